"""MobileNetV2 backbones (Sandler et al., 2018) for both StructVPR branches.

- `MobileNetV2`: the RGB branch backbone (width multiplier, any input
  channel count, output stride 32, BatchNorm, ReLU6), optionally with the
  ImageNet classification head (used to check pretrained weights).
- `light_mobilenet`: the lighter seg-branch variant (fewer, narrower blocks,
  expansion 4) for SLME-encoded label maps; the paper uses "a lighter
  MobileNet" without giving its table, so this table is **ours**.

How the layers are computed (the 3x3 depthwise convolution as XLA's shifted
multiply-adds, a grouped convolution or native C++ kernels; 1x1 convolutions
as matmuls; frozen BatchNorm folded; whole blocks as one native pass) is
`models/ops/`, and which of those runs is decided in one place,
`ops/dispatch.py` (`model.depthwise`: "auto" | "native" | "shifted" |
"grouped"). Padding is TF/XLA "SAME" everywhere (so TFLite weights load
unchanged).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from structvpr_jax.models.ops import conv as conv_ops
from structvpr_jax.models.ops import depthwise as depthwise_ops
from structvpr_jax.models.ops import dispatch, fused
from structvpr_jax.models.ops import pointwise as pointwise_ops

# (expansion t, output channels c, repeats n, first stride s) per stage.
MOBILENET_V2_BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# The light seg-branch table (ours): same output stride 32, ~1/4 the FLOPs.
LIGHT_MOBILENET_BLOCKS = (
    (1, 16, 1, 1),
    (4, 24, 1, 2),
    (4, 32, 2, 2),
    (4, 64, 2, 2),
    (4, 96, 1, 1),
    (4, 160, 1, 2),
)


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
  """Channel rounding used by MobileNetV2 (TF/torchvision `_make_divisible`)."""
  min_value = divisor if min_value is None else min_value
  new = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if new < 0.9 * value:  # never round down by more than 10%
    new += divisor
  return new


class DepthwiseConv3x3(nn.Module):
  """3x3 depthwise convolution, 'SAME' padding; param `kernel` [3, 3, C].

  `impl` ("auto" | "native" | "shifted" | "grouped", `dispatch.resolve_depthwise`)
  chooses the kernel; the parameters and the results are the same for all.
  """
  stride: int = 1
  impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.normal(stddev=math.sqrt(2.0 / 9.0))

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1]), self.param_dtype)
    conv = depthwise_ops.DEPTHWISE_CONV[dispatch.resolve_depthwise(self.impl)]
    return conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride)


_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


NORMS = ("batch", "group")


def group_count(channels: int, max_groups: int = 8) -> int:
  """GroupNorm groups: the largest of max_groups, max_groups/2, ..., 1 dividing `channels`."""
  g = max_groups
  while channels % g:
    g //= 2
  return g


class _Kernel(nn.Module):
  """A convolution's weight alone, under the same name and with the same
  initialiser as the layer it stands for (param "kernel")."""
  shape: tuple
  init: Callable
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self):
    return self.param("kernel", self.init, self.shape, self.param_dtype)


class _FrozenBN(nn.Module):
  """nn.BatchNorm's variables (params scale, bias; batch_stats mean, var; same
  names and initial values) returned as its frozen affine map (mul, add):
  BN(y) = y * mul + add with mul = scale / sqrt(var + eps), add = bias - mean * mul."""
  epsilon: float = 1e-3
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: int):
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    mul = scale * lax.rsqrt(var.value + self.epsilon)
    return mul, bias - mean.value * mul


class ConvBN(nn.Module):
  """(1x1 matmul | 3x3 depthwise | kxk conv) -> BatchNorm or GroupNorm -> optional ReLU6.

  `norm="group"` (GroupNorm, 8 groups where the channels allow) normalises
  each image by itself: no running statistics, the same in training and
  evaluation; for branches trained from scratch (the seg teacher).
  """
  features: int
  kind: str = "pointwise"  # "pointwise", "depthwise" or "full"
  stride: int = 1
  kernel_size: int = 3
  activation: bool = True
  norm: str = "batch"
  depthwise: str = "auto"
  fold_bn: bool = False
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, *, defer_bias: bool = False,
               prologue_bias: Optional[jax.Array] = None,
               weights_for: Optional[int] = None):
    """`defer_bias` (folded pointwise only): return (x @ kernel, bias)
    without adding the bias or the activation, for the next depthwise layer
    to apply as its `prologue_bias` (folded native depthwise only): its
    input is then relu6(x + prologue_bias). `weights_for=C_in` (folded
    only; x unused): return the folded (kernel, bias) for C_in input
    channels instead of applying them (`InvertedResidual`'s fused block)."""
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if weights_for is not None:
      if not (self.fold_bn and self.norm == "batch" and not train):
        raise ValueError("weights_for needs folded frozen BatchNorm")
      return self._folded_weights(weights_for)
    if self.fold_bn and self.norm == "batch" and not train:
      return self._folded(x, defer_bias, prologue_bias)
    if defer_bias or prologue_bias is not None:
      raise ValueError("defer_bias / prologue_bias need folded frozen BatchNorm")
    if self.kind == "pointwise":
      kernel = _Kernel((x.shape[-1], self.features), _conv_init, self.param_dtype,
                       name="conv")()
      x = pointwise_ops.pointwise(x.astype(self.dtype), kernel.astype(self.dtype))
    elif self.kind == "depthwise":
      x = DepthwiseConv3x3(stride=self.stride, impl=self.depthwise, name="conv", **dtypes)(x)
    elif self.kind == "full":
      x = nn.Conv(self.features, (self.kernel_size, self.kernel_size),
                  strides=(self.stride, self.stride), padding="SAME", use_bias=False,
                  kernel_init=_conv_init, name="conv", **dtypes)(x)
    else:
      raise ValueError(f"unknown conv kind {self.kind!r}")
    if self.norm == "batch":
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3,
                       axis_name=self.bn_axis_name, name="bn", **dtypes)(x)
    elif self.norm == "group":
      x = nn.GroupNorm(num_groups=group_count(x.shape[-1]), epsilon=1e-3, name="gn",
                       **dtypes)(x)
    else:
      raise ValueError(f"unknown norm {self.norm!r}; expected one of {NORMS}")
    return pointwise_ops.relu6(x) if self.activation else x

  def _folded(self, x, defer_bias: bool = False, prologue_bias: Optional[jax.Array] = None):
    """Frozen BatchNorm folded into the convolution (then the activation):
    one pass over the activations instead of two, forward and backward; the
    parameters are the unfolded layer's (same tree), and scale / bias still
    get gradients through the folded weights. With the native depthwise
    kernel the bias and relu6 run in the convolution's own pass."""
    kernel, add = self._folded_weights(x.shape[-1])
    x = x.astype(self.dtype)
    if (defer_bias and (self.kind != "pointwise" or not self.activation)) or (
        prologue_bias is not None and self.kind != "depthwise"):
      raise ValueError(f"{self.kind} layer: defer_bias is for pointwise layers with an "
                       "activation, prologue_bias for depthwise ones")
    if self.kind == "pointwise":
      y = pointwise_ops.pointwise(x, kernel)
      if defer_bias:
        return y, add.astype(y.dtype)
    elif self.kind == "depthwise":
      impl = dispatch.resolve_depthwise(self.depthwise)
      if impl == "native":     # the biases and activations in the same pass
        return depthwise_ops.native_depthwise_bias_relu6(
            x, kernel, add.astype(self.dtype), self.stride, self.activation, prologue_bias)
      if prologue_bias is not None:
        x = pointwise_ops.relu6(x + prologue_bias.astype(x.dtype))
      y = depthwise_ops.DEPTHWISE_CONV[impl](x, kernel, self.stride)
    elif self.kernel_size == 3 and dispatch.resolve_depthwise(self.depthwise) == "native":
      return conv_ops.native_conv3x3_bias_relu6(x, kernel, add.astype(self.dtype), self.stride,
                                       self.activation)
    else:
      y = conv_ops.full_conv(x, kernel, self.stride)
    y = y + add.astype(y.dtype)
    return pointwise_ops.relu6(y) if self.activation else y

  def _folded_weights(self, c_in: int):
    """(kernel * mul, add): the layer's weights with its frozen BatchNorm
    folded in, for `c_in` input channels (kernel in the compute dtype)."""
    out = c_in if self.kind == "depthwise" else self.features
    if self.kind == "pointwise":
      shape, init = (c_in, out), _conv_init
    elif self.kind == "depthwise":
      shape, init = (3, 3, c_in), DepthwiseConv3x3.kernel_init
    elif self.kind == "full":
      shape, init = (self.kernel_size, self.kernel_size, c_in, out), _conv_init
    else:
      raise ValueError(f"unknown conv kind {self.kind!r}")
    kernel = _Kernel(shape, init, self.param_dtype, name="conv")()
    mul, add = _FrozenBN(epsilon=1e-3, param_dtype=self.param_dtype, name="bn")(out)
    return (kernel * mul).astype(self.dtype), add


class InvertedResidual(nn.Module):
  """MobileNetV2 block: expand 1x1 -> depthwise 3x3 -> linear project 1x1."""
  features: int
  expansion: int
  stride: int
  norm: str = "batch"
  depthwise: str = "auto"
  fold_bn: bool = False
  fused_blocks: bool = True
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.nowrap
  def fuses(self, train: bool) -> bool:
    """Whether the block runs as one native pass (`dispatch.blocks_fuse`)."""
    return dispatch.blocks_fuse(self.fold_bn, self.norm, self.depthwise, self.fused_blocks,
                                self.dtype, self.param_dtype, train)

  @nn.compact
  def __call__(self, x, train: bool, *, weights_for: Optional[int] = None):
    """`weights_for=C_in` (only where `fuses(train)`; x unused): return
    (weights, residual), the arguments `fused.fused_inverted_residual` takes
    after x, instead of applying the block."""
    in_features = x.shape[-1] if weights_for is None else weights_for
    common = dict(norm=self.norm, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                  param_dtype=self.param_dtype, fold_bn=self.fold_bn)
    if weights_for is not None and not self.fuses(train):
      raise ValueError("weights_for needs a fused block (InvertedResidual.fuses)")
    if self.fuses(train):
      # The whole block as one native pass where nothing differentiates it
      # (evaluation); gradients take the layers below (`fused.fused_inverted_residual`).
      ce = in_features * self.expansion
      expand = (ConvBN(ce, "pointwise", name="expand", **common)(None, train, weights_for=in_features)
                if self.expansion != 1 else None)
      depthwise = ConvBN(ce, "depthwise", stride=self.stride, depthwise=self.depthwise,
                         name="depthwise", **common)(None, train, weights_for=ce)
      project = ConvBN(self.features, "pointwise", activation=False, name="project",
                       **common)(None, train, weights_for=ce)
      weights = (expand, depthwise, project)
      residual = self.stride == 1 and in_features == self.features
      if weights_for is not None:
        return weights, residual
      return fused.fused_inverted_residual(x.astype(self.dtype), weights, self.stride, residual)
    y, prologue_bias = x, None
    # Frozen BN folded and the native depthwise kernel: the expand layer's
    # bias and relu6 run inside the depthwise kernel (forward and backward)
    # instead of as passes over the block's largest tensor.
    fuse = dispatch.folded_native(self.fold_bn, self.norm, self.depthwise, train)
    if self.expansion != 1:
      expand = ConvBN(in_features * self.expansion, "pointwise", name="expand", **common)
      if fuse:
        y, prologue_bias = expand(y, train, defer_bias=True)
      else:
        y = expand(y, train)
    y = ConvBN(y.shape[-1], "depthwise", stride=self.stride, depthwise=self.depthwise,
               name="depthwise", **common)(y, train, prologue_bias=prologue_bias)
    y = ConvBN(self.features, "pointwise", activation=False, name="project", **common)(y, train)
    if self.stride == 1 and in_features == self.features:
      y = y + x
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 feature extractor, output stride 32.

  Attributes:
    width: width multiplier (channels rounded to multiples of 8).
    blocks: stage table of (expansion, channels, repeats, stride).
    last_features: channels of the final 1x1 conv before width scaling
      (1280 for MobileNetV2; scaled only when width > 1, as in the paper);
      None or 0 skips the final conv.
    num_classes: when set, global average pooling + Dense head (logits).
    last_activation: ReLU6 after the final conv's BatchNorm. Feature
      extractors for NetVLAD turn it off (as NetVLAD uses VGG conv5 before its
      ReLU): zero-centred local features, whose directions differ between
      images; after a ReLU6 all features share the positive orthant and a
      common offset, the L2-normalised descriptors nearly coincide and
      NetVLAD's intra-normalised residuals are mostly noise.
    norm: "batch" (BatchNorm; the pretrained ImageNet file's) or "group"
      (GroupNorm: no running statistics, for training from scratch).
    output_stride: 32, or 16 / 8: the last stride-2 blocks run at stride 1
      (a 2x / 4x finer local feature map, e.g. 6x8 instead of 3x4 at
      96x128, for NetVLAD on a small input).
    depthwise: the 3x3 depthwise kernel, "auto" | "native" | "shifted" |
      "grouped" (`dispatch.resolve_depthwise`; equal results up to float rounding).
    fold_bn: with BatchNorm in its frozen form (train=False: evaluation, and
      training with `train.batchnorm="frozen"`), fold it into the preceding
      convolution (`ConvBN._folded`; equal up to float rounding, same
      parameters; `model.fold_bn`).
    fused_blocks: with `fold_bn` and the native kernels, evaluate each
      inverted-residual block as one native pass (`fused.fused_inverted_residual`:
      training and gradients are unaffected; equal up to float rounding;
      `model.fused_blocks`). False runs the separate layers.
    remat: recompute each block's activations in the backward pass instead of
      keeping them (`nn.remat`; `train.remat`): training memory falls to
      about the block inputs, for roughly one more forward pass of compute.
      Same parameters and values.
    trainable_from: index of the first block gradients reach (0: all); the
      stem and blocks before it get none (`lax.stop_gradient` on their
      output), so their backward pass is not computed at all (the usual VPR
      fine-tuning of the last blocks only; `train.trainable_from`).
    bn_axis_name: mesh axis for synchronised BatchNorm statistics (set when
      the model runs inside `shard_map`, e.g. "data").
    dtype: compute dtype.
    param_dtype: parameter dtype (float32; float64 in exactness tests).

  Call: `(x [B, H, W, C_in], train: bool)` -> `[B, ceil(H/32), ceil(W/32),
  C_out]` (or `[B, num_classes]` logits with a head).
  """
  width: float = 1.0
  blocks: Sequence[tuple[int, int, int, int]] = MOBILENET_V2_BLOCKS
  stem_features: int = 32
  last_features: Optional[int] = 1280
  num_classes: Optional[int] = None
  last_activation: bool = True
  norm: str = "batch"
  output_stride: int = 32
  depthwise: str = "auto"
  trainable_from: int = 0
  fold_bn: bool = False
  fused_blocks: bool = True
  remat: bool = False
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.nowrap
  def fuses_blocks(self, train: bool) -> bool:
    """Whether the stem and the blocks run as native passes (the stem's
    native 3x3 convolution, `InvertedResidual.fuses`) and no remat wraps
    them, so that `__call__`'s `micro_batch` applies."""
    return not self.remat and dispatch.blocks_fuse(self.fold_bn, self.norm, self.depthwise,
                                                   self.fused_blocks, self.dtype,
                                                   self.param_dtype, train)

  def _half_resolution_in_chunks(self, x, stem, table, blocks, micro_batch: int):
    """(features after the blocks reading the stem's output, index of the
    first block not run): the stem and those blocks with their folded
    weights, `micro_batch` images at a time."""
    stem_kernel, stem_bias = stem(None, False, weights_for=x.shape[-1])
    early, in_features = [], stem_kernel.shape[-1]
    for (index, expansion, channels, s, input_stride), block in zip(table, blocks):
      if input_stride != 2:
        break
      early.append((index, s) + block(None, False, weights_for=in_features))
      in_features = channels

    def chunk(xc):
      y = conv_ops.native_conv3x3_bias_relu6(xc, stem_kernel, stem_bias.astype(self.dtype), 2,
                                             True)
      for index, s, weights, residual in early:
        if index == self.trainable_from and index > 0:
          y = lax.stop_gradient(y)               # as in `__call__`
        y = fused.fused_inverted_residual(y, weights, s, residual)
      return y

    n = x.shape[0]
    y = lax.map(chunk, x.reshape((n // micro_batch, micro_batch) + x.shape[1:]))
    return y.reshape((n,) + y.shape[2:]), len(early)

  @property
  def output_features(self) -> int:
    if self.last_features:
      return make_divisible(self.last_features * max(1.0, self.width))
    return make_divisible(self.blocks[-1][1] * self.width)

  def _block_table(self):
    """[(index, expansion, channels, stride, input stride)] of the blocks."""
    table, index, total_stride = [], 0, 2
    for expansion, channels, repeats, stride in self.blocks:
      for r in range(repeats):
        s = stride if r == 0 else 1
        if s == 2 and total_stride >= self.output_stride:
          s = 1                                   # keep the finer feature map
        table.append((index, expansion, make_divisible(channels * self.width), s,
                      total_stride))
        total_stride *= s
        index += 1
    return table

  @nn.compact
  def __call__(self, x, train: bool = False, micro_batch: int = 0):
    """`micro_batch` > 0 (evaluation with fused blocks, `fuses_blocks`):
    the half-resolution layers (the stem and the blocks reading its
    output) run `micro_batch` images at a time (`lax.map`; it must divide
    the batch), the rest on the whole batch: chunks keep the largest
    activations cache-sized, the whole batch keeps the small late layers
    busy. Values equal the unchunked call's bitwise (the same kernels on
    the same rows)."""
    common = dict(norm=self.norm, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                  param_dtype=self.param_dtype, fold_bn=self.fold_bn)
    x = jnp.asarray(x, self.dtype)
    if self.output_stride not in (8, 16, 32):
      raise ValueError(f"output_stride={self.output_stride}; expected 8, 16 or 32")
    stem = ConvBN(make_divisible(self.stem_features * self.width), "full", stride=2,
                  depthwise=self.depthwise, name="stem", **common)
    table = self._block_table()
    # `train` (argument 2, counting the module) is a Python bool: static.
    block_class = nn.remat(InvertedResidual, static_argnums=(2,)) if self.remat else InvertedResidual
    blocks = [block_class(channels, expansion, s, depthwise=self.depthwise,
                          fused_blocks=self.fused_blocks, name=f"block{index}", **common)
              for index, expansion, channels, s, _ in table]
    start = 0
    if micro_batch and micro_batch < x.shape[0]:
      if not self.fuses_blocks(train):
        raise ValueError("micro_batch needs fused blocks (MobileNetV2.fuses_blocks)")
      if x.shape[0] % micro_batch:
        raise ValueError(f"micro_batch={micro_batch} must divide the batch ({x.shape[0]})")
      x, start = self._half_resolution_in_chunks(x, stem, table, blocks, micro_batch)
    else:
      x = stem(x, train)
    for (index, *_), block in zip(table[start:], blocks[start:]):
      if index == self.trainable_from and index > 0:
        x = lax.stop_gradient(x)                 # nothing below this block trains
      x = block(x, train)
    index = len(table)
    if self.trainable_from and self.trainable_from >= index:
      x = lax.stop_gradient(x)                   # every block frozen: the head trains
    if self.last_features:
      x = ConvBN(self.output_features, "pointwise", activation=self.last_activation,
                 name="last", **common)(x, train)
    if self.num_classes:
      x = jnp.mean(x, axis=(1, 2))
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="head")(x)
    return x


def mobilenet_v2(width: float = 1.0, **kwargs) -> MobileNetV2:
  """The RGB-branch backbone: standard MobileNetV2 (1280 final channels)."""
  return MobileNetV2(width=width, **kwargs)


def light_mobilenet(width: float = 1.0, **kwargs) -> MobileNetV2:
  """The seg-branch backbone (ours): 8 blocks, expansion 4, 512 final channels."""
  kwargs.setdefault("blocks", LIGHT_MOBILENET_BLOCKS)
  kwargs.setdefault("last_features", 512)
  kwargs.setdefault("stem_features", 16)
  return MobileNetV2(width=width, **kwargs)


BACKBONES = {"mobilenet_v2": mobilenet_v2, "mobilenet_light": light_mobilenet}


def get_backbone(name: str, **kwargs) -> MobileNetV2:
  """Backbone factory by name (`BACKBONES` keys)."""
  if name not in BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
  return BACKBONES[name](**kwargs)

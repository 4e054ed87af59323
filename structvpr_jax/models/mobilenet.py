"""MobileNetV2 backbones (Sandler et al., 2018) for both StructVPR branches.

- `MobileNetV2`: the RGB branch backbone (width multiplier, any input
  channel count, output stride 32, BatchNorm, ReLU6), optionally with the
  ImageNet classification head (used to check pretrained weights).
- `light_mobilenet`: the lighter seg-branch variant (fewer, narrower blocks,
  expansion 4) for SLME-encoded label maps; the paper uses "a lighter
  MobileNet" without giving its table, so this table is **ours**.

The 3x3 depthwise convolution has three equal implementations (`DEPTHWISE`):
"native", a C++ kernel and its gradients called through XLA FFI
(`native_depthwise_conv3x3`, `models/native/`; float32, built on first
use); "shifted", 9 shifted multiply-adds in XLA (`depthwise_conv3x3`),
because on XLA:CPU the grouped conv was measured ~25x slower and
single-threaded; and "grouped", `lax.conv_general_dilated(...,
feature_group_count=C)` (`grouped_depthwise_conv3x3`), the native kernel of
cuDNN and the TPU. "auto" (the default) picks native on the CPU when it
builds (else shifted) and grouped elsewhere. 1x1 convolutions are plain matmuls on the channel axis
(`pointwise`). Padding is TF/XLA "SAME" everywhere (so TFLite weights
load unchanged).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from structvpr_jax.models import native

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


def _same_padding(size: int, stride: int, kernel: int = 3) -> tuple[int, int, int]:
  """(output size, pad before, pad after) of XLA/TF 'SAME' padding."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return out, total // 2, total - total // 2


def _shifted_multiply_adds(padded: jax.Array, kernel: jax.Array, stride: int,
                           start: Callable[[int, int], tuple[int, int]],
                           out_hw: tuple[int, int], order) -> jax.Array:
  """sum over (i, j) in `order` of slice(padded, start(i, j), out_hw, stride) * kernel[i, j],
  accumulated left to right (the order fixes the float rounding)."""
  b, _, _, c = padded.shape
  ho, wo = out_hw
  out = None
  for i, j in order:
    r, q = start(i, j)
    patch = lax.slice(padded, (0, r, q, 0),
                      (b, r + (ho - 1) * stride + 1, q + (wo - 1) * stride + 1, c),
                      (1, stride, stride, 1))
    term = patch * kernel[i, j]
    out = term if out is None else out + term
  return out


_TAPS = tuple((i, j) for i in range(3) for j in range(3))
# Output pixels from which the depthwise kernel gradient runs as one pass
# (`_depthwise_shifted_bwd`); below it, 9 reductions are faster on XLA:CPU.
_ONE_PASS_KERNEL_GRADIENT_PIXELS = 1024


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_shifted(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  return _depthwise_shifted_fwd(x, kernel, stride)[0]


def _depthwise_shifted_fwd(x, kernel, stride):
  _, h, w, _ = x.shape
  ho, top, bottom = _same_padding(h, stride)
  wo, left, right = _same_padding(w, stride)
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  y = _shifted_multiply_adds(xp, kernel, stride, lambda i, j: (i, j), (ho, wo), _TAPS)
  # Residuals: the padded input once (plain autodiff keeps the 9 shifted
  # patches, 9 copies of the input, for the kernel gradient).
  return y, (xp, kernel, (h, w))


def _depthwise_shifted_bwd(stride, residuals, g):
  """The VJP written as the forward's shifted multiply-adds.

  dx: the transposed strided slices (pads with interior stride - 1) of the
  9 terms, written as 9 slices of one dilated, padded gradient, summed in
  the order plain autodiff accumulates them (taps in reverse), so dx is the
  same as autodiff's. dk[i, j] = sum over (b, h, w) of patch_ij * g, as
  autodiff. What changes is the fusion: XLA:CPU fused autodiff's 9 padded
  terms, with their bounds checks, into the consumer's elementwise chain
  (8x slower than this form in the profiled train step), and the forward no
  longer materialises 9 patches.
  """
  xp, kernel, (h, w) = residuals
  ho, wo = g.shape[1], g.shape[2]
  top = _same_padding(h, stride)[1]
  left = _same_padding(w, stride)[1]
  products = [lax.slice(xp, (0, i, j, 0),
                        (xp.shape[0], i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1,
                         xp.shape[3]), (1, stride, stride, 1)) * g for i, j in _TAPS]
  if ho * wo >= _ONE_PASS_KERNEL_GRADIENT_PIXELS:
    # One pass for all 9 taps: a variadic reduce over (batch, rows) whose
    # operands XLA fuses (no shifted copies of x), then the columns.
    zero = jnp.zeros((), g.dtype)
    partial = lax.reduce(tuple(products), (zero,) * 9,
                         lambda a, b: tuple(u + v for u, v in zip(a, b)), (0, 1))
    dk = jnp.stack(partial).sum(axis=1).reshape(3, 3, -1)
  else:
    dk = jnp.stack([jnp.sum(p, axis=(0, 1, 2)) for p in products]).reshape(3, 3, -1)
  # gd[m] = g[(m - 2) / stride] where that is an integer in range, else 0;
  # dx[p] = sum_ij gd[p + top + 2 - i] * k[i, j] (rows; the same in columns).
  zero = jnp.zeros((), g.dtype)
  hi_h = top + h - 1 - (ho - 1) * stride
  hi_w = left + w - 1 - (wo - 1) * stride
  gd = lax.pad(g, zero, ((0, 0, 0), (2, hi_h, stride - 1), (2, hi_w, stride - 1), (0, 0, 0)))
  dx = _shifted_multiply_adds(gd, kernel, 1, lambda i, j: (top + 2 - i, left + 2 - j), (h, w),
                              _TAPS[::-1])
  return dx.astype(xp.dtype), dk.astype(kernel.dtype)


_depthwise_shifted.defvjp(_depthwise_shifted_fwd, _depthwise_shifted_bwd)


def depthwise_conv3x3(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """3x3 depthwise convolution with 'SAME' padding as 9 shifted multiply-adds.

  Equal (values and gradients) to `lax.conv_general_dilated(x, kernel[:, :,
  None, :], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO",
  "NHWC"), feature_group_count=C)`. The gradient is a custom VJP
  (`_depthwise_shifted_bwd`) with the same values as autodiff of the
  forward, in a form XLA:CPU runs faster.

  Args:
    x: [B, H, W, C].
    kernel: [3, 3, C].
    stride: 1 or 2 (strided slices for 2).

  Returns:
    [B, ceil(H/stride), ceil(W/stride), C], dtype of `x * kernel`.
  """
  c = x.shape[-1]
  if kernel.shape != (3, 3, c):
    raise ValueError(f"kernel shape {kernel.shape} != (3, 3, {c})")
  dtype = jnp.result_type(x, kernel)
  # inside shard_map a replicated kernel is cast to per-device before the
  # custom VJP, whose kernel gradient is per-device (its transpose sums it)
  x, kernel = native.match_varying(x.astype(dtype), kernel.astype(dtype))
  return _depthwise_shifted(x, kernel, int(stride))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _depthwise_native(x: jax.Array, kernel: jax.Array, bias: jax.Array, pbias: jax.Array,
                      stride: int, activation: bool, prologue: bool) -> jax.Array:
  return native.depthwise_forward(x, kernel, bias, stride, activation,
                                  pbias if prologue else None)


def _depthwise_native_fwd(x, kernel, bias, pbias, stride, activation, prologue):
  z = native.depthwise_forward(x, kernel, bias, stride, activation, pbias if prologue else None)
  # z is the next layer's input anyway; the activation's mask is read off it.
  return z, (x, kernel, pbias, z if activation else None)


def _depthwise_native_bwd(stride, activation, prologue, residuals, dz):
  x, kernel, pbias, z = residuals
  dx, dkernel, dbias, dpbias = native.depthwise_backward(
      x, kernel, z if activation else dz, dz, stride, activation, pbias if prologue else None)
  return dx, dkernel, dbias, dpbias


_depthwise_native.defvjp(_depthwise_native_fwd, _depthwise_native_bwd)


def _native_applies(dtype, stride) -> bool:
  """The native kernels take float32 and stride 1 or 2, once built."""
  return dtype == jnp.float32 and int(stride) in (1, 2) and native.load()


def native_depthwise_conv3x3(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """The same 3x3 depthwise convolution by the C++ kernels of
  `models/native/depthwise.cc` (XLA FFI custom calls, CPU only): one pass
  over each output row's channels in registers for the forward, one for
  the input gradient and one for the kernel gradient, split over XLA's
  intra-op threads (the kernel gradient in a fixed chunk order, so it is
  the same bit for bit on every run).

  float32 only: other dtypes (float64 in the exactness tests, bfloat16)
  take `depthwise_conv3x3`, as everything does when the library cannot be
  built (`native.load()`). Values and gradients equal `depthwise_conv3x3`'s up
  to float32 rounding (the sums are in a different order).

  Args / Returns: as `depthwise_conv3x3`.
  """
  c = x.shape[-1]
  if kernel.shape != (3, 3, c):
    raise ValueError(f"kernel shape {kernel.shape} != (3, 3, {c})")
  dtype = jnp.result_type(x, kernel)
  if not _native_applies(dtype, stride):
    return depthwise_conv3x3(x, kernel, stride)
  x, kernel, bias = native.match_varying(x.astype(dtype), kernel.astype(dtype),
                                         jnp.zeros((c,), dtype))
  return _depthwise_native(x, kernel, bias, bias, int(stride), False, False)


def native_depthwise_bias_relu6(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                                stride: int = 1, activation: bool = True,
                                prologue_bias: Optional[jax.Array] = None) -> jax.Array:
  """relu6(depthwise_conv3x3(in(x), kernel, stride) + bias) (without relu6
  when `activation` is False) as one native pass: MobileNetV2's depthwise
  layer with frozen BatchNorm folded in (`ConvBN._folded`). Saves a read and
  a write of the output forward and of its gradient backward; the gradient
  of relu6 is `relu6`'s (1 where 0 < z < 6, else 0), read off the output z.

  in(x) = x, or with `prologue_bias` [C] given, relu6(x + prologue_bias):
  x is then the expand 1x1's pre-activation and that layer's bias and
  activation run inside this kernel, forward and backward, instead of as
  passes of their own over the block's largest tensor.

  Args:
    x: [B, H, W, C]; kernel: [3, 3, C]; bias: [C]; prologue_bias: [C] or None.

  Returns:
    [B, ceil(H/stride), ceil(W/stride), C]. Non-float32 dtypes take the XLA
    ops (`depthwise_conv3x3`, then the bias and `relu6`).
  """
  c = x.shape[-1]
  if kernel.shape != (3, 3, c) or bias.shape != (c,):
    raise ValueError(f"kernel {kernel.shape} / bias {bias.shape} != (3, 3, {c}) / ({c},)")
  if prologue_bias is not None and prologue_bias.shape != (c,):
    raise ValueError(f"prologue_bias {prologue_bias.shape} != ({c},)")
  dtype = jnp.result_type(x, kernel, bias)
  if not _native_applies(dtype, stride):
    if prologue_bias is not None:
      x = relu6(x + prologue_bias.astype(x.dtype))
    y = depthwise_conv3x3(x, kernel, stride) + bias.astype(dtype)
    return relu6(y) if activation else y
  prologue = prologue_bias is not None
  x, kernel, bias, pbias = native.match_varying(
      x.astype(dtype), kernel.astype(dtype), bias.astype(dtype),
      (prologue_bias if prologue else bias).astype(dtype))
  return _depthwise_native(x, kernel, bias, pbias, int(stride), bool(activation), prologue)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv3x3_native(x, kernel, bias, stride: int, activation: bool):
  return native.conv3x3_forward(x, kernel, bias, stride, activation)


def _conv3x3_native_fwd(x, kernel, bias, stride, activation):
  z = native.conv3x3_forward(x, kernel, bias, stride, activation)
  return z, (x, kernel, z)


def _conv3x3_native_bwd(stride, activation, residuals, dz):
  x, kernel, z = residuals
  dkernel, dbias = native.conv3x3_kernel_gradient(x, z, dz, stride, activation)
  # The input gradient (of the image, for the stem) is XLA's transposed
  # convolution; XLA drops it when nothing uses it, as in training.
  cot = jnp.where((z > 0) & (z < 6), dz, jnp.zeros_like(dz)) if activation else dz
  _, conv_vjp = jax.vjp(lambda a: _full_conv(a, kernel, stride), x)
  return conv_vjp(cot)[0], dkernel, dbias


_conv3x3_native.defvjp(_conv3x3_native_fwd, _conv3x3_native_bwd)


def _full_conv(x, kernel, stride):
  return lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def native_conv3x3_bias_relu6(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                              stride: int = 1, activation: bool = True) -> jax.Array:
  """relu6(conv(x, kernel) + bias) for a full 3x3 'SAME' convolution (the
  stem: few input channels) by the native kernels, without relu6 when
  `activation` is False. XLA:CPU ran the stem at ~25 GFLOP/s; the native
  forward keeps each output pixel's channels in registers, and its kernel
  gradient keeps all 27 kernel rows of 16 output channels in registers (RGB
  input). The input gradient is XLA's transposed convolution.

  Args:
    x: [B, H, W, Cin]; kernel: [3, 3, Cin, Cout] (HWIO); bias: [Cout].

  Returns:
    [B, ceil(H/stride), ceil(W/stride), Cout]. Non-float32 dtypes, or no
    native library, take XLA's convolution (then the bias and `relu6`).
  """
  if kernel.shape[:3] != (3, 3, x.shape[-1]) or bias.shape != kernel.shape[-1:]:
    raise ValueError(f"kernel {kernel.shape} / bias {bias.shape} do not fit x {x.shape}")
  dtype = jnp.result_type(x, kernel, bias)
  if not _native_applies(dtype, stride):
    y = _full_conv(x, kernel.astype(dtype), int(stride)) + bias.astype(dtype)
    return relu6(y) if activation else y
  x, kernel, bias = native.match_varying(x.astype(dtype), kernel.astype(dtype),
                                         bias.astype(dtype))
  return _conv3x3_native(x, kernel, bias, int(stride), bool(activation))


def grouped_depthwise_conv3x3(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """The same 3x3 depthwise convolution as one grouped convolution
  (`feature_group_count=C`): the native kernel on GPUs and TPUs.

  Args / Returns: as `depthwise_conv3x3`.
  """
  c = x.shape[-1]
  if kernel.shape != (3, 3, c):
    raise ValueError(f"kernel shape {kernel.shape} != (3, 3, {c})")
  return lax.conv_general_dilated(x, kernel[:, :, None, :], (stride, stride), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=c)


@jax.custom_jvp
def relu6(x: jax.Array) -> jax.Array:
  """min(max(x, 0), 6), elementwise, with the derivative 1 where 0 < x < 6 and
  0 elsewhere (PyTorch's ReLU6/hardtanh). `jnp.clip`'s own derivative splits
  exact ties in halves through a chain of compares, selects and divides that
  XLA:CPU evaluates in every backward pass; the two differ only where x is
  exactly 0 or 6."""
  return jnp.clip(x, 0.0, 6.0)


@relu6.defjvp
def _relu6_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return relu6(x), jnp.where((x > 0) & (x < 6), t, jnp.zeros_like(t))


@jax.custom_vjp
def pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """1x1 convolution as a matmul on the channel axis: `x @ kernel`.

  Args:
    x: [..., C_in].
    kernel: [C_in, C_out].

  Returns:
    [..., C_out].

  The same values and gradients as autodiff of `x @ kernel`; the custom VJP
  only pins how XLA:CPU computes the kernel gradient `x^T g` (the
  activations' rows are the contraction): with the operands behind an
  optimisation barrier it keeps them in their row-major layout, where plain
  autodiff let layout assignment transpose the largest activation into a
  copy and run the contraction on it 10x slower (block 1's expand in the
  train step at 224: 22.8 ms + an 11 ms copy vs 2.1 ms, jax.profiler).
  """
  return x @ kernel


def _pointwise_fwd(x, kernel):
  return x @ kernel, (x, kernel)


def _pointwise_bwd(residuals, g):
  x, kernel = residuals
  c_in, c_out = kernel.shape
  rows_x, rows_g = lax.optimization_barrier((x.reshape(-1, c_in), g.reshape(-1, c_out)))
  return (g @ kernel.T).astype(x.dtype), (rows_x.T @ rows_g).astype(kernel.dtype)


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


DEPTHWISE = ("auto", "native", "shifted", "grouped")
_DEPTHWISE_CONV = {"native": native_depthwise_conv3x3, "shifted": depthwise_conv3x3,
                   "grouped": grouped_depthwise_conv3x3}


def resolve_depthwise(kind: str, backend: Optional[str] = None) -> str:
  """"native", "shifted" or "grouped" for `kind` ("auto": native on the CPU
  backend when its library builds, else shifted; grouped on GPU/TPU;
  `backend` defaults to `jax.default_backend()`). An explicit "native" that
  cannot be built or runs off the CPU is an error naming the reason."""
  if kind not in DEPTHWISE:
    raise ValueError(f"depthwise={kind!r}; expected one of {DEPTHWISE}")
  on_cpu = (backend or jax.default_backend()) == "cpu"
  if kind == "native":
    if not on_cpu:
      raise ValueError("model.depthwise='native' runs on the CPU backend only")
    if not native.load():
      raise ValueError(f"model.depthwise='native' is unavailable: {native.status()['reason']}")
    return kind
  if kind != "auto":
    return kind
  if not on_cpu:
    return "grouped"
  return "native" if native.load() else "shifted"


class DepthwiseConv3x3(nn.Module):
  """3x3 depthwise convolution, 'SAME' padding; param `kernel` [3, 3, C].

  `impl` ("auto" | "native" | "shifted" | "grouped", `resolve_depthwise`)
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
    conv = _DEPTHWISE_CONV[resolve_depthwise(self.impl)]
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
      x = pointwise(x.astype(self.dtype), kernel.astype(self.dtype))
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
    return relu6(x) if self.activation else x

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
      y = pointwise(x, kernel)
      if defer_bias:
        return y, add.astype(y.dtype)
    elif self.kind == "depthwise":
      impl = resolve_depthwise(self.depthwise)
      if impl == "native":     # the biases and activations in the same pass
        return native_depthwise_bias_relu6(x, kernel, add.astype(self.dtype), self.stride,
                                           self.activation, prologue_bias)
      if prologue_bias is not None:
        x = relu6(x + prologue_bias.astype(x.dtype))
      y = _DEPTHWISE_CONV[impl](x, kernel, self.stride)
    elif self.kernel_size == 3 and resolve_depthwise(self.depthwise) == "native":
      return native_conv3x3_bias_relu6(x, kernel, add.astype(self.dtype), self.stride,
                                       self.activation)
    else:
      y = _full_conv(x, kernel, self.stride)
    y = y + add.astype(y.dtype)
    return relu6(y) if self.activation else y

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


# Block inputs at least this many pixels wide differentiate the expand 1x1
# and the depthwise layer as one native backward pass
# (`_expand_depthwise_native`); narrower ones take the layers' own. The
# pass works row by row: in the frozen train step at 224 (in-process A/B,
# alternating calls, 30 pairs each) the step took 0.96-0.97x the time with
# it on rows of 112 and 56 pixels (blocks 1-3), 0.94-0.96x down to 28
# (blocks 1-6), 1.00x down to 14 and 1.04x down to 7 (a Zen 4 host; on a
# Zen 5, down to 28: 0.99x, interval 0.98-1.00, 2026-12-04).
JOINT_EXPAND_BACKWARD_MIN_WIDTH = 28


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _expand_depthwise_native(x, we, be, kd, bd, stride: int):
  """relu6(depthwise(relu6(x @ we + be), kd, stride) + bd), the block's
  expand 1x1 and depthwise layers with folded BN, as `_inverted_residual_layers`
  computes them (the same forward, bit for bit); the backward is one native
  pass (`native.expand_depthwise_backward`) in which the gradient of x @ we,
  the block's largest, is never written out. x [B, H, W, C], we [C, Ce],
  be [Ce], kd [3, 3, Ce], bd [Ce], float32 -> [B, Ho, Wo, Ce]."""
  return native.depthwise_forward(pointwise(x, we), kd, bd, stride, True, be)


def _expand_depthwise_native_fwd(x, we, be, kd, bd, stride):
  m = pointwise(x, we)
  z = native.depthwise_forward(m, kd, bd, stride, True, be)
  return z, (x, we, m, kd, be, z)


def _expand_depthwise_native_bwd(stride, residuals, dz):
  dx, dwe, dkd, dbd, dbe = native.expand_depthwise_backward(
      *native.match_varying(*residuals, dz), stride)
  return dx, dwe, dbe, dkd, dbd


_expand_depthwise_native.defvjp(_expand_depthwise_native_fwd, _expand_depthwise_native_bwd)


def _joint_expand_backward_applies(x, we, be, kd, bd, stride) -> bool:
  """`_expand_depthwise_native` takes the block: float32, native kernels,
  rows of at least `JOINT_EXPAND_BACKWARD_MIN_WIDTH`, Ce a multiple of 16
  and C of 4 (every MobileNetV2 width rounds channels to multiples of 8)."""
  c, ce = we.shape
  return (all(a.dtype == jnp.float32 for a in (x, we, be, kd, bd))
          and x.shape[2] >= JOINT_EXPAND_BACKWARD_MIN_WIDTH and ce % 16 == 0 and c % 4 == 0
          and _native_applies(jnp.float32, stride))


def _inverted_residual_layers(x, weights, stride: int, residual: bool):
  """The block with folded BN as separate layers (what training
  differentiates): expand 1x1 (its bias and relu6 inside the native
  depthwise's prologue), depthwise + bias + relu6, project 1x1 + bias,
  residual. `weights`: ((we, be) or None, (kd, bd), (wp, bp)). On wide
  rows the expand and depthwise layers' backward runs as one native pass
  (`_expand_depthwise_native`; same forward, gradients equal up to float
  rounding)."""
  expand, (kd, bd), (wp, bp) = weights
  # Named like the modules' layers, so profiles (experiments/profile_step.py)
  # can tell them apart.
  if expand is not None and _joint_expand_backward_applies(x, *expand, kd, bd, stride):
    with jax.named_scope("expand_depthwise"):
      d = _expand_depthwise_native(*native.match_varying(x, *expand, kd, bd), int(stride))
  else:
    prologue_bias = None
    if expand is not None:
      with jax.named_scope("expand"):
        x_in, prologue_bias = pointwise(x, expand[0]), expand[1]
    else:
      x_in = x
    with jax.named_scope("depthwise"):
      d = native_depthwise_bias_relu6(x_in, kd, bd, stride, True, prologue_bias)
  with jax.named_scope("project"):
    y = pointwise(d, wp) + bp.astype(d.dtype)
  return y + x if residual else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fused_inverted_residual(x: jax.Array, weights, stride: int, residual: bool) -> jax.Array:
  """MobileNetV2's inverted-residual block with folded frozen BatchNorm, as
  one native pass (`native.inverted_residual_forward`: the expanded tensor
  and the depthwise output never leave the cache; at 480x640 the blocks ran
  1.4x faster than as separate layers). Differentiating it runs and
  differentiates the separate layers (`_inverted_residual_layers`), so
  training computes exactly what differentiating them computes; the fused
  values equal those up to float rounding (another summation order).

  Args:
    x: [B, H, W, C] float32.
    weights: ((expand kernel [C, Ce], bias [Ce]) or None when the block has
      no expand layer, (depthwise kernel [3, 3, Ce], bias [Ce]), (project
      kernel [Ce, Cout], bias [Cout])), float32, BN folded in.
    stride: 1 or 2. residual: add x (stride 1, C == Cout).

  Returns:
    [B, ceil(H/stride), ceil(W/stride), Cout] float32.
  """
  expand, (kd, bd), (wp, bp) = weights
  we, be = expand if expand is not None else (None, None)
  arrays = native.match_varying(*(a for a in (x, we, be, kd, bd, wp, bp) if a is not None))
  if expand is None:
    arrays = (arrays[0], None, None) + tuple(arrays[1:])
  return native.inverted_residual_forward(*arrays, stride, residual)


def _fused_inverted_residual_fwd(x, weights, stride, residual):
  y, layers_vjp = jax.vjp(
      lambda x, w: _inverted_residual_layers(x, w, stride, residual), x, weights)
  return y, layers_vjp


def _fused_inverted_residual_bwd(stride, residual, layers_vjp, g):
  return layers_vjp(g)


fused_inverted_residual.defvjp(_fused_inverted_residual_fwd, _fused_inverted_residual_bwd)


def folded_native(fold_bn: bool, norm: str, depthwise: str, train: bool) -> bool:
  """Whether frozen BatchNorm is folded (`fold_bn`, outside training) and
  the native kernels run (`resolve_depthwise`): the expand 1x1's bias and
  relu6 then run inside the depthwise kernel."""
  return fold_bn and norm == "batch" and not train and resolve_depthwise(depthwise) == "native"


def blocks_fuse(fold_bn: bool, norm: str, depthwise: str, fused_blocks: bool, dtype,
                param_dtype, train: bool) -> bool:
  """Whether an inverted-residual block runs as one native pass
  (`fused_inverted_residual`): `folded_native`, `fused_blocks`, float32."""
  return (fused_blocks and folded_native(fold_bn, norm, depthwise, train)
          and dtype == jnp.float32 and param_dtype == jnp.float32)


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
    """Whether the block runs as one native pass (`blocks_fuse`)."""
    return blocks_fuse(self.fold_bn, self.norm, self.depthwise, self.fused_blocks, self.dtype,
                       self.param_dtype, train)

  @nn.compact
  def __call__(self, x, train: bool, *, weights_for: Optional[int] = None):
    """`weights_for=C_in` (only where `fuses(train)`; x unused): return
    (weights, residual), the arguments `fused_inverted_residual` takes
    after x, instead of applying the block."""
    in_features = x.shape[-1] if weights_for is None else weights_for
    common = dict(norm=self.norm, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                  param_dtype=self.param_dtype, fold_bn=self.fold_bn)
    if weights_for is not None and not self.fuses(train):
      raise ValueError("weights_for needs a fused block (InvertedResidual.fuses)")
    if self.fuses(train):
      # The whole block as one native pass where nothing differentiates it
      # (evaluation); gradients take the layers below (`fused_inverted_residual`).
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
      return fused_inverted_residual(x.astype(self.dtype), weights, self.stride, residual)
    y, prologue_bias = x, None
    # Frozen BN folded and the native depthwise kernel: the expand layer's
    # bias and relu6 run inside the depthwise kernel (forward and backward)
    # instead of as passes over the block's largest tensor.
    fuse = folded_native(self.fold_bn, self.norm, self.depthwise, train)
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
      "grouped" (`resolve_depthwise`; equal results up to float rounding).
    fold_bn: with BatchNorm in its frozen form (train=False: evaluation, and
      training with `train.batchnorm="frozen"`), fold it into the preceding
      convolution (`ConvBN._folded`; equal up to float rounding, same
      parameters; `model.fold_bn`).
    fused_blocks: with `fold_bn` and the native kernels, evaluate each
      inverted-residual block as one native pass (`fused_inverted_residual`:
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
    return not self.remat and blocks_fuse(self.fold_bn, self.norm, self.depthwise,
                                          self.fused_blocks, self.dtype, self.param_dtype, train)

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
      y = native_conv3x3_bias_relu6(xc, stem_kernel, stem_bias.astype(self.dtype), 2, True)
      for index, s, weights, residual in early:
        if index == self.trainable_from and index > 0:
          y = lax.stop_gradient(y)               # as in `__call__`
        y = fused_inverted_residual(y, weights, s, residual)
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

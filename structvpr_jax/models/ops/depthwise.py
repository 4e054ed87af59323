"""The 3x3 depthwise convolution ('SAME' padding, NHWC, kernel [3, 3, C]),
three equal implementations (`DEPTHWISE_CONV`; which one runs is
`dispatch.resolve_depthwise`'s):

- "shifted" (`depthwise_conv3x3`): 9 shifted multiply-adds in XLA with a
  custom VJP, because on XLA:CPU the grouped conv was measured ~25x slower
  and single-threaded;
- "grouped" (`grouped_depthwise_conv3x3`): `lax.conv_general_dilated(...,
  feature_group_count=C)`, the native kernel of cuDNN and the TPU;
- "native" (`native_depthwise_conv3x3`; with a fused bias, relu6 and
  prologue `native_depthwise_bias_relu6`): the C++ kernels of
  `models/native/` through XLA FFI, float32, with XLA's formulation for
  everything else (`dispatch.native_applies`).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from structvpr_jax.models import native
from structvpr_jax.models.ops import dispatch, pointwise


def same_padding(size: int, stride: int, kernel: int = 3) -> tuple[int, int, int]:
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
  ho, top, bottom = same_padding(h, stride)
  wo, left, right = same_padding(w, stride)
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
  top = same_padding(h, stride)[1]
  left = same_padding(w, stride)[1]
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


def native_depthwise_conv3x3(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """The same 3x3 depthwise convolution by the C++ kernels of
  `models/native/kernels.cc` (XLA FFI custom calls, CPU only): one pass
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
  if not dispatch.native_applies(dtype, stride):
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
  if not dispatch.native_applies(dtype, stride):
    if prologue_bias is not None:
      x = pointwise.relu6(x + prologue_bias.astype(x.dtype))
    y = depthwise_conv3x3(x, kernel, stride) + bias.astype(dtype)
    return pointwise.relu6(y) if activation else y
  prologue = prologue_bias is not None
  x, kernel, bias, pbias = native.match_varying(
      x.astype(dtype), kernel.astype(dtype), bias.astype(dtype),
      (prologue_bias if prologue else bias).astype(dtype))
  return _depthwise_native(x, kernel, bias, pbias, int(stride), bool(activation), prologue)


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


# model.depthwise's implementations by resolved name (`dispatch.resolve_depthwise`).
DEPTHWISE_CONV = {"native": native_depthwise_conv3x3, "shifted": depthwise_conv3x3,
                  "grouped": grouped_depthwise_conv3x3}

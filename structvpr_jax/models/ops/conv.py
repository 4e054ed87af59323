"""The full 3x3 'SAME' convolution of MobileNetV2's stem (few input
channels): XLA's (`full_conv`), and the native forward and kernel gradient
with a fused bias and relu6 (`native_conv3x3_bias_relu6`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from structvpr_jax.models import native
from structvpr_jax.models.ops import dispatch, pointwise


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
  _, conv_vjp = jax.vjp(lambda a: full_conv(a, kernel, stride), x)
  return conv_vjp(cot)[0], dkernel, dbias


_conv3x3_native.defvjp(_conv3x3_native_fwd, _conv3x3_native_bwd)


def full_conv(x, kernel, stride):
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
  if not dispatch.native_applies(dtype, stride):
    y = full_conv(x, kernel.astype(dtype), int(stride)) + bias.astype(dtype)
    return pointwise.relu6(y) if activation else y
  x, kernel, bias = native.match_varying(x.astype(dtype), kernel.astype(dtype),
                                         bias.astype(dtype))
  return _conv3x3_native(x, kernel, bias, int(stride), bool(activation))

"""MobileNetV2's inverted-residual block with folded frozen BatchNorm, as
the native kernels run it (`dispatch.folded_native` / `blocks_fuse`):

- `inverted_residual_layers`: the separate layers, what training
  differentiates (expand 1x1, whose bias and relu6 run in the depthwise
  kernel's prologue; depthwise + bias + relu6; project 1x1 + bias; residual);
  on wide rows the expand and depthwise layers' backward is one native pass
  (`_expand_depthwise_native`, `dispatch.joint_expand_backward_applies`);
- `fused_inverted_residual`: the whole block's forward as one native pass;
  its gradient is the separate layers'.
"""

from __future__ import annotations

import functools

import jax

from structvpr_jax.models import native
from structvpr_jax.models.ops import depthwise, dispatch, pointwise


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _expand_depthwise_native(x, we, be, kd, bd, stride: int):
  """relu6(depthwise(relu6(x @ we + be), kd, stride) + bd), the block's
  expand 1x1 and depthwise layers with folded BN, as `inverted_residual_layers`
  computes them (the same forward, bit for bit); the backward is one native
  pass (`native.expand_depthwise_backward`) in which the gradient of x @ we,
  the block's largest, is never written out. x [B, H, W, C], we [C, Ce],
  be [Ce], kd [3, 3, Ce], bd [Ce], float32 -> [B, Ho, Wo, Ce]."""
  return native.depthwise_forward(pointwise.pointwise(x, we), kd, bd, stride, True, be)


def _expand_depthwise_native_fwd(x, we, be, kd, bd, stride):
  m = pointwise.pointwise(x, we)
  z = native.depthwise_forward(m, kd, bd, stride, True, be)
  return z, (x, we, m, kd, be, z)


def _expand_depthwise_native_bwd(stride, residuals, dz):
  dx, dwe, dkd, dbd, dbe = native.expand_depthwise_backward(
      *native.match_varying(*residuals, dz), stride)
  return dx, dwe, dbe, dkd, dbd


_expand_depthwise_native.defvjp(_expand_depthwise_native_fwd, _expand_depthwise_native_bwd)


def inverted_residual_layers(x, weights, stride: int, residual: bool):
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
  if expand is not None and dispatch.joint_expand_backward_applies(x, *expand, kd, bd, stride):
    with jax.named_scope("expand_depthwise"):
      d = _expand_depthwise_native(*native.match_varying(x, *expand, kd, bd), int(stride))
  else:
    prologue_bias = None
    if expand is not None:
      with jax.named_scope("expand"):
        x_in, prologue_bias = pointwise.pointwise(x, expand[0]), expand[1]
    else:
      x_in = x
    with jax.named_scope("depthwise"):
      d = depthwise.native_depthwise_bias_relu6(x_in, kd, bd, stride, True, prologue_bias)
  with jax.named_scope("project"):
    y = pointwise.pointwise(d, wp) + bp.astype(d.dtype)
  return y + x if residual else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fused_inverted_residual(x: jax.Array, weights, stride: int, residual: bool) -> jax.Array:
  """MobileNetV2's inverted-residual block with folded frozen BatchNorm, as
  one native pass (`native.inverted_residual_forward`: the expanded tensor
  and the depthwise output never leave the cache; at 480x640 the blocks ran
  1.4x faster than as separate layers). Differentiating it runs and
  differentiates the separate layers (`inverted_residual_layers`), so
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
      lambda x, w: inverted_residual_layers(x, w, stride, residual), x, weights)
  return y, layers_vjp


def _fused_inverted_residual_bwd(stride, residual, layers_vjp, g):
  return layers_vjp(g)


fused_inverted_residual.defvjp(_fused_inverted_residual_fwd, _fused_inverted_residual_bwd)

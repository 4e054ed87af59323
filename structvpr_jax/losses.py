"""Training losses (pure, jittable): triplet margin loss and weighted KD.

docs/design.md, "Losses":
  L_triplet = mean over valid (b, m) of max(0, ||q_b - p_b|| - ||q_b - n_bm|| + margin)
  L_KD      = sum_i w_i ||s_i - stop_grad(t_i)||^2 / B   (L2-normalised s, t)
  L         = L_triplet(student) + lambda * L_KD         (stage 2)
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

L2_EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = L2_EPS) -> jax.Array:
  """x / max(||x||, eps) along `axis` (zero vectors stay zero, grads finite)."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
  """||x|| along `axis` with a zero (not NaN) gradient at x = 0."""
  sq = jnp.sum(jnp.square(x), axis=axis)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def triplet_margin_loss(q: jax.Array, p: jax.Array, n: jax.Array, margin: float = 0.1,
                        neg_mask: Optional[jax.Array] = None) -> jax.Array:
  """Triplet margin loss with unsquared L2 distances.

  Args:
    q: [B, D] query descriptors.
    p: [B, D] positive descriptors.
    n: [B, M, D] negative descriptors.
    margin: the triplet margin (0.1, NetVLAD recipe).
    neg_mask: optional [B, M] (1/True = valid negative); the mean runs over
      valid (b, m) only; all-invalid gives 0.

  Returns:
    scalar float32.
  """
  d_pos = _safe_norm(q - p)                      # [B]
  d_neg = _safe_norm(q[:, None, :] - n)          # [B, M]
  hinge = jnp.maximum(d_pos[:, None] - d_neg + margin, 0.0)
  if neg_mask is None:
    return jnp.mean(hinge)
  mask = neg_mask.astype(hinge.dtype)
  return jnp.sum(hinge * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def distill_loss(student: jax.Array, teacher: jax.Array, weights: jax.Array) -> jax.Array:
  """Per-sample weighted descriptor distillation (docs/design.md, "Distillation loss").

  Args:
    student: [B, D] student (RGB) descriptors; gradients flow into these.
    teacher: [B, D] teacher (seg) descriptors; gradients are stopped.
    weights: [B] per-sample weights (Eq. 3, see `partition.distill_weights`).

  Returns:
    scalar (at least float32): sum_i w_i ||s_i - t_i||^2 / B on L2-normalised s, t.
  """
  acc = jnp.promote_types(student.dtype, jnp.float32)
  s = l2_normalize(student.astype(acc))
  t = l2_normalize(jax.lax.stop_gradient(teacher).astype(acc))
  per_sample = jnp.sum(jnp.square(s - t), axis=-1)
  return jnp.sum(weights.astype(acc) * per_sample) / student.shape[0]

"""Training losses (pure, jittable): triplet margin loss and weighted KD forms.

docs/design.md, "Losses" and "Distillation loss" (the KD forms are ours: the
paper does not say which it used):
  L_triplet = mean over valid (b, m) of max(0, ||q_b - p_b|| - ||q_b - n_bm|| + margin)
  feature     L_KD = sum_i w_i ||s_i - stop_grad(t_i)||^2 / B   (L2-normalised s, t)
  adaptor     the same with s_i replaced by A(s_i) = s_i W + b, a trainable
              linear head used only in the loss (FitNets-style)
  relational  L_KD = sum_b w_b KL(P_t,b || P_s,b) / B, P_.,b = softmax(-d_.,b / T)
              over the distances from query b to its positive and negatives
  L         = L_triplet(student) + lambda * L_KD         (stage 2)
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

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


KD_FORMS = ("feature", "adaptor", "relational")


def adaptor_init(dim: int) -> dict:
  """Host parameters of the linear KD adaptor A(s) = s W + b, W [dim, dim] = I,
  b = 0 (float32 numpy): at the start the adaptor loss equals the feature loss."""
  return {"kernel": np.eye(dim, dtype=np.float32), "bias": np.zeros((dim,), np.float32)}


def adaptor_apply(params: dict, student: jax.Array) -> jax.Array:
  """[N, D] student descriptors -> [N, D] in the teacher's space (before L2)."""
  acc = jnp.promote_types(student.dtype, jnp.float32)
  return student.astype(acc) @ params["kernel"].astype(acc) + params["bias"].astype(acc)


def query_distances(desc: jax.Array) -> jax.Array:
  """[B, C, D] (query first, then C-1 candidates) -> [B, C-1] L2 distances between
  the L2-normalised query and each candidate."""
  x = l2_normalize(desc)
  return _safe_norm(x[:, :1, :] - x[:, 1:, :])


def relational_distill_loss(student: jax.Array, teacher: jax.Array, weights: jax.Array,
                            temperature: float = 0.1) -> jax.Array:
  """Per-sample weighted relational distillation over each triplet's candidates.

  Args:
    student: [B, C, D] student descriptors of (query, positive, negatives...).
    teacher: [B, C, D] teacher descriptors of the same images; gradients stopped.
    weights: [B] per-sample weights (Eq. 3).
    temperature: T of the softmax over -distance / T.

  Returns:
    scalar: sum_b w_b KL(P_t,b || P_s,b) / B, where P_x,b = softmax_c(-d_x[b, c] / T)
    and d_x[b, c] = ||x_b0 - x_bc|| on L2-normalised descriptors (c = 1..C-1).
    Zero when the student's distances equal the teacher's, whatever the
    coordinates: only the teacher's distance structure is copied.
  """
  acc = jnp.promote_types(student.dtype, jnp.float32)
  d_s = query_distances(student.astype(acc))
  d_t = query_distances(jax.lax.stop_gradient(teacher).astype(acc))
  log_p_s = jax.nn.log_softmax(-d_s / temperature, axis=-1)
  log_p_t = jax.nn.log_softmax(-d_t / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)          # [B]
  return jnp.sum(weights.astype(acc) * kl) / student.shape[0]

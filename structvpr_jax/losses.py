"""Training losses (pure, jittable): triplet margin loss and weighted KD forms.

docs/design.md, "Losses" and "Distillation loss" (the KD forms are ours: the
paper does not say which it used):
  L_triplet = mean over valid (b, m) of max(0, ||q_b - p_b|| - ||q_b - n_bm|| + margin)
  feature     L_KD = sum_i w_i ||s_i - stop_grad(t_i)||^2 / B   (L2-normalised s, t)
  adaptor     the same with s_i replaced by A(s_i) = s_i W + b, a trainable
              linear head used only in the loss (FitNets-style)
  relational  L_KD = sum_b w_b KL(P_t,b || P_s,b) / B, P_.,b = softmax(-d_.,b / T)
              over the distances from query b to its positive and negatives
  relational_batch
              the same over every candidate of the batch (all positives and
              negatives of all triplets, gathered over the devices), with a
              sharper teacher: P_t,b = softmax(-d_t,b / T_t), P_s,b =
              softmax(-d_s,b / T_s) (CSD / SEED / SFRS-style similarity
              distributions)
  rkd         RKD distance (Park et al. 2019, as DistilVPR uses it): the
              query-to-candidate distances of the batch, each divided by their
              mean, student vs teacher, smooth-L1 per query
  L         = L_triplet(student) + lambda * L_KD         (stage 2)

Normalisation of the weighted sum over queries: "batch" (divide by B, the
default) or "weights" (divide by sum_b w_b: the "gate" weighting, whose
strength then does not depend on how many queries pass the gate). Under
`shard_map` pass `axis_name` so that batch-wide contexts, means and weight
sums span every device's shard (the result is then the device-count
independent global value).
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


NORMALIZATIONS = ("batch", "weights")


def weighted_mean(per_sample: jax.Array, weights: jax.Array, normalize: str = "batch",
                  axis_name: Optional[str] = None) -> jax.Array:
  """sum_b w_b l_b / B ("batch") or / sum_b w_b ("weights"; 0 when every w is 0).

  Under `shard_map` with `axis_name`, each shard returns its share so that the
  mean over devices (the train step's pmean) is the global value: "batch"
  needs nothing (equal shards); "weights" divides by the global sum of the
  weights over the device count.
  """
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"KD normalisation {normalize!r}; expected one of {NORMALIZATIONS}")
  acc = per_sample.dtype
  num = jnp.sum(weights.astype(acc) * per_sample)
  if normalize == "batch":
    return num / per_sample.shape[0]
  denom = jnp.sum(weights.astype(acc))
  if axis_name is not None:
    denom = jax.lax.psum(denom, axis_name) / jax.lax.psum(1, axis_name)
  return jnp.where(denom > 0, num / jnp.where(denom > 0, denom, 1.0), 0.0)


def distill_loss(student: jax.Array, teacher: jax.Array, weights: jax.Array,
                 normalize: str = "batch", axis_name: Optional[str] = None) -> jax.Array:
  """Per-sample weighted descriptor distillation (docs/design.md, "Distillation loss").

  Args:
    student: [B, D] student (RGB) descriptors; gradients flow into these.
    teacher: [B, D] teacher (seg) descriptors; gradients are stopped.
    weights: [B] per-sample weights (Eq. 3, see `partition.distill_weights`).

    normalize, axis_name: see `weighted_mean`.

  Returns:
    scalar (at least float32): sum_i w_i ||s_i - t_i||^2 / B on L2-normalised s, t.
  """
  acc = jnp.promote_types(student.dtype, jnp.float32)
  s = l2_normalize(student.astype(acc))
  t = l2_normalize(jax.lax.stop_gradient(teacher).astype(acc))
  per_sample = jnp.sum(jnp.square(s - t), axis=-1)
  return weighted_mean(per_sample, weights, normalize, axis_name)


KD_FORMS = ("feature", "adaptor", "relational", "relational_batch", "rkd")
# the forms whose teacher describes every image of a triplet (not only q and p)
WIDE_KD_FORMS = ("relational", "relational_batch", "rkd")


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
                            temperature: float = 0.1, teacher_temperature: float = 0.0,
                            normalize: str = "batch",
                            axis_name: Optional[str] = None) -> jax.Array:
  """Per-sample weighted relational distillation over each triplet's candidates.

  Args:
    student: [B, C, D] student descriptors of (query, positive, negatives...).
    teacher: [B, C, D] teacher descriptors of the same images; gradients stopped.
    weights: [B] per-sample weights (Eq. 3).
    temperature: the student's T of the softmax over -distance / T.
    teacher_temperature: the teacher's T (0: `temperature`).
    normalize, axis_name: see `weighted_mean`.

  Returns:
    scalar: sum_b w_b KL(P_t,b || P_s,b) / B, where P_x,b = softmax_c(-d_x[b, c] / T_x)
    and d_x[b, c] = ||x_b0 - x_bc|| on L2-normalised descriptors (c = 1..C-1).
    Zero when the student's distances equal the teacher's (equal temperatures),
    whatever the coordinates: only the teacher's distance structure is copied.
  """
  acc = jnp.promote_types(student.dtype, jnp.float32)
  d_s = query_distances(student.astype(acc))
  d_t = query_distances(jax.lax.stop_gradient(teacher).astype(acc))
  return weighted_mean(_kl_of_distances(d_s, d_t, temperature, teacher_temperature),
                       weights, normalize, axis_name)


def _kl_of_distances(d_s, d_t, temperature: float, teacher_temperature: float) -> jax.Array:
  """[B] KL(softmax(-d_t / T_t) || softmax(-d_s / T_s)) over the last axis."""
  t_t = float(teacher_temperature) or float(temperature)
  log_p_s = jax.nn.log_softmax(-d_s / temperature, axis=-1)
  log_p_t = jax.nn.log_softmax(-d_t / t_t, axis=-1)
  return jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)


def batch_distances(desc: jax.Array, axis_name: Optional[str] = None) -> jax.Array:
  """[B, C, D] (query first, then C-1 candidates per triplet) -> [B, N] L2
  distances between each L2-normalised query and every candidate of the
  batch, N = B (C-1) (x the device count: with `axis_name` the candidates of
  every shard are gathered, in device order, so each query sees the global
  batch's candidates)."""
  x = l2_normalize(desc)
  queries = x[:, 0, :]
  candidates = x[:, 1:, :].reshape(-1, x.shape[-1])
  if axis_name is not None:
    candidates = jax.lax.all_gather(candidates, axis_name, tiled=True)
  return _safe_norm(queries[:, None, :] - candidates[None, :, :])


def batch_relational_distill_loss(student: jax.Array, teacher: jax.Array, weights: jax.Array,
                                  temperature: float = 0.1, teacher_temperature: float = 0.0,
                                  normalize: str = "batch",
                                  axis_name: Optional[str] = None) -> jax.Array:
  """Relational distillation over every candidate of the batch ("relational_batch").

  Args:
    student: [B, C, D] student descriptors of (query, positive, negatives...).
    teacher: [B, C, D] teacher descriptors of the same images; gradients stopped.
    weights: [B] per-query weights (Eq. 3).
    temperature: the student's softmax temperature T_s.
    teacher_temperature: the teacher's T_t (0: T_s); retrieval distillation
      uses a sharper teacher (T_t < T_s: CSD, SEED, SFRS use 0.01-0.07).
    normalize, axis_name: see `weighted_mean`; with `axis_name` the context
      is every device's candidates (`batch_distances`).

  Returns:
    scalar: sum_b w_b KL(P_t,b || P_s,b) / B with P_x,b = softmax_n(-d_x[b, n] / T_x)
    over the N = B (C-1) candidates of the batch (each query's own positive
    and negatives among them).
  """
  acc = jnp.promote_types(student.dtype, jnp.float32)
  d_s = batch_distances(student.astype(acc), axis_name)
  d_t = batch_distances(jax.lax.stop_gradient(teacher).astype(acc), axis_name)
  return weighted_mean(_kl_of_distances(d_s, d_t, temperature, teacher_temperature),
                       weights, normalize, axis_name)


def smooth_l1(x: jax.Array, beta: float = 1.0) -> jax.Array:
  """Huber / smooth-L1 elementwise: 0.5 x^2 / beta where |x| < beta, else |x| - beta / 2."""
  a = jnp.abs(x)
  return jnp.where(a < beta, 0.5 * jnp.square(x) / beta, a - 0.5 * beta)


def rkd_distance_loss(student: jax.Array, teacher: jax.Array, weights: jax.Array,
                      normalize: str = "batch", axis_name: Optional[str] = None) -> jax.Array:
  """RKD distance loss over the batch ("rkd"; Park et al. 2019, DistilVPR).

  Args:
    student: [B, C, D] student descriptors of (query, positive, negatives...).
    teacher: [B, C, D] teacher descriptors of the same images; gradients stopped.
    weights: [B] per-query weights (Eq. 3).
    normalize, axis_name: see `weighted_mean`.

  Returns:
    scalar: sum_b w_b l_b / B, l_b = mean_n smooth_l1(d_s[b, n] / mu_s - d_t[b, n] / mu_t)
    over the N candidates of the batch (`batch_distances`), mu_x the mean of
    d_x over all (query, candidate) pairs (of every device with `axis_name`;
    the student's mean carries gradient, as in RKD). Zero when the student's
    distances are the teacher's times any positive factor.
  """
  acc = jnp.promote_types(student.dtype, jnp.float32)
  d_s = batch_distances(student.astype(acc), axis_name)
  d_t = batch_distances(jax.lax.stop_gradient(teacher).astype(acc), axis_name)

  def mean_of(d):
    m = jnp.mean(d)
    return m if axis_name is None else jax.lax.pmean(m, axis_name)

  eps = jnp.asarray(L2_EPS, acc)
  rel_s = d_s / jnp.maximum(mean_of(d_s), eps)
  rel_t = d_t / jnp.maximum(mean_of(d_t), eps)
  per_query = jnp.mean(smooth_l1(rel_s - rel_t), axis=-1)                    # [B]
  return weighted_mean(per_query, weights, normalize, axis_name)

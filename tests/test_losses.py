"""Losses vs plain-numpy references written from docs/design.md, and hand cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structvpr_jax import losses


def numpy_triplet(q, p, n, margin, mask=None):
  total, count = 0.0, 0
  for b in range(q.shape[0]):
    d_pos = np.sqrt(np.sum((q[b] - p[b]) ** 2))
    for m in range(n.shape[1]):
      if mask is not None and not mask[b, m]:
        continue
      d_neg = np.sqrt(np.sum((q[b] - n[b, m]) ** 2))
      total += max(0.0, d_pos - d_neg + margin)
      count += 1
  return total / max(count, 1)


def numpy_distill(s, t, w):
  s = s / np.linalg.norm(s, axis=1, keepdims=True)
  t = t / np.linalg.norm(t, axis=1, keepdims=True)
  return np.sum(w * np.sum((s - t) ** 2, axis=1)) / len(s)


def test_triplet_matches_numpy_reference():
  rng = np.random.default_rng(0)
  q, p = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
  n = rng.normal(size=(5, 3, 8))
  mask = rng.random((5, 3)) > 0.3
  for margin in (0.1, 2.0):
    got = jax.jit(losses.triplet_margin_loss)(q, p, n, margin)
    np.testing.assert_allclose(got, numpy_triplet(q, p, n, margin), rtol=1e-5)
    got = losses.triplet_margin_loss(q, p, n, margin, neg_mask=mask)
    np.testing.assert_allclose(got, numpy_triplet(q, p, n, margin, mask), rtol=1e-5)


def test_triplet_hand_case():
  q = np.array([[0.0, 0.0]])
  p = np.array([[3.0, 4.0]])               # d+ = 5
  n = np.array([[[6.0, 8.0], [0.0, 5.05]]])  # d- = 10 (inactive), 5.05 (active)
  # hinge: max(0, 5 - 10 + 0.1) = 0 ; max(0, 5 - 5.05 + 0.1) = 0.05
  np.testing.assert_allclose(losses.triplet_margin_loss(q, p, n, 0.1), 0.025, rtol=1e-5)
  np.testing.assert_allclose(
      losses.triplet_margin_loss(q, p, n, 0.1, neg_mask=np.array([[False, True]])), 0.05,
      rtol=1e-5)
  assert float(losses.triplet_margin_loss(q, p, n, 0.1, neg_mask=np.zeros((1, 2), bool))) == 0


def test_triplet_gradient_finite_at_identical_descriptors():
  q = jnp.ones((2, 4))
  g = jax.grad(lambda q: losses.triplet_margin_loss(q, q, jnp.stack([q, q], 1)))(q)
  assert np.all(np.isfinite(np.asarray(g)))


def test_distill_matches_numpy_and_stops_teacher_gradient():
  rng = np.random.default_rng(1)
  s, t, w = rng.normal(size=(6, 10)), rng.normal(size=(6, 10)), rng.random(6)
  np.testing.assert_allclose(jax.jit(losses.distill_loss)(s, t, w), numpy_distill(s, t, w),
                             rtol=1e-5)
  g_teacher = jax.grad(lambda t: losses.distill_loss(jnp.asarray(s), t, jnp.asarray(w)))(
      jnp.asarray(t))
  assert float(jnp.abs(g_teacher).max()) == 0.0
  g_student = jax.grad(lambda s: losses.distill_loss(s, jnp.asarray(t), jnp.asarray(w)))(
      jnp.asarray(s))
  assert float(jnp.abs(g_student).max()) > 0.0


def test_distill_hand_case():
  s = np.array([[1.0, 0.0], [2.0, 0.0]])    # normalised: (1,0), (1,0)
  t = np.array([[0.0, 3.0], [5.0, 0.0]])    # normalised: (0,1), (1,0)
  w = np.array([0.5, 1.0])
  # sample 0: ||(1,-1)||^2 = 2, weighted 1.0; sample 1: 0. Sum / B = 0.5
  np.testing.assert_allclose(losses.distill_loss(s, t, w), 0.5, rtol=1e-6)


@pytest.mark.parametrize("w", [0.0, 1.0])
def test_distill_zero_weight_zero_loss(w):
  s, t = np.eye(3), np.eye(3)[::-1]
  loss = losses.distill_loss(s, t, np.full(3, w))
  assert (float(loss) == 0.0) == (w == 0.0)


# --------------------------------------------------------------------------
# KD forms (ours; docs/design.md "Distillation loss")
# --------------------------------------------------------------------------
def numpy_relational(s, t, w, temperature):
  """Loop over triplets: KL(softmax(-d_t/T) || softmax(-d_s/T)) * w_b, mean over B."""
  total = 0.0
  for b in range(s.shape[0]):
    def dists(x):
      x = x / np.linalg.norm(x, axis=1, keepdims=True)
      return np.array([np.linalg.norm(x[0] - x[c]) for c in range(1, len(x))])
    ls, lt = -dists(s[b]) / temperature, -dists(t[b]) / temperature
    ps = np.exp(ls - ls.max()); ps /= ps.sum()
    pt = np.exp(lt - lt.max()); pt /= pt.sum()
    total += w[b] * np.sum(pt * (np.log(pt) - np.log(ps)))
  return total / s.shape[0]


def test_relational_matches_numpy_reference():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(3, 4, 6)), rng.normal(size=(3, 4, 6))
  w = np.array([1.0, 0.25, 0.0])
  for temperature in (0.1, 1.0):
    got = jax.jit(losses.relational_distill_loss, static_argnums=3)(s, t, w, temperature)
    np.testing.assert_allclose(got, numpy_relational(s, t, w, temperature), rtol=1e-4)


def test_relational_two_triplet_hand_case():
  """2 triplets, 2-d descriptors, T = 1. Triplet 0: the student is the teacher
  rotated (same distances) -> KL 0. Triplet 1: teacher distances (0, 2),
  student (2, 0): p_t = softmax(0, -2) = (a, b), p_s = softmax(-2, 0) = (b, a)
  with a = sigmoid(2), so KL = a log(a/b) + b log(b/a)."""
  e0, e1 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
  rot = np.array([[0.0, -1.0], [1.0, 0.0]])
  t0 = np.stack([e0, e1, -e0])            # query, positive, negative: d = sqrt2, 2
  s0 = t0 @ rot.T
  t1 = np.stack([e0, e0, -e0])            # d_t = (0, 2)
  s1 = np.stack([e0, -e0, e0])            # d_s = (2, 0)
  s, t = np.stack([s0, s1]), np.stack([t0, t1])
  w = np.array([1.0, 1.0])
  # triplet 1 by hand: logits_t = (0, -2), logits_s = (-2, 0)
  a = 1 / (1 + np.exp(-2.0))              # p_t(pos) = p_s(neg)
  b = 1 - a                               # p_t(neg) = p_s(pos)
  kl1 = a * np.log(a / b) + b * np.log(b / a)
  got = losses.relational_distill_loss(s, t, w, 1.0)
  np.testing.assert_allclose(got, (0.0 + kl1) / 2, rtol=1e-5)
  # weight 0 on triplet 1 removes it; the rotated triplet alone is 0
  np.testing.assert_allclose(losses.relational_distill_loss(s, t, np.array([1.0, 0.0]), 1.0),
                             0.0, atol=1e-6)


def test_zero_weight_means_zero_gradient_for_every_form():
  rng = np.random.default_rng(2)
  s = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
  w = jnp.array([0.0, 1.0])
  g = jax.grad(lambda x: losses.relational_distill_loss(x, t, w))(s)
  assert np.all(np.asarray(g[0]) == 0) and np.any(np.asarray(g[1]) != 0)
  g = jax.grad(lambda x: losses.distill_loss(x, t[:, 0], w))(s[:, 0])
  assert np.all(np.asarray(g[0]) == 0) and np.any(np.asarray(g[1]) != 0)
  params = losses.adaptor_init(5)
  g = jax.grad(lambda x: losses.distill_loss(losses.adaptor_apply(params, x), t[:, 0], w))(
      s[:, 0])
  assert np.all(np.asarray(g[0]) == 0) and np.any(np.asarray(g[1]) != 0)


def test_adaptor_starts_as_the_feature_loss_and_maps_shapes():
  rng = np.random.default_rng(3)
  s, t = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
  w = np.array([1.0, 0.5, 0.0, 2.0])
  params = losses.adaptor_init(6)
  assert params["kernel"].shape == (6, 6) and params["bias"].shape == (6,)
  mapped = losses.adaptor_apply(params, s)
  assert mapped.shape == (4, 6)
  np.testing.assert_allclose(losses.distill_loss(mapped, t, w), numpy_distill(s, t, w),
                             rtol=1e-5)
  # a trained adaptor that maps s exactly onto t gives zero loss
  kernel, *_ = np.linalg.lstsq(s, t, rcond=None)     # 4 samples, 6 dims: exact fit
  fitted = {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.zeros(6)}
  np.testing.assert_allclose(losses.distill_loss(losses.adaptor_apply(fitted, s), t, w), 0.0,
                             atol=1e-5)

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

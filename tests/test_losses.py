"""Losses vs plain-numpy references written from docs/design.md, and hand cases."""

import os

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


# --------------------------------------------------------------------------
# Batch-wide relational KD, RKD distance, and the "weights" normalisation
# (numpy references written from docs/design.md "Distillation")
# --------------------------------------------------------------------------
def numpy_batch_distances(x):
  x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  queries = x[:, 0]
  candidates = x[:, 1:].reshape(-1, x.shape[-1])
  return np.array([[np.linalg.norm(q - c) for c in candidates] for q in queries])


def numpy_softmax(logits):
  e = np.exp(logits - logits.max())
  return e / e.sum()


def numpy_batch_relational(s, t, w, t_s, t_t, normalize="batch"):
  d_s, d_t = numpy_batch_distances(s), numpy_batch_distances(t)
  kl = []
  for b in range(len(s)):
    ps, pt = numpy_softmax(-d_s[b] / t_s), numpy_softmax(-d_t[b] / t_t)
    kl.append(np.sum(pt * (np.log(pt) - np.log(ps))))
  total = np.sum(w * np.array(kl))
  return total / (len(s) if normalize == "batch" else np.sum(w))


def numpy_smooth_l1(x):
  a = np.abs(x)
  return np.where(a < 1, 0.5 * x * x, a - 0.5)


def numpy_rkd(s, t, w, normalize="batch"):
  d_s, d_t = numpy_batch_distances(s), numpy_batch_distances(t)
  per = np.mean(numpy_smooth_l1(d_s / d_s.mean() - d_t / d_t.mean()), axis=1)
  return np.sum(w * per) / (len(s) if normalize == "batch" else np.sum(w))


def test_batch_relational_matches_numpy_reference():
  rng = np.random.default_rng(4)
  s, t = rng.normal(size=(3, 4, 6)), rng.normal(size=(3, 4, 6))
  w = np.array([1.0, 0.25, 0.0])
  for t_s, t_t in ((0.1, 0.0), (0.1, 0.03), (1.0, 0.5)):
    for normalize in ("batch", "weights"):
      got = losses.batch_relational_distill_loss(s, t, w, t_s, t_t, normalize=normalize)
      want = numpy_batch_relational(s, t, w, t_s, t_t or t_s, normalize)
      np.testing.assert_allclose(got, want, rtol=1e-4)


def test_batch_relational_hand_case():
  """One triplet (C = 2: query, positive) and a second triplet: the context of
  each query is both triplets' positives. 1-d-like unit vectors, T = 1.
  Query 0 = e0, candidates e0 (d 0) and -e0 (d 2): teacher logits (0, -2).
  The student sees them swapped (2, 0) -> KL = a log(a/b) + b log(b/a),
  a = sigmoid(2); query 1 (= -e0) is the mirror image -> the same KL."""
  e0 = np.array([1.0, 0.0])
  t = np.stack([np.stack([e0, e0]), np.stack([-e0, -e0])])     # candidates: e0, -e0
  s = np.stack([np.stack([e0, -e0]), np.stack([-e0, e0])])     # candidates: -e0, e0
  a = 1 / (1 + np.exp(-2.0))
  b = 1 - a
  kl = a * np.log(a / b) + b * np.log(b / a)
  got = losses.batch_relational_distill_loss(s, t, np.ones(2), 1.0)
  np.testing.assert_allclose(got, kl, rtol=1e-5)
  # the student equal to the teacher: 0, whatever the temperatures are equal
  np.testing.assert_allclose(losses.batch_relational_distill_loss(t, t, np.ones(2), 0.3), 0.0,
                             atol=1e-6)


def test_sharper_teacher_temperature_sharpens_the_target():
  """T_t < T_s: the teacher's distribution is sharper, so the student's own
  distances (same as the teacher's) are no longer a zero-loss solution."""
  rng = np.random.default_rng(5)
  t = rng.normal(size=(2, 3, 4))
  same = losses.batch_relational_distill_loss(t, t, np.ones(2), 0.1, 0.1)
  sharper = losses.batch_relational_distill_loss(t, t, np.ones(2), 0.1, 0.02)
  assert abs(float(same)) < 1e-6 and float(sharper) > 1e-3


def test_rkd_matches_numpy_reference():
  rng = np.random.default_rng(6)
  s, t = rng.normal(size=(4, 3, 5)), rng.normal(size=(4, 3, 5))
  w = np.array([1.0, 0.0, 0.5, 2.0])
  for normalize in ("batch", "weights"):
    np.testing.assert_allclose(losses.rkd_distance_loss(s, t, w, normalize=normalize),
                               numpy_rkd(s, t, w, normalize), rtol=1e-4)


def test_rkd_is_zero_when_distances_agree_up_to_scale():
  """A rotated student (equal distances) gives 0; RKD compares d / mean(d), so
  a common factor on the distances cancels; and a hand case."""
  rng = np.random.default_rng(7)
  t = rng.normal(size=(3, 3, 4))
  q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  rotated = t @ q.T                                   # same distances after L2 normalisation
  np.testing.assert_allclose(losses.rkd_distance_loss(rotated, t, np.ones(3)), 0.0, atol=1e-6)
  # distances agreeing up to scale: rkd sees only d / mean(d)
  d_t = losses.batch_distances(jnp.asarray(t))
  rel = d_t / jnp.mean(d_t)
  np.testing.assert_allclose(rel, (3.0 * d_t) / jnp.mean(3.0 * d_t), rtol=1e-6)
  # hand case: two queries e0 and e1, candidates e0, e1 -> d = [[0, r2], [r2, 0]];
  # the student swaps its candidates -> d_s = [[r2, 0], [0, r2]]; means equal (r2/2),
  # so rel diff = +-2 everywhere -> smooth_l1(2) = 1.5 per pair
  e0, e1 = np.eye(2)
  t2 = np.stack([np.stack([e0, e0]), np.stack([e1, e1])])
  s2 = np.stack([np.stack([e0, e1]), np.stack([e1, e0])])
  np.testing.assert_allclose(losses.rkd_distance_loss(s2, t2, np.ones(2)), 1.5, rtol=1e-5)


def test_weights_normalisation_divides_by_the_weight_sum():
  per = jnp.array([1.0, 3.0, 5.0, 7.0])
  w = jnp.array([1.0, 0.0, 1.0, 0.0])
  np.testing.assert_allclose(losses.weighted_mean(per, w, "batch"), 6.0 / 4)
  np.testing.assert_allclose(losses.weighted_mean(per, w, "weights"), 6.0 / 2)
  assert float(losses.weighted_mean(per, jnp.zeros(4), "weights")) == 0.0
  g = jax.grad(lambda p: losses.weighted_mean(p, jnp.zeros(4), "weights"))(per)
  assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g) == 0)
  with pytest.raises(ValueError, match="normalisation"):
    losses.weighted_mean(per, w, "mean")


@pytest.mark.parametrize("form", ["relational_batch", "rkd"])
def test_zero_weight_zero_gradient_for_batch_forms(form):
  """A query of weight 0 contributes nothing: the loss and its gradient equal
  those with that query's term removed; all weights 0 -> zero gradient."""
  rng = np.random.default_rng(8)
  s = jnp.asarray(rng.normal(size=(3, 3, 5)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(3, 3, 5)), jnp.float32)
  fn = {"relational_batch": lambda x, w: losses.batch_relational_distill_loss(x, t, w, 0.1, 0.05),
        "rkd": lambda x, w: losses.rkd_distance_loss(x, t, w)}[form]
  g = jax.grad(fn)(s, jnp.zeros(3))
  assert np.all(np.asarray(g) == 0)
  g = jax.grad(fn)(s, jnp.array([1.0, 0.0, 0.0]))
  assert np.any(np.asarray(g) != 0)
  # the teacher gets no gradient
  tg = jax.grad(lambda tt: losses.rkd_distance_loss(s, tt, jnp.ones(3)))(t)
  assert np.all(np.asarray(tg) == 0)


def test_batch_forms_under_shard_map_equal_the_global_batch():
  """With axis_name, 4 shards of a batch give the global value (the train
  step's pmean of per-shard losses): run in a subprocess with 4 CPU devices."""
  import subprocess
  import sys
  code = r'''
import os, sys
sys.path.insert(0, os.getcwd())
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from structvpr_jax import losses, parallel
mesh = parallel.make_mesh()
assert mesh.size == 4
rng = np.random.default_rng(9)
s = jnp.asarray(rng.normal(size=(8, 3, 6)), jnp.float32)
t = jnp.asarray(rng.normal(size=(8, 3, 6)), jnp.float32)
w = jnp.asarray((rng.random(8) > 0.4).astype(np.float32))
forms = {
  "relational_batch": lambda s, t, w, **k: losses.batch_relational_distill_loss(s, t, w, 0.2, 0.05, **k),
  "rkd": lambda s, t, w, **k: losses.rkd_distance_loss(s, t, w, **k),
  "feature": lambda s, t, w, **k: losses.distill_loss(s[:, 0], t[:, 0], w, **k),
  "relational": lambda s, t, w, **k: losses.relational_distill_loss(s, t, w, 0.2, **k)}
for name, fn in forms.items():
  for normalize in ("batch", "weights"):
    want = fn(s, t, w, normalize=normalize)
    def shard(s, t, w):
      return jax.lax.pmean(fn(s, t, w, normalize=normalize, axis_name="data"), "data")
    got = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P()))(s, t, w)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7, err_msg=f"{name} {normalize}")
    # the gradient w.r.t. the student, as the train step takes it: each device
    # differentiates its own shard's loss (the cotangents of the gathered
    # candidates return to their devices), then the gradients are averaged
    gw = jax.grad(lambda s: fn(s, t, w, normalize=normalize))(s)
    def local_grad(s, t, w):
      g = jax.grad(lambda s: fn(s, t, w, normalize=normalize, axis_name="data"))(s)
      return g / jax.lax.psum(1, "data")
    gs = jax.jit(jax.shard_map(local_grad, mesh=mesh, in_specs=(P("data"),) * 3,
                               out_specs=P("data")))(s, t, w)
    np.testing.assert_allclose(gs, gw, rtol=1e-4, atol=1e-6, err_msg=f"grad {name} {normalize}")
print("ok")
'''
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                       timeout=600)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]

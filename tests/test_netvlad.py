"""NetVLAD vs a numpy reference from docs/design.md; k-means init; branch shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structvpr_jax.models import branch, netvlad


def numpy_netvlad(x, kernel, bias, centroids):
  """x [B, N, D] -> [B, K*D] following docs/design.md ("NetVLAD") literally."""
  out = []
  for xb in x:
    xb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
    logits = xb @ kernel + bias
    a = np.exp(logits - logits.max(axis=1, keepdims=True))
    a /= a.sum(axis=1, keepdims=True)
    v = np.zeros_like(centroids)
    for k in range(len(centroids)):
      for i in range(len(xb)):
        v[k] += a[i, k] * (xb[i] - centroids[k])
      v[k] /= np.linalg.norm(v[k])
    flat = v.reshape(-1)
    out.append(flat / np.linalg.norm(flat))
  return np.stack(out)


def params_of(kernel, bias, centroids):
  return {"params": {"assign": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)},
                     "centroids": jnp.asarray(centroids)}}


def test_matches_numpy_reference_on_random_input():
  rng = np.random.default_rng(0)
  b, h, w, d, k = 3, 4, 5, 6, 4
  x = rng.normal(size=(b, h, w, d)).astype(np.float32)
  kernel, bias = rng.normal(size=(d, k)), rng.normal(size=(k,))
  centroids = rng.normal(size=(k, d))
  layer = netvlad.NetVLAD(k)
  got = jax.jit(layer.apply)(params_of(kernel, bias, centroids), x)
  want = numpy_netvlad(x.reshape(b, h * w, d), kernel, bias, centroids)
  assert got.shape == (b, k * d)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_hand_case_k2_d2_cluster_major():
  # x = (1,0), (0,1); zero assignment weights -> a = 1/2 each.
  # V_0 = 0.5(1,0) + 0.5(0,1) - (0,0) = (0.5, 0.5)        -> (1,1)/sqrt2
  # V_1 = 0.5((1,0)-(1,1)) + 0.5((0,1)-(1,1)) = (-.5,-.5) -> -(1,1)/sqrt2
  # flatten cluster-major, L2 -> (0.5, 0.5, -0.5, -0.5)
  x = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
  out = netvlad.NetVLAD(2).apply(
      params_of(np.zeros((2, 2)), np.zeros(2), np.array([[0.0, 0.0], [1.0, 1.0]])), x)
  np.testing.assert_allclose(out, [[0.5, 0.5, -0.5, -0.5]], atol=1e-6)


def _plain_residual_sums(assign, x, centroids):
  """Eq. 1 as written, sum_n a_nk (x_n - c_k), for autodiff to differentiate."""
  return jnp.einsum("bnk,bnkd->bkd", assign, x[:, :, None, :] - centroids[None, None])


def test_residual_sums_vjp_equals_autodiff_of_the_formula_float64():
  rng = np.random.default_rng(3)
  b, n, k, d = 3, 7, 4, 5
  with jax.enable_x64():
    a = jax.nn.softmax(jnp.asarray(rng.normal(size=(b, n, k))), axis=-1)
    x = jnp.asarray(rng.normal(size=(b, n, d)))
    c = jnp.asarray(rng.normal(size=(k, d)))
    g = jnp.asarray(rng.normal(size=(b, k, d)))
    got, got_vjp = jax.vjp(netvlad.residual_sums, a, x, c)
    want, want_vjp = jax.vjp(_plain_residual_sums, a, x, c)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    for name, u, v in zip(("assign", "x", "centroids"), got_vjp(g), want_vjp(g)):
      assert u.dtype == v.dtype == jnp.float64, name
      np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12, err_msg=name)


def test_residual_sums_hand_gradient():
  # one image, N = 2, K = 1, D = 1: V = a1 (x1 - c) + a2 (x2 - c), g = 1:
  # dV/da_i = x_i - c, dV/dx_i = a_i, dV/dc = -(a1 + a2)
  a = jnp.array([[[0.25], [0.5]]])
  x = jnp.array([[[2.0], [-1.0]]])
  c = jnp.array([[0.5]])
  v, vjp = jax.vjp(netvlad.residual_sums, a, x, c)
  np.testing.assert_allclose(v, [[[0.25 * 1.5 + 0.5 * -1.5]]])
  da, dx, dc = vjp(jnp.ones((1, 1, 1)))
  np.testing.assert_allclose(da, [[[1.5], [-1.5]]])
  np.testing.assert_allclose(dx, [[[0.25], [0.5]]])
  np.testing.assert_allclose(dc, [[-0.75]])


def test_layer_gradients_equal_autodiff_with_mask_float32():
  rng = np.random.default_rng(4)
  b, h, w, d, k = 2, 3, 4, 6, 5
  x = jnp.asarray(rng.normal(size=(b, h, w, d)), jnp.float32)
  mask = jnp.asarray(rng.random((b, h * w)) > 0.3, jnp.float32)
  layer = netvlad.NetVLAD(k)
  params = layer.init(jax.random.PRNGKey(0), x)
  cot = jnp.asarray(rng.normal(size=(b, k * d)), jnp.float32)
  loss = lambda p, x: jnp.sum(layer.apply(p, x, mask) * cot)
  got = jax.grad(loss, argnums=(0, 1))(params, x)
  original = netvlad.residual_sums
  try:
    netvlad.residual_sums = _plain_residual_sums   # autodiff of Eq. 1 instead
    want = jax.grad(loss, argnums=(0, 1))(params, x)
  finally:
    netvlad.residual_sums = original
  for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)


def test_param_names_and_shapes():
  v = netvlad.NetVLAD(8).init(jax.random.PRNGKey(0), jnp.ones((1, 3, 3, 5)))["params"]
  assert v["assign"]["kernel"].shape == (5, 8)
  assert v["assign"]["bias"].shape == (8,)
  assert v["centroids"].shape == (8, 5)


def test_init_from_kmeans_recovers_clusters_and_alpha_formula():
  rng = np.random.default_rng(0)
  centres = np.eye(4, 8, dtype=np.float32) * 3
  x = np.concatenate([c + 0.05 * rng.normal(size=(100, 8)) for c in centres]).astype(np.float32)
  params = netvlad.init_from_kmeans(x, 4, seed=0)
  c = params["centroids"]
  assert c.shape == (4, 8) and params["assign"]["kernel"].shape == (8, 4)
  np.testing.assert_array_equal(params["assign"]["bias"], np.zeros(4))
  # every true cluster direction is matched by one centroid
  c_hat = c / np.linalg.norm(c, axis=1, keepdims=True)
  assert np.all(np.max(c_hat @ (centres / 3).T, axis=0) > 0.99)
  # alpha from the formula, recomputed independently
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  dots = np.sort(xn @ c_hat.T, axis=1)
  alpha = -np.log(0.01) / np.mean(dots[:, -1] - dots[:, -2])
  np.testing.assert_allclose(params["assign"]["kernel"], alpha * c_hat.T, rtol=1e-4)
  # the resulting soft assignment is nearly hard: top cluster gets >= 0.99 on average
  logits = xn @ params["assign"]["kernel"]
  a = np.exp(logits - logits.max(1, keepdims=True))
  a /= a.sum(1, keepdims=True)
  assert a.max(1).mean() > 0.95


def test_init_from_kmeans_is_deterministic_and_validates():
  x = np.random.default_rng(1).normal(size=(200, 6)).astype(np.float32)
  a, b = netvlad.init_from_kmeans(x, 5, seed=3), netvlad.init_from_kmeans(x, 5, seed=3)
  np.testing.assert_array_equal(a["centroids"], b["centroids"])
  with pytest.raises(ValueError, match="at least num_clusters"):
    netvlad.init_from_kmeans(x[:3], 5)
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    netvlad.init_from_kmeans(x[None], 5)


def test_branch_projection_gives_common_descriptor_size():
  tiny = ((1, 8, 1, 1), (2, 16, 1, 2))
  rgb = branch.Branch("mobilenet_v2", width=0.35, dim=16, num_clusters=4, blocks=tiny)
  seg = branch.Branch("mobilenet_light", width=0.35, dim=16, num_clusters=4, blocks=tiny)
  out_rgb = jax.eval_shape(lambda: rgb.init_with_output(jax.random.PRNGKey(0),
                                                        jnp.zeros((2, 32, 32, 3)))[0])
  out_seg = jax.eval_shape(lambda: seg.init_with_output(jax.random.PRNGKey(0),
                                                        jnp.zeros((2, 32, 32, 5)))[0])
  assert out_rgb.shape == out_seg.shape == (2, 64) == (2, rgb.descriptor_dim)
  no_proj = branch.Branch("mobilenet_v2", width=0.35, dim=None, num_clusters=4, blocks=tiny)
  assert no_proj.descriptor_dim == 4 * 1280
  feats = jax.eval_shape(lambda: no_proj.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), method="local_features")[0])
  assert feats.shape == (1, 8, 8, 1280)  # stem + one stride-2 stage: stride 4

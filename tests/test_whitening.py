"""PCA-whitening of global descriptors vs a plain-numpy reference and hand cases."""

import numpy as np
import pytest

from structvpr_jax import whitening


def _descriptors(n=200, d=32, seed=0):
  rng = np.random.default_rng(seed)
  # anisotropic: a few strong directions, as real descriptors have
  x = rng.normal(size=(n, d)) * np.geomspace(5.0, 0.1, d)
  x = x @ np.linalg.qr(rng.normal(size=(d, d)))[0]
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_whitened_training_covariance_is_identity():
  x = _descriptors()
  params = whitening.fit(x, 8, whiten=True, eps=0.0)
  y = (x - params["mean"]) @ params["projection"]      # before the final L2 norm
  np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(8), atol=1e-3)


def test_matches_numpy_eigendecomposition_reference():
  x = _descriptors(seed=1).astype(np.float64)
  params = whitening.fit(x, 5, whiten=True, eps=0.0)
  # reference from the definition: eigenvectors of the sample covariance
  cov = np.cov(x, rowvar=False)
  vals, vecs = np.linalg.eigh(cov)
  order = np.argsort(vals)[::-1][:5]
  ref = vecs[:, order] / np.sqrt(vals[order])
  got = params["projection"].astype(np.float64)
  signs = np.sign(np.sum(got * ref, axis=0))           # eigenvectors up to sign
  np.testing.assert_allclose(got * signs, ref, rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(params["explained_variance"], vals[order], rtol=1e-4)
  np.testing.assert_allclose(params["mean"], x.mean(0), atol=1e-6)


def test_hand_case_points_on_a_line():
  # 2-D points on the line y = x: one component, along (1, 1)/sqrt(2).
  x = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
  params = whitening.fit(x, 1, whiten=False)
  direction = params["projection"][:, 0]
  np.testing.assert_allclose(np.abs(direction), [2 ** -0.5, 2 ** -0.5], atol=1e-6)
  np.testing.assert_allclose(params["mean"], [1.5, 1.5])
  # variance along the line: coordinates -1.5..1.5 step 1 times sqrt(2) -> var 10/3
  np.testing.assert_allclose(params["explained_variance"], [10.0 / 3.0], rtol=1e-5)
  y = whitening.apply(params, np.array([[3.0, 3.0], [0.0, 0.0]]))
  np.testing.assert_allclose(np.abs(y), [[1.0], [1.0]])   # unit norm, opposite signs
  assert y[0, 0] == -y[1, 0]


def test_apply_unit_norm_and_plain_pca_keeps_distances_order():
  x = _descriptors(seed=2)
  params = whitening.fit(x, 31, whiten=False)           # full rank - 1: almost a rotation
  y = whitening.apply(params, x)
  np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)
  assert y.shape == (200, 31) and y.dtype == np.float32


@pytest.mark.parametrize("dim", [0, 33, 200])
def test_bad_dim_names_the_field(dim):
  with pytest.raises(ValueError, match="eval.pca_dim"):
    whitening.fit(_descriptors(), dim)

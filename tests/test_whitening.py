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


def test_apply_gives_unit_norm_rows():
  x = _descriptors(seed=2)
  params = whitening.fit(x, 31, whiten=False)
  y = whitening.apply(params, x)
  np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)
  assert y.shape == (200, 31) and y.dtype == np.float32


def _pairwise(a):
  a = a.astype(np.float64)
  sq = np.sum(a * a, axis=1)
  return np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * a @ a.T, 0.0))


def test_full_rank_plain_pca_keeps_distances_and_their_order():
  """Plain PCA to the full dimension rotates the centred descriptors, so
  after the L2 norm every pairwise distance, and each descriptor's order of
  neighbours, is that of the centred, L2-normalised descriptors (numpy
  reference); a rank-deficient projection (PCA to 4 dims) does not keep it."""
  x = _descriptors(seed=2)
  centred = x.astype(np.float64) - x.astype(np.float64).mean(0)
  reference = _pairwise(centred / np.linalg.norm(centred, axis=1, keepdims=True))
  y = whitening.apply(whitening.fit(x, 32, whiten=False), x)
  got = _pairwise(y)
  np.testing.assert_allclose(got, reference, atol=2e-5)
  # the order of each row's 10 nearest neighbours (itself first)
  np.testing.assert_array_equal(np.argsort(got, axis=1)[:, :10],
                                np.argsort(reference, axis=1)[:, :10])
  low = _pairwise(whitening.apply(whitening.fit(x, 4, whiten=False), x))
  assert not np.array_equal(np.argsort(low, axis=1)[:, :10], np.argsort(reference, axis=1)[:, :10])


@pytest.mark.parametrize("dim", [0, 33, 200])
def test_bad_dim_names_the_field(dim):
  with pytest.raises(ValueError, match="eval.pca_dim"):
    whitening.fit(_descriptors(), dim)

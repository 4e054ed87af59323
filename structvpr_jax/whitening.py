"""PCA (optionally whitened) projection of global descriptors.

NetVLAD descriptors are large (K * D: 4096-d by default, 81,920-d for
NetVLAD-64 on MobileNetV2's 1280 channels). The usual remedy in the VPR
literature (NetVLAD, Arandjelovic et al. 2016, "PCA + whitening" to 4096-d)
is a linear map fitted on training descriptors:

  mu = mean_i x_i                                   x_i: [D] unit-norm descriptors
  X - mu = U S V^T                                  thin SVD, S descending
  P = V[:, :d] / (S[:d] / sqrt(N - 1) + eps)        whiten=True
  P = V[:, :d]                                      whiten=False (plain PCA)
  y = l2_normalize((x - mu) P)                      [d]

With whitening, the fitted descriptors' covariance is the identity in the
kept d dims (up to eps). `d` is capped by N - 1 (the rank of centred data).
Fit on the train split only; apply to database and queries alike.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12


def fit(descriptors, dim: int, whiten: bool = True, eps: float = 1e-6) -> dict:
  """Fit the projection on training descriptors.

  Args:
    descriptors: [N, D] float (N >= 2).
    dim: output dimension d (1 <= d <= min(D, N - 1)).
    whiten: scale each component to unit variance.
    eps: added to the component standard deviations (whiten=True).

  Returns:
    {"mean": [D] float32, "projection": [D, d] float32,
     "explained_variance": [d] float32 (variance of each kept component),
     "whiten": bool}.
  """
  x = np.asarray(descriptors, np.float64)
  if x.ndim != 2:
    raise ValueError(f"PCA: descriptors must be [N, D], got shape {x.shape}")
  n, d_in = x.shape
  if n < 2:
    raise ValueError(f"PCA: need at least 2 training descriptors, got {n}")
  dim = int(dim)
  max_dim = min(d_in, n - 1)
  if not 1 <= dim <= max_dim:
    raise ValueError(f"PCA: eval.pca_dim={dim} must be in [1, {max_dim}] "
                     f"(min(descriptor dim {d_in}, training descriptors {n} - 1))")
  if not np.all(np.isfinite(x)):
    raise ValueError("PCA: training descriptors contain non-finite values")
  mean = x.mean(axis=0)
  _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
  components = vt[:dim].T                                   # [D, d]
  std = s[:dim] / np.sqrt(n - 1)
  projection = components / (std + eps) if whiten else components
  return {"mean": mean.astype(np.float32), "projection": projection.astype(np.float32),
          "explained_variance": (std ** 2).astype(np.float32), "whiten": bool(whiten)}


def apply(params: dict, descriptors) -> np.ndarray:
  """[N, D] -> [N, d] float32, unit L2 norm (rows of zeros stay zero)."""
  x = np.asarray(descriptors, np.float32)
  y = (x - params["mean"]) @ params["projection"]
  norm = np.linalg.norm(y, axis=1, keepdims=True)
  return (y / np.maximum(norm, _EPS)).astype(np.float32)

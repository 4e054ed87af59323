"""NetVLAD aggregation (Arandjelovic et al., CVPR 2016) and its k-means init.

Formulas (docs/design.md, "NetVLAD"):
  x_i <- x_i / ||x_i||                                   local descriptors
  a_ik = softmax_k(x_i . W_k + b_k)                      soft assignment
  V_k  = sum_i a_ik (x_i - c_k)                          residual sums
  V_k <- V_k / ||V_k|| (intra-normalisation); flatten cluster-major; L2.
"""

from __future__ import annotations

from typing import Any, Optional

import faiss
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from structvpr_jax.losses import l2_normalize
from structvpr_jax.models import native

_EPS = 1e-12


class NetVLAD(nn.Module):
  """NetVLAD layer: [B, H, W, D] (or [B, N, D]) -> [B, K*D] unit-norm.

  Params: `assign/kernel` [D, K], `assign/bias` [K], `centroids` [K, D].
  The output is cluster-major: out[b, k*D:(k+1)*D] is cluster k's residual.

  Attributes:
    num_clusters: K.
    dtype: compute dtype of the matmuls; softmax and normalisations run in
      at least float32 (`promote_types(dtype, param_dtype, float32)`).
    param_dtype: parameter dtype.
  """
  num_clusters: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """Args: x [B, H, W, D] or [B, N, D]; mask optional [B, N] (1 = valid)."""
    b, d = x.shape[0], x.shape[-1]
    acc = jnp.promote_types(jnp.promote_types(self.dtype, self.param_dtype), jnp.float32)
    x = jnp.reshape(x, (b, -1, d)).astype(acc)
    x = l2_normalize(x)
    logits = nn.Dense(self.num_clusters, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="assign", kernel_init=nn.initializers.normal(0.1))(x)
    centroids = self.param("centroids", nn.initializers.uniform(1.0),
                           (self.num_clusters, d), self.param_dtype).astype(acc)
    assign = jax.nn.softmax(logits.astype(acc), axis=-1)  # [B, N, K]
    if mask is not None:
      assign = assign * jnp.reshape(mask, (b, -1, 1)).astype(assign.dtype)
    # inside shard_map the replicated centroids are cast to per-device
    # first: the custom VJP's centroid gradient is per-device
    vlad = residual_sums(*native.match_varying(assign, x.astype(self.dtype), centroids))
    vlad = l2_normalize(vlad, axis=-1)  # intra-normalisation
    vlad = jnp.reshape(vlad, (b, self.num_clusters * d))
    return l2_normalize(vlad, axis=-1)


@jax.custom_vjp
def residual_sums(assign: jax.Array, x: jax.Array, centroids: jax.Array) -> jax.Array:
  """V[b, k] = sum_n a[b, n, k] (x[b, n] - c[k]), computed as
  sum_n a[b, n, k] x[b, n] - (sum_n a[b, n, k]) c[k] (NetVLAD's Eq. 1).

  Args:
    assign: [B, N, K] soft assignment a, accumulation dtype (>= float32).
    x: [B, N, D] local descriptors, compute dtype (the first sum's matmul
      takes a in it and accumulates in the accumulation dtype).
    centroids: [K, D] c, accumulation dtype.

  Returns:
    [B, K, D], accumulation dtype.

  The VJP is written out (`_residual_sums_bwd`): autodiff's values (up to
  float rounding) in the form XLA:CPU runs fastest. Autodiff's transpose
  summed the centroid gradient over the batch and the assignment gradient's
  centroid term as reductions over the [B, K, D] cotangent that XLA:CPU
  (YNNPACK) ran slowly: NetVLAD-64 on 12 x 7 x 7 x 1280 took ~9.7 ms forward and
  backward, 5.3 ms with this VJP (alternating calls, this machine).
  """
  return _residual_sums_fwd(assign, x, centroids)[0]


def _residual_sums_fwd(assign, x, centroids):
  weighted = jnp.einsum("bnk,bnd->bkd", assign.astype(x.dtype), x,
                        preferred_element_type=centroids.dtype)
  vlad = weighted - jnp.sum(assign, axis=1)[..., None] * centroids[None]
  return vlad, (assign, x, centroids)


def _residual_sums_bwd(residuals, g):
  """dA[b, n, k] = x[b, n] . g[b, k] - c[k] . g[b, k];
  dX[b, n] = sum_k a[b, n, k] g[b, k];  dC[k] = -sum_b (sum_n a[b, n, k]) g[b, k]."""
  assign, x, centroids = residuals
  acc = centroids.dtype
  centroid_term = jnp.einsum("bkd,kd->bk", g, centroids)
  d_assign = jnp.einsum("bnd,bkd->bnk", x.astype(acc), g) - centroid_term[:, None, :]
  d_x = jnp.einsum("bnk,bkd->bnd", assign, g)
  d_centroids = -jnp.einsum("bk,bkd->kd", jnp.sum(assign, axis=1), g,
                            out_sharding=native.weight_gradient_sharding(g, centroids))
  return d_assign, d_x.astype(x.dtype), d_centroids


residual_sums.defvjp(_residual_sums_fwd, _residual_sums_bwd)


def init_from_kmeans(local_descs, num_clusters: int, seed: int = 0,
                     niter: int = 100) -> dict:
  """NetVLAD params from faiss k-means on local descriptors.

  Args:
    local_descs: [N, D] local features (L2-normalised here, as NetVLAD does).
    num_clusters: K (N must be >= K).
    seed: faiss k-means seed.
    niter: k-means iterations.

  Returns:
    {"assign": {"kernel": [D, K], "bias": [K]}, "centroids": [K, D]}, float32
    numpy, with centroids c from k-means, alpha = -log(0.01) / mean(top1 -
    top2 of x . c_hat), kernel = alpha * c_hat^T, bias = 0.
  """

  x = np.ascontiguousarray(np.asarray(local_descs, np.float32))
  if x.ndim != 2:
    raise ValueError(f"local_descs must be [N, D], got shape {x.shape}")
  n, d = x.shape
  if num_clusters < 2:
    raise ValueError(f"num_clusters must be >= 2, got {num_clusters}")
  if n < num_clusters:
    raise ValueError(f"k-means needs at least num_clusters={num_clusters} "
                     f"descriptors, got {n}")
  if not np.all(np.isfinite(x)):
    raise ValueError("local_descs contain non-finite values")
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)
  kmeans = faiss.Kmeans(d, num_clusters, niter=niter, seed=int(seed), verbose=False,
                        max_points_per_centroid=max(256, -(-n // num_clusters)))
  kmeans.train(x)
  centroids = np.asarray(kmeans.centroids, np.float32).reshape(num_clusters, d)
  c_hat = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), _EPS)
  dots = x @ c_hat.T
  top2 = -np.partition(-dots, 1, axis=1)[:, :2]
  gap = float(np.mean(top2[:, 0] - top2[:, 1]))
  alpha = -np.log(0.01) / max(gap, 1e-6)
  return {
      "assign": {"kernel": (alpha * c_hat.T).astype(np.float32),
                 "bias": np.zeros((num_clusters,), np.float32)},
      "centroids": centroids,
  }

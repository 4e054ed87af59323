"""Re-ranking the global top-K with local features (StructVPR + R).

Pure numerics; the local features come from the same jitted pass as the
global descriptor (`evaluation.describe_with_local`: `Branch.global_and_local`
and, for eval.rerank_layer != "final", a backbone block's output), the I/O is
`evaluation.py`'s.

Local features of an image are a fixed list of P windows on one of the
branch's feature maps (`Layout`): for each patch size p and stride s (one
"set" each, as Patch-NetVLAD's patch sizes), every p x p window of cells
starting at a multiple of s. A window is described either by the mean of its
cells' L2-normalised features, normalised (`features="local"`, as many
floats as the map has channels; p = 1 is the backbone's own local features)
or by the branch's NetVLAD layer applied to its cells
(`features="patchnetvlad"`, Hausler et al. CVPR 2021; K x local_dim floats;
the final map only). An image keeps at most
`max_features` of them (the windows whose cells' local features have the
largest mean norm) as float16, with their index into the layout (`keep`).

Matching a query with a candidate, per set (Patch-NetVLAD,
patchnetvlad/tools/patch_matcher.py): mutual nearest neighbours by cosine
similarity (`mutual_nearest_neighbours`), then a geometric score:

- `rss`: rapid spatial scoring (Patch-NetVLAD's Eq. 6): with d_i = g_db(i) -
  g_q(fw(i)) the patch-grid displacement of each mutual match (x = column,
  y = row) and d_bar their mean,
  s = (1 / n_q) sum_i (x_max - |d_ix - d_bar_x|)^2 + (y_max - |d_iy - d_bar_y|)^2,
  x_max, y_max the set's largest patch-grid column and row, n_q the query's
  feature count in the set (0 without a mutual match). Higher is better.
  Pure JAX, jitted (`candidate_scores`): batched over the candidates on an
  accelerator, one at a time inside the program on the CPU.
- `ransac`: the number of mutual matches that are inliers of a homography
  (or fundamental matrix) fitted by OpenCV's USAC between the windows' pixel
  centres, threshold `ransac_threshold` x cell size x patch stride pixels
  (Patch-NetVLAD's 1.5 x feature stride x patch stride), divided by n_q.
  Host code, one candidate and set at a time.

Several sets: each set's scores are z-normalised over the K candidates and
summed with the set weights (Patch-NetVLAD's `normalise_func`). With
`global_weight` w_g > 0 (eval.rerank_global_weight) the global similarity
of each candidate, z-normalised over the same K candidates, is added with
weight w_g (`fuse_global`): the local score alone (w_g = 0, the default,
Patch-NetVLAD's re-ranking) forgets how close the global descriptors were,
and a local match among many look-alike candidates can then outrank the
global first choice; the z-score of the global similarity keeps that
information on the same scale as each set's. The K candidates are
re-ordered by the score (ties keep the global order); ranks beyond K keep
the global order.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("none", "rss", "ransac")          # eval.rerank
FEATURES = ("local", "patchnetvlad")         # eval.rerank_features
GEOMETRIES = ("homography", "fundamental")   # eval.rerank_geometry
# eval.rerank_layer: the branch's projected local features (what NetVLAD
# aggregates) or the output of the backbone's last block at that stride
LAYERS = ("final", "stride8", "stride16", "stride32")
# fewest correspondences each model is fitted from
MIN_MATCHES = {"homography": 4, "fundamental": 8}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `eval.rerank*` asks for (`evaluation.rerank_settings` reads the config).

  method: "rss" or "ransac"; topk: candidates re-ranked per query;
  features: "local" or "patchnetvlad"; layer: which feature map the windows
  lie on (`LAYERS`); patch_sizes, strides: one set per
  pair, in feature cells; weights: per set (empty: equal); max_features: the
  most local features kept per image (0: all); geometry: RANSAC's model;
  ransac_threshold: in units of output stride x patch stride;
  global_weight: >= 0, the weight of the candidates' z-normalised global
  similarity added to the local score (`fuse_global`; 0: the local score
  alone).
  """
  method: str = "rss"
  topk: int = 100
  features: str = "local"
  layer: str = "final"
  patch_sizes: tuple = (1,)
  strides: tuple = (1,)
  weights: tuple = ()
  max_features: int = 0
  geometry: str = "homography"
  ransac_threshold: float = 1.5
  global_weight: float = 0.0

  def describe(self) -> str:
    sizes = ",".join(f"{p}/{s}" for p, s in zip(self.patch_sizes, self.strides))
    fused = (f", + {self.global_weight:g} x global similarity" if self.global_weight else "")
    return (f"{self.method} re-ranking of the top {self.topk} ({self.features} features of "
            f"the {self.layer} layer, patch/stride {sizes}{fused})")


def check_settings(s: Settings) -> None:
  """ValueError naming the eval.rerank* field that is out of range."""
  if s.method not in METHODS:
    raise ValueError(f"eval.rerank={s.method!r}; expected one of {METHODS}")
  if s.features not in FEATURES:
    raise ValueError(f"eval.rerank_features={s.features!r}; expected one of {FEATURES}")
  if s.layer not in LAYERS:
    raise ValueError(f"eval.rerank_layer={s.layer!r}; expected one of {LAYERS}")
  if s.features == "patchnetvlad" and s.layer != "final":
    raise ValueError(f"eval.rerank_features='patchnetvlad' aggregates the final local features "
                     f"with the branch's NetVLAD: it needs eval.rerank_layer='final', got "
                     f"{s.layer!r}")
  if s.geometry not in GEOMETRIES:
    raise ValueError(f"eval.rerank_geometry={s.geometry!r}; expected one of {GEOMETRIES}")
  if int(s.topk) < 1:
    raise ValueError(f"eval.rerank_topk={s.topk} must be >= 1")
  if not s.patch_sizes or any(int(p) < 1 for p in s.patch_sizes):
    raise ValueError(f"eval.rerank_patch_sizes={tuple(s.patch_sizes)}: expected one or more "
                     "patch sizes >= 1 (feature cells)")
  if len(s.strides) != len(s.patch_sizes) or any(int(x) < 1 for x in s.strides):
    raise ValueError(f"eval.rerank_patch_strides={tuple(s.strides)}: expected one stride >= 1 "
                     f"per patch size {tuple(s.patch_sizes)}")
  if s.weights and (len(s.weights) != len(s.patch_sizes) or any(w < 0 for w in s.weights)
                    or not sum(s.weights) > 0):
    raise ValueError(f"eval.rerank_patch_weights={tuple(s.weights)}: expected () or one "
                     f"weight >= 0 per patch size {tuple(s.patch_sizes)}, not all 0")
  if int(s.max_features) < 0:
    raise ValueError(f"eval.rerank_max_features={s.max_features} must be >= 0 (0: all)")
  if not float(s.ransac_threshold) > 0:
    raise ValueError(f"eval.rerank_ransac_threshold={s.ransac_threshold} must be > 0")
  if not (np.isfinite(float(s.global_weight)) and float(s.global_weight) >= 0):
    raise ValueError(f"eval.rerank_global_weight={s.global_weight} must be a finite number "
                     ">= 0 (0: the local score alone)")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Every window an image's local features may come from (numpy, fixed per
  image size).

  feature_hw: (Hf, Wf) cells of the local feature map; output_stride: input
  pixels per cell (the mean of H / Hf and W / Wf); set_id int32 [P]; grid int32 [P, 2]: (column, row) of the
  window in its set's patch grid (window start / stride); pixels float32
  [P, 2]: (x, y) centre of the window in input pixels; cells: per set, int32
  [P_s, p * p] indices of the window's cells in the flattened Hf x Wf map;
  grid_max float32 [S, 2]: each set's largest grid (column, row);
  thresholds float32 [S]: RANSAC thresholds in pixels per set (for
  ransac_threshold 1); set_sizes int [S]: P_s.
  """
  feature_hw: tuple
  output_stride: float
  patch_sizes: tuple
  strides: tuple
  set_id: np.ndarray
  grid: np.ndarray
  pixels: np.ndarray
  cells: tuple
  grid_max: np.ndarray
  thresholds: np.ndarray

  @property
  def size(self) -> int:
    return int(len(self.set_id))

  @property
  def num_sets(self) -> int:
    return len(self.patch_sizes)

  def to_json(self) -> dict:
    return {"feature_hw": list(self.feature_hw), "output_stride": self.output_stride,
            "patch_sizes": list(self.patch_sizes), "strides": list(self.strides),
            "num_windows": self.size}


def make_layout(image_size: Sequence[int], feature_hw: Sequence[int],
                patch_sizes: Sequence[int], strides: Sequence[int]) -> Layout:
  """The `Layout` of an image of `image_size` (H, W) whose local feature map
  is `feature_hw` (Hf, Wf) cells (a cell spans H / Hf x W / Wf pixels). A
  patch size larger than the feature map is an error naming
  eval.rerank_patch_sizes."""
  h, w = (int(x) for x in image_size)
  hf, wf = (int(x) for x in feature_hw)
  sy, sx = h / hf, w / wf
  set_id, grid, pixels, cells, grid_max, thresholds = [], [], [], [], [], []
  for k, (p, s) in enumerate(zip(patch_sizes, strides)):
    p, s = int(p), int(s)
    if p > hf or p > wf:
      raise ValueError(f"eval.rerank_patch_sizes: patch size {p} exceeds the {hf}x{wf} local "
                       f"feature map of {h}x{w} images")
    rows = list(range(0, hf - p + 1, s))
    cols = list(range(0, wf - p + 1, s))
    cell = []
    for gi, r in enumerate(rows):
      for gj, c in enumerate(cols):
        set_id.append(k)
        grid.append((gj, gi))
        pixels.append(((c + p / 2.0) * sx, (r + p / 2.0) * sy))
        cell.append([(r + a) * wf + (c + b) for a in range(p) for b in range(p)])
    cells.append(np.asarray(cell, np.int32).reshape(len(rows) * len(cols), p * p))
    grid_max.append((len(cols) - 1, len(rows) - 1))
    thresholds.append(float(0.5 * (sx + sy) * s))
  return Layout(feature_hw=(hf, wf), output_stride=float(0.5 * (sx + sy)),
                patch_sizes=tuple(int(p) for p in patch_sizes),
                strides=tuple(int(s) for s in strides),
                set_id=np.asarray(set_id, np.int32), grid=np.asarray(grid, np.int32),
                pixels=np.asarray(pixels, np.float32), cells=tuple(cells),
                grid_max=np.asarray(grid_max, np.float32),
                thresholds=np.asarray(thresholds, np.float32))


def window_features(features: jax.Array, cells: np.ndarray) -> jax.Array:
  """[B, Hf, Wf, D] local features -> [B, P_s, p * p, D], the cells of each
  window (`Layout.cells[s]`)."""
  b, hf, wf, d = features.shape
  return jnp.reshape(features, (b, hf * wf, d))[:, jnp.asarray(cells)]


def describe_windows(features: jax.Array, cells: Sequence[np.ndarray], kind: str = "local",
                     aggregate=None, max_features: int = 0):
  """The local features of a batch of images, one row per kept window.

  Args:
    features: [B, Hf, Wf, D] a layer's local feature map.
    cells: per set, int [P_s, p * p] (`Layout.cells`).
    kind: "local": the mean of the window's L2-normalised features,
      normalised ([.., D]); "patchnetvlad": `aggregate([B * P_s, p * p, D])`
      -> [B * P_s, F] (the branch's NetVLAD layer).
    max_features: `select_features`; a window's strength is the mean norm
      of its cells' features.

  Returns:
    (float16 [B, P', F], int32 [B, P'] layout indices).
  """
  f = features.astype(jnp.float32)
  norms = jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True))
  feats, strength = [], []
  for c in cells:
    win = window_features(f, c)                                         # [B, Ps, pp, D]
    strength.append(jnp.mean(window_features(norms, c)[..., 0], axis=-1))
    if kind == "local":
      feats.append(_l2(jnp.mean(_l2(win), axis=2)))
    elif kind == "patchnetvlad":
      b, ps, pp, d = win.shape
      feats.append(jnp.reshape(aggregate(jnp.reshape(win, (b * ps, pp, d))), (b, ps, -1)))
    else:
      raise ValueError(f"eval.rerank_features={kind!r}; expected one of {FEATURES}")
  return select_features(jnp.concatenate(feats, axis=1), jnp.concatenate(strength, axis=1),
                         max_features)


def _l2(x, eps: float = 1e-12):
  return x / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)), eps)


def select_features(features: jax.Array, strength: jax.Array, max_features: int):
  """Keep the `max_features` strongest windows of each image.

  Args:
    features: [B, P, D]; strength: [B, P] float (larger is kept first; ties
      by the lower index); max_features: 0 or >= P keeps all.

  Returns:
    (float16 [B, P', D], int32 [B, P'] layout indices in ascending order),
    P' = min(P, max_features) (P when max_features is 0).
  """
  b, p, _ = features.shape
  if not max_features or max_features >= p:
    keep = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  else:
    _, top = jax.lax.top_k(strength, int(max_features))
    keep = jnp.sort(top, axis=1).astype(jnp.int32)
  kept = jnp.take_along_axis(features, keep[:, :, None], axis=1)
  return kept.astype(jnp.float16), keep


def mutual_nearest_neighbours(q: jax.Array, db: jax.Array, q_set: jax.Array,
                              db_set: jax.Array):
  """Mutual nearest neighbours within each set by dot product (cosine for unit
  features; Patch-NetVLAD's `torch_nn` on 2 - 2 q.db).

  Args:
    q: [Pq, D] query features; db: [Pd, D] one candidate's; any float dtype
      (computed in float32).
    q_set: int [Pq], db_set: int [Pd]: the set of each feature (features of
      different sets never match; a negative set id marks padding).

  Returns:
    (fw int32 [Pd]: the query feature nearest to each candidate feature,
     mutual bool [Pd]: that query feature's nearest candidate feature is this
     one). Ties go to the lower index.
  """
  sim = jnp.dot(db.astype(jnp.float32), q.astype(jnp.float32).T,
                precision=jax.lax.Precision.HIGHEST)                 # [Pd, Pq]
  valid = (db_set[:, None] == q_set[None, :]) & (db_set[:, None] >= 0)
  sim = jnp.where(valid, sim, -jnp.inf)
  fw = jnp.argmax(sim, axis=1).astype(jnp.int32)                      # [Pd]
  bw = jnp.argmax(sim, axis=0).astype(jnp.int32)                      # [Pq]
  mutual = (bw[fw] == jnp.arange(db.shape[0])) & jnp.any(valid, axis=1)
  return fw, mutual


def rapid_spatial_score(q_grid: jax.Array, db_grid: jax.Array, fw: jax.Array,
                        mutual: jax.Array, db_set: jax.Array, grid_max: jax.Array,
                        q_count: jax.Array) -> jax.Array:
  """Rapid spatial scores of one candidate, per set (module docstring).

  Args:
    q_grid: [Pq, 2] the query features' patch-grid (column, row);
    db_grid: [Pd, 2] the candidate's; fw, mutual: `mutual_nearest_neighbours`;
    db_set: int [Pd]; grid_max: [S, 2] (x_max, y_max) per set;
    q_count: [S] the query's feature count per set.

  Returns:
    float32 [S], higher is better; 0 for a set without mutual matches.
  """
  s = grid_max.shape[0]
  d = (db_grid - q_grid[fw]).astype(jnp.float32)                      # [Pd, 2]
  member = mutual[None, :] & (db_set[None, :] == jnp.arange(s)[:, None])   # [S, Pd]
  m = member.astype(jnp.float32)
  n = jnp.sum(m, axis=1)                                              # [S]
  mean = (m @ d) / jnp.maximum(n, 1.0)[:, None]                       # [S, 2]
  res = jnp.abs(d[None, :, :] - mean[:, None, :])                     # [S, Pd, 2]
  per = jnp.sum(jnp.square(grid_max[:, None, :].astype(jnp.float32) - res), axis=-1)
  total = jnp.sum(per * m, axis=1)
  return jnp.where(n > 0, total / jnp.maximum(q_count.astype(jnp.float32), 1.0), 0.0)


def _candidate_scores(q_feat, q_keep, db_feat, db_keep, set_id, grid, grid_max,
                      sequential=False):
  q_set = jnp.where(q_keep >= 0, set_id[jnp.maximum(q_keep, 0)], -2)
  q_grid = grid[jnp.maximum(q_keep, 0)]
  q_count = jnp.sum(q_set[None, :] == jnp.arange(grid_max.shape[0])[:, None], axis=1)

  def one(feat, keep):
    valid = keep >= 0
    db_set = jnp.where(valid, set_id[jnp.maximum(keep, 0)], -1)
    fw, mutual = mutual_nearest_neighbours(q_feat, feat, q_set, db_set)
    score = rapid_spatial_score(q_grid, grid[jnp.maximum(keep, 0)], fw, mutual, db_set,
                                grid_max, q_count)
    return score, fw, mutual

  if sequential:     # one candidate at a time: its [P, P] similarities stay in cache
    return jax.lax.map(lambda a: one(*a), (db_feat, db_keep))
  return jax.vmap(one)(db_feat, db_keep)


_jitted = jax.jit(_candidate_scores, static_argnames=("sequential",))


def candidate_scores(q_feat, q_keep, db_feat, db_keep, set_id, grid, grid_max):
  return _jitted(q_feat, q_keep, db_feat, db_keep, set_id, grid, grid_max,
                 sequential=jax.default_backend() == "cpu")


candidate_scores.__doc__ = """Scores of K candidates against one query, jitted
on the default device: on an accelerator the K candidates in one batch
(`vmap`), on the CPU one after another inside the same program (`lax.map`:
each candidate's [P, P] similarities stay cache-sized; same values).

Args:
  q_feat: [P, D] float16/32, q_keep: int32 [P] layout indices (-1: padding);
  db_feat: [K, P, D], db_keep: int32 [K, P];
  set_id: int32 [L], grid: int32 [L, 2], grid_max: float32 [S, 2] (`Layout`).

Returns:
  (rss float32 [K, S], fw int32 [K, P], mutual bool [K, P]).
"""


def ransac_inliers(src: np.ndarray, dst: np.ndarray, threshold: float,
                   geometry: str = "homography") -> np.ndarray:
  """bool [M]: correspondences src[i] -> dst[i] ([M, 2] pixels) that are
  inliers of the homography (or fundamental matrix) OpenCV's USAC fits
  (`cv2.USAC_DEFAULT`: deterministic, its own fixed seed), `threshold`
  pixels of reprojection (Sampson) error. All False below
  `MIN_MATCHES[geometry]` correspondences or when no model is found."""
  import cv2    # optional dependency, needed by eval.rerank="ransac" only
  src = np.ascontiguousarray(src, np.float32).reshape(-1, 2)
  dst = np.ascontiguousarray(dst, np.float32).reshape(-1, 2)
  if geometry not in GEOMETRIES:
    raise ValueError(f"eval.rerank_geometry={geometry!r}; expected one of {GEOMETRIES}")
  if len(src) < MIN_MATCHES[geometry]:
    return np.zeros(len(src), bool)
  if geometry == "homography":
    _, mask = cv2.findHomography(src, dst, cv2.USAC_DEFAULT, float(threshold))
  else:
    _, mask = cv2.findFundamentalMat(src, dst, cv2.USAC_DEFAULT, float(threshold), 0.99)
  if mask is None:
    return np.zeros(len(src), bool)
  return np.asarray(mask).reshape(-1).astype(bool)


def ransac_scores(layout: Layout, q_keep: np.ndarray, db_keep: np.ndarray, fw: np.ndarray,
                  mutual: np.ndarray, threshold: float = 1.5,
                  geometry: str = "homography") -> np.ndarray:
  """float32 [K, S]: per candidate and set, RANSAC inliers among the mutual
  matches / the query's feature count in the set.

  Args: q_keep int [P], db_keep int [K, P] layout indices (-1 padding);
  fw, mutual [K, P] from `candidate_scores`; threshold in output stride x
  patch stride units."""
  s = layout.num_sets
  q_keep = np.asarray(q_keep)
  q_valid = q_keep >= 0
  q_count = np.bincount(layout.set_id[q_keep[q_valid]], minlength=s).astype(np.float32)
  out = np.zeros((len(db_keep), s), np.float32)
  for c in range(len(db_keep)):
    m = np.asarray(mutual[c], bool)
    if not m.any():
      continue
    db_idx = np.asarray(db_keep[c])[m]
    q_idx = q_keep[np.asarray(fw[c])[m]]
    sets = layout.set_id[db_idx]
    for k in range(s):
      sel = sets == k
      if not sel.any():
        continue
      inl = ransac_inliers(layout.pixels[db_idx[sel]], layout.pixels[q_idx[sel]],
                           threshold * float(layout.thresholds[k]), geometry)
      out[c, k] = inl.sum() / max(q_count[k], 1.0)
  return out


def combine_scores(scores: np.ndarray, weights: Sequence[float] = ()) -> np.ndarray:
  """float64 [K]: sum over sets of weight x the set's scores z-normalised over
  the K candidates (a constant set contributes 0). `weights` () = equal."""
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2:
    raise ValueError(f"scores must be [K, S], got shape {scores.shape}")
  w = np.ones(scores.shape[1]) if not len(weights) else np.asarray(weights, np.float64)
  mean = scores.mean(axis=0, keepdims=True)
  std = scores.std(axis=0, keepdims=True)
  z = np.where(std > 0, (scores - mean) / np.where(std > 0, std, 1.0), 0.0)
  return z @ w


def fuse_global(local: np.ndarray, distances: np.ndarray, candidates: np.ndarray,
                weight: float) -> np.ndarray:
  """float64 [K]: `local` (`combine_scores`) + weight x the candidates' global
  similarity z-normalised over the K candidates.

  The global similarity is the negated squared L2 distance of the search
  (for unit descriptors 2 - 2 cosine: the same z-scores as the cosine).
  Padding (-1 candidates) and non-finite distances are left out of the mean
  and standard deviation and get no global term; so does every candidate
  when the distances are all equal. weight 0 returns `local` unchanged.
  """
  local = np.asarray(local, np.float64)
  if not weight:
    return local
  sim = -np.asarray(distances, np.float64)
  if local.shape != sim.shape or np.shape(candidates) != sim.shape:
    raise ValueError(f"local scores {local.shape}, global distances {sim.shape} and "
                     f"candidates {np.shape(candidates)} differ in shape")
  valid = (np.asarray(candidates) >= 0) & np.isfinite(sim)
  z = np.zeros_like(sim)
  if valid.any():
    mean, std = sim[valid].mean(), sim[valid].std()
    if std > 0:
      z[valid] = (sim[valid] - mean) / std
  return local + float(weight) * z


def reorder(candidates: np.ndarray, score: np.ndarray) -> np.ndarray:
  """int [K]: `candidates` (global order) sorted by `score` descending; ties
  and padding (-1 candidates, always last) keep the global order."""
  candidates = np.asarray(candidates)
  key = np.where(candidates >= 0, -np.asarray(score, np.float64), np.inf)
  return candidates[np.argsort(key, kind="stable")]


def rerank(predictions: np.ndarray, q_local: tuple, db_local: tuple, layout: Layout,
           settings: Settings, query_rows: Optional[Sequence[int]] = None,
           global_distances=None) -> dict:
  """Re-ranks every query's global top-K.

  Args:
    predictions: int [Q, >= 1] global ranking (database rows, -1 = none).
    q_local: (features [Q, P, D], keep [Q, P]) of the queries; db_local: the
      same [N, P, D], [N, P] of the database; any row-indexable arrays (a
      float16 memmap on disk is read one query's candidates at a time).
    layout, settings: how the features were made, what to do.
    query_rows: the rows of `q_local` of each prediction row (default 0..Q-1).
    global_distances: float [Q, >= K] the search's distances, aligned with
      `predictions`; needed by settings.global_weight > 0 (`fuse_global`).

  Returns:
    {"predictions": int64 [Q, W] (the first min(K, W) re-ranked, the rest as
     `predictions`), "scores": float64 [Q, K] combined score of each re-ranked
     candidate in the new order (NaN for padding), "seconds": wall time of
     the re-ranking (reading candidates included)}.
  """
  check_settings(settings)
  preds = np.asarray(predictions, np.int64)
  k = int(min(settings.topk, preds.shape[1]))
  fuse = float(settings.global_weight) > 0
  if fuse:
    if global_distances is None:
      raise ValueError(f"eval.rerank_global_weight={settings.global_weight}: fusing the "
                       "global similarity needs the search's distances (global_distances)")
    dists = np.asarray(global_distances)
    if dists.shape[0] != preds.shape[0] or dists.shape[1] < k:
      raise ValueError(f"global_distances of shape {dists.shape} do not cover the top {k} "
                       f"of predictions {preds.shape}")
  set_id, grid = jnp.asarray(layout.set_id), jnp.asarray(layout.grid)
  grid_max = jnp.asarray(layout.grid_max)
  out = preds.copy()
  scores = np.full((len(preds), k), np.nan)
  rows = range(len(preds)) if query_rows is None else query_rows
  t0 = time.perf_counter()
  for i, qi in enumerate(rows):
    cand = preds[i, :k]
    safe = np.maximum(cand, 0)
    order = np.argsort(safe, kind="stable")        # sorted reads (memmaps)
    db_feat = np.empty((k,) + tuple(db_local[0].shape[1:]), db_local[0].dtype)
    db_keep = np.empty((k,) + tuple(db_local[1].shape[1:]), np.int32)
    db_feat[order] = np.asarray(db_local[0][safe[order]])
    db_keep[order] = np.asarray(db_local[1][safe[order]])
    db_keep[cand < 0] = -1
    q_feat, q_keep = np.asarray(q_local[0][qi]), np.asarray(q_local[1][qi], np.int32)
    rss, fw, mutual = candidate_scores(q_feat, q_keep, db_feat, db_keep, set_id, grid,
                                       grid_max)
    if settings.method == "rss":
      per_set = np.asarray(rss)
    else:
      per_set = ransac_scores(layout, q_keep, db_keep, np.asarray(fw), np.asarray(mutual),
                              settings.ransac_threshold, settings.geometry)
    combined = combine_scores(per_set, settings.weights)
    if fuse:
      combined = fuse_global(combined, dists[i, :k], cand, settings.global_weight)
    new = reorder(cand, combined)
    out[i, :k] = new
    lookup = dict(zip(cand.tolist(), combined.tolist()))
    scores[i] = [lookup[c] if c >= 0 else np.nan for c in new.tolist()]
  return {"predictions": out, "scores": scores, "seconds": time.perf_counter() - t0}


def bytes_per_image(num_features: int, dim: int) -> int:
  """Stored bytes of one image's local features: float16 values + int32 keep."""
  return int(num_features) * (2 * int(dim) + 4)

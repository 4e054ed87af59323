"""Retrieval: ground truth by UTM radius, faiss search, Recall@N.

Conventions follow the VPR ecosystem (datasets_vg benchmark, MixVPR): exact
`faiss.IndexFlatL2` search by default; a query counts as found at N when any
of its top-N database images lies within `radius` metres (25 m); the
denominator is all queries. For databases too large for exact search,
`index="ivf_pq"` (`eval.index`) searches a faiss IVF-PQ index instead
(approximate: inverted lists + product-quantised codes, `make_index`).
"""

from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np
from scipy.spatial import cKDTree


def positives_within(query_utm, db_utm, radius: float) -> list:
  """Database indices within `radius` metres of each query (KD-tree).

  Args:
    query_utm: [Q, 2] metres.
    db_utm: [N, 2] metres.
    radius: inclusive radius (distance <= radius).

  Returns:
    list of Q sorted int64 arrays.
  """
  q = np.asarray(query_utm, np.float64).reshape(-1, 2)
  db = np.asarray(db_utm, np.float64).reshape(-1, 2)
  if len(db) == 0:
    return [np.zeros((0,), np.int64) for _ in range(len(q))]
  tree = cKDTree(db)
  hits = tree.query_ball_point(q, r=float(radius), return_sorted=True)
  return [np.asarray(h, np.int64) for h in hits]


INDEXES = ("flat", "ivf_pq")


def ivf_pq_params(num_database: int, dim: int, nlist: int = 0, pq_m: int = 0) -> dict:
  """The IVF-PQ shape for a database: {"nlist", "m", "nbits"}.

  nlist (inverted lists): given, else about 4 sqrt(N), at most N / 39 (faiss
  wants >= 39 training points per list) and at least 1. m (sub-quantisers):
  given, else the largest divisor of D that is <= D / 16 and <= 64 (so each
  code covers >= 16 dimensions). nbits per code: 8, fewer when N < 256 (k-means
  of 2^nbits centroids needs as many training points).
  """
  if num_database < 1 or dim < 1:
    raise ValueError(f"IVF-PQ needs a non-empty database, got N={num_database}, D={dim}")
  if not nlist:
    nlist = int(round(4 * np.sqrt(num_database)))
    nlist = max(1, min(nlist, num_database // 39))
  if not pq_m:
    pq_m = max(m for m in range(1, min(64, max(1, dim // 16)) + 1) if dim % m == 0)
  if dim % pq_m:
    raise ValueError(f"eval.pq_m={pq_m} must divide the descriptor size {dim}")
  nbits = int(max(1, min(8, np.floor(np.log2(num_database)))))
  return {"nlist": int(nlist), "m": int(pq_m), "nbits": nbits}


def make_index(db_desc, index: str = "flat", nlist: int = 0, pq_m: int = 0, nprobe: int = 16):
  """A faiss index holding `db_desc` [N, D] float32: "flat" (exact L2) or
  "ivf_pq" (`ivf_pq_params`, trained on the database itself with faiss's fixed
  k-means seed, so the same descriptors give the same index; `nprobe` lists
  visited per query)."""
  db = np.ascontiguousarray(np.asarray(db_desc, np.float32))
  if index not in INDEXES:
    raise ValueError(f"eval.index={index!r}; expected one of {INDEXES}")
  if index == "flat":
    out = faiss.IndexFlatL2(db.shape[1])
  else:
    p = ivf_pq_params(db.shape[0], db.shape[1], nlist, pq_m)
    quantizer = faiss.IndexFlatL2(db.shape[1])
    out = faiss.IndexIVFPQ(quantizer, db.shape[1], p["nlist"], p["m"], p["nbits"])
    out.train(db)
    out.nprobe = int(max(1, min(nprobe, p["nlist"])))   # faiss keeps `quantizer` alive
  out.add(db)
  return out


def search(query_desc, db_desc, k: int, index: str = "flat", nlist: int = 0, pq_m: int = 0,
           nprobe: int = 16, block_rows: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """L2 search: exact (`faiss.IndexFlatL2`, index="flat") or approximate
  (index="ivf_pq", see `make_index`).

  Args:
    query_desc: [Q, D] float32.
    db_desc: [N, D] float32, or any array-like sliceable by rows (e.g. a
      float16 `np.memmap` of descriptors on disk).
    k: neighbours per query (clipped to N).
    index, nlist, pq_m, nprobe: the index (`make_index`).
    block_rows: > 0 (flat only): read the database `block_rows` rows at a
      time, as float32, and keep the running top k (`search_blocked`): memory
      O(Q x k + block_rows x D) instead of a float32 copy of the database.

  Returns:
    (squared distances [Q, k] float32, indices [Q, k] int64), nearest first
    (IVF-PQ: approximate distances; index -1 where the visited lists held
    fewer than k vectors, counted as a miss by `correct_at_k`).
  """
  if block_rows and index == "flat":
    return search_blocked(query_desc, db_desc, k, block_rows)
  q = np.ascontiguousarray(np.asarray(query_desc, np.float32))
  db = np.ascontiguousarray(np.asarray(db_desc, np.float32))
  if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
    raise ValueError(f"descriptor shapes must be [Q, D] and [N, D], got {q.shape}, {db.shape}")
  searcher = make_index(db, index, nlist, pq_m, nprobe)
  return searcher.search(q, int(min(k, db.shape[0])))


def search_blocked(query_desc, db_desc, k: int,
                   block_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
  """Exact L2 search over database blocks of `block_rows` rows, merging each
  block's top k into the running top k (ties: the lower database index
  first, as one exact search). Same results as `search(..., "flat")`; the
  database is never held whole (a memmap on disk is read block by block)."""
  q = np.ascontiguousarray(np.asarray(query_desc, np.float32))
  n = int(db_desc.shape[0])
  if q.ndim != 2 or len(db_desc.shape) != 2 or q.shape[1] != db_desc.shape[1]:
    raise ValueError(f"descriptor shapes must be [Q, D] and [N, D], got {q.shape}, "
                     f"{tuple(db_desc.shape)}")
  if block_rows < 1:
    raise ValueError(f"block_rows must be >= 1, got {block_rows}")
  k = int(min(k, n))
  best_d = np.full((len(q), 0), np.inf, np.float32)
  best_i = np.zeros((len(q), 0), np.int64)
  for start in range(0, n, int(block_rows)):
    block = np.ascontiguousarray(np.asarray(db_desc[start:start + block_rows], np.float32))
    flat = faiss.IndexFlatL2(block.shape[1])
    flat.add(block)
    d, i = flat.search(q, int(min(k, len(block))))
    cat_d = np.concatenate([best_d, d], axis=1)
    cat_i = np.concatenate([best_i, i + start], axis=1)
    order = _topk_order(cat_d, cat_i, k)
    best_d = np.take_along_axis(cat_d, order, axis=1)
    best_i = np.take_along_axis(cat_i, order, axis=1)
  return best_d, best_i


def _topk_order(dist: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
  """int [Q, k]: per row, the positions of the k smallest distances, ties by index."""
  order = np.argsort(idx, axis=1, kind="stable")
  by_dist = np.argsort(np.take_along_axis(dist, order, axis=1), axis=1, kind="stable")
  return np.take_along_axis(order, by_dist, axis=1)[:, :k]


def correct_at_k(predictions, query_utm, db_utm, radius: float = 25.0) -> np.ndarray:
  """bool [Q, k]: whether the database image at each predicted rank is within
  `radius` of the query (vectorised; equal to membership in
  `positives_within(query_utm, db_utm, radius)`)."""
  q = np.asarray(query_utm, np.float64).reshape(-1, 2)
  db = np.asarray(db_utm, np.float64).reshape(-1, 2)
  pred = np.asarray(predictions)
  dist_sq = np.sum(np.square(db[np.maximum(pred, 0)] - q[:, None, :]), axis=-1)
  return (dist_sq <= float(radius) ** 2) & (pred >= 0)     # -1: no prediction (IVF-PQ)


def recall_from_predictions(predictions, query_utm, db_utm, ns: Sequence[int] = (1, 5, 10, 20),
                            radius: float = 25.0) -> dict:
  """{n: percent of queries with a positive among their top-n predictions}."""
  correct = correct_at_k(predictions, query_utm, db_utm, radius)
  found = np.cumsum(correct, axis=1) > 0   # found[:, j]: a positive in top j+1
  num_q = max(len(correct), 1)
  recalls = {}
  for n in ns:
    col = min(int(n), correct.shape[1]) - 1
    recalls[int(n)] = float(100.0 * found[:, col].sum() / num_q) if col >= 0 else 0.0
  return recalls


def recall_at_n(query_desc, db_desc, query_utm, db_utm, ns: Sequence[int] = (1, 5, 10, 20),
                radius: float = 25.0) -> dict:
  """Recall@N in percent (0-100) by exact faiss search.

  Args:
    query_desc: [Q, D]; db_desc: [N, D] descriptors.
    query_utm: [Q, 2]; db_utm: [N, 2] metres.
    ns: the N values; N > database size counts the whole database.
    radius: ground-truth radius in metres (25 m).

  Returns:
    {n: float percent}.
  """
  if len(query_desc) != len(query_utm) or len(db_desc) != len(db_utm):
    raise ValueError(f"descriptor/UTM counts differ: {len(query_desc)} queries vs "
                     f"{len(query_utm)} UTM, {len(db_desc)} database vs {len(db_utm)} UTM")
  _, predictions = search(query_desc, db_desc, max(ns))
  return recall_from_predictions(predictions, query_utm, db_utm, ns, radius)

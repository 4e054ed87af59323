"""Retrieval: ground truth by UTM radius, faiss search, Recall@N.

Conventions follow the VPR ecosystem (datasets_vg benchmark, MixVPR): exact
`faiss.IndexFlatL2` search; a query counts as found at N when any of its top-N
database images lies within `radius` metres (25 m); the denominator is all
queries.
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


def search(query_desc, db_desc, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact L2 search with `faiss.IndexFlatL2`.

  Args:
    query_desc: [Q, D] float32.
    db_desc: [N, D] float32.
    k: neighbours per query (clipped to N).

  Returns:
    (squared distances [Q, k] float32, indices [Q, k] int64), nearest first.
  """
  q = np.ascontiguousarray(np.asarray(query_desc, np.float32))
  db = np.ascontiguousarray(np.asarray(db_desc, np.float32))
  if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
    raise ValueError(f"descriptor shapes must be [Q, D] and [N, D], got {q.shape}, {db.shape}")
  index = faiss.IndexFlatL2(db.shape[1])
  index.add(db)
  return index.search(q, int(min(k, db.shape[0])))


def correct_at_k(predictions, query_utm, db_utm, radius: float = 25.0) -> np.ndarray:
  """bool [Q, k]: whether the database image at each predicted rank is within
  `radius` of the query (vectorised; equal to membership in
  `positives_within(query_utm, db_utm, radius)`)."""
  q = np.asarray(query_utm, np.float64).reshape(-1, 2)
  db = np.asarray(db_utm, np.float64).reshape(-1, 2)
  pred = np.asarray(predictions)
  dist_sq = np.sum(np.square(db[pred] - q[:, None, :]), axis=-1)
  return dist_sq <= float(radius) ** 2


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

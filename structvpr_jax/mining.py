"""Hard-negative mining cache (NetVLAD recipe, Arandjelovic et al. 2016).

Per training query:
- best positive = the database image within `pos_radius` (10 m) nearest to
  the query in descriptor space (current parameters);
- negatives = the `num_negatives` (M) hardest, i.e. nearest in descriptor
  space, among `num_candidates` random database images beyond `neg_radius`
  (25 m) plus the query's hard negatives of the previous round.

The cache is refreshed every `refresh_every` queries with the current
parameters (the datasets_vg benchmark's "partial" mining): a chunk of queries
is described together with their positives, one shared random candidate set
and their previous hard negatives, and mined in one vectorised pass. All
random choices come from `seed`, the epoch and the chunk index, so the same
seed and parameters give the same triplets.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np

from structvpr_jax import retrieval


class NegativeMiner:
  """Mining state over one training split.

  Args:
    query_utm: [Q, 2] training query UTM (metres).
    db_utm: [N, 2] training database UTM.
    num_negatives: M negatives per triplet.
    num_candidates: random database candidates per refresh (~1000).
    refresh_every: queries per cache refresh (chunk size).
    pos_radius, neg_radius: metres.
    seed: mining seed.
    strategy: "hard" (the NetVLAD recipe above) or "random" (M random
      negatives beyond `neg_radius` per query, no descriptors needed; a
      baseline and a warm-up for worlds where the hardest negatives are
      near-duplicates of the positive).

  Attributes:
    train_queries: int64 indices of queries usable for training (>= 1
      positive and >= M negatives).
    hard_negatives: int64 [Q, M] last round's hard negatives (-1 = none yet).
  """

  def __init__(self, query_utm, db_utm, *, num_negatives: int = 10,
               num_candidates: int = 1000, refresh_every: int = 1000,
               pos_radius: float = 10.0, neg_radius: float = 25.0, seed: int = 0,
               strategy: str = "hard"):
    if strategy not in ("hard", "random"):
      raise ValueError(f"mining strategy must be 'hard' or 'random', got {strategy!r}")
    self.strategy = strategy
    self.query_utm = np.asarray(query_utm, np.float64).reshape(-1, 2)
    self.db_utm = np.asarray(db_utm, np.float64).reshape(-1, 2)
    self.num_negatives = int(num_negatives)
    self.num_candidates = int(num_candidates)
    self.refresh_every = int(refresh_every)
    self.seed = int(seed)
    if self.num_negatives < 1 or self.refresh_every < 1 or self.num_candidates < 1:
      raise ValueError("num_negatives, num_candidates and refresh_every must be >= 1")
    self.positives = retrieval.positives_within(self.query_utm, self.db_utm, pos_radius)
    self.soft_positives = retrieval.positives_within(self.query_utm, self.db_utm, neg_radius)
    num_db = len(self.db_utm)
    num_pos = np.array([len(p) for p in self.positives])
    num_neg = num_db - np.array([len(s) for s in self.soft_positives])
    usable = (num_pos > 0) & (num_neg >= self.num_negatives)
    self.train_queries = np.flatnonzero(usable).astype(np.int64)
    self.num_without_positive = int(np.sum(num_pos == 0))
    if len(self.train_queries) == 0:
      raise ValueError(
          f"no training query has a database image within {pos_radius} m and "
          f">= {self.num_negatives} beyond {neg_radius} m "
          f"({len(self.query_utm)} queries, {num_db} database images)")
    self.hard_negatives = np.full((len(self.query_utm), self.num_negatives), -1, np.int64)
    # (epoch, chunk) -> (positive, negatives) of the last mined chunk, kept so
    # a run resumed in the middle of a chunk reuses the same triplets.
    self.last_mined: Optional[tuple] = None

  # -- ordering -------------------------------------------------------------
  def epoch_order(self, epoch: int) -> np.ndarray:
    """The usable queries in this epoch's seeded random order."""
    rng = np.random.default_rng([self.seed, 1, int(epoch)])
    return self.train_queries[rng.permutation(len(self.train_queries))]

  def chunks(self, epoch: int) -> Iterator[np.ndarray]:
    """Consecutive chunks of `refresh_every` queries of the epoch order."""
    order = self.epoch_order(epoch)
    for start in range(0, len(order), self.refresh_every):
      yield order[start:start + self.refresh_every]

  def num_chunks(self) -> int:
    return -(-len(self.train_queries) // self.refresh_every)

  # -- mining -------------------------------------------------------------
  def candidates(self, epoch: int, chunk: int) -> np.ndarray:
    """The shared random database candidates of one refresh (sorted)."""
    num_db = len(self.db_utm)
    if self.num_candidates >= num_db:
      return np.arange(num_db, dtype=np.int64)
    rng = np.random.default_rng([self.seed, 2, int(epoch), int(chunk)])
    return np.sort(rng.choice(num_db, self.num_candidates, replace=False)).astype(np.int64)

  def mine(self, query_ids: np.ndarray, epoch: int, chunk: int,
           describe: Callable[[str, np.ndarray], np.ndarray]):
    """Refreshes the cache for `query_ids` with the current parameters.

    Args:
      query_ids: int [n] training query indices (one chunk).
      epoch, chunk: position (seeds the candidate draw).
      describe: `describe(role, indices) -> float32 [len(indices), D]`, role
        "queries" or "database"; descriptors with the current parameters.

    Returns:
      (positive [n] int64, negatives [n, M] int64) database indices. Also
      stored as the next round's previous hard negatives.
    """
    query_ids = np.asarray(query_ids, np.int64)
    if (self.last_mined is not None and self.last_mined[0] == (int(epoch), int(chunk))
        and np.array_equal(self.last_mined[1], query_ids)):
      return self.last_mined[2].copy(), self.last_mined[3].copy()
    n, m = len(query_ids), self.num_negatives
    if self.strategy == "random":
      return self._random_triplets(query_ids, epoch, chunk)
    pos_lists = [self.positives[q] for q in query_ids]
    soft_lists = [self.soft_positives[q] for q in query_ids]
    previous = self.hard_negatives[query_ids]                       # [n, M], -1 = none
    cands = self.candidates(epoch, chunk)
    needed = np.unique(np.concatenate(
        [cands, previous[previous >= 0]] + pos_lists).astype(np.int64))
    q_desc = np.asarray(describe("queries", query_ids), np.float32)
    db_desc = np.asarray(describe("database", needed), np.float32)
    dist = _squared_distances(q_desc, db_desc)                        # [n, U]

    # best positive: nearest among the query's positives
    pos_rows = np.repeat(np.arange(n), [len(p) for p in pos_lists])
    pos_cols = np.searchsorted(needed, np.concatenate(pos_lists))
    pos_d = np.full(dist.shape, np.inf, np.float32)
    pos_d[pos_rows, pos_cols] = dist[pos_rows, pos_cols]
    best_positive = needed[np.argmin(pos_d, axis=1)]

    # negatives: shared candidates + own previous hard negatives, minus soft positives
    allowed = np.zeros(dist.shape, bool)
    allowed[:, np.searchsorted(needed, cands)] = True
    prev_rows, prev_k = np.nonzero(previous >= 0)
    allowed[prev_rows, np.searchsorted(needed, previous[prev_rows, prev_k])] = True
    soft_rows = np.repeat(np.arange(n), [len(s) for s in soft_lists])
    soft_cols = np.searchsorted(needed, np.concatenate(soft_lists))
    in_needed = (soft_cols < len(needed)) & (
        needed[np.minimum(soft_cols, len(needed) - 1)] == np.concatenate(soft_lists))
    allowed[soft_rows[in_needed], soft_cols[in_needed]] = False
    neg_d = np.where(allowed, dist, np.inf)
    num_allowed = allowed.sum(axis=1)
    # Too few negatives among the candidates: top up with random true negatives.
    short = np.flatnonzero(num_allowed < m)
    negatives = np.empty((n, m), np.int64)
    hardest = np.argsort(neg_d, axis=1, kind="stable")[:, :m]        # nearest first
    negatives[:] = needed[hardest]
    if len(short):
      rng = np.random.default_rng([self.seed, 3, int(epoch), int(chunk)])
      num_db = len(self.db_utm)
      for r in short:  # rare: tiny databases only
        pool = np.setdiff1d(np.arange(num_db), soft_lists[r])
        negatives[r] = rng.choice(pool, m, replace=len(pool) < m)
    self.hard_negatives[query_ids] = negatives
    best_positive = best_positive.astype(np.int64)
    self.last_mined = ((int(epoch), int(chunk)), query_ids.copy(), best_positive.copy(),
                       negatives.copy())
    return best_positive, negatives

  def _random_triplets(self, query_ids, epoch, chunk):
    """A random positive and M random negatives per query (vectorised)."""
    n, m, num_db = len(query_ids), self.num_negatives, len(self.db_utm)
    rng = np.random.default_rng([self.seed, 4, int(epoch), int(chunk)])
    soft = np.zeros((n, num_db), bool)
    rows = np.repeat(np.arange(n), [len(self.soft_positives[q]) for q in query_ids])
    soft[rows, np.concatenate([self.soft_positives[q] for q in query_ids])] = True
    # random permutation of the database per query; negatives first, in random order
    keys = rng.random((n, num_db)) + soft          # soft positives sort last
    negatives = np.argsort(keys, axis=1)[:, :m].astype(np.int64)
    counts = np.array([len(self.positives[q]) for q in query_ids])
    pick = (rng.random(n) * counts).astype(np.int64)
    positive = np.array([self.positives[q][k] for q, k in zip(query_ids, pick)], np.int64)
    self.last_mined = ((int(epoch), int(chunk)), query_ids.copy(), positive.copy(),
                       negatives.copy())
    return positive, negatives

  # -- checkpointing ---------------------------------------------------------
  def state_dict(self) -> dict:
    """numpy arrays only (fits an Orbax checkpoint)."""
    state = {"hard_negatives": self.hard_negatives.copy()}
    if self.last_mined is not None:
      (epoch, chunk), q, p, n = self.last_mined
      state.update(last_key=np.array([epoch, chunk], np.int64), last_queries=q,
                   last_positive=p, last_negatives=n)
    return state

  def load_state_dict(self, state: dict) -> None:
    hard = np.asarray(state["hard_negatives"], np.int64)
    if hard.shape != self.hard_negatives.shape:
      raise ValueError(f"mining state shape {hard.shape} != {self.hard_negatives.shape}")
    self.hard_negatives = hard.copy()
    self.last_mined = None
    if "last_key" in state:
      key = tuple(int(k) for k in np.asarray(state["last_key"]))
      self.last_mined = (key, np.asarray(state["last_queries"], np.int64),
                         np.asarray(state["last_positive"], np.int64),
                         np.asarray(state["last_negatives"], np.int64))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[n, m] squared L2 distances (float32, clipped at 0)."""
  sq = (np.sum(a * a, axis=1, keepdims=True) + np.sum(b * b, axis=1)[None, :]
        - 2.0 * a @ b.T)
  return np.maximum(sq, 0.0).astype(np.float32)

"""Hard-negative mining: planted hardest negative, best positive, determinism."""

import numpy as np
import pytest

from structvpr_jax import mining

# Database on a north line every 5 m (0..195 m); queries at the same places.
DB_UTM = np.stack([np.zeros(40), np.arange(40) * 5.0], 1)
Q_UTM = DB_UTM[::4] + np.array([0.0, 1.0])


def random_describe(seed=0, dim=8, planted=None):
  rng = np.random.default_rng(seed)
  q_desc = rng.normal(size=(len(Q_UTM), dim)).astype(np.float32)
  db_desc = rng.normal(size=(len(DB_UTM), dim)).astype(np.float32)
  for q, d in (planted or {}).items():
    db_desc[d] = q_desc[q] + 1e-3
  calls = []

  def describe(role, idx):
    calls.append((role, np.asarray(idx).copy()))
    return (q_desc if role == "queries" else db_desc)[np.asarray(idx)]
  return describe, q_desc, db_desc, calls


def test_planted_hardest_negative_and_best_positive():
  # query 0 (north 1 m): db 30 (150 m away) is made its descriptor twin
  describe, q_desc, db_desc, _ = random_describe(planted={0: 30, 5: 2})
  miner = mining.NegativeMiner(Q_UTM, DB_UTM, num_negatives=3, num_candidates=1000,
                               refresh_every=10, seed=0)
  pos, neg = miner.mine(np.arange(len(Q_UTM)), 0, 0, describe)
  assert neg[0, 0] == 30 and neg[5, 0] == 2
  for i in range(len(Q_UTM)):
    geo = np.linalg.norm(DB_UTM - Q_UTM[i], axis=1)
    positives = np.flatnonzero(geo <= 10)
    d = np.linalg.norm(db_desc - q_desc[i], axis=1)
    assert pos[i] == positives[np.argmin(d[positives])]
    # negatives are beyond 25 m, distinct, and the M nearest such in descriptor space
    assert np.all(geo[neg[i]] > 25) and len(set(neg[i])) == 3
    negs = np.flatnonzero(geo > 25)
    np.testing.assert_array_equal(neg[i], negs[np.argsort(d[negs], kind="stable")[:3]])


def test_candidates_subset_and_previous_hard_negatives_are_kept():
  describe, *_ , calls = random_describe(planted={0: 30})
  miner = mining.NegativeMiner(Q_UTM, DB_UTM, num_negatives=2, num_candidates=5,
                               refresh_every=10, seed=1)
  miner.hard_negatives[0] = [30, 31]
  _, neg = miner.mine(np.array([0, 1]), 0, 0, describe)
  assert neg[0, 0] == 30            # previous hard negative stays a candidate
  cands = miner.candidates(0, 0)
  assert len(cands) == 5
  described_db = [idx for role, idx in calls if role == "database"][0]
  assert set(cands) <= set(described_db) and 30 in described_db
  assert set(neg[1]) <= set(cands) | set(miner.hard_negatives[1])


def test_seeded_order_and_state_round_trip():
  a = mining.NegativeMiner(Q_UTM, DB_UTM, num_negatives=2, refresh_every=4, seed=3)
  b = mining.NegativeMiner(Q_UTM, DB_UTM, num_negatives=2, refresh_every=4, seed=3)
  c = mining.NegativeMiner(Q_UTM, DB_UTM, num_negatives=2, refresh_every=4, seed=4)
  np.testing.assert_array_equal(a.epoch_order(0), b.epoch_order(0))
  assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
  assert not np.array_equal(a.epoch_order(0), c.epoch_order(0))
  assert sorted(np.concatenate(list(a.chunks(0)))) == sorted(a.train_queries)
  describe, *_ = random_describe()
  chunk = next(iter(a.chunks(0)))
  pos, neg = a.mine(chunk, 0, 0, describe)
  b.load_state_dict(a.state_dict())
  np.testing.assert_array_equal(b.hard_negatives, a.hard_negatives)
  # resuming inside the chunk reuses the mined triplets (no re-mining)
  pos2, neg2 = b.mine(chunk, 0, 0, lambda *_: (_ for _ in ()).throw(AssertionError("mined")))
  np.testing.assert_array_equal(pos, pos2)
  np.testing.assert_array_equal(neg, neg2)


def test_unusable_queries_are_excluded_and_all_unusable_raises():
  q_utm = np.concatenate([Q_UTM, [[5000.0, 5000.0]]])   # last one: no positive
  miner = mining.NegativeMiner(q_utm, DB_UTM, num_negatives=2)
  assert len(q_utm) - 1 not in miner.train_queries and miner.num_without_positive == 1
  with pytest.raises(ValueError, match="no training query"):
    mining.NegativeMiner([[9000.0, 0.0]], DB_UTM)


def test_random_strategy_draws_true_negatives_and_positives():
  miner = mining.NegativeMiner(Q_UTM, DB_UTM, num_negatives=3, refresh_every=10, seed=0,
                               strategy="random")
  pos, neg = miner.mine(np.arange(len(Q_UTM)), 0, 0, None)   # needs no descriptors
  for i in range(len(Q_UTM)):
    geo = np.linalg.norm(DB_UTM - Q_UTM[i], axis=1)
    assert geo[pos[i]] <= 10 and np.all(geo[neg[i]] > 25) and len(set(neg[i])) == 3
  again = mining.NegativeMiner(Q_UTM, DB_UTM, num_negatives=3, refresh_every=10, seed=0,
                               strategy="random").mine(np.arange(len(Q_UTM)), 0, 0, None)
  np.testing.assert_array_equal(neg, again[1])
  other = miner.mine(np.arange(len(Q_UTM)), 1, 0, None)[1]
  assert not np.array_equal(neg, other)
  with pytest.raises(ValueError, match="strategy"):
    mining.NegativeMiner(Q_UTM, DB_UTM, strategy="semi")

"""Ground truth by radius and Recall@N vs brute force and a hand case."""

import numpy as np
import pytest

from structvpr_jax import retrieval


def brute_positives(q_utm, db_utm, radius):
  return [np.array([j for j in range(len(db_utm))
                    if np.linalg.norm(db_utm[j] - q) <= radius], np.int64) for q in q_utm]


def brute_recall(q_desc, db_desc, q_utm, db_utm, ns, radius):
  positives = brute_positives(q_utm, db_utm, radius)
  d = ((q_desc[:, None, :] - db_desc[None]) ** 2).sum(-1)
  order = np.argsort(d, axis=1, kind="stable")
  return {n: 100.0 * np.mean([np.isin(order[i, :n], positives[i]).any()
                              for i in range(len(q_desc))]) for n in ns}


def test_positives_within_matches_brute_force_and_is_sorted():
  rng = np.random.default_rng(0)
  q, db = rng.uniform(0, 100, (40, 2)), rng.uniform(0, 100, (300, 2))
  got = retrieval.positives_within(q, db, 12.5)
  for a, b in zip(got, brute_positives(q, db, 12.5)):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int64 and np.all(np.diff(a) > 0)


def test_positives_within_radius_is_inclusive():
  got = retrieval.positives_within([[0.0, 0.0]], [[0, 25.0], [0, 25.001], [3, 4]], 25.0)
  np.testing.assert_array_equal(got[0], [0, 2])


def test_recall_hand_case():
  # database at north 0, 100, 200, 300 with 1-D descriptors 0, 1, 2, 3.
  db_utm = np.array([[0, 0], [0, 100], [0, 200], [0, 300]], float)
  db = np.array([[0.0], [1.0], [2.0], [3.0]], np.float32)
  # q0 at north 0 looks like db1 (1.1): squared distances to db0..db3 are
  #   1.21, .01, .81, 3.61 -> order db1, db2, db0, db3: found at rank 3.
  # q1 at north 300 looks like db0 (0.0): order db0, db1, db2, db3: found at rank 4.
  # q2 at north 200 looks like db2: found at rank 1.
  q_utm = np.array([[0, 0], [0, 300], [0, 200]], float)
  q = np.array([[1.1], [0.0], [2.0]], np.float32)
  rec = retrieval.recall_at_n(q, db, q_utm, db_utm, ns=(1, 2, 3, 4, 20))
  np.testing.assert_allclose([rec[n] for n in (1, 2, 3, 4, 20)],
                             [100 / 3, 100 / 3, 200 / 3, 100.0, 100.0])


def test_recall_matches_brute_force():
  rng = np.random.default_rng(1)
  db_utm = rng.uniform(0, 500, (200, 2))
  q_utm = db_utm[:60] + rng.normal(0, 5, (60, 2))
  db = rng.normal(size=(200, 8)).astype(np.float32)
  q = (db[:60] + rng.normal(0, 0.8, (60, 8))).astype(np.float32)
  ns = (1, 5, 10, 20)
  got = retrieval.recall_at_n(q, db, q_utm, db_utm, ns)
  want = brute_recall(q, db, q_utm, db_utm, ns, 25.0)
  for n in ns:
    assert got[n] == pytest.approx(want[n])
  assert 0 < got[1] <= got[5] <= got[10] <= got[20] <= 100


def test_recall_with_no_positive_counts_as_miss():
  rec = retrieval.recall_at_n(np.zeros((2, 2)), np.zeros((1, 2)), [[0, 0], [0, 1000]],
                              [[0, 0]], ns=(1,))
  assert rec[1] == 50.0


def test_shape_errors():
  with pytest.raises(ValueError, match="counts differ"):
    retrieval.recall_at_n(np.zeros((2, 2)), np.zeros((3, 2)), np.zeros((1, 2)), np.zeros((3, 2)))
  with pytest.raises(ValueError, match="descriptor shapes"):
    retrieval.search(np.zeros((2, 3)), np.zeros((3, 2)), 1)

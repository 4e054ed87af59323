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


def test_ivf_pq_params():
  assert retrieval.ivf_pq_params(10000, 4096) == {"nlist": 256, "m": 64, "nbits": 8}   # 4 sqrt(N) > N/39
  assert retrieval.ivf_pq_params(1000, 4096)["nlist"] == 25                            # N // 39
  assert retrieval.ivf_pq_params(20, 4096) == {"nlist": 1, "m": 64, "nbits": 4}
  assert retrieval.ivf_pq_params(1000, 64)["m"] == 4                                   # <= D/16
  assert retrieval.ivf_pq_params(1000, 96)["m"] == 6
  assert retrieval.ivf_pq_params(1000, 4096, nlist=7, pq_m=32) == {"nlist": 7, "m": 32,
                                                                    "nbits": 8}
  with pytest.raises(ValueError, match="pq_m=5 must divide"):
    retrieval.ivf_pq_params(1000, 64, pq_m=5)


def test_ivf_pq_search_finds_well_separated_neighbours_and_misses_count():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(60, 64)).astype(np.float32)
  db = np.repeat(centres, 10, axis=0) + 0.01 * rng.normal(size=(600, 64)).astype(np.float32)
  q = centres + 0.01 * rng.normal(size=(60, 64)).astype(np.float32)
  _, exact = retrieval.search(q, db, 5)
  _, approx = retrieval.search(q, db, 5, index="ivf_pq", nprobe=4)
  assert approx.shape == (60, 5) and approx.dtype == np.int64
  # every query's nearest cluster is found: the top-5 lie in its own 10 copies
  assert np.all(approx // 10 == np.arange(60)[:, None])
  assert np.all(exact // 10 == np.arange(60)[:, None])
  # the same descriptors give the same index and answers (fixed k-means seed)
  np.testing.assert_array_equal(retrieval.search(q, db, 5, index="ivf_pq", nprobe=4)[1], approx)
  # a -1 (fewer than k found) is a miss, never the last database image
  utm_db = np.zeros((600, 2))
  utm_db[-1] = [1000.0, 0.0]
  hits = retrieval.correct_at_k(np.array([[-1, 599]]), np.array([[1000.0, 0.0]]), utm_db)
  np.testing.assert_array_equal(hits, [[False, True]])
  with pytest.raises(ValueError, match="eval.index='hnsw'"):
    retrieval.search(q, db, 5, index="hnsw")


def test_blocked_search_equals_one_exact_search(tmp_path):
  """search_blocked / search(block_rows=...) over any block size, a float16
  memmap included, returns the exact search's neighbours; ties go to the
  lower database index as in one search."""
  rng = np.random.default_rng(3)
  q = rng.normal(size=(40, 16)).astype(np.float32)
  db = rng.normal(size=(300, 16)).astype(np.float32)
  db[200] = db[10]                                   # an exact tie across blocks
  q[0] = db[10]
  d0, i0 = retrieval.search(q, db, 12)
  for block in (1, 7, 64, 299, 1000):
    d1, i1 = retrieval.search(q, db, 12, block_rows=block)
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_allclose(d1, d0, rtol=1e-6, atol=1e-6)
  assert i0[0, 0] == 10 and i0[0, 1] == 200
  path = str(tmp_path / "db.npy")
  mm = np.lib.format.open_memmap(path, "w+", np.float16, db.shape)
  mm[:] = db
  mm.flush()
  on_disk = np.load(path, mmap_mode="r")
  d2, i2 = retrieval.search_blocked(q, on_disk, 5, block_rows=50)
  d3, i3 = retrieval.search(q, db.astype(np.float16).astype(np.float32), 5)
  np.testing.assert_array_equal(i2, i3)
  np.testing.assert_allclose(d2, d3, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="block_rows"):
    retrieval.search_blocked(q, db, 5, block_rows=0)

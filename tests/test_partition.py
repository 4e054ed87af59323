"""Partition margins/ranks, groups and Eq. 3 weights vs numpy and by hand."""

import jax
import numpy as np
import pytest

from structvpr_jax import partition

# Hand case, 1-D descriptors, places on a north line (east = 0):
# database at 0, 5, 30, 60 m; queries at 0, 30, 100, 60, 5 m.
DB_UTM = np.array([[0, 0], [0, 5], [0, 30], [0, 60]], np.float64)
Q_UTM = np.array([[0, 0], [0, 30], [0, 100], [0, 60], [0, 5]], np.float64)
TEACHER_DB = np.array([[1.0], [0.5], [0.7], [3.0]])
TEACHER_Q = np.array([[0.0], [0.6], [0.0], [0.65], [3.0]])
STUDENT_DB = np.array([[0.0], [2.0], [0.1], [0.05]])
STUDENT_Q = np.array([[0.0], [0.0], [0.0], [0.05], [1.0]])
# Worked by hand (pos <= 10 m, neg > 25 m):
#  q0 T: d+=.5 (db1), d-=.7 (db2)  m=.2  r=1 | S: d+=0,  d-=.05 m=.05  r=1 -> D1
#  q1 T: d+=.1 (db2), d-=.4 (db0)  m=.3  r=1 | S: d+=.1,  d-=0   m=-.1  r=3 -> D2
#  q2 no database image within 10 m                                       -> 0
#  q3 T: d+=2.35, d-=.05  m=-2.3 r=4         | S: d+=0,   d-=.05 m=.05  r=1 -> D3
#  q4 T: d+=2,    d-=0    m=-2   r=2         | S: d+=1,   d-=.95 m=-.05 r=2 -> D4
T_MARGIN = [0.2, 0.3, 0.0, -2.3, -2.0]
T_RANK = [1, 1, 5, 4, 2]
S_MARGIN = [0.05, -0.1, 0.0, 0.05, -0.05]
S_RANK = [1, 3, 5, 1, 2]
GROUPS = [1, 2, 0, 3, 4]


def numpy_margins(q, db, q_utm, db_utm, pos_r=10.0, neg_r=25.0):
  """Brute force from docs/design.md: per query, loop over the database."""
  margin, rank, has_pos = [], [], []
  for i in range(len(q)):
    d = np.linalg.norm(db - q[i], axis=1)
    geo = np.linalg.norm(db_utm - q_utm[i], axis=1)
    pos, neg = d[geo <= pos_r], d[geo > neg_r]
    d_pos = pos.min() if len(pos) else np.inf
    d_neg = neg.min() if len(neg) else np.inf
    margin.append(d_neg - d_pos if len(pos) and len(neg) else 0.0)
    rank.append(1 + int(np.sum(neg < d_pos)))
    has_pos.append(len(pos) > 0)
  return np.array(margin), np.array(rank), np.array(has_pos)


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_hand_case_margins_and_ranks():
  t = partition.retrieval_margins(TEACHER_Q, TEACHER_DB, Q_UTM, DB_UTM)
  s = partition.retrieval_margins(STUDENT_Q, STUDENT_DB, Q_UTM, DB_UTM)
  np.testing.assert_allclose(t.margin, T_MARGIN, atol=1e-5)
  np.testing.assert_allclose(s.margin, S_MARGIN, atol=1e-5)
  np.testing.assert_array_equal(t.rank, T_RANK)
  np.testing.assert_array_equal(s.rank, S_RANK)
  np.testing.assert_array_equal(t.has_positive, [True, True, False, True, True])


def test_hand_case_groups_and_weights():
  valid = np.array([True, True, False, True, True])
  np.testing.assert_array_equal(partition.assign_groups(T_RANK, S_RANK, valid), GROUPS)
  assert partition.assign_groups(T_RANK, S_RANK, valid).dtype == np.int8
  # tau = 3: q1's student (rank 3) and q4's both (rank 2) become right
  np.testing.assert_array_equal(partition.assign_groups(T_RANK, S_RANK, valid, tau=3),
                                [1, 1, 0, 3, 1])
  w = partition.distill_weights(T_MARGIN, S_MARGIN, T_RANK, valid=valid)
  np.testing.assert_allclose(w, [sigmoid(1.5), sigmoid(4.0), 0, 0, 0], rtol=1e-5)
  assert float(w[1]) > 0.5  # D2: teacher beats student -> above one half
  np.testing.assert_allclose(
      partition.distill_weights(T_MARGIN, S_MARGIN, T_RANK, kind="group", r_S=S_RANK,
                                valid=valid), [0.5, 1.0, 0, 0, 0])
  np.testing.assert_allclose(
      partition.distill_weights(T_MARGIN, S_MARGIN, T_RANK, kind="uniform", valid=valid),
      [1, 1, 0, 1, 1])
  np.testing.assert_allclose(
      partition.distill_weights(T_MARGIN, S_MARGIN, T_RANK, kind="teacher_only", valid=valid),
      [1, 1, 0, 0, 0])


def test_partition_pass_writes_all_fields():
  out = partition.partition(TEACHER_Q, TEACHER_DB, STUDENT_Q, STUDENT_DB, Q_UTM, DB_UTM,
                            block_size=2)
  np.testing.assert_array_equal(out["groups"], GROUPS)
  np.testing.assert_allclose(out["weights"], [sigmoid(1.5), sigmoid(4.0), 0, 0, 0], rtol=1e-5)
  np.testing.assert_array_equal(out["teacher_rank"], T_RANK)
  assert out["groups"].dtype == np.int8 and out["weights"].dtype == np.float32
  summary = partition.group_summary(out["groups"], out["weights"])
  assert summary["D2"]["count"] == 1 and summary["excluded"]["count"] == 1
  assert summary["D4"]["mean_weight"] == 0.0


@pytest.mark.parametrize("block_size", [1, 7, 64, 1000])
def test_random_inputs_match_numpy_reference(block_size):
  rng = np.random.default_rng(block_size)
  q_utm = rng.uniform(0, 200, size=(53, 2))
  db_utm = rng.uniform(0, 200, size=(97, 2))
  q = rng.normal(size=(53, 16)).astype(np.float32)
  db = rng.normal(size=(97, 16)).astype(np.float32)
  got = partition.retrieval_margins(q, db, q_utm, db_utm, block_size=block_size)
  margin, rank, has_pos = numpy_margins(q, db, q_utm, db_utm)
  np.testing.assert_allclose(got.margin, margin, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got.rank, rank)
  np.testing.assert_array_equal(got.has_positive, has_pos)


def test_large_utm_offsets_are_centred_exactly():
  # Northings ~5e6 m resolve only to 0.5 m in float32: the host-side centring
  # must keep a 9.99 m positive and a 25.01 m negative on the right side.
  offset = np.array([500_000.0, 5_000_000.0])
  db_utm = offset + np.array([[0, 0], [0, 9.99], [0, 25.01], [0, 10.01]])
  q_utm = offset + np.array([[0, 0.0]])
  q = np.zeros((1, 2), np.float32)
  db = np.array([[5, 0], [1, 0], [2, 0], [0.5, 0]], np.float32)
  m = partition.retrieval_margins(q, db, q_utm, db_utm)
  np.testing.assert_allclose(m.d_pos, [1.0])   # db1 at 9.99 m is a positive
  np.testing.assert_allclose(m.d_neg, [2.0])   # db3 (10.01 m) is soft, db2 a negative
  np.testing.assert_array_equal(m.rank, [1])


def test_weights_continuous_and_sigmoid_properties():
  m_t = np.linspace(-1, 1, 11)
  m_s = np.zeros(11)
  w = np.asarray(partition.distill_weights(m_t, m_s, np.ones(11, np.int32), beta=10.0))
  np.testing.assert_allclose(w, sigmoid(10 * m_t), rtol=1e-5)
  assert np.all(np.diff(w) > 0)
  w_wrong = partition.distill_weights(m_t, m_s, np.full(11, 2), tau=1)
  assert float(np.abs(w_wrong).max()) == 0.0


def test_everything_jits():
  fn = jax.jit(lambda mt, ms, rt, rs: (
      partition.assign_groups(rt, rs, None, 1),
      partition.distill_weights(mt, ms, rt, 1, 10.0, "group", r_S=rs)))
  groups, w = fn(np.array(T_MARGIN), np.array(S_MARGIN), np.array(T_RANK), np.array(S_RANK))
  np.testing.assert_array_equal(groups, [1, 2, 4, 3, 4])


def test_unknown_kind_raises():
  with pytest.raises(ValueError, match="unknown distillation weighting"):
    partition.distill_weights(T_MARGIN, S_MARGIN, T_RANK, kind="bogus")
  with pytest.raises(ValueError, match="needs the student ranks"):
    partition.distill_weights(T_MARGIN, S_MARGIN, T_RANK, kind="group")


def test_crossfit_folds_cut_the_map_at_the_median_along_its_long_axis():
  # queries on a north-south line (long axis) with a little east jitter
  q = np.array([[0.0, 0], [1, 10], [0, 20], [1, 30], [0, 40], [1, 50]])
  db = np.array([[0.0, -5], [0, 24], [0, 26], [0, 60]])
  q_fold, db_fold = partition.crossfit_folds(q + 500000.0, db + 500000.0)
  assert q_fold.dtype == np.int8 and db_fold.dtype == np.int8
  np.testing.assert_array_equal(q_fold, [0, 0, 0, 1, 1, 1])   # median northing 25
  np.testing.assert_array_equal(db_fold, [0, 0, 1, 1])
  # independent of the order of the queries, and of the direction of the line
  perm = np.array([3, 0, 5, 1, 4, 2])
  np.testing.assert_array_equal(partition.crossfit_folds(q[perm], db)[0], q_fold[perm])
  np.testing.assert_array_equal(partition.crossfit_folds(-q, -db)[0], 1 - q_fold)
  # an east-west map is cut east-west
  qf, _ = partition.crossfit_folds(q[:, ::-1], db[:, ::-1])
  np.testing.assert_array_equal(qf, q_fold)
  with pytest.raises(ValueError, match="fold 1 has 0 queries"):
    partition.crossfit_folds(np.zeros((4, 2)), db)


def test_gate_weights_hand_case():
  """gate: 0 where the teacher ranks the positive wrong (r_T > tau), 1 elsewhere,
  whatever the margins; its KD is normalised by the weights' sum."""
  m_T = np.array([0.5, -0.2, 0.1, 0.3])
  m_S = np.array([0.0, 0.4, 0.2, -0.1])
  r_T = np.array([1, 3, 1, 2])
  w = partition.distill_weights(m_T, m_S, r_T, tau=1, kind="gate")
  np.testing.assert_array_equal(np.asarray(w), [1.0, 0.0, 1.0, 0.0])
  w2 = partition.distill_weights(m_T, m_S, r_T, tau=2, kind="gate",
                                 valid=np.array([True, True, True, False]))
  np.testing.assert_array_equal(np.asarray(w2), [1.0, 0.0, 1.0, 0.0])
  assert partition.kd_normalization("gate") == "weights"
  assert all(partition.kd_normalization(k) == "batch" for k in partition.WEIGHTINGS
             if k != "gate")
  with pytest.raises(ValueError, match="weighting"):
    partition.kd_normalization("soft")
  # the gate's loss: the teacher-right queries' mean (2 of 4 pass -> sum / 2)
  from structvpr_jax import losses
  per_query = np.array([0.2, 9.0, 0.4, 9.0], np.float32)
  np.testing.assert_allclose(losses.weighted_mean(per_query, w, "weights"), 0.3, rtol=1e-6)

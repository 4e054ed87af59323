"""Sample partition and distillation weights (StructVPR Sec. 3.3, Eq. 3).

The paper partitions training samples by how the two stage-1 branches
retrieve them and weights the distillation per sample, but gives neither the
criterion nor the exact weight function. docs/design.md ("Partition and weights") fixes this
reconstruction (**ours**):

For branch b and training query i (descriptor distances, unsquared L2):
  d+ = min over database images within `pos_radius` (10 m),
  d- = min over database images beyond `neg_radius` (25 m),
  margin m = d- - d+,  rank r = 1 + #{negatives closer than d+}.
A branch is *right* on i when r <= tau. Groups: D1 teacher and student right,
D2 teacher right / student wrong, D3 teacher wrong / student right, D4 both
wrong, 0 = excluded (no positive, or no negative to rank against).

Eq. 3 (ours):  w = 1[r_T <= tau] * sigmoid(beta * (m_T - m_S)).
Ablation kinds: "sigmoid" (default), "group" (a constant per group),
"uniform" (1 everywhere: plain distillation), "teacher_only" (1[r_T <= tau]),
"gate" (the same 0/1 weights as teacher_only, a reliability gate as
StructVPR++ applies to "noisy" pairs; the KD loss is then normalised by the
sum of the weights instead of the batch size: `KD_NORMALIZATION`).

Cross-fitted partition (ours, `distill.partition = "crossfit"`): the training
places are cut in two spatial folds (`crossfit_folds`); stage-1 branches
trained on one fold partition the other, so every query is judged by branches
that never trained on it (the paper's stage-1 partition judges queries the
student has already fitted, which leaves few in D2).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from structvpr_jax.parallel import DATA_AXIS

WEIGHTINGS = ("sigmoid", "group", "uniform", "teacher_only", "gate")
# How stage 2 normalises the weighted KD sum for each weighting
# (`losses.weighted_mean`): by the batch size, or by the sum of the weights.
KD_NORMALIZATION = {"gate": "weights"}


def kd_normalization(kind: str) -> str:
  """"weights" for the gate weighting, else "batch" (`losses.NORMALIZATIONS`)."""
  if kind not in WEIGHTINGS:
    raise ValueError(f"unknown distillation weighting {kind!r}; expected one of {WEIGHTINGS}")
  return KD_NORMALIZATION.get(kind, "batch")
PARTITIONS = ("stage1", "crossfit")
GROUP_NAMES = ("excluded", "D1", "D2", "D3", "D4")
# "group" weighting (ours): D1 both right 0.5, D2 teacher-only right 1.0,
# D3 student-only right 0, D4 both wrong 0 -- the sigmoid's values at m_T = m_S
# (D1) and in the limit m_T >> m_S (D2).
DEFAULT_GROUP_WEIGHTS = (0.5, 1.0, 0.0, 0.0)


def crossfit_folds(query_utm, database_utm) -> tuple[np.ndarray, np.ndarray]:
  """Two spatial folds of a training split for the cross-fitted partition.

  The queries' positions are projected on their principal axis (the
  direction of largest spread, signed so that its largest component is
  positive) and cut at the median projection; database images are cut at the
  same threshold, so a fold holds a contiguous part of the map with its own
  queries and database (only places on the cut lose positives to the other
  fold).

  Args:
    query_utm: [Q, 2] float UTM metres.
    database_utm: [N, 2] float UTM metres.

  Returns:
    (query_fold int8 [Q], database_fold int8 [N]), values in {0, 1}.

  Raises:
    ValueError: a fold would have no queries or no database images.
  """
  q = np.asarray(query_utm, np.float64).reshape(-1, 2)
  db = np.asarray(database_utm, np.float64).reshape(-1, 2)
  centre = q.mean(axis=0)
  _, _, vt = np.linalg.svd(q - centre, full_matrices=False)
  axis = vt[0]
  if axis[np.argmax(np.abs(axis))] < 0:
    axis = -axis
  proj_q, proj_db = (q - centre) @ axis, (db - centre) @ axis
  threshold = np.median(proj_q)
  q_fold = (proj_q > threshold).astype(np.int8)
  db_fold = (proj_db > threshold).astype(np.int8)
  for k in (0, 1):
    if not (q_fold == k).any() or not (db_fold == k).any():
      raise ValueError(f"cross-fitted partition: fold {k} has {(q_fold == k).sum()} queries "
                       f"and {(db_fold == k).sum()} database images; it needs both (the "
                       f"training places are too few or all in one spot)")
  return q_fold, db_fold


class Margins(NamedTuple):
  """Per-query retrieval statistics of one branch (all [Q]).

  margin: float32, d- - d+ (0 where undefined, see has_positive/has_negative).
  rank: int32, 1 + #{negatives closer than d+}.
  has_positive: bool, some database image within pos_radius.
  has_negative: bool, some database image beyond neg_radius.
  d_pos, d_neg: float32 distances to the nearest positive / negative (inf
    where none).
  """
  margin: jax.Array
  rank: jax.Array
  has_positive: jax.Array
  has_negative: jax.Array
  d_pos: jax.Array
  d_neg: jax.Array


def center_utm(query_utm, db_utm) -> tuple[np.ndarray, np.ndarray]:
  """Subtracts the database mean in float64 on the host, returns float32.

  UTM northings are ~5e6 m where float32 resolves only 0.5 m; centring keeps
  the radius tests exact to millimetres inside float32 jitted code.
  """
  q = np.asarray(query_utm, np.float64).reshape(-1, 2)
  db = np.asarray(db_utm, np.float64).reshape(-1, 2)
  origin = db.mean(axis=0) if len(db) else np.zeros(2)
  return (q - origin).astype(np.float32), (db - origin).astype(np.float32)


def _block_margins(q_desc, q_utm, db_desc, db_sqnorm, db_utm, pos_radius, neg_radius):
  """Margins for one block of queries: q_desc [b, D] vs the whole database."""
  q_desc = q_desc.astype(jnp.float32)
  sq = (jnp.sum(jnp.square(q_desc), axis=1, keepdims=True) + db_sqnorm[None, :]
        - 2.0 * jnp.dot(q_desc, db_desc.T, preferred_element_type=jnp.float32))
  sq = jnp.maximum(sq, 0.0)                                       # [b, N]
  geo = jnp.sum(jnp.square(q_utm[:, None, :] - db_utm[None, :, :]), axis=-1)
  positive = geo <= pos_radius * pos_radius
  negative = geo > neg_radius * neg_radius
  inf = jnp.float32(jnp.inf)
  sq_pos = jnp.min(jnp.where(positive, sq, inf), axis=1)          # [b]
  sq_neg = jnp.min(jnp.where(negative, sq, inf), axis=1)
  closer = jnp.sum(negative & (sq < sq_pos[:, None]), axis=1, dtype=jnp.int32)
  has_pos = jnp.any(positive, axis=1)
  has_neg = jnp.any(negative, axis=1)
  d_pos, d_neg = jnp.sqrt(sq_pos), jnp.sqrt(sq_neg)
  margin = jnp.where(has_pos & has_neg, d_neg - d_pos, 0.0)
  return margin, closer + 1, has_pos, has_neg, d_pos, d_neg


def _margins_local(q_desc, q_utm, db_desc, db_utm, *, pos_radius, neg_radius, block_size):
  """Blocked over queries with lax.map: memory O(block_size x N)."""
  nq = q_desc.shape[0]
  num_blocks = -(-nq // block_size)
  pad = num_blocks * block_size - nq
  q_desc = jnp.pad(q_desc, ((0, pad), (0, 0)))
  q_utm = jnp.pad(q_utm, ((0, pad), (0, 0)))
  db_desc = db_desc.astype(jnp.float32)
  db_sqnorm = jnp.sum(jnp.square(db_desc), axis=1)
  block = functools.partial(_block_margins, db_desc=db_desc, db_sqnorm=db_sqnorm,
                            db_utm=db_utm, pos_radius=pos_radius, neg_radius=neg_radius)
  outs = jax.lax.map(
      lambda args: block(*args),
      (q_desc.reshape(num_blocks, block_size, -1), q_utm.reshape(num_blocks, block_size, 2)))
  return tuple(o.reshape(num_blocks * block_size)[:nq] for o in outs)


@functools.partial(jax.jit, static_argnames=("pos_radius", "neg_radius", "block_size", "mesh"))
def _retrieval_margins_jit(q_desc, db_desc, q_utm, db_utm, *, pos_radius, neg_radius,
                           block_size, mesh):
  local = functools.partial(_margins_local, pos_radius=pos_radius, neg_radius=neg_radius,
                            block_size=block_size)
  if mesh is None or mesh.size == 1:
    return Margins(*local(q_desc, q_utm, db_desc, db_utm))
  nq = q_desc.shape[0]
  per_device = -(-nq // mesh.size)
  pad = per_device * mesh.size - nq
  q_desc = jnp.pad(q_desc, ((0, pad), (0, 0)))
  q_utm = jnp.pad(q_utm, ((0, pad), (0, 0)))
  sharded = jax.shard_map(local, mesh=mesh,
                          in_specs=(P(DATA_AXIS), P(DATA_AXIS), P(), P()),
                          out_specs=P(DATA_AXIS))
  outs = sharded(q_desc, q_utm, db_desc, db_utm)
  return Margins(*(o[:nq] for o in outs))


def retrieval_margins(q_desc, db_desc, q_utm, db_utm, pos_radius: float = 10.0,
                      neg_radius: float = 25.0, *, block_size: int = 512,
                      mesh=None) -> Margins:
  """How one branch retrieves every training query (one jitted pass).

  Args:
    q_desc: [Q, D] query descriptors.
    db_desc: [N, D] database descriptors.
    q_utm: [Q, 2] query UTM (metres); numpy float64 is centred on the host
      first (see `center_utm`), jax arrays are used as given.
    db_utm: [N, 2] database UTM.
    pos_radius: training-positive radius (metres).
    neg_radius: negatives lie strictly beyond this radius.
    block_size: queries per block; memory is O(block_size x N).
    mesh: optional 1-D ("data",) mesh: queries are sharded over its devices.

  Returns:
    `Margins` of jax arrays, each [Q].
  """
  if isinstance(q_utm, np.ndarray) or isinstance(db_utm, np.ndarray):
    q_utm, db_utm = center_utm(q_utm, db_utm)
  block_size = int(max(1, min(block_size, q_desc.shape[0])))
  return _retrieval_margins_jit(q_desc, db_desc, q_utm, db_utm, pos_radius=float(pos_radius),
                                neg_radius=float(neg_radius), block_size=block_size,
                                mesh=mesh)


def assign_groups(teacher_rank, student_rank, valid=None, tau: int = 1) -> jax.Array:
  """Groups D1..D4 (int8 1..4; 0 = excluded) from the two branches' ranks.

  Args:
    teacher_rank, student_rank: int [Q] ranks (see `retrieval_margins`).
    valid: optional bool [Q]; False -> group 0 (no positive / no negative).
    tau: a branch is right when its rank <= tau.
  """
  t_right = jnp.asarray(teacher_rank) <= tau
  s_right = jnp.asarray(student_rank) <= tau
  group = jnp.where(t_right, jnp.where(s_right, 1, 2), jnp.where(s_right, 3, 4))
  if valid is not None:
    group = jnp.where(jnp.asarray(valid), group, 0)
  return group.astype(jnp.int8)


def distill_weights(m_T, m_S, r_T, tau: int = 1, beta: float = 10.0, kind: str = "sigmoid",
                    *, r_S=None, valid=None,
                    group_weights=DEFAULT_GROUP_WEIGHTS) -> jax.Array:
  """Per-sample distillation weights (Eq. 3, our reconstruction).

  Args:
    m_T, m_S: float [Q] teacher / student margins.
    r_T: int [Q] teacher ranks.
    tau: rank threshold for "right".
    beta: sigmoid sharpness.
    kind: "sigmoid" -> 1[r_T <= tau] * sigmoid(beta (m_T - m_S));
      "group" -> `group_weights[group - 1]` (needs `r_S`);
      "uniform" -> 1; "teacher_only" and "gate" -> 1[r_T <= tau] (gate's
      loss is normalised by the weights' sum: `kd_normalization`).
    r_S: int [Q] student ranks (only for kind="group").
    valid: optional bool [Q]; weights are 0 where False.
    group_weights: weights of D1..D4 for kind="group".

  Returns:
    float32 [Q].
  """
  m_T = jnp.asarray(m_T, jnp.float32)
  m_S = jnp.asarray(m_S, jnp.float32)
  teacher_right = jnp.asarray(r_T) <= tau
  if kind == "sigmoid":
    w = jnp.where(teacher_right, jax.nn.sigmoid(beta * (m_T - m_S)), 0.0)
  elif kind == "group":
    if r_S is None:
      raise ValueError("distill_weights(kind='group') needs the student ranks r_S")
    groups = assign_groups(r_T, r_S, None, tau).astype(jnp.int32)
    w = jnp.asarray(group_weights, jnp.float32)[groups - 1]
  elif kind == "uniform":
    w = jnp.ones_like(m_T)
  elif kind in ("teacher_only", "gate"):
    w = teacher_right.astype(jnp.float32)
  else:
    raise ValueError(f"unknown distillation weighting {kind!r}; expected one of {WEIGHTINGS}")
  if valid is not None:
    w = jnp.where(jnp.asarray(valid), w, 0.0)
  return w.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("pos_radius", "neg_radius", "tau", "beta",
                                             "kind", "block_size", "mesh"))
def _partition_jit(teacher_q, teacher_db, student_q, student_db, q_utm, db_utm, *,
                   pos_radius, neg_radius, tau, beta, kind, block_size, mesh):
  common = dict(pos_radius=pos_radius, neg_radius=neg_radius, block_size=block_size,
                mesh=mesh)
  t = _retrieval_margins_jit(teacher_q, teacher_db, q_utm, db_utm, **common)
  s = _retrieval_margins_jit(student_q, student_db, q_utm, db_utm, **common)
  valid = t.has_positive & t.has_negative
  groups = assign_groups(t.rank, s.rank, valid, tau)
  weights = distill_weights(t.margin, s.margin, t.rank, tau, beta, kind, r_S=s.rank,
                            valid=valid)
  return {"groups": groups, "weights": weights, "teacher_margin": t.margin,
          "student_margin": s.margin, "teacher_rank": t.rank, "student_rank": s.rank}


def partition(teacher_q, teacher_db, student_q, student_db, q_utm, db_utm, *,
              pos_radius: float = 10.0, neg_radius: float = 25.0, tau: int = 1,
              beta: float = 10.0, kind: str = "sigmoid", block_size: int = 512,
              mesh=None) -> dict:
  """Both branches' margins, groups and Eq. 3 weights in one jitted pass.

  Args:
    teacher_q/teacher_db: [Q, D] / [N, D] seg-branch descriptors.
    student_q/student_db: [Q, D'] / [N, D'] RGB-branch descriptors.
    q_utm, db_utm: [Q, 2] / [N, 2] UTM metres (centred on the host).

  Returns:
    dict of numpy arrays (the `partition.npz` fields): groups int8 [Q],
    weights float32, teacher_margin, student_margin float32, teacher_rank,
    student_rank int32.
  """
  if kind not in WEIGHTINGS:
    raise ValueError(f"unknown distillation weighting {kind!r}; expected one of {WEIGHTINGS}")
  q_utm, db_utm = center_utm(q_utm, db_utm)
  block_size = int(max(1, min(block_size, np.shape(teacher_q)[0])))
  out = _partition_jit(teacher_q, teacher_db, student_q, student_db, q_utm, db_utm,
                       pos_radius=float(pos_radius), neg_radius=float(neg_radius),
                       tau=int(tau), beta=float(beta), kind=kind, block_size=block_size,
                       mesh=mesh)
  return {k: np.asarray(v) for k, v in jax.device_get(out).items()}


def group_summary(groups, weights) -> dict:
  """{"D1": {"count": n, "mean_weight": w}, ..., "excluded": {...}} (host-side)."""
  groups = np.asarray(groups)
  weights = np.asarray(weights, np.float64)
  summary = {}
  for g, name in enumerate(GROUP_NAMES):
    sel = groups == g
    summary[name] = {"count": int(sel.sum()),
                     "mean_weight": float(weights[sel].mean()) if sel.any() else None}
  return summary

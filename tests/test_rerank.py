"""Re-ranking (structvpr_jax/rerank.py): each formula against an independent
numpy reference, hand cases, RANSAC on synthetic correspondences, and the
extraction, storage and evaluation around it on a tiny branch."""

import os

import numpy as np
import pytest

from structvpr_jax import config_lib, evaluation, parallel, rerank
from structvpr_jax.data import layout as layout_lib
from structvpr_jax.models import spec as model_spec


# ---------------------------------------------------------------- references

def numpy_mutual_nn(q, db):
  """Patch-NetVLAD's torch_nn + mutual check, literally: distances
  sqrt(2 - 2 q.db), fw = per candidate feature its nearest query feature,
  bw = per query feature its nearest candidate feature."""
  dist = np.sqrt(np.maximum(2 - 2 * db.astype(np.float64) @ q.astype(np.float64).T, 0) + 1e-9)
  fw = dist.argmin(axis=1)
  bw = dist.argmin(axis=0)
  mutual = bw[fw] == np.arange(len(db))
  return fw, mutual


def numpy_rss(q_grid, db_grid, fw, mutual, grid_max, num_query):
  """Patch-NetVLAD's rapid spatial score (paper Eq. 6, compare_two_spatial),
  with the sign flipped (higher is better): loops over the mutual matches."""
  idx = np.flatnonzero(mutual)
  if not len(idx):
    return 0.0
  d = np.array([db_grid[i] - q_grid[fw[i]] for i in idx], np.float64)
  mean = d.mean(axis=0)
  total = 0.0
  for dx, dy in d:
    total += (grid_max[0] - abs(dx - mean[0])) ** 2 + (grid_max[1] - abs(dy - mean[1])) ** 2
  return total / num_query


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# -------------------------------------------------------------- pure numerics

def test_layout_windows_positions_and_sets():
  lay = rerank.make_layout((64, 96), (4, 6), (1, 2), (1, 2))
  # patch 1 stride 1: 4 x 6 windows; patch 2 stride 2: 2 x 3
  assert lay.size == 24 + 6 and lay.num_sets == 2
  assert np.array_equal(np.bincount(lay.set_id), [24, 6])
  assert lay.cells[0].shape == (24, 1) and lay.cells[1].shape == (6, 4)
  # set 1, window (row 1, col 2): cells (2..3) x (4..5) of the 4 x 6 map
  w = 1 * 3 + 2
  assert sorted(lay.cells[1][w]) == [2 * 6 + 4, 2 * 6 + 5, 3 * 6 + 4, 3 * 6 + 5]
  assert tuple(lay.grid[24 + w]) == (2, 1)
  # a cell spans 16 pixels; that window's centre is at cells (5, 3) -> (80, 48)
  assert tuple(lay.pixels[24 + w]) == (80.0, 48.0)
  assert np.array_equal(lay.grid_max, [[5, 3], [2, 1]])
  with pytest.raises(ValueError, match="eval.rerank_patch_sizes"):
    rerank.make_layout((64, 96), (4, 6), (5,), (1,))


def test_mutual_nearest_neighbours_hand_case():
  # query features e0, e1, e2; candidate features: ~e1, ~e0, ~e0 (weaker), e3
  q = np.eye(4)[:3].astype(np.float32)
  db = unit(np.array([[0.1, 1, 0, 0], [1, 0.1, 0, 0], [1, 0, 0.6, 0], [0, 0, 0, 1]],
                     np.float32))
  fw, mutual = rerank.mutual_nearest_neighbours(q, db, np.zeros(3, np.int32),
                                                np.zeros(4, np.int32))
  assert np.asarray(fw).tolist()[:3] == [1, 0, 0]
  # db 0 <-> q1 and db 1 <-> q0 are mutual; db 2's nearest query (q0) prefers db 1;
  # db 3 is orthogonal to every query: its argmax (q0) does not choose it back
  assert np.asarray(mutual).tolist() == [True, True, False, False]
  ref_fw, ref_mutual = numpy_mutual_nn(q, db)
  assert np.array_equal(np.asarray(mutual), ref_mutual)
  # features of different sets never match; -1 marks padding. Sets: q0 | q1 q2
  # and db1 | db0 db2: db1 can only meet q0, db2 now wins q2 (db1 is out of its set)
  fw, mutual = rerank.mutual_nearest_neighbours(q, db, np.array([0, 1, 1], np.int32),
                                                np.array([1, 0, 1, -1], np.int32))
  assert np.asarray(mutual).tolist() == [True, True, True, False]
  assert np.asarray(fw).tolist()[:3] == [1, 0, 2]


def test_candidate_scores_match_numpy_reference():
  rng = np.random.default_rng(0)
  lay = rerank.make_layout((48, 64), (6, 8), (1, 2), (1, 1))
  p, d, k = lay.size, 16, 7
  q = unit(rng.normal(size=(p, d))).astype(np.float16)
  db = unit(rng.normal(size=(k, p, d))).astype(np.float16)
  db[2] = q                                   # one candidate shares the query's features
  q_keep = np.arange(p, dtype=np.int32)
  db_keep = np.stack([np.sort(rng.choice(p, p, replace=False)) for _ in range(k)]).astype(np.int32)
  db_keep[4, -5:] = -1                        # padding
  rss, fw, mutual = rerank.candidate_scores(q, q_keep, db, db_keep, lay.set_id, lay.grid,
                                            lay.grid_max)
  rss, fw, mutual = map(np.asarray, (rss, fw, mutual))
  # the CPU's one-candidate-at-a-time program and the accelerators' batch agree
  for sequential in (True, False):
    other = rerank._jitted(q, q_keep, db, db_keep, lay.set_id, lay.grid, lay.grid_max,
                           sequential=sequential)
    np.testing.assert_allclose(np.asarray(other[0]), rss, rtol=1e-6)
    assert np.array_equal(np.asarray(other[1]), fw) and np.array_equal(np.asarray(other[2]),
                                                                       mutual)
  for c in range(k):
    for s in range(lay.num_sets):
      q_sel = np.flatnonzero(lay.set_id[q_keep] == s)
      d_sel = np.flatnonzero((db_keep[c] >= 0) & (lay.set_id[np.maximum(db_keep[c], 0)] == s))
      qf = q[q_sel].astype(np.float32)
      df = db[c, d_sel].astype(np.float32)
      ref_fw, ref_mutual = numpy_mutual_nn(qf, df)
      assert np.array_equal(mutual[c, d_sel], ref_mutual), (c, s)
      assert np.array_equal(fw[c, d_sel][ref_mutual], q_sel[ref_fw][ref_mutual]), (c, s)
      ref = numpy_rss(lay.grid[q_keep[q_sel]], lay.grid[db_keep[c, d_sel]], ref_fw, ref_mutual,
                      lay.grid_max[s], len(q_sel))
      assert rss[c, s] == pytest.approx(ref, rel=1e-5), (c, s)
  # the candidate holding the query's own features: every feature matches, no spread
  top = (lay.grid_max[:, 0] ** 2 + lay.grid_max[:, 1] ** 2)
  assert np.allclose(rss[2], top, rtol=1e-6)


def test_rss_translated_copy_highest_shuffled_lowest():
  """A query image's feature grid; a copy translated by one cell, one
  translated by two columns and a row (less overlap), and the same features
  at shuffled positions: the translations score by their overlap, the
  shuffle lowest. (RSS sums over the mutual matches: the shuffle, with all 60
  features matched but no common shift, still beats an unrelated image's
  ~28 chance matches; re-ranking only ever compares candidates that global
  retrieval found similar.)"""
  rng = np.random.default_rng(1)
  hf, wf, d = 6, 10, 32
  lay = rerank.make_layout((hf * 16, wf * 16), (hf, wf), (1,), (1,))
  grid = unit(rng.normal(size=(hf, wf, d)))
  t1 = np.concatenate([grid[:, 1:], unit(rng.normal(size=(hf, 1, d)))], axis=1)
  t2 = np.concatenate([grid[1:, 2:], unit(rng.normal(size=(hf - 1, 2, d)))], axis=1)
  t2 = np.concatenate([t2, unit(rng.normal(size=(1, wf, d)))], axis=0)
  shuffled = grid.reshape(-1, d)[rng.permutation(hf * wf)].reshape(hf, wf, d)
  q = grid.reshape(-1, d).astype(np.float16)
  db = np.stack([shuffled, t2, t1]).reshape(3, -1, d).astype(np.float16)
  keep = np.broadcast_to(np.arange(hf * wf, dtype=np.int32), (3, hf * wf))
  rss, _, mutual = rerank.candidate_scores(q, keep[0], db, keep, lay.set_id, lay.grid,
                                           lay.grid_max)
  rss = np.asarray(rss)[:, 0]
  assert rss[2] > rss[1] > rss[0]
  # the one-cell translation: its 54 shared features all shift by (-1, 0)
  top = lay.grid_max[0, 0] ** 2 + lay.grid_max[0, 1] ** 2
  assert rss[2] >= 54 * top / 60 - 1e-3
  out = rerank.rerank(np.array([[0, 1, 2]]), (q[None], keep[:1]), (db, keep), lay,
                      rerank.Settings(method="rss", topk=3))
  assert out["predictions"].tolist() == [[2, 1, 0]]
  # RANSAC (a homography between the cell centres) orders them the same way
  out = rerank.rerank(np.array([[0, 1, 2]]), (q[None], keep[:1]), (db, keep), lay,
                      rerank.Settings(method="ransac", topk=3))
  assert out["predictions"].tolist() == [[2, 1, 0]]


def test_ransac_recovers_inliers_of_a_known_homography():
  rng = np.random.default_rng(0)
  h = np.array([[0.9, 0.05, 12.0], [-0.03, 1.1, -7.0], [1e-4, 2e-4, 1.0]])
  src = rng.uniform(0, 640, size=(60, 2))
  dst_h = np.c_[src, np.ones(60)] @ h.T
  dst = dst_h[:, :2] / dst_h[:, 2:]
  outliers = np.zeros(60, bool)
  outliers[rng.choice(60, 18, replace=False)] = True
  dst[outliers] = rng.uniform(0, 640, size=(outliers.sum(), 2))
  found = rerank.ransac_inliers(src, dst, 3.0, "homography")
  # every true inlier, and no outlier farther than the threshold from the model
  assert found[~outliers].all()
  stray = np.linalg.norm(dst[outliers] - (dst_h[outliers, :2] / dst_h[outliers, 2:]), axis=1)
  assert not found[outliers][stray > 3.0].any()
  assert np.array_equal(rerank.ransac_inliers(src, dst, 3.0), found)   # deterministic
  assert not rerank.ransac_inliers(src[:3], dst[:3], 3.0).any()        # too few
  fundamental = rerank.ransac_inliers(src, dst, 3.0, "fundamental")
  assert fundamental[~outliers].mean() > 0.9


def test_ransac_scores_count_inliers_per_set():
  lay = rerank.make_layout((64, 64), (8, 8), (1,), (1,))
  p = lay.size
  keep = np.arange(p, dtype=np.int32)
  # candidate 0: every feature matched to itself (identity homography);
  # candidate 1: matched to a random permutation (no geometry)
  rng = np.random.default_rng(0)
  fw = np.stack([keep, rng.permutation(p)]).astype(np.int32)
  mutual = np.ones((2, p), bool)
  scores = rerank.ransac_scores(lay, keep, np.stack([keep, keep]), fw, mutual)
  assert scores[0, 0] == 1.0 and scores[1, 0] < 0.3


def test_combine_scores_and_reorder():
  scores = np.array([[1.0, 10.0], [3.0, 10.0], [2.0, 10.0]])
  # the constant second set contributes nothing
  assert np.argsort(-rerank.combine_scores(scores)).tolist() == [1, 2, 0]
  two = np.array([[0.0, 3.0], [1.0, 0.0], [0.5, 1.0]])
  z = (two - two.mean(0)) / two.std(0)
  assert np.allclose(rerank.combine_scores(two, (0.25, 0.75)), z @ [0.25, 0.75])
  # ties keep the global order, padding stays last
  assert rerank.reorder(np.array([5, 7, -1, 9]), np.array([1.0, 2.0, 9.0, 1.0])).tolist() == \
      [7, 5, 9, -1]


def test_fuse_global_hand_case_and_numpy_reference():
  local = np.array([0.5, -1.0, 2.0, 0.0])
  dist = np.array([0.2, 0.4, 0.6, 0.8])           # squared L2, nearest first
  cand = np.array([3, 1, 4, 1])
  # weight 0: the local score itself, untouched
  assert np.array_equal(rerank.fuse_global(local, dist, cand, 0.0), local)
  # hand case: -d = [-.2, -.4, -.6, -.8], mean -.5, std sqrt(.05)
  z = np.array([0.3, 0.1, -0.1, -0.3]) / np.sqrt(0.05)
  assert np.allclose(rerank.fuse_global(local, dist, cand, 2.0), local + 2.0 * z)
  # numpy reference with padding and a non-finite distance left out of the statistics
  rng = np.random.default_rng(1)
  local, dist = rng.normal(size=8), np.sort(rng.uniform(0, 2, size=8))
  cand = np.array([5, 2, 7, 0, 1, 3, -1, -1])
  dist[5] = np.inf
  ok = np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
  ref = np.zeros(8)
  ref[ok] = (-dist[ok] - (-dist[ok]).mean()) / (-dist[ok]).std()
  np.testing.assert_allclose(rerank.fuse_global(local, dist, cand, 0.7), local + 0.7 * ref)
  # equal distances: no global information, no global term
  assert np.array_equal(rerank.fuse_global(local, np.ones(8), cand, 3.0), local)
  with pytest.raises(ValueError, match="differ"):
    rerank.fuse_global(local, dist[:4], cand, 1.0)


def test_rerank_fusion_default_is_bitwise_and_a_large_weight_keeps_the_global_order():
  rng = np.random.default_rng(2)
  lay = rerank.make_layout((48, 64), (3, 4), (1, 2), (1, 1))
  nq, nd, d = 5, 9, 8
  q = (unit(rng.normal(size=(nq, lay.size, d))).astype(np.float16),
       np.tile(np.arange(lay.size, dtype=np.int32), (nq, 1)))
  db = (unit(rng.normal(size=(nd, lay.size, d))).astype(np.float16),
        np.tile(np.arange(lay.size, dtype=np.int32), (nd, 1)))
  db[0][3] = q[0][0]                          # database 3 is query 0's own image
  preds = np.stack([rng.permutation(nd) for _ in range(nq)])
  dist = np.sort(rng.uniform(0.5, 1.5, size=(nq, nd)), axis=1)
  base = rerank.Settings(method="rss", topk=6, patch_sizes=(1, 2), strides=(1, 1))
  plain = rerank.rerank(preds, q, db, lay, base)
  zero = rerank.rerank(preds, q, db, lay, rerank.Settings(**{**base.__dict__,
                                                              "global_weight": 0.0}),
                       global_distances=dist)
  assert np.array_equal(plain["predictions"], zero["predictions"])
  assert np.array_equal(plain["scores"], zero["scores"], equal_nan=True)
  # the fused score is the local one plus w x z(global similarity), per query
  w = 0.5
  fused = rerank.rerank(preds, q, db, lay, rerank.Settings(**{**base.__dict__,
                                                               "global_weight": w}),
                        global_distances=dist)
  for i in range(nq):
    cand = preds[i, :6]
    local = dict(zip(plain["predictions"][i, :6].tolist(), plain["scores"][i].tolist()))
    sim = -dist[i, :6]
    ref = {c: local[c] + w * (s - sim.mean()) / sim.std() for c, s in zip(cand.tolist(), sim)}
    got = dict(zip(fused["predictions"][i, :6].tolist(), fused["scores"][i].tolist()))
    assert got.keys() == ref.keys()
    for c in got:
      assert got[c] == pytest.approx(ref[c], rel=1e-9, abs=1e-12)
    assert sorted(fused["predictions"][i, :6].tolist()) == sorted(cand.tolist())
    assert fused["predictions"][i, 6:].tolist() == preds[i, 6:].tolist()
  # a weight that swamps the local score keeps the global order
  big = rerank.rerank(preds, q, db, lay, rerank.Settings(**{**base.__dict__,
                                                             "global_weight": 1e6}),
                      global_distances=dist)
  assert np.array_equal(big["predictions"], preds)
  with pytest.raises(ValueError, match="eval.rerank_global_weight"):
    rerank.rerank(preds, q, db, lay, rerank.Settings(global_weight=1.0))


def test_select_features_keeps_the_strongest_in_layout_order():
  feats = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
  strength = np.array([[0.1, 0.9, 0.5, 0.8, 0.2], [5, 4, 3, 2, 1]], np.float32)
  kept, keep = rerank.select_features(feats, strength, 3)
  assert np.asarray(keep).tolist() == [[1, 2, 3], [0, 1, 2]]
  assert np.asarray(kept).dtype == np.float16
  assert np.array_equal(np.asarray(kept)[0], feats[0, [1, 2, 3]].astype(np.float16))
  _, keep_all = rerank.select_features(feats, strength, 0)
  assert np.asarray(keep_all).shape == (2, 5)


def test_settings_errors_name_the_field():
  for kw, field in [({"method": "magic"}, "eval.rerank="), ({"topk": 0}, "eval.rerank_topk"),
                    ({"features": "sift"}, "eval.rerank_features"),
                    ({"layer": "block3"}, "eval.rerank_layer"),
                    ({"features": "patchnetvlad", "layer": "stride16"}, "eval.rerank_layer"),
                    ({"patch_sizes": (0,)}, "eval.rerank_patch_sizes"),
                    ({"patch_sizes": (1, 2), "strides": (1,)}, "eval.rerank_patch_strides"),
                    ({"weights": (1.0,), "patch_sizes": (1, 2), "strides": (1, 1)},
                     "eval.rerank_patch_weights"),
                    ({"max_features": -1}, "eval.rerank_max_features"),
                    ({"geometry": "affine"}, "eval.rerank_geometry"),
                    ({"ransac_threshold": 0.0}, "eval.rerank_ransac_threshold"),
                    ({"global_weight": -1.0}, "eval.rerank_global_weight"),
                    ({"global_weight": float("nan")}, "eval.rerank_global_weight")]:
    with pytest.raises(ValueError, match=field):
      rerank.check_settings(rerank.Settings(**kw))


def test_config_validation_names_the_field():
  from configs import distill
  config = distill.get_config("smoke")
  config.eval.rerank = "rss"
  config_lib.validate_config(config)          # the defaults with re-ranking on are valid
  config.eval.rerank_patch_sizes = (1, 2)
  with pytest.raises(ValueError, match="eval.rerank_patch_strides"):
    config_lib.validate_config(config)
  config.eval.rerank_patch_strides = (1, 1)
  config.eval.rerank_patch_sizes = (40, 1)    # larger than the local feature map
  with pytest.raises(ValueError, match="eval.rerank_patch_sizes"):
    config_lib.validate_config(config)
  config.eval.rerank_patch_sizes = (1, 2)
  config.eval.rerank_global_weight = -0.5
  with pytest.raises(ValueError, match="eval.rerank_global_weight"):
    config_lib.validate_config(config)
  config.eval.rerank_global_weight = 0.0
  config.eval.rerank = "sometimes"
  with pytest.raises(ValueError, match="eval.rerank="):
    config_lib.validate_config(config)
  # the eval stage records the re-ranking fields only when it re-ranks
  config.eval.rerank = "none"
  assert "eval.rerank_topk" not in config_lib.stage_fields(config, "eval")
  config.eval.rerank, config.eval.rerank_patch_sizes = "rss", (1, 2)
  fields = config_lib.stage_fields(config, "eval")
  assert fields["eval.rerank"] == "rss" and fields["eval.rerank_patch_sizes"] == [1, 2]
  assert fields["eval.rerank_global_weight"] == 0.0


# ------------------------------------------------- extraction and evaluation

SPEC = {"branch": "rgb", "view": "rgb", "backbone": "mobilenet_v2", "width": 0.35, "dim": 8,
        "num_clusters": 4, "blocks": [[1, 8, 1, 1], [2, 8, 1, 2], [2, 8, 1, 2]],
        "slme": "slme", "normalization": "imagenet", "image_size": [32, 48], "init": ""}


class ArraySource:
  def __init__(self, x):
    self.x = x

  def __len__(self):
    return len(self.x)

  def get(self, view, idx):
    return self.x[np.asarray(idx)]


@pytest.fixture(scope="module")
def tiny():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (7, 32, 48, 3), dtype=np.uint8)
  mesh = parallel.make_mesh()
  variables = model_spec.init_variables(SPEC, 0)
  return images, mesh, variables


@pytest.mark.parametrize("settings", [
    rerank.Settings(method="rss", patch_sizes=(1, 2), strides=(1, 1), max_features=20),
    rerank.Settings(method="ransac", layer="stride8", patch_sizes=(1,), strides=(1,)),
    rerank.Settings(method="rss", features="patchnetvlad", patch_sizes=(2,), strides=(1,))])
def test_one_pass_gives_the_global_descriptor_and_an_image_ranks_itself_first(tiny, settings):
  images, mesh, variables = tiny
  replicated = parallel.replicate(variables, mesh)
  plain = evaluation.Extractor(SPEC, mesh, 4)(replicated, ArraySource(images))
  ex = evaluation.Extractor(SPEC, mesh, 4, local=settings)
  global_desc, feats, keep = ex(replicated, ArraySource(images))
  np.testing.assert_allclose(global_desc, plain, atol=1e-6)
  assert feats.dtype == np.float16 and keep.dtype == np.int32
  assert feats.shape[:2] == keep.shape and len(feats) == len(images)
  if settings.max_features:
    assert feats.shape[1] == settings.max_features
  assert np.all(keep >= 0) and np.all(keep < ex.layout.size)
  assert np.all(np.diff(keep, axis=1) > 0)
  # each image, as a query against the database of all of them, whatever its global rank
  order = np.stack([np.roll(np.arange(len(images)), -(i + 1)) for i in range(len(images))])
  out = rerank.rerank(order, (feats, keep), (feats, keep), ex.layout, settings)
  assert out["predictions"][:, 0].tolist() == list(range(len(images)))


def test_stride_layers_follow_the_block_table():
  assert evaluation.rerank_block(SPEC, "final") == ""
  assert evaluation.rerank_block(SPEC, "stride8") == "block2"
  v2 = dict(SPEC, blocks=None, width=1.0)
  assert evaluation.rerank_block(v2, "stride16") == "block12"
  assert evaluation.rerank_block(v2, "stride8") == "block5"
  with pytest.raises(ValueError, match="eval.rerank_layer"):
    evaluation.rerank_block(SPEC, "stride32")


def _tiny_layout(root, places=6):
  """A layout folder: database and queries of `places` places 100 m apart."""
  from PIL import Image
  rng = np.random.default_rng(3)
  for role in ("database", "queries"):
    d = os.path.join(root, "images", "test", role)
    os.makedirs(d)
    for i in range(places):
      im = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
      Image.fromarray(im).save(os.path.join(d, f"@{100.0 * i:.2f}@{0.0:.2f}@@@@@@@@.png"))
  return root


def test_local_features_round_trip_through_the_disk_format(tiny, tmp_path):
  _, mesh, variables = tiny
  root = _tiny_layout(str(tmp_path / "data"))
  vs = layout_lib.read_split(root, "test")
  settings = rerank.Settings(method="rss", patch_sizes=(1, 2), strides=(1, 1), max_features=16)
  ex = evaluation.Extractor(SPEC, mesh, 4, local=settings)
  mem = evaluation.describe_split(SPEC, variables, vs, mesh, extractor=ex)
  store = str(tmp_path / "store")
  disk = evaluation.describe_split(SPEC, variables, vs, mesh, extractor=ex, store=store,
                                   dtype="float32")
  assert sorted(os.listdir(store)) == ["database.npy", "database_local.npy",
                                       "database_local_keep.npy", "local_layout.json",
                                       "queries.npy", "queries_local.npy",
                                       "queries_local_keep.npy"]          # no temporaries
  for role in ("database", "queries"):
    assert np.array_equal(np.asarray(disk[role]), mem[role])
    loaded = evaluation.load_local_features(store, role)
    assert isinstance(loaded[0], np.memmap) and loaded[0].dtype == np.float16
    assert np.array_equal(np.asarray(loaded[0]), mem["local"][role][0])
    assert np.array_equal(np.asarray(loaded[1]), mem["local"][role][1])
  # re-ranking from the memory maps equals re-ranking from memory
  preds = np.tile(np.arange(vs.num_database), (vs.num_queries, 1))
  a = rerank.rerank(preds, mem["local"]["queries"], mem["local"]["database"], ex.layout, settings)
  b = rerank.rerank(preds, disk["local"]["queries"], disk["local"]["database"], ex.layout,
                    settings)
  assert np.array_equal(a["predictions"], b["predictions"])
  os.remove(os.path.join(store, "queries_local_keep.npy"))
  with pytest.raises(ValueError, match="queries_local_keep.npy"):
    evaluation.load_local_features(store, "queries")


def test_rerank_none_is_bitwise_the_global_evaluation(tiny, tmp_path):
  from configs import distill
  _, mesh, variables = tiny
  root = _tiny_layout(str(tmp_path / "data"))
  config = distill.get_config("smoke")
  config.eval.batch_size = 4
  plain = evaluation.RecallEvaluator(SPEC, root, "test", mesh, 4, radius=25.0,
                                     extractor=evaluation.Extractor(SPEC, mesh, 4)).run(variables)
  assert config.eval.rerank == "none"
  none = evaluation.RecallEvaluator(
      SPEC, root, "test", mesh, 4, radius=25.0,
      extractor=evaluation.extractor_from_config(config, SPEC, mesh, local=True)).run(variables)
  assert "_rerank" not in none
  assert evaluation.public(none) == dict(evaluation.public(plain), extract_s=none["extract_s"])
  assert np.array_equal(none["_predictions"], plain["_predictions"])
  # with re-ranking: the global part of the report is unchanged, "+R" beside it
  config.eval.rerank = "rss"
  config.eval.rerank_layer = "stride8"        # the tiny backbone's deepest block stride
  rep = evaluation.RecallEvaluator(
      SPEC, root, "test", mesh, 4, radius=25.0,
      extractor=evaluation.extractor_from_config(config, SPEC, mesh, local=True)).run(variables)
  for key in ("R@1", "R@5", "R@10", "R@20", "per_condition"):
    assert rep[key] == plain[key], key
  plus = rep["_rerank"]
  assert plus["rerank"]["method"] == "rss" and plus["rerank"]["local_bytes_per_image"] > 0
  assert plus["num_queries"] == plain["num_queries"]
  # the re-ranked list is a permutation of the global top-K
  assert sorted(plus["_predictions"][0].tolist()) == sorted(range(6))
  assert plus["_global_rank"].shape == plus["_predictions"].shape


def test_rerank_checkpoint_variants_equal_one_call_each(tiny, tmp_path):
  """One extraction re-ranked with several settings gives what a call per
  setting gives; settings that need other features are refused by name."""
  from configs import distill
  from structvpr_jax import checkpoint
  from structvpr_jax.stages import evaluate
  _, _, variables = tiny
  root = _tiny_layout(str(tmp_path / "data"))
  ckpt = str(tmp_path / "ckpt")
  checkpoint.save(checkpoint.manager(ckpt), 0, variables, {"spec": SPEC, "step": 0})
  config = distill.get_config("smoke")
  config.eval.batch_size = 4
  config.eval.rerank, config.eval.rerank_layer = "rss", "stride8"
  config.eval.rerank_patch_sizes, config.eval.rerank_patch_strides = (1, 2), (1, 1)
  variants = [{"rerank_topk": 3}, {}, {"rerank_topk": 2, "rerank_global_weight": 1.0},
              {"rerank": "ransac", "rerank_topk": 4, "rerank_global_weight": 0.5}]
  many = evaluate.rerank_checkpoint_variants(config, ckpt, root, "test", variants)
  assert len(many) == len(variants)
  for v, got in zip(variants, many):
    one = evaluate.rerank_checkpoint(evaluate.with_eval(config, v), ckpt, root, "test")
    assert got["per_query"] == one["per_query"], v
    assert got["paired"] == one["paired"], v
    for key in ("R@1", "R@5", "per_condition", "num_queries"):
      assert got["global"][key] == one["global"][key] and got["rerank"][key] == one["rerank"][key]
    assert got["rerank"]["rerank"]["topk"] == v.get("rerank_topk", 100)
    assert got["rerank"]["rerank"]["global_weight"] == v.get("rerank_global_weight", 0.0)
    assert got["step"] == 0
  # the paired record is recomputable from the per-query hits
  hits = many[2]["per_query"]
  d = 100 * (np.mean(hits["rerank"]["hits"]["R@1"]) - np.mean(hits["global"]["hits"]["R@1"]))
  assert many[2]["paired"]["R@1"]["diff"] == pytest.approx(d)
  with pytest.raises(ValueError, match="eval.rerank_layer"):
    evaluate.rerank_checkpoint_variants(config, ckpt, root, "test",
                                        [{}, {"rerank_layer": "final"}])
  with pytest.raises(ValueError, match="eval.rerank\\*"):
    evaluate.rerank_checkpoint_variants(config, ckpt, root, "test", [{"radius": 5.0}])
  with pytest.raises(ValueError, match="eval.rerank_topx"):
    evaluate.with_eval(config, {"rerank_topx": 3})

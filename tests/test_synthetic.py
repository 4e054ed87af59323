"""Tests of the procedural 2.5-D city (structvpr_jax.data.synthetic)."""

import importlib
import json
import math
import os

import numpy as np
import pytest

from structvpr_jax.data import layout
from structvpr_jax.data import synthetic as S

# The renderer module (the package's `S.render` is the function).
RENDER = importlib.import_module("structvpr_jax.data.synthetic.render")

H, W = 120, 160
F = (W / 2) / math.tan(math.radians(S.HFOV_DEG) / 2)  # 80 px
CY = H / 2
HC = 1.8


def _ray(u):
  """Ray direction (forward = +a, right = -b) of column u for yaw 0."""
  x = (u + 0.5 - W / 2) / F
  return 1.0, -x


def _rows(t, zb, zt):
  """Rows [top, bottom) covered by a hit at depth t spanning heights [zb, zt]."""
  top = math.ceil(CY - F * (zt - HC) / t - 0.5)
  bot = math.ceil(CY - F * (zb - HC) / t - 0.5)
  return max(top, 0), min(max(bot, 0), H)


def _scene():
  facade = dict(p0=(20.0, -30.0), p1=(20.0, 30.0), top=10.8, cls=S.BUILDING)
  pole = dict(center=(10.0, 0.0), radius=0.3, top=8.0, cls=S.POLE)
  sign = dict(center=(8.0, -2.0), radius=0.4, bottom=2.0, top=2.6, cls=S.TRAFFIC_SIGN)
  car = dict(center=(12.0, 3.0), half=(2.2, 0.9), top=1.4, cls=S.CAR)
  world = S.make_scene(segments=[facade], cylinders=[pole, sign], boxes=[car],
                       road_half_width=100.0)
  return world, S.Pose(0, 0.0, 0.0, 0.0, HC)


def _expected_labels():
  """Hand-computed label map of `_scene` from the pinhole model."""
  exp = np.full((H, W), S.SKY, np.uint8)
  # Facade at depth 20 spans every column: rows ceil(60 - 80*9/20 - .5) = 24 ..
  # ceil(60 + 80*1.8/20 - .5) = 67 (exclusive); below it the road.
  ft, fb = _rows(20.0, 0.0, 10.8)
  assert (ft, fb) == (24, 67)
  exp[ft:fb] = S.BUILDING
  exp[fb:] = S.ROAD
  hits = []  # per column: (depth, zb, zt, class), painted far to near
  for u in range(W):
    dx, dy = _ray(u)
    col = []
    for (ca, cb), r, zb, zt, cls in (((10.0, 0.0), 0.3, 0.0, 8.0, S.POLE),
                                     ((8.0, -2.0), 0.4, 2.0, 2.6, S.TRAFFIC_SIGN)):
      # |o + t d - c|^2 = r^2 with o = 0
      a = dx * dx + dy * dy
      b = -2 * (dx * ca + dy * cb)
      c = ca * ca + cb * cb - r * r
      disc = b * b - 4 * a * c
      if disc >= 0:
        col.append(((-b - math.sqrt(disc)) / (2 * a), zb, zt, cls))
    # axis-aligned box [9.8, 14.2] x [2.1, 3.9] (slab method)
    tx = sorted(((9.8) / dx, (14.2) / dx))
    ty = sorted(((2.1) / dy, (3.9) / dy)) if dy != 0 else (-math.inf, math.inf)
    t0, t1 = max(tx[0], ty[0]), min(tx[1], ty[1])
    if t0 < t1 and t0 > 0:
      col.append((t0, 0.0, 1.4, S.CAR))
    for t, zb, zt, cls in sorted(col, reverse=True):
      top, bot = _rows(t, zb, zt)
      exp[top:bot, u] = cls
  return exp


def test_labels_match_pinhole_geometry():
  world, pose = _scene()
  rgb, lab = S.render(world, pose, "day", (H, W))
  assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
  assert lab.shape == (H, W) and lab.dtype == np.uint8
  exp = _expected_labels()
  np.testing.assert_array_equal(lab, exp)
  # sanity of the hand-computed scene itself
  pole_cols = np.nonzero((lab == S.POLE).any(0))[0]
  np.testing.assert_array_equal(pole_cols, [78, 79, 80, 81])  # |10 x / sqrt(1+x^2)| <= 0.3
  assert (lab[:24, 0] == S.SKY).all() and (lab[24:67, 0] == S.BUILDING).all()
  assert (lab[67:, 0] == S.ROAD).all()
  # the low car occludes only the building below its top: building shows above it
  car_cols = np.nonzero((lab == S.CAR).any(0))[0]
  assert len(car_cols) > 5
  for u in car_cols:
    top = np.nonzero(lab[:, u] == S.CAR)[0].min()
    assert lab[top - 1, u] == S.BUILDING
  # the floating sign does not hide what is below it
  sign_cols = np.nonzero((lab == S.TRAFFIC_SIGN).any(0))[0]
  assert len(sign_cols) > 0
  for u in sign_cols:
    bottom = np.nonzero(lab[:, u] == S.TRAFFIC_SIGN)[0].max()
    assert lab[bottom + 1, u] in (S.BUILDING, S.ROAD)


def test_wedge_culling_is_exact(monkeypatch):
  world = S.make_world(1, "val", 40)
  for i in range(0, 40, 6):
    pose = S.query_pose(world, i, np.random.default_rng(i))
    outs = []
    for cull in (True, False):
      monkeypatch.setattr(RENDER, "_WEDGE_CULL", cull)
      outs.append(S.render(world, pose, "night", (48, 64), rng=np.random.default_rng(i)))
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    np.testing.assert_array_equal(outs[0][0], outs[1][0])


def test_render_deterministic():
  w1 = S.make_world(0, "train", 30)
  w2 = S.make_world(0, "train", 30)
  w3 = S.make_world(1, "train", 30)
  for cond in ("day", "night"):
    a = S.render(w1, 7, cond, (48, 64), rng=np.random.default_rng(5))
    b = S.render(w2, 7, cond, (48, 64), rng=np.random.default_rng(5))
    c = S.render(w3, 7, cond, (48, 64), rng=np.random.default_rng(5))
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert a[0].tobytes() != c[0].tobytes()
  # rng=None is deterministic too
  assert S.render(w1, 3, "fog", (24, 32))[0].tobytes() == S.render(w2, 3, "fog", (24, 32))[0].tobytes()


def test_world_poses_and_districts():
  worlds = {s: S.make_world(0, s, 25) for s in layout.SPLITS}
  pts = {}
  for split, w in worlds.items():
    utm = np.array([w.utm(p)[:2] for p in w.poses])
    pts[split] = utm
    same = [i for i in range(len(w.poses) - 1) if w.poses[i].street == w.poses[i + 1].street]
    steps = np.linalg.norm(utm[1:] - utm[:-1], axis=1)[same]
    np.testing.assert_allclose(steps, S.PLACE_SPACING, atol=1e-6)
    assert set(w.place_regime) <= set(S.REGIMES)
  for a in layout.SPLITS:
    for b in layout.SPLITS:
      if a < b:
        d = np.linalg.norm(pts[a][:, None] - pts[b][None], axis=-1)
        assert d.min() > 1000.0


def _generate(root, seed=0, **kw):
  args = dict(seed=seed, image_size=(24, 32), num_places={"train": 6, "val": 4, "test": 5},
              progress=False)
  args.update(kw)
  return S.generate(str(root), **args)


def test_generate_layout(tmp_path):
  root = _generate(tmp_path / "ds")
  with open(os.path.join(root, "synthetic.json")) as fh:
    meta = json.load(fh)
  assert meta["seed"] == 0 and meta["image_size"] == [24, 32]
  assert meta["conditions"] == list(S.QUERY_CONDITIONS)
  assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
  all_utm = {}
  for split in layout.SPLITS:
    sp = layout.read_split(root, split, require_segmentations=True)
    assert sp.num_database == meta["num_places"][split] == meta["counts"][split]["database"]
    assert set(sp.query_notes()) == set(S.QUERY_CONDITIONS)
    for path in sp.database_paths:
      assert layout.parse_name(path)["note"] == "day"
    for paths, segs in ((sp.database_paths, sp.database_seg_paths),
                        (sp.query_paths, sp.query_seg_paths)):
      for p, s in zip(paths, segs):
        assert os.path.splitext(os.path.basename(p))[0] == os.path.splitext(os.path.basename(s))[0]
        layout.parse_utm(p)
    from PIL import Image
    lab = np.asarray(Image.open(sp.query_seg_paths[0]))
    img = np.asarray(Image.open(sp.query_paths[0]))
    assert lab.shape == (24, 32) and lab.dtype == np.uint8 and lab.max() < S.NUM_CLASSES
    assert img.shape == (24, 32, 3)
    d = np.linalg.norm(sp.query_utm[:, None] - sp.database_utm[None], axis=-1)
    assert (d.min(axis=1) <= layout.TRAIN_POSITIVE_RADIUS).all()
    all_utm[split] = np.concatenate([sp.database_utm, sp.query_utm])
  for a in layout.SPLITS:
    for b in layout.SPLITS:
      if a < b:
        assert np.linalg.norm(all_utm[a][:, None] - all_utm[b][None], axis=-1).min() > 1000.0
  # matching config: skipped (nothing rewritten)
  stamp = os.path.getmtime(os.path.join(root, "synthetic.json"))
  assert _generate(tmp_path / "ds") == root
  assert os.path.getmtime(os.path.join(root, "synthetic.json")) == stamp
  # mismatching config: error naming the file and the field
  with pytest.raises(ValueError, match=r"synthetic\.json.*'seed'"):
    _generate(tmp_path / "ds", seed=1)


def test_generate_deterministic(tmp_path):
  roots = [_generate(tmp_path / name, seed=seed, num_places={"train": 3, "val": 2, "test": 2})
           for name, seed in (("a", 0), ("b", 0), ("c", 1))]

  def files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
      for n in names:
        if n != "synthetic.json":
          with open(os.path.join(dirpath, n), "rb") as fh:
            out[os.path.relpath(os.path.join(dirpath, n), root)] = fh.read()
    return out

  a, b, c = (files(r) for r in roots)
  assert a == b
  assert set(a) != set(c) or any(a[k] != c[k] for k in a)


def test_corruption_strength():
  world = S.make_world(0, "test", 30)
  labels = [S.render(world, i, "day", (60, 80))[1] for i in range(0, 30, 3)]
  changed = {}
  for cond in S.CONDITIONS:
    rng = np.random.default_rng(0)
    changed[cond] = np.mean([(S.corrupt_labels(l, cond, rng) != l).mean() for l in labels])
  assert changed["day"] < 0.01
  assert changed["day"] == min(changed.values())
  assert changed["night"] > changed["dusk"] and changed["fog"] > changed["dusk"]
  out = S.corrupt_labels(labels[0], "night", np.random.default_rng(1))
  assert out.dtype == np.uint8 and out.shape == labels[0].shape and out.max() < S.NUM_CLASSES
  again = S.corrupt_labels(labels[0], "night", np.random.default_rng(1))
  np.testing.assert_array_equal(out, again)


def _repetitive_pair(world):
  """Two places inside one repetitive block, a multiple of its period apart."""
  for i in range(world.num_places):
    if world.place_regime[i] != "repetitive":
      continue
    si, bi = world.place_block[i]
    a0, a1, _, period = world.streets[si].blocks[bi]
    pi = world.poses[i]
    if pi.a < a0 + 5:
      continue
    for j in range(i + 1, world.num_places):
      pj = world.poses[j]
      d = pj.a - pi.a
      if (tuple(world.place_block[j]) == (si, bi) and pj.a + 60 < a1
          and abs(d / period - round(d / period)) < 1e-9):
        return i, j
  return None


def test_both_regimes():
  world = S.make_world(0, "train", 200)
  assert {"structure", "repetitive"} <= set(world.place_regime)
  pair = _repetitive_pair(world)
  assert pair is not None
  i, j = pair
  rgb_i, lab_i = S.render(world, i, "day", (60, 80))
  rgb_j, lab_j = S.render(world, j, "day", (60, 80))
  # D3: structure is ambiguous (near-identical label maps) but appearance differs
  assert (lab_i == lab_j).mean() > 0.95
  assert np.abs(rgb_i.astype(int) - rgb_j).mean() > 8
  # structure places a few places apart have clearly different label maps
  k = next(k for k in range(world.num_places - 6)
           if world.place_regime[k] == "structure"
           and world.poses[k].street == world.poses[k + 6].street)
  lab_k = S.render(world, k, "day", (60, 80))[1]
  lab_k6 = S.render(world, k + 6, "day", (60, 80))[1]
  assert (lab_k == lab_k6).mean() < (lab_i == lab_j).mean() - 0.05
  # D2: night / repaint change the appearance strongly, labels keep the structure
  day_rgb, day_lab = S.render(world, k, "day", (60, 80))
  for cond, min_diff in (("night", 50), ("repaint", 5)):
    rgb, lab = S.render(world, k, cond, (60, 80), dynamic="database")
    np.testing.assert_array_equal(lab, day_lab)
    assert np.abs(rgb.astype(int) - day_rgb).mean() > min_diff


def test_montage(tmp_path):
  out = S.montage(str(tmp_path / "m.png"), image_size=(30, 40), num_places=12, scale=1)
  from PIL import Image
  img = Image.open(out)
  assert img.size[0] > 5 * 40 and img.size[1] > 2 * 30


def test_cli_generate(tmp_path, capsys):
  root = str(tmp_path / "cli")
  S.main(["generate", "--root", root, "--height", "16", "--width", "24", "--train", "2",
          "--val", "2", "--test", "2", "--seed", "3"])
  assert capsys.readouterr().out.strip() == os.path.abspath(root)
  with open(os.path.join(root, "synthetic.json")) as fh:
    meta = json.load(fh)
  assert meta["seed"] == 3 and meta["image_size"] == [16, 24]
  assert len(os.listdir(os.path.join(root, "images", "val", "queries"))) == 4

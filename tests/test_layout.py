"""Tests of the datasets_vg layout, ground truth helpers and frame converters."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from structvpr_jax import files
from structvpr_jax.data import convert as C
from structvpr_jax.data import layout as L

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GARDENS_POINT = os.path.join(REPO, "..", "shared", "data", "gardens_point")


def _write_layout(root, split, role, utms, notes=None, seg=True, size=(6, 8)):
  paths = []
  for k, (east, north) in enumerate(utms):
    name = L.format_name(east, north, note=None if notes is None else notes[k])
    img_dir, seg_dir = L.split_folders(root, split, role)
    rgb = np.full(size + (3,), 10 * k, np.uint8)
    files.save_image(os.path.join(img_dir, name), rgb)
    if seg:
      files.save_image(os.path.join(seg_dir, name[:-4] + ".png"), np.full(size, k, np.uint8))
    paths.append(os.path.join(img_dir, name))
  return paths


DB_UTM = [(0, 30), (0, 0), (0, 20), (0, 10), (0, 40)]
Q_UTM = [(6, 0), (0, 12), (100, 0)]


@pytest.fixture()
def small(tmp_path):
  root = str(tmp_path / "root")
  _write_layout(root, "train", "database", DB_UTM)
  _write_layout(root, "train", "queries", Q_UTM, notes=["day", "night", "day"])
  return root


def test_read_split_round_trip(small):
  sp = L.read_split(small, "train", require_segmentations=True)
  names = [os.path.basename(p) for p in sp.database_paths]
  assert names == sorted(names)
  # name order: @0.00@0.00, @0.00@10.00, @0.00@20.00, @0.00@30.00, @0.00@40.00
  np.testing.assert_array_equal(sp.database_utm, [[0, 0], [0, 10], [0, 20], [0, 30], [0, 40]])
  assert sp.database_utm.dtype == np.float64 and sp.query_utm.shape == (3, 2)
  # queries: @0.00@12.00 < @100.00@0.00 < @6.00@0.00 (string order)
  np.testing.assert_array_equal(sp.query_utm, [[0, 12], [100, 0], [6, 0]])
  assert sp.query_notes() == ["night", "day", "day"]
  for img, seg in zip(sp.database_paths + sp.query_paths,
                      sp.database_seg_paths + sp.query_seg_paths):
    assert os.path.isfile(seg)
    assert seg == L.seg_path_for(img)
    assert os.path.join("segmentations", "train") in seg and seg.endswith(".png")
  # list_role gives the same order
  paths, utm = L.list_role(small, "train", "queries")
  assert paths == sp.query_paths
  np.testing.assert_array_equal(utm, sp.query_utm)


def test_read_split_without_segmentations(tmp_path):
  root = str(tmp_path)
  _write_layout(root, "val", "database", DB_UTM, seg=False)
  _write_layout(root, "val", "queries", Q_UTM, seg=False)
  sp = L.read_split(root, "val")
  assert sp.database_seg_paths is None and sp.query_seg_paths is None
  with pytest.raises(ValueError, match="missing label map"):
    L.read_split(root, "val", require_segmentations=True)


def test_malformed_name_names_file(small):
  bad = os.path.join(small, "images", "train", "queries", "IMG_0001.jpg")
  Image.new("RGB", (4, 4)).save(bad)
  with pytest.raises(ValueError, match="IMG_0001.jpg"):
    L.read_split(small, "train")
  os.remove(bad)
  bad = os.path.join(small, "images", "train", "queries", "@abc@1.0@@.jpg")
  Image.new("RGB", (4, 4)).save(bad)
  with pytest.raises(ValueError, match=r"@abc@1\.0@@\.jpg"):
    L.read_split(small, "train")


def test_missing_label_map_names_file(small):
  sp = L.read_split(small, "train")
  os.remove(sp.query_seg_paths[1])
  with pytest.raises(ValueError, match=os.path.basename(sp.query_seg_paths[1]).replace(".", r"\.")):
    L.read_split(small, "train", require_segmentations=True)


def test_empty_split_is_clear(small):
  with pytest.raises(ValueError, match=r"test.database: no images"):
    L.read_split(small, "test")
  os.makedirs(os.path.join(small, "images", "val", "database"))
  with pytest.raises(ValueError, match="no images"):
    L.read_split(small, "val")
  with pytest.raises(ValueError, match="split must be one of"):
    L.read_split(small, "training")


def test_training_ground_truth_hand_case(small):
  sp = L.read_split(small, "train")
  pos, soft = L.training_ground_truth(sp)
  # q0 = (0, 12): db north 10 (d=2), 20 (d=8) within 10 m; 0 (12), 30 (18) within 25 m.
  np.testing.assert_array_equal(pos[0], [1, 2])
  np.testing.assert_array_equal(soft[0], [0, 1, 2, 3])
  # q1 = (100, 0): nothing.
  assert len(pos[1]) == 0 and len(soft[1]) == 0
  # q2 = (6, 0): db0 at 6 m; db1 at sqrt(36 + 100) = 11.7 m is a soft positive.
  np.testing.assert_array_equal(pos[2], [0])
  np.testing.assert_array_equal(soft[2], [0, 1, 2])
  np.testing.assert_array_equal(L.queries_without_positives(sp), [1])
  np.testing.assert_array_equal(L.queries_without_positives(sp, radius=5.0), [1, 2])
  assert L.queries_without_positives(sp, radius=200.0).dtype == np.int64


# ---------------------------------------------------------------------------
# Frame converters
# ---------------------------------------------------------------------------

TRAVERSES = ("day", "dusk", "night")
NUM_FRAMES = 12
IMG_HW = (12, 16)
LAB_HW = (6, 8)


def _label(t, i):
  return ((np.arange(LAB_HW[0] * LAB_HW[1]).reshape(LAB_HW) + 7 * i + t) % 19).astype(np.uint8)


@pytest.fixture()
def frames(tmp_path):
  src = tmp_path / "src"
  rng = np.random.default_rng(0)
  for t, name in enumerate(TRAVERSES):
    (src / "img" / name).mkdir(parents=True)
    (src / "seg" / name).mkdir(parents=True)
    for i in range(NUM_FRAMES):  # unpadded numbers: frame2 before frame10
      rgb = rng.integers(0, 255, IMG_HW + (3,), dtype=np.uint8)
      Image.fromarray(rgb).save(src / "img" / name / f"frame{i}.jpg", quality=90)
      Image.fromarray(_label(t, i)).save(src / "seg" / name / f"frame{i}.png")
  return src


SPEC = "train:0-5,val:6-7,test:8-11"


def _convert(src, out, **kw):
  return C.convert_frames(str(out), str(src / "img" / "day"),
                          [str(src / "img" / "dusk"), str(src / "img" / "night")],
                          kw.pop("split_places", SPEC), seg_root=str(src / "seg"),
                          workers=2, verbose=kw.pop("verbose", False), **kw)


def test_convert_frames(frames, tmp_path):
  out = tmp_path / "out"
  marker = _convert(frames, out)
  expected = {"train": (0, 6), "val": (6, 8), "test": (8, 12)}
  assert marker["counts"] == {s: {"database": b - a, "queries": 2 * (b - a)}
                              for s, (a, b) in expected.items()}
  assert not any(p.name.startswith("out.tmp") for p in tmp_path.iterdir())
  with open(out / "convert.json") as fh:
    assert json.load(fh)["counts"] == marker["counts"]
  for split, (a, b) in expected.items():
    sp = L.read_split(str(out), split, require_segmentations=True)
    assert sp.num_database == b - a and sp.num_queries == 2 * (b - a)
    assert sorted(sp.database_utm[:, 1]) == [10.0 * i for i in range(a, b)]
    assert np.all(sp.database_utm[:, 0] == 0) and np.all(sp.query_utm[:, 0] == 0)
    assert sorted(sp.query_notes()) == ["dusk"] * (b - a) + ["night"] * (b - a)
    for path, seg in zip(sp.database_paths + sp.query_paths,
                         sp.database_seg_paths + sp.query_seg_paths):
      fields = L.parse_name(path)
      i, note = int(fields["pano_id"]), fields["note"]
      assert L.parse_utm(path) == (0.0, 10.0 * i) and a <= i < b
      assert os.path.basename(path) == L.format_name(0, 10 * i, pano_id=i, note=note)
      with open(path, "rb") as fh, open(frames / "img" / note / f"frame{i}.jpg", "rb") as fs:
        assert fh.read() == fs.read()  # no --max-side: bytes kept
      lab = np.asarray(Image.open(seg))
      assert lab.dtype == np.uint8 and lab.shape == IMG_HW
      want = np.repeat(np.repeat(_label(TRAVERSES.index(note), i), 2, 0), 2, 1)
      np.testing.assert_array_equal(lab, want)  # nearest-neighbour upsampling
    assert len(L.queries_without_positives(sp)) == 0


def test_convert_idempotent_and_refusals(frames, tmp_path, capsys):
  out = tmp_path / "out"
  _convert(frames, out)
  mtime = os.path.getmtime(out / "convert.json")
  before = sorted(os.listdir(out / "images" / "val" / "queries"))
  again = _convert(frames, out, verbose=True)
  assert "nothing to do" in capsys.readouterr().out
  assert os.path.getmtime(out / "convert.json") == mtime
  assert sorted(os.listdir(out / "images" / "val" / "queries")) == before
  assert again["counts"]["val"] == {"database": 2, "queries": 4}
  with pytest.raises(ValueError, match=r"convert\.json.*max_side"):
    _convert(frames, out, max_side=8)
  with pytest.raises(ValueError, match=r"convert\.json.*split_places"):
    _convert(frames, out, split_places="train:0-7,test:8-11")
  # A non-empty folder that is not a conversion is refused.
  other = tmp_path / "other"
  other.mkdir()
  (other / "x.txt").write_text("x")
  with pytest.raises(ValueError, match="no convert.json"):
    _convert(frames, other)


def test_convert_resize(frames, tmp_path):
  out = tmp_path / "small"
  _convert(frames, out, max_side=8)
  sp = L.read_split(str(out), "test", require_segmentations=True)
  for path, seg in zip(sp.query_paths, sp.query_seg_paths):
    fields = L.parse_name(path)
    assert Image.open(path).size == (8, 6)
    lab = np.asarray(Image.open(seg))
    np.testing.assert_array_equal(lab, _label(TRAVERSES.index(fields["note"]),
                                              int(fields["pano_id"])))


def test_convert_errors(frames, tmp_path):
  os.remove(frames / "seg" / "night" / "frame3.png")
  with pytest.raises(ValueError, match=r"night.frame3\.png"):
    _convert(frames, tmp_path / "a")
  assert not os.path.exists(tmp_path / "a")
  os.remove(frames / "img" / "night" / "frame11.jpg")
  with pytest.raises(ValueError, match=r"different frame counts.*day has 12.*night has 11"):
    _convert(frames, tmp_path / "b")
  with pytest.raises(ValueError, match="overlap"):
    C.parse_split_places("train:0-5,test:5-9", 12)
  with pytest.raises(ValueError, match="outside"):
    C.parse_split_places("train:0-12", 12)
  assert C.parse_split_places("test:70%-100%,train:0%-60%,val:60%-70%", 3576) == {
      "train": (0, 2146), "val": (2146, 2503), "test": (2503, 3576)}


def test_cli_general_form(frames, tmp_path, capsys):
  out = tmp_path / "cli"
  rc = C.main(["convert-frames", "--database", str(frames / "img" / "day"),
               "--queries", str(frames / "img" / "night"), "--out", str(out),
               "--split-places", "train:0-3,val:4-5,test:6-11", "--workers", "1"])
  assert rc == 0
  line = capsys.readouterr().out.strip()
  assert "train 4 db/4 q, val 2 db/2 q, test 6 db/6 q" in line and line.endswith(" s")
  assert L.read_split(str(out), "val").database_seg_paths is None
  rc = C.main(["convert-frames", "--database", str(frames / "img" / "day"),
               "--queries", str(frames / "img" / "night"), "--out", str(out),
               "--split-places", "train:0-3,val:4-5,test:6-10"])
  assert rc == 2 and "convert.json" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir(GARDENS_POINT), reason="../shared/data/gardens_point absent")
def test_gardens_point_conversion(tmp_path):
  marker = C.convert_preset("gardens_point", GARDENS_POINT, str(tmp_path / "gp"),
                            max_side=48, workers=2, verbose=False)
  want = {"train": (80, 160), "val": (20, 40), "test": (100, 200)}
  for split, (n_db, n_q) in want.items():
    sp = L.read_split(str(tmp_path / "gp"), split, require_segmentations=True)
    assert (sp.num_database, sp.num_queries) == (n_db, n_q)
    assert marker["counts"][split] == {"database": n_db, "queries": n_q}
    assert sorted(set(sp.query_notes())) == ["day_right", "night_right"]
    assert {L.parse_name(p)["note"] for p in sp.database_paths} == {"day_left"}
    assert len(L.queries_without_positives(sp)) == 0
  sp = L.read_split(str(tmp_path / "gp"), "test")
  assert sp.database_utm[:, 1].min() == 1000.0 and sp.database_utm[:, 1].max() == 1990.0
  img = Image.open(sp.query_paths[0])
  assert max(img.size) == 48
  assert Image.open(sp.query_seg_paths[0]).size == img.size


def test_write_subset_links_kept_images_and_other_splits(small, tmp_path):
  _write_layout(small, "val", "database", [(0, 0)])
  _write_layout(small, "val", "queries", [(0, 1)])
  sp = L.read_split(small, "train", require_segmentations=True)
  dest = str(tmp_path / "fold")
  q_keep, db_keep = np.array([True, False, True]), np.array([False, True, True, False, False])
  assert L.write_subset(sp, dest, q_keep, db_keep) == dest
  sub = L.read_split(dest, "train", require_segmentations=True)
  assert [os.path.basename(p) for p in sub.query_paths] == \
      [os.path.basename(p) for p, k in zip(sp.query_paths, q_keep) if k]
  np.testing.assert_array_equal(sub.database_utm, sp.database_utm[db_keep])
  for img, seg in zip(sub.query_paths + sub.database_paths,
                      sub.query_seg_paths + sub.database_seg_paths):
    assert os.path.islink(img) and os.path.islink(seg)
    original = os.path.join(small, os.path.relpath(img, dest))
    assert os.path.realpath(img) == os.path.realpath(original)
    assert open(seg, "rb").read() == open(L.seg_path_for(original), "rb").read()
  # other splits are the original folders, linked
  assert L.read_split(dest, "val").query_paths[0].startswith(dest)
  assert not os.path.exists(os.path.join(dest, "images", "test"))
  # the same selection again is kept; another one is refused naming the folder
  assert L.write_subset(sp, dest, q_keep, db_keep) == dest
  with pytest.raises(ValueError, match="fold: exists and is not the subset"):
    L.write_subset(sp, dest, ~q_keep, db_keep)
  with pytest.raises(ValueError, match="queries mask has shape"):
    L.write_subset(sp, str(tmp_path / "other"), q_keep[:2], db_keep)
  assert not os.path.exists(tmp_path / "other")


def test_patchnetvlad_ground_truth_round_trip_and_two_folder_split(small, tmp_path, capsys):
  _write_layout(small, "test", "database", DB_UTM)
  _write_layout(small, "test", "queries", Q_UTM)
  gt = str(tmp_path / "gt.npz")
  assert C.main(["export-gt", "--root", small, "--split", "test", "--out", gt]) == 0
  assert "utmQ (3, 2)" in capsys.readouterr().out
  utm_q, utm_db, radius = L.read_patchnetvlad_gt(gt)
  sp = L.read_split(small, "test")
  np.testing.assert_array_equal(utm_q, sp.query_utm)
  np.testing.assert_array_equal(utm_db, sp.database_utm)
  assert radius == 25.0
  with np.load(gt) as z:
    assert sorted(z.files) == ["posDistThr", "utmDb", "utmQ"]
  # two plain folders whose names carry no UTM, positions from the .npz
  folders = {}
  for role, paths in (("database", sp.database_paths), ("queries", sp.query_paths)):
    folders[role] = tmp_path / role
    os.makedirs(folders[role])
    for k, p in enumerate(paths):
      os.symlink(p, folders[role] / f"img{k:03d}.jpg")
  vs = L.folder_split(str(folders["database"]), str(folders["queries"]), ground_truth=gt)
  np.testing.assert_array_equal(vs.query_utm, sp.query_utm)
  with pytest.raises(ValueError, match="img000.jpg: not a datasets_vg name"):
    L.folder_split(str(folders["database"]), str(folders["queries"]))
  os.remove(folders["queries"] / "img000.jpg")
  with pytest.raises(ValueError, match="3 queries positions for 2 images"):
    L.folder_split(str(folders["database"]), str(folders["queries"]), ground_truth=gt)
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, utmQ=utm_q)
  with pytest.raises(ValueError, match=r"bad.npz: missing \['utmDb', 'posDistThr'\]"):
    L.read_patchnetvlad_gt(bad)


NORDLAND = os.path.join(REPO, "..", "shared", "data", "nordland_64x32")


@pytest.mark.skipif(not os.path.isdir(NORDLAND), reason="needs ../shared/data/nordland_64x32")
@pytest.mark.parametrize("preset,frames", [("nordland_pm1", 1), ("nordland_pm10", 10)])
def test_nordland_variants_have_their_frame_tolerance(tmp_path, preset, frames):
  C.convert_preset(preset, NORDLAND, str(tmp_path / preset), verbose=False)
  sp = L.read_split(str(tmp_path / preset), "test")
  positives = L.retrieval.positives_within(sp.query_utm, sp.database_utm,
                                           L.TEST_POSITIVE_RADIUS)
  db_frame = {float(u[1]): int(L.parse_name(p)["pano_id"])
              for u, p in zip(sp.database_utm, sp.database_paths)}
  for q in range(0, sp.num_queries, 97):
    frame = int(L.parse_name(sp.query_paths[q])["pano_id"])
    got = sorted(db_frame[float(sp.database_utm[j, 1])] for j in positives[q])
    want = [f for f in range(frame - frames, frame + frames + 1) if f in db_frame.values()]
    assert got == want, (q, frame)

"""Tests of the tensorflow-datasets builder (structvpr_jax.data.tfds_vpr), no TensorFlow."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from structvpr_jax import files
from structvpr_jax.data import layout as L
from structvpr_jax.data import tfds_vpr as T

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 10, 14


def _make_layout(root):
  """train + test splits; one train query without a label map, a PNG and a
  grayscale image among the database images."""
  rng = np.random.default_rng(1)
  for split, north0 in (("train", 0.0), ("test", 1000.0)):
    for role in L.ROLES:
      img_dir, seg_dir = L.split_folders(root, split, role)
      os.makedirs(img_dir)
      os.makedirs(seg_dir)
      for k in range(3 if role == "database" else 2):
        note = "day" if role == "database" else "night"
        ext = ".png" if (role, k) == ("database", 1) else ".jpg"
        name = L.format_name(k, north0 + 10 * k, ext=ext, note=note, pano_id=k)
        rgb = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        if (role, k) == ("database", 2):
          Image.fromarray(rgb[..., 0]).save(os.path.join(img_dir, name))  # grayscale JPEG
        else:
          files.save_image(os.path.join(img_dir, name), rgb)
        if (split, role, k) != ("train", "queries", 1):
          lab = rng.integers(0, 19, (H, W), dtype=np.uint8)
          files.save_image(os.path.join(seg_dir, name[:-len(ext)] + ".png"), lab)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  base = tmp_path_factory.mktemp("tfds")
  root = str(base / "layout")
  _make_layout(root)
  data_dir = str(base / "data")
  builder = T.build(root, data_dir)
  return root, data_dir, builder


def test_splits_and_records(built):
  root, data_dir, builder = built
  assert builder.name == "vpr_layout"
  assert sorted(builder.info.splits.keys()) == sorted(
      ["train_database", "train_queries", "test_database", "test_queries"])
  for split in ("train", "test"):
    for role in L.ROLES:
      paths, utm = L.list_role(root, split, role)
      src = T.load_source(data_dir, f"{split}_{role}")
      assert len(src) == len(paths)
      for i, path in enumerate(paths):
        rec = src[i]
        assert rec["filename"] == os.path.basename(path)
        assert rec["role"] == role
        assert rec["utm"].dtype == np.float64
        np.testing.assert_array_equal(rec["utm"], utm[i])
        want = np.asarray(Image.open(path).convert("RGB"))
        assert rec["image"].dtype == np.uint8 and rec["image"].shape == (H, W, 3)
        np.testing.assert_array_equal(rec["image"], want)
        seg = L.seg_path_for(path)
        assert rec["segmentation"].dtype == np.uint8 and rec["segmentation"].shape == (H, W)
        if os.path.isfile(seg):
          assert rec["has_segmentation"] is True
          np.testing.assert_array_equal(rec["segmentation"], np.asarray(Image.open(seg)))
        else:
          assert rec["has_segmentation"] is False
          assert not rec["segmentation"].any()
  assert "tensorflow" not in sys.modules


def test_random_access_and_missing_label(built):
  root, data_dir, builder = built
  # (read_split refuses this split: its segmentations tree is incomplete.)
  query_paths, _ = L.list_role(root, "train", "queries")
  db_paths, _ = L.list_role(root, "train", "database")
  src = T.load_source(os.path.join(data_dir, "vpr_layout", "1.0.0"), "train_queries")
  flags = [r["has_segmentation"] for r in src]
  missing = [i for i, p in enumerate(query_paths) if not os.path.isfile(L.seg_path_for(p))]
  assert len(missing) == 1 and flags == [i not in missing for i in range(len(flags))]
  db = T.load_source(builder, "train_database")
  batch = db.__getitems__([2, 0, -1])
  assert [r["filename"] for r in batch] == [os.path.basename(db_paths[i])
                                            for i in (2, 0, 2)]
  assert db[-3]["filename"] == os.path.basename(db_paths[0])
  assert [r["filename"] for r in db[1:]] == [os.path.basename(p) for p in db_paths[1:]]
  with pytest.raises(IndexError):
    db[3]
  with pytest.raises(ValueError, match="not built"):
    T.load_source(data_dir, "val_queries")
  with pytest.raises(ValueError, match="split must be one of"):
    T.load_source(data_dir, "train")
  with pytest.raises(ValueError, match="no prepared vpr_layout"):
    T.load_source(root, "train_queries")


def test_image_bytes_not_reencoded(built):
  root, data_dir, builder = built
  assert builder.info.features["image"].encoding_format == "jpeg"
  assert builder.info.disable_shuffling
  paths, _ = L.list_role(root, "test", "queries")
  raw = builder.as_data_source(split="test_queries",
                               decoders={"image": T.tfds.decode.SkipDecoding()})
  for i, path in enumerate(paths):  # the stored bytes are the file's own
    with open(path, "rb") as fh:
      assert raw[i]["image"] == fh.read()


def test_build_and_read_without_tensorflow(tmp_path):
  """Fresh interpreter: build + read, then TensorFlow must not be imported."""
  script = textwrap.dedent(f"""
      import json, sys
      sys.path.insert(0, {REPO!r})
      sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
      from test_tfds_vpr import _make_layout
      from structvpr_jax.data import tfds_vpr as T
      _make_layout({str(tmp_path / "layout")!r})
      T.build({str(tmp_path / "layout")!r}, {str(tmp_path / "data")!r})
      rec = T.load_source({str(tmp_path / "data")!r}, "test_database")[1]
      print(json.dumps({{"tf": sys.modules.get("tensorflow") is not None,
                         "shape": list(rec["image"].shape),
                         "filename": rec["filename"]}}))
  """)
  env = dict(os.environ, TQDM_DISABLE="1")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120, cwd=str(tmp_path), env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result == {"tf": False, "shape": [H, W, 3],
                    "filename": L.format_name(1, 1010, ext=".png", note="day", pano_id=1)}

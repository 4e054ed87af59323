"""TFLite segmentation: reference image, CamVid accuracy, folder runs, refusals."""

import glob
import os
import sys

import numpy as np
import pytest

from structvpr_jax.data import layout, segment

DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
MODELS = os.path.join(DATA, "models")
SEG_MODEL = os.path.join(MODELS, segment.MODEL_NAME)
CLASSIFIER = os.path.join(MODELS, "mobilenet_v2_1.0_224_quant.tflite")
CAMVID = os.path.join(DATA, "camvid_val")

litert = pytest.importorskip("ai_edge_litert", reason="pip install ai-edge-litert")
needs_model = pytest.mark.skipif(not os.path.isfile(SEG_MODEL), reason=f"{SEG_MODEL} missing")


def _read(path, mode=None):
  from PIL import Image
  with Image.open(path) as im:
    return np.asarray(im.convert(mode) if mode else im)


@pytest.fixture(scope="module")
def segmenter():
  return segment.Segmenter(SEG_MODEL, num_threads=2)


@needs_model
def test_reference_image_agreement(segmenter):
  image = _read(os.path.join(MODELS, "cityscapes_segmentation.bmp"), "RGB")
  # The reference mask is a single-channel image of Cityscapes trainIds.
  mask = _read(os.path.join(MODELS, "cityscapes_segmentation_mask.bmp"))
  assert mask.ndim == 2 and mask.max() < 19
  labels = segmenter(image)
  assert labels.dtype == np.uint8 and labels.shape == image.shape[:2]
  agreement = segment.pixel_agreement(labels, mask)
  print(f"reference mask agreement {agreement:.4f}")
  assert agreement >= 0.90


def test_camvid_mapping_is_a_partition():
  lut = segment.cityscapes_to_camvid_lut()
  assert sorted(segment.CAMVID_TO_CITYSCAPES) == list(range(len(segment.CAMVID_CLASSES)))
  assert np.all(lut[:19] < 11) and np.all(lut[19:] == 255)
  assert lut[0] == 3 and lut[10] == 0 and lut[11] == 9 and lut[13] == 8  # road, sky, person, car


@needs_model
@pytest.mark.skipif(not os.path.isdir(os.path.join(CAMVID, "valannot")),
                    reason=f"no CamVid in {CAMVID}")
def test_camvid_subset_pixel_accuracy():
  images = sorted(glob.glob(os.path.join(CAMVID, "val", "*.png")))[::10][:10]
  labels = [os.path.join(CAMVID, "valannot", os.path.basename(p)) for p in images]
  result = segment.evaluate_camvid(SEG_MODEL, images, labels)
  print(f"CamVid {result['num_images']} images: pixel accuracy "
        f"{result['pixel_accuracy']:.4f}, mean class accuracy "
        f"{result['mean_class_accuracy']:.4f}")
  assert result["num_images"] == 10 and result["unmapped"] == 0
  assert result["pixel_accuracy"] >= 0.80


def _write_rgb(path, h, w, seed):
  from PIL import Image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  image = np.zeros((h, w, 3), np.uint8)
  image[: h // 2] = (120, 160, 220)                       # "sky"
  image[h // 2:] = (90, 90, 90)                           # "road"
  image += rng.integers(0, 10, image.shape, dtype=np.uint8)
  Image.fromarray(image).save(path)


@needs_model
def test_segment_layout_folder_and_resume(tmp_path):
  root = tmp_path / "vpr"
  sizes = {}
  for i, (split, role) in enumerate([("train", "database"), ("train", "queries"),
                                     ("test", "queries")]):
    for j, ext in enumerate((".jpg", ".png")):
      name = layout.format_name(10.0 * i, 5.0 * j, ext=ext)
      path = str(root / "images" / split / role / name)
      h, w = 40 + 7 * i, 60 + 11 * j
      _write_rgb(path, h, w, seed=10 * i + j)
      sizes[path] = (h, w)
  counts = segment.segment_folder(SEG_MODEL, str(root), progress=False)
  assert counts["total"] == counts["written"] == len(sizes) and counts["skipped"] == 0
  for path, hw in sizes.items():
    out = layout.seg_path_for(path)
    labels = _read(out)
    assert labels.dtype == np.uint8 and labels.shape == hw, out
    assert labels.max() < 19
  assert not glob.glob(str(root / "segmentations" / "**" / "*.tmp*"), recursive=True)
  mtimes = {p: os.path.getmtime(layout.seg_path_for(p)) for p in sizes}
  again = segment.segment_folder(SEG_MODEL, str(root), progress=False)
  assert again["written"] == 0 and again["skipped"] == len(sizes)
  assert mtimes == {p: os.path.getmtime(layout.seg_path_for(p)) for p in sizes}
  # A deleted label map is redone alone (resumable).
  os.remove(layout.seg_path_for(next(iter(sizes))))
  third = segment.segment_folder(SEG_MODEL, str(root), progress=False)
  assert third["written"] == 1 and third["skipped"] == len(sizes) - 1
  # layout.read_split sees the complete segmentations tree.
  split = layout.read_split(str(root), "train")
  assert all(os.path.isfile(p) for p in split.query_seg_paths + split.database_seg_paths)


@needs_model
def test_segment_plain_folder_needs_out(tmp_path, capsys):
  folder = tmp_path / "plain"
  _write_rgb(str(folder / "a.png"), 30, 50, 0)
  _write_rgb(str(folder / "sub" / "b.jpg"), 20, 20, 1)
  with pytest.raises(ValueError, match="output folder"):
    segment.segment_folder(SEG_MODEL, str(folder), progress=False)
  out = tmp_path / "out"
  counts = segment.segment_folder(SEG_MODEL, str(folder), out_root=str(out), progress=True)
  assert counts["written"] == 2
  assert _read(str(out / "a.png")).shape == (30, 50)
  assert _read(str(out / "sub" / "b.png")).shape == (20, 20)
  if not sys.stderr.isatty():
    assert "images/s" in capsys.readouterr().err


@needs_model
@pytest.mark.skipif(not os.path.isfile(CLASSIFIER), reason=f"{CLASSIFIER} missing")
def test_classifier_is_refused(tmp_path):
  _write_rgb(str(tmp_path / "plain" / "a.png"), 30, 50, 0)
  with pytest.raises(ValueError) as info:
    segment.segment_folder(CLASSIFIER, str(tmp_path / "plain"), out_root=str(tmp_path / "o"))
  message = str(info.value)
  assert "\n" not in message and os.path.basename(CLASSIFIER) in message
  assert "not a segmentation model" in message and "[1, 1001]" in message
  assert not (tmp_path / "o").exists()
  with pytest.raises(ValueError, match="not found"):
    segment.Segmenter(str(tmp_path / "missing.tflite"))


def test_output_kind_and_input_quantisation():
  kind = lambda shape, dtype, q=(0.0, 0): segment.output_kind(
      {"name": "out", "shape": np.array(shape), "dtype": dtype, "quantization": q}, "m.tflite")
  assert kind([1, 9, 9], np.int64) == "labels"
  assert kind([1, 9, 9, 1], np.int32) == "labels"
  assert kind([1, 9, 9, 19], np.float32) == "scores"
  assert kind([1, 9, 9, 19], np.uint8, (0.1, 3)) == "scores"
  for shape, dtype in [([1, 1001], np.uint8), ([1, 9, 9], np.float32), ([1, 1, 1, 5], np.float32)]:
    with pytest.raises(ValueError, match="m.tflite: not a segmentation model"):
      kind(shape, dtype)
  pixels = np.array([[[0, 128, 255]]], np.uint8)
  u8 = segment.quantize_input(pixels, {"dtype": np.uint8, "quantization": (1 / 128, 128)})
  np.testing.assert_array_equal(u8, pixels[None])
  i8 = segment.quantize_input(pixels, {"dtype": np.int8, "quantization": (1 / 128, 0)})
  np.testing.assert_array_equal(i8, (pixels.astype(int) - 128)[None])
  f32 = segment.quantize_input(pixels, {"dtype": np.float32, "quantization": (0.0, 0)})
  np.testing.assert_allclose(f32, [[[[-1.0, 0.0, 127 / 128]]]])


def test_config_and_run(tmp_path):
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs import segment as segment_config
  c = segment_config.get_config()
  assert c.mode == "segment" and c.segment.images == "" and c.segment.num_threads == 2
  assert c.segment.model == "auto" and c.segment.out == ""
  with pytest.raises(ValueError, match="segment.images"):
    segment.run(c)
  if os.path.isfile(SEG_MODEL):
    _write_rgb(str(tmp_path / "plain" / "a.png"), 30, 50, 0)
    c.segment.images = str(tmp_path / "plain")
    c.segment.out = str(tmp_path / "out")
    c.segment.model = SEG_MODEL
    counts = segment.run(c)
    assert counts["written"] == 1 and os.path.isfile(tmp_path / "out" / "a.png")

"""Offline semantic segmentation of a dataset with a TFLite model.

  python -m structvpr_jax.main --config=configs/segment.py \
      --config.segment.images=DIR [--config.segment.out=OUT]

Runs a TFLite segmentation model (default: DeepLab with a MobileNet-EdgeTPU
backbone trained on Cityscapes, `deeplab_mobilenet_edgetpu_slim_cityscapes_
quant.tflite`, uint8 input [1, 513, 513, 3], output [1, 513, 513] argmax of the
19 Cityscapes trainIds) over every image of

- a layout folder (`<root>/images/<split>/<role>/*.jpg`, any split/role, see
  `layout.py`): label maps go to the mirrored
  `<root>/segmentations/<split>/<role>/<stem>.png` (or `<out>/<split>/<role>/`
  when an output folder is given), or
- any plain image folder (searched recursively): label maps go to
  `<out>/<relative folder>/<stem>.png`; `out` is required.

Each image is resized (whole image, bilinear) to the model's input size; the
label map is resized back to the image size with NEAREST and written as a
uint8 PNG (class ids) through `files.save_image` (temp file + rename), so an
interrupted run leaves no partial file and a rerun skips finished images.

Input/output handling follows the model's own tensor details: float, uint8 or
int8 input (pixels are mapped to the real range `(pixel - 128) / 128` and
quantised with the input tensor's scale/zero point; for the reference model
that is the raw uint8 pixel), and either an integer label map output
([1, H, W] or [1, H, W, 1]) or per-class scores [1, H, W, C] (argmax). Any
other output (e.g. an ImageNet classifier's [1, 1001]) is refused.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from structvpr_jax import files
from structvpr_jax.data import layout
from structvpr_jax.models import weights
from structvpr_jax.models.pretrained import dequantize

MODEL_NAME = weights.FILES["segmenter"].name
# <repo>/../shared/data/models (the project's shared read-only data).
DEFAULT_MODEL = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data", "models",
    MODEL_NAME))


def resolve_model(model: str) -> str:
  """segment.model: a .tflite path, or "auto" / "" = the pinned Cityscapes
  segmenter from `weights.find("segmenter")` (environment variable, cache,
  ../shared/data/models, or a checked download)."""
  if model and model.strip().lower() != "auto":
    return model
  path = weights.find("segmenter", download=True, progress=True)
  if path is None:
    raise ValueError("segment.model='auto': the Cityscapes segmenter "
                     f"({MODEL_NAME}) is not on this machine and could not be downloaded "
                     f"from {weights.base_url()}; set ${weights.FILES['segmenter'].env} or "
                     f"--config.segment.model=PATH, or run `python -m structvpr_jax.weights "
                     f"fetch` where the network is reachable")
  return path

# Pixel -> real input of the network: (pixel - INPUT_MEAN) / INPUT_STD, i.e.
# [-1, 1) as in the TF-slim / DeepLab MobileNet training. For the reference
# model (uint8 input, scale 1/128, zero point 128) the quantised value is the
# pixel itself.
INPUT_MEAN = 128.0
INPUT_STD = 128.0

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole",
                      "traffic light", "traffic sign", "vegetation", "terrain", "sky",
                      "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")
CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol",
                  "Fence", "Car", "Pedestrian", "Bicyclist")
CAMVID_IGNORE = 11  # "Unlabelled" (void) in the SegNet CamVid-11 annotations

# CamVid-11 class -> the Cityscapes trainIds that count as that class. The
# grouping follows how SegNet's CamVid-11 merges the 32 original CamVid
# classes (Brostow et al. 2009), matched to the Cityscapes definitions:
#   Sky        <- sky
#   Building   <- building, wall        (CamVid Building = Building, Wall,
#                                        Archway, Bridge, Tunnel)
#   Pole       <- pole                  (Column_Pole, TrafficCone)
#   Road       <- road                  (Road, lane markings, RoadShoulder)
#   Pavement   <- sidewalk              (Sidewalk, ParkingBlock)
#   Tree       <- vegetation, terrain   (Tree, VegetationMisc: grass, verges)
#   SignSymbol <- traffic light, traffic sign  (SignSymbol, Misc_Text,
#                                        TrafficLight)
#   Fence      <- fence
#   Car        <- car, truck, bus, train  (Car, SUVPickupTruck, Truck_Bus,
#                                        Train, OtherMoving)
#   Pedestrian <- person                (Pedestrian, Child, CartLuggagePram)
#   Bicyclist  <- rider, motorcycle, bicycle  (Bicyclist = rider + bicycle,
#                                        MotorcycleScooter)
# Every Cityscapes class maps to exactly one CamVid class; CamVid Unlabelled
# (11) pixels are ignored when scoring.
CAMVID_TO_CITYSCAPES = {
    0: (10,),
    1: (2, 3),
    2: (5,),
    3: (0,),
    4: (1,),
    5: (8, 9),
    6: (6, 7),
    7: (4,),
    8: (13, 14, 15, 16),
    9: (11,),
    10: (12, 17, 18),
}


def cityscapes_to_camvid_lut() -> np.ndarray:
  """uint8 [256] lookup: Cityscapes trainId -> CamVid-11 id (255 = unmapped)."""
  lut = np.full(256, 255, np.uint8)
  for camvid, ids in CAMVID_TO_CITYSCAPES.items():
    for cid in ids:
      if lut[cid] != 255:
        raise AssertionError(f"Cityscapes class {cid} mapped twice")
      lut[cid] = camvid
  return lut


def _interpreter(model_path: str, num_threads: int):
  try:  # imported here: the TFLite runtime is an optional extra ([segment])
    from ai_edge_litert.interpreter import Interpreter
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("segmentation needs ai-edge-litert: pip install ai-edge-litert "
                      "(or pip install -e .[segment])") from e
  interpreter = Interpreter(model_path=model_path, num_threads=num_threads)
  interpreter.allocate_tensors()
  return interpreter


def output_kind(details: dict, model_path: str) -> str:
  """'labels' (integer [1,H,W] / [1,H,W,1]) or 'scores' ([1,H,W,C], C > 1).

  Raises:
    ValueError (one line, naming the model file) for any other output.
  """
  shape = tuple(int(s) for s in details["shape"])
  dtype = np.dtype(details["dtype"])
  integer = np.issubdtype(dtype, np.integer)
  quantised = bool(details.get("quantization", (0.0, 0))[0])
  spatial = len(shape) >= 3 and shape[0] == 1 and shape[1] > 1 and shape[2] > 1
  if spatial and integer and not quantised and (len(shape) == 3 or
                                                (len(shape) == 4 and shape[3] == 1)):
    return "labels"
  if spatial and len(shape) == 4 and shape[3] > 1:
    return "scores"
  raise ValueError(
      f"{model_path}: not a segmentation model: output {details.get('name', '')!r} has "
      f"shape {list(shape)} dtype {dtype.name}; expected a label map [1,H,W] or "
      f"[1,H,W,1] of integer class ids, or per-class scores [1,H,W,C]")


def quantize_input(image: np.ndarray, details: dict) -> np.ndarray:
  """uint8 [H, W, 3] at the model size -> the input tensor [1, H, W, 3]."""
  dtype = np.dtype(details["dtype"])
  real = (image.astype(np.float32) - INPUT_MEAN) / INPUT_STD
  if np.issubdtype(dtype, np.floating):
    return real[None].astype(dtype)
  scale, zero = details["quantization"]
  if not scale:
    raise ValueError(f"integer input {details.get('name')!r} without quantisation scale")
  info = np.iinfo(dtype)
  q = np.round(real / scale + zero)
  return np.clip(q, info.min, info.max)[None].astype(dtype)


class Segmenter:
  """A TFLite segmentation model as `uint8 HxWx3 image -> uint8 HxW class ids`.

  Attributes:
    model_path: the .tflite file.
    input_size: (H, W) of the model input.
    kind: 'labels' (model outputs argmax ids) or 'scores' (we take the argmax).
    num_classes: C for a 'scores' model, else None.

  Raises (constructor): ValueError naming the model file when it is missing
  or its output is not a label map / per-class scores.
  """

  def __init__(self, model_path: str = DEFAULT_MODEL, num_threads: int = 2):
    if not os.path.isfile(model_path):
      raise ValueError(f"{model_path}: segmentation model file not found")
    self.model_path = model_path
    self._interp = _interpreter(model_path, num_threads)
    self._in = self._interp.get_input_details()[0]
    self._out = self._interp.get_output_details()[0]
    shape = tuple(int(s) for s in self._in["shape"])
    if len(shape) != 4 or shape[0] != 1 or shape[3] != 3:
      raise ValueError(f"{model_path}: input shape {list(shape)} is not [1,H,W,3]")
    self.input_size = shape[1:3]
    self.kind = output_kind(self._out, model_path)
    self.num_classes = int(self._out["shape"][3]) if self.kind == "scores" else None

  def raw(self, image: np.ndarray) -> np.ndarray:
    """Label map at the model's output resolution (int64 [h, w]) for one image
    already resized to `input_size`."""
    self._interp.set_tensor(self._in["index"], quantize_input(image, self._in))
    self._interp.invoke()
    out = self._interp.get_tensor(self._out["index"])[0]
    if self.kind == "labels":
      return out.reshape(out.shape[:2]).astype(np.int64)
    return np.argmax(dequantize(out, self._out), axis=-1)

  def prepare(self, image: np.ndarray) -> np.ndarray:
    """uint8 image (HxW, HxWx3 or HxWx4) -> uint8 [H_in, W_in, 3] (bilinear)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
      raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
      raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    image = image[..., :3]
    h, w = self.input_size
    if image.shape[:2] != (h, w):
      image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    return image

  def __call__(self, image: np.ndarray, prepared: Optional[np.ndarray] = None) -> np.ndarray:
    """uint8 HxWx3 -> uint8 HxW class ids at the image's own size (NEAREST)."""
    image = np.asarray(image)
    if prepared is None:
      prepared = self.prepare(image)
    labels = self.raw(prepared)
    if labels.min() < 0 or labels.max() > 255:
      raise ValueError(f"{self.model_path}: class ids outside 0..255")
    labels = labels.astype(np.uint8)
    h, w = image.shape[:2]
    if labels.shape != (h, w):
      labels = np.asarray(Image.fromarray(labels).resize((w, h), Image.NEAREST))
    return labels


def _is_layout(root: str) -> bool:
  return os.path.isdir(os.path.join(root, "images"))


def _walk_images(folder: str) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    out += [os.path.join(dirpath, n) for n in sorted(filenames)
            if n.lower().endswith(layout.IMAGE_EXTENSIONS) and not n.startswith(".")]
  return out


def plan(images_root: str, out_root: Optional[str] = None) -> list[tuple[str, str]]:
  """(image path, label-map path) for every image under `images_root`.

  A layout folder (has `images/`) mirrors into `<root>/segmentations` (or
  `out_root`); a plain folder mirrors into `out_root` (required).
  """
  if not os.path.isdir(images_root):
    raise ValueError(f"{images_root}: no such image folder")
  if _is_layout(images_root):
    src_root = os.path.join(images_root, "images")
    dst_root = out_root or os.path.join(images_root, "segmentations")
  else:
    if not out_root:
      raise ValueError(f"{images_root} is not a layout folder (no images/ inside): "
                       "give an output folder (segment.out)")
    src_root, dst_root = images_root, out_root
  pairs, seen = [], {}
  for path in _walk_images(src_root):
    rel = os.path.relpath(path, src_root)
    dst = os.path.join(dst_root, os.path.splitext(rel)[0] + ".png")
    if dst in seen:
      raise ValueError(f"{path} and {seen[dst]} would both write {dst}")
    seen[dst] = path
    pairs.append((path, dst))
  return pairs


def _load_rgb(path: str) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


class _Progress:
  """tqdm on a TTY, else one line every `every` seconds with images/s."""

  def __init__(self, total: int, enabled: bool, every: float = 30.0):
    self.total, self.done, self.every = total, 0, every
    self.start = self.last = time.time()
    self.enabled = enabled and total > 0
    self.bar = None
    if self.enabled and sys.stderr.isatty():
      self.bar = tqdm(total=total, unit="img", desc="segment", file=sys.stderr)

  def update(self):
    self.done += 1
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.update(1)
      return
    now = time.time()
    if now - self.last >= self.every or self.done == self.total:
      self.last = now
      rate = self.done / max(now - self.start, 1e-9)
      print(f"segment: {self.done}/{self.total} images, {rate:.2f} images/s",
            file=sys.stderr, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def segment_folder(model_path: str, images_root: str, out_root: Optional[str] = None,
                   num_threads: int = 2, progress: bool = True) -> dict:
  """Writes a label-map PNG for every image of a layout or plain folder.

  Args:
    model_path: TFLite segmentation model.
    images_root: layout root (with `images/`) or a plain image folder.
    out_root: output folder; default `<root>/segmentations` for a layout,
      required for a plain folder.
    num_threads: TFLite CPU threads.
    progress: tqdm on a TTY, else a line with images/s every 30 s.

  Returns:
    dict: `total` images found, `written`, `skipped` (PNG already there),
    `seconds`, `images_per_s` (written images per second of this run).

  Raises:
    ValueError: missing folder/model, no out_root for a plain folder, or a
      model whose output is not a label map (message names the model file).
  """
  segmenter = Segmenter(model_path, num_threads=num_threads)  # validates the model
  pairs = plan(images_root, out_root)
  todo = [(src, dst) for src, dst in pairs if not os.path.isfile(dst)]
  bar = _Progress(len(todo), progress)
  start = time.time()

  def load(src):
    image = _load_rgb(src)
    return image, segmenter.prepare(image)

  # Decode + resize the next image on a worker thread while TFLite runs.
  with ThreadPoolExecutor(max_workers=1) as pool:
    futures = [pool.submit(load, todo[0][0])] if todo else []
    for i, (src, dst) in enumerate(todo):
      if i + 1 < len(todo):
        futures.append(pool.submit(load, todo[i + 1][0]))
      image, prepared = futures[i].result()
      futures[i] = None
      files.save_image(dst, np.asarray(segmenter(image, prepared=prepared), np.uint8))
      bar.update()
  bar.close()
  seconds = time.time() - start
  return {"total": len(pairs), "written": len(todo), "skipped": len(pairs) - len(todo),
          "seconds": round(seconds, 3),
          "images_per_s": round(len(todo) / seconds, 3) if todo and seconds > 0 else 0.0}


def pixel_agreement(pred: np.ndarray, ref: np.ndarray, ignore: Optional[int] = None) -> float:
  """Fraction of pixels (not equal to `ignore` in ref) where pred == ref."""
  pred, ref = np.asarray(pred), np.asarray(ref)
  valid = np.ones(ref.shape, bool) if ignore is None else ref != ignore
  return float((pred[valid] == ref[valid]).mean())


def evaluate_camvid(model_path: str, image_paths: list, label_paths: list,
                    num_threads: int = 2) -> dict:
  """CamVid-11 pixel accuracy of the Cityscapes model via CAMVID_TO_CITYSCAPES.

  Returns:
    dict: `pixel_accuracy` (over labelled pixels), `per_class` {name: acc},
    `mean_class_accuracy`, `confusion` [11, 11] int64 (rows = ground truth),
    `num_images`.
  """
  segmenter = Segmenter(model_path, num_threads=num_threads)
  lut = cityscapes_to_camvid_lut()
  n = len(CAMVID_CLASSES)
  confusion = np.zeros((n, n), np.int64)
  unmapped = 0
  for image_path, label_path in zip(image_paths, label_paths):
    with Image.open(label_path) as im:
      gt = np.asarray(im)
    pred = lut[segmenter(_load_rgb(image_path))]
    if pred.shape != gt.shape:
      raise ValueError(f"{label_path}: label shape {gt.shape} != image {pred.shape}")
    valid = gt < n
    unmapped += int((pred[valid] == 255).sum())
    pred_v = np.where(pred[valid] == 255, 0, pred[valid])  # cannot happen: all mapped
    np.add.at(confusion, (gt[valid].astype(np.int64), pred_v.astype(np.int64)), 1)
  totals = confusion.sum(1)
  per_class = {name: (float(confusion[i, i] / totals[i]) if totals[i] else float("nan"))
               for i, name in enumerate(CAMVID_CLASSES)}
  return {"pixel_accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)),
          "per_class": per_class,
          "mean_class_accuracy": float(np.nanmean(list(per_class.values()))),
          "confusion": confusion, "num_images": len(image_paths), "unmapped": unmapped}


def run(config) -> dict:
  """`mode == "segment"`: segments `config.segment.images` (see module doc)."""
  cfg = config.segment
  images = cfg.get("images", "")
  if not images:
    raise ValueError("segment.images is required: a layout root or an image folder "
                     "(--config.segment.images=DIR)")
  model = resolve_model(cfg.get("model", "") or "auto")
  counts = segment_folder(model, images, out_root=cfg.get("out", "") or None,
                          num_threads=int(cfg.get("num_threads", 2)),
                          progress=bool(cfg.get("progress", True)))
  print(f"segment: {counts['written']} written, {counts['skipped']} skipped "
        f"(already there), {counts['total']} images in {images}; "
        f"{counts['images_per_s']:.2f} images/s")
  return counts

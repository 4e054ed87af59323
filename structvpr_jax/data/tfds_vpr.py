"""tensorflow-datasets builder for any layout folder, readable without TensorFlow.

`VprLayout` (dataset name ``vpr_layout``) turns a layout folder
(`structvpr_jax.data.layout`; docs/design.md, "Data layout") given as ``manual_dir``
into ArrayRecord files, one record per image, splits
``{train,val,test}_{database,queries}`` (only the splits present in the
folder). Records keep `layout.read_split`'s order (sorted by file name):
record i of ``train_database`` is ``read_split(root, "train").database_paths[i]``.

Fields:
  image             uint8 [H, W, 3], stored as the file's own encoded bytes
                    (JPEG or PNG, not re-encoded; non-RGB files are converted
                    to RGB and stored as PNG).
  segmentation      uint8 [H, W, 1] class ids, PNG; zeros when the image has
                    no label map.
  has_segmentation  bool: whether `segmentation` is a real label map.
  utm               float64 [2] (east, north) metres, from the file name.
  role              "database" / "queries".
  filename          the image's file name (datasets_vg name, no folder).

Usage::

    builder = tfds_vpr.build("data/gardens_point", "/tmp/tfds")   # writes once
    source = tfds_vpr.load_source("/tmp/tfds", "test_queries")     # random access
    rec = source[17]   # {'image': uint8 HxWx3, 'segmentation': uint8 HxW, ...}

How this avoids TensorFlow with tensorflow-datasets 4.9.10 (checked in its
source and by tests/test_tfds_vpr.py, which asserts ``'tensorflow' not in
sys.modules``):

* Writing: ``tfds.features.Image.encode_example`` only needs TensorFlow
  (``TFGraphRunner`` + ``tf.image.encode_*``) for *numpy arrays*; given
  ``bytes`` it passes them through. So `_generate_examples` yields encoded
  bytes (file contents, or PIL-encoded PNG for the zero label maps / non-RGB
  images), never arrays. `Tensor` and `Text` features serialise through
  tfds' own copy of the ``tf.train.Example`` protos
  (``tensorflow_datasets.proto.tf_example_pb2``), no TensorFlow.
  ``file_format='array_record'`` writes with the ``array_record`` package.
  ``disable_shuffling=True`` keeps records in key order (the shuffler sorts
  by the raw integer key instead of its hash), so indices match
  `layout.read_split`.
* Reading: ``builder.as_data_source`` (what ``tfds.data_source`` calls)
  parses records with ``ExampleParserNp`` (numpy, no TensorFlow). `Image`
  would decode with OpenCV when installed, else PIL; `load_source` instead
  passes ``tfds.decode.SkipDecoding()`` for both image fields and decodes the
  bytes with PIL itself, so decoding is always PIL and always RGB/uint8.
* Avoided: ``builder.as_dataset`` / ``tfds.load`` (tf.data), and handing
  numpy arrays to `Image` features.

``tfds.data_source("vpr_layout", data_dir=...)`` also works once this module
is imported (it registers the builder); `load_source` additionally accepts the
builder's own version folder and returns decoded, convenient records.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Union

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from structvpr_jax.data import layout

NAME = "vpr_layout"
SPLIT_NAMES = tuple(f"{s}_{r}" for s in layout.SPLITS for r in layout.ROLES)


def _image_bytes(path: str) -> tuple[bytes, tuple[int, int]]:
  """(encoded RGB image bytes, (H, W)); the file's own bytes when it is an
  RGB JPEG/PNG, else converted to RGB and encoded as PNG."""
  with Image.open(path) as img:
    size = (img.size[1], img.size[0])
    if img.mode == "RGB" and img.format in ("JPEG", "PNG"):
      with open(path, "rb") as fh:
        return fh.read(), size
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue(), size


def _png_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _label_bytes(path: str, size: tuple[int, int]) -> bytes:
  """PNG bytes of a uint8 label map; checks it is single-channel and HxW."""
  with Image.open(path) as img:
    if (img.size[1], img.size[0]) != tuple(size):
      raise ValueError(f"{path}: label map is {img.size[1]}x{img.size[0]} but its image is "
                       f"{size[0]}x{size[1]}")
    if img.mode == "L" and img.format == "PNG":
      with open(path, "rb") as fh:
        return fh.read()
    if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
      raise ValueError(f"{path}: label map must be single-channel class ids, got mode {img.mode}")
    arr = np.asarray(img)
  if arr.size and (arr.min() < 0 or arr.max() > 255):
    raise ValueError(f"{path}: label ids must be in 0..255")
  return _png_bytes(arr.astype(np.uint8))


class VprLayout(tfds.core.GeneratorBasedBuilder):
  """One record per image of a datasets_vg layout folder (``manual_dir``)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the layout folder (<root>/images/{train,val,test}/{database,queries}/"
      "@east@north@...@.jpg, optional <root>/segmentations/...) as "
      "tfds.download.DownloadConfig(manual_dir=<root>).")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Visual place recognition images in the datasets_vg layout "
                    "with UTM positions and optional label maps.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8,
                                         encoding_format="jpeg"),
            "segmentation": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8,
                                                encoding_format="png"),
            "has_segmentation": tfds.features.Tensor(shape=(), dtype=np.bool_),
            "utm": tfds.features.Tensor(shape=(2,), dtype=np.float64),
            "role": tfds.features.Text(),
            "filename": tfds.features.Text(),
        }),
        supervised_keys=None,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    gens = {}
    for split in layout.SPLITS:
      roles = {role: layout.list_role(root, split, role)[0] for role in layout.ROLES}
      if not any(roles.values()):
        continue
      for role, paths in roles.items():
        if not paths:
          raise ValueError(f"{os.path.join(root, 'images', split, role)}: no images, but the "
                           f"{split} split has {layout.ROLES[1 - layout.ROLES.index(role)]}")
        gens[f"{split}_{role}"] = self._generate_examples(root, split, role)
    if not gens:
      raise ValueError(f"{root}: no images/<split>/<role> folders with images "
                       f"(not a layout folder?)")
    return gens

  def _generate_examples(self, root: str, split: str, role: str):
    paths, utm = layout.list_role(root, split, role)
    for i, path in enumerate(paths):
      image, size = _image_bytes(path)
      seg_path = layout.seg_path_for(path)
      has_seg = os.path.isfile(seg_path)
      seg = _label_bytes(seg_path, size) if has_seg else _png_bytes(np.zeros(size, np.uint8))
      yield i, {
          "image": image,
          "segmentation": seg,
          "has_segmentation": has_seg,
          "utm": utm[i],
          "role": role,
          "filename": os.path.basename(path),
      }


def build(layout_root: str, data_dir: str, *, overwrite: bool = False) -> VprLayout:
  """Writes (once) the ArrayRecord dataset of `layout_root` under `data_dir`.

  The result lives in ``<data_dir>/vpr_layout/1.0.0``; a finished build there
  is reused (tfds' own check) unless `overwrite`. Note that tfds does not
  know which layout folder a finished build came from: use one `data_dir` per
  layout folder.
  """
  builder = VprLayout(data_dir=os.fspath(data_dir))
  mode = (tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS if not overwrite
          else tfds.download.GenerateMode.FORCE_REDOWNLOAD)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(
          manual_dir=os.fspath(os.path.abspath(layout_root)), download_mode=mode))
  return builder


def _builder_dir(root_or_builder_dir: str) -> str:
  """The ``.../vpr_layout/<version>`` folder under (or equal to) the argument."""
  path = os.fspath(root_or_builder_dir)
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  for base in (os.path.join(path, NAME), path):
    if os.path.isdir(base):
      versions = sorted((d for d in os.listdir(base)
                         if os.path.isfile(os.path.join(base, d, "dataset_info.json"))),
                        key=lambda v: tuple(int(x) if x.isdigit() else -1 for x in v.split(".")))
      if versions:
        return os.path.join(base, versions[-1])
  raise ValueError(f"{path}: no prepared {NAME} dataset (expected <data_dir>/{NAME}/<version>/"
                   f"dataset_info.json; run tfds_vpr.build first)")


def _decode_image(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img.convert("RGB"), np.uint8)


def _decode_label(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as img:
    arr = np.asarray(img)
  return arr.reshape(arr.shape[:2]).astype(np.uint8, copy=False)


def _as_str(value) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return _as_str(value.item())
  return str(value)


class VprSource(Sequence):
  """Random-access records of one split, images decoded with PIL.

  Each record: ``image`` uint8 [H, W, 3], ``segmentation`` uint8 [H, W],
  ``has_segmentation`` bool, ``utm`` float64 [2], ``role`` str,
  ``filename`` str. Supports ``len``, ``src[i]`` (negative i too),
  ``src[a:b]`` and ``src.__getitems__([i, j, ...])`` (one batched read).
  """

  def __init__(self, data_source, split: str):
    self._source = data_source
    self.split = split

  def __len__(self) -> int:
    return len(self._source)

  @staticmethod
  def _convert(rec) -> dict:
    return {
        "image": _decode_image(rec["image"]),
        "segmentation": _decode_label(rec["segmentation"]),
        "has_segmentation": bool(rec["has_segmentation"]),
        "utm": np.asarray(rec["utm"], np.float64),
        "role": _as_str(rec["role"]),
        "filename": _as_str(rec["filename"]),
    }

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.__getitems__(list(range(len(self)))[index])
    index = int(index)
    n = len(self)
    if index < 0:
      index += n
    if not 0 <= index < n:
      raise IndexError(f"{self.split}: index {index} out of range [0, {n})")
    return self._convert(self._source[index])

  def __getitems__(self, indices) -> list:
    n = len(self)
    idx = [int(i) + n if int(i) < 0 else int(i) for i in indices]
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
      raise IndexError(f"{self.split}: index {bad[0]} out of range [0, {n})")
    if not idx:
      return []
    return [self._convert(r) for r in self._source.__getitems__(idx)]

  def __repr__(self) -> str:
    return f"VprSource(split={self.split!r}, len={len(self)})"


def load_source(root_or_builder_dir: Union[str, os.PathLike, tfds.core.DatasetBuilder],
                split: str) -> VprSource:
  """Random access (ArrayRecord) to one split of a built dataset.

  Args:
    root_or_builder_dir: the `data_dir` given to `build`, the builder's
      version folder (``<data_dir>/vpr_layout/1.0.0``), or a builder.
    split: one of ``{train,val,test}_{database,queries}``.
  """
  if split not in SPLIT_NAMES:
    raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
  if isinstance(root_or_builder_dir, tfds.core.DatasetBuilder):
    builder = root_or_builder_dir
  else:
    builder = tfds.builder_from_directory(_builder_dir(root_or_builder_dir))
  if split not in builder.info.splits:
    raise ValueError(f"{builder.data_dir}: split {split!r} not built; "
                     f"have {sorted(builder.info.splits.keys())}")
  skip = tfds.decode.SkipDecoding()
  source = builder.as_data_source(split=split,
                                  decoders={"image": skip, "segmentation": skip})
  return VprSource(source, split)


__all__ = ["VprLayout", "VprSource", "build", "load_source", "NAME", "SPLIT_NAMES"]

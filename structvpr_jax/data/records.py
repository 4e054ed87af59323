"""Pre-resized images in ArrayRecord files: what `data.format="array_record"` reads.

A pod (or any run that reads the same images many times) should not decode
full-size JPEGs on every step. `export` decodes every image of a layout
folder once, at the training size, with the same functions the folder path
uses (`decode.read_rgb` bilinear, `read_labels` nearest, ids
checked), and writes one ArrayRecord file per split and role:

  <out>/manifest.json                 format, image size, per split/role counts
  <out>/<split>_<role>.array_record   record i = image i of
                                      `layout.read_split(root, split)` (sorted names)

A record is the raw bytes of uint8 [H, W, 3] RGB, followed by uint8 [H, W]
label ids when the split has label maps: fixed size, no decoding on read.
Reading is random access (`grain.sources.ArrayRecordDataSource`), so the
miner's random database candidates and the triplets cost one record each.

The default folder is ``<layout root>/records/<H>x<W>`` (`default_dir`).
`open_role` checks that the records match the layout's current file list
(count and a SHA-256 of the names, sizes and modification times of the
images and label maps) and stops naming both when they do not:
a records folder never silently serves another dataset's pixels.

Because the bytes are exactly what the folder path would decode, training on
records gives the same batches, bitwise, as training on the folder (test).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import sys
from typing import Optional, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from grain import sources as grain_sources
from tqdm import tqdm

from structvpr_jax import files
from structvpr_jax.data import decode, layout

FORMAT = "structvpr_jax-records"
VERSION = 2          # 2: files_sha256 (names, sizes, times) replaces names_sha256
MANIFEST = "manifest.json"
NUM_CLASSES = 19          # Cityscapes ids (slme.NUM_CITYSCAPES_CLASSES); 255 = ignore


def default_dir(layout_root: str, image_size) -> str:
  """``<layout root>/records/<H>x<W>``."""
  h, w = int(image_size[0]), int(image_size[1])
  return os.path.join(os.path.abspath(layout_root), "records", f"{h}x{w}")


def files_digest(paths: Sequence[str], seg_paths: Optional[Sequence[str]] = None) -> str:
  """SHA-256 of each image's (and label map's) name, size and modification
  time, in order: a records folder made from other files, or from files
  rewritten since under the same names (a re-conversion, new label maps), is
  told apart without reading any pixels."""
  h = hashlib.sha256()
  for group in (paths, seg_paths or ()):
    for p in group:
      st = os.stat(p)
      h.update(f"{os.path.basename(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(b"--\n")
  return h.hexdigest()


def read_manifest(records_dir: str) -> dict:
  path = os.path.join(records_dir, MANIFEST)
  if not os.path.isfile(path):
    raise ValueError(f"{records_dir}: no {MANIFEST} (not an exported records folder; run "
                     f"`python -m structvpr_jax.data.convert export-records --root <layout> "
                     f"--image-size H,W`)")
  manifest = files.read_json(path)
  if manifest.get("format") != FORMAT or int(manifest.get("version", -1)) != VERSION:
    raise ValueError(f"{path}: format {manifest.get('format')!r} version "
                     f"{manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}")
  return manifest


def export(layout_root: str, image_size, out: Optional[str] = None,
           splits: Sequence[str] = layout.SPLITS, num_threads: int = 4,
           progress: bool = True, verbose: bool = True) -> str:
  """Writes the records of `splits` (those present) of `layout_root`.

  Args:
    layout_root: layout folder.
    image_size: (H, W) of the records (the training `data.image_size`).
    out: records folder (default `default_dir`); must not exist, or hold a
      finished export of the same size and file lists (then it is reused).
    splits: which splits to export (those without images are skipped).
    num_threads: decoding threads (PIL releases the GIL).
    progress, verbose: a progress bar (on a terminal); a summary line.

  Returns:
    The records folder. Written under a temporary name and renamed when
    complete: an interrupted export leaves nothing half-written.
  """
  h, w = int(image_size[0]), int(image_size[1])
  out = os.path.abspath(out or default_dir(layout_root, (h, w)))
  todo = {}
  for split in splits:
    if not os.path.isdir(os.path.join(layout_root, "images", split)):
      continue
    vs = layout.read_split(layout_root, split)
    for role, paths, seg_paths in (("database", vs.database_paths, vs.database_seg_paths),
                                   ("queries", vs.query_paths, vs.query_seg_paths)):
      todo[f"{split}_{role}"] = (paths, seg_paths)
  if not todo:
    raise ValueError(f"{layout_root}: no split with images to export")
  if os.path.exists(out):
    if os.path.isfile(os.path.join(out, MANIFEST)):
      manifest = read_manifest(out)
      same = (list(manifest["image_size"]) == [h, w] and all(
          name in manifest["splits"] and manifest["splits"][name]["files_sha256"]
          == files_digest(paths, segs) for name, (paths, segs) in todo.items()))
      if same:
        if verbose:
          print(f"export-records: {out} already holds these images at {h}x{w}; reused")
        return out
    raise ValueError(f"{out}: exists and is not an export of {layout_root} at {h}x{w} "
                     "(remove it or choose another --out)")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  manifest = {"format": FORMAT, "version": VERSION, "image_size": [h, w],
              "layout_root": os.path.abspath(layout_root), "splits": {}}
  total = sum(len(p) for p, _ in todo.values())
  bar = tqdm(total=total, desc="export", unit="img", disable=not (progress and sys.stderr.isatty()))
  pool = concurrent.futures.ThreadPoolExecutor(max(1, int(num_threads)))

  def record(args) -> bytes:
    path, seg_path = args
    rgb = decode.read_rgb(path, (h, w))
    if seg_path is None:
      return rgb.tobytes()
    return rgb.tobytes() + decode.read_labels(seg_path, (h, w), NUM_CLASSES).tobytes()

  try:
    with files.atomic_dir(out) as tmp:
      for name, (paths, seg_paths) in todo.items():
        fname = f"{name}.array_record"
        writer = ArrayRecordWriter(os.path.join(tmp, fname), "group_size:1")
        try:
          items = zip(paths, seg_paths if seg_paths is not None else [None] * len(paths))
          for rec in pool.map(record, items):     # in order; decoded ahead on the pool
            writer.write(rec)
            bar.update(1)
        finally:
          writer.close()
        manifest["splits"][name] = {
            "file": fname, "count": len(paths), "seg": seg_paths is not None,
            "files_sha256": files_digest(paths, seg_paths),
            "record_bytes": h * w * (3 + (seg_paths is not None))}
      files.write_json(os.path.join(tmp, MANIFEST), manifest)
  finally:
    pool.shutdown()
    bar.close()
  size = sum(os.path.getsize(os.path.join(out, s["file"])) for s in manifest["splits"].values())
  if verbose:
    print(f"export-records: {total} images at {h}x{w} -> {out} ({size / 2 ** 30:.2f} GiB)")
  return out


class RoleRecords:
  """Random access to one split/role of a records folder.

  `read(i)` -> (rgb uint8 [H, W, 3], seg uint8 [H, W] or None). Thread-safe
  (ArrayRecord readers are).
  """

  def __init__(self, records_dir: str, split: str, role: str, paths: Sequence[str],
               image_size, seg_paths: Optional[Sequence[str]] = None):
    manifest = read_manifest(records_dir)
    h, w = int(image_size[0]), int(image_size[1])
    if list(manifest["image_size"]) != [h, w]:
      raise ValueError(f"{records_dir}: records are {manifest['image_size'][0]}x"
                       f"{manifest['image_size'][1]} but data.image_size is {h}x{w} (export "
                       f"them at this size, or set data.records_dir)")
    name = f"{split}_{role}"
    if name not in manifest["splits"]:
      raise ValueError(f"{records_dir}: no records of {split}/{role} (exported: "
                       f"{sorted(manifest['splits'])})")
    entry = manifest["splits"][name]
    if entry["count"] != len(paths) or entry["files_sha256"] != files_digest(
        paths, seg_paths if entry["seg"] else None):
      raise ValueError(f"{records_dir}: records of {split}/{role} hold {entry['count']} images "
                       f"but the layout folder now lists {len(paths)}, or its files changed "
                       f"(names, sizes or times) since the export: remove the folder and "
                       f"export them again")
    self.path = os.path.join(records_dir, entry["file"])
    self.image_size = (h, w)
    self.has_seg = bool(entry["seg"])
    self.count = int(entry["count"])
    self._source = grain_sources.ArrayRecordDataSource(self.path)
    if len(self._source) != self.count:
      raise ValueError(f"{self.path}: {len(self._source)} records, manifest says {self.count}")

  def __len__(self) -> int:
    return self.count

  def read(self, index: int):
    h, w = self.image_size
    data = self._source[int(index)]
    expected = h * w * (3 + self.has_seg)
    if len(data) != expected:
      raise ValueError(f"{self.path}: record {index} has {len(data)} bytes, expected "
                       f"{expected}")
    buf = np.frombuffer(data, np.uint8)
    rgb = buf[:h * w * 3].reshape(h, w, 3)
    seg = buf[h * w * 3:].reshape(h, w) if self.has_seg else None
    return rgb, seg


def open_split(vs: layout.VprSplit, records_dir: str, image_size) -> dict:
  """{"database": RoleRecords, "queries": RoleRecords} of a layout split."""
  return {"database": RoleRecords(records_dir, vs.split, "database", vs.database_paths,
                                  image_size, vs.database_seg_paths),
          "queries": RoleRecords(records_dir, vs.split, "queries", vs.query_paths,
                                 image_size, vs.query_seg_paths)}


__all__ = ["FORMAT", "VERSION", "default_dir", "files_digest", "read_manifest", "export",
           "RoleRecords", "open_split"]

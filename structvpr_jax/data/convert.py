"""Dataset converters: frame-aligned traverses -> the layout folder format.

Frame-aligned datasets without GPS (Gardens Point, Nordland) are converted to
the layout (`structvpr_jax.data.layout`; docs/design.md, "Data layout") with
synthetic UTM (north = 10 m * frame index, east = 0; the traverse name is kept
in the ``note`` field)::

    python -m structvpr_jax.data.convert convert-frames --preset gardens_point \
        --src ../shared/data/gardens_point --out DIR [--max-side 320]
    python -m structvpr_jax.data.convert convert-frames --preset nordland \
        --src ../shared/data/nordland_64x32 --out DIR
    python -m structvpr_jax.data.convert convert-frames --database A \
        --queries B [--queries C] [--seg-root S] --out DIR \
        --split-places train:0-59,val:60-69,test:70-99
    python -m structvpr_jax.data.convert convert-csv --csv images.csv --out DIR

See `convert_frames`, `convert_preset`, `PRESETS` and `convert_csv` (images
with WGS84 lat/lon -> UTM names, `structvpr_jax.data.geo`).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
from PIL import Image

from structvpr_jax import files
from structvpr_jax.data import geo, records
from structvpr_jax.data.layout import (
    IMAGE_EXTENSIONS, ROLES, SPLITS, TEST_POSITIVE_RADIUS, format_name, list_images,
    read_split, split_folders, write_patchnetvlad_gt)

FRAME_SPACING_M = 10.0   # synthetic UTM: north = 10 m * frame index, east = 0
CONVERT_MARKER = "convert.json"
CONVERT_VERSION = 1

# Presets: traverse folders relative to --src, the split of places (frame
# indices), and an optional label-map root holding <traverse name>/<stem>.png.
#   gardens_point: 200 places; 0-99 train of which the last 20 (80-99) are
#     val, 100-199 test; day_left database, day_right + night_right queries.
#   nordland: 3,576 places (every 10th frame of the 728 km ride); first 60%
#     train, next 10% val, last 30% test (contiguous stretches of track, so
#     no place is shared between splits); summer database, winter queries.
PRESETS = {
    "gardens_point": dict(
        database="images/day_left",
        queries=("images/day_right", "images/night_right"),
        seg_root="segmentations",
        split_places="train:0-79,val:80-99,test:100-199"),
    "nordland": dict(
        database="summer",
        queries=("winter",),
        seg_root=None,
        split_places="train:0%-60%,val:60%-70%,test:70%-100%"),
}
# Nordland under the two ground-truth conventions of the literature, applied
# to this copy's frames (every 10th frame of the ride) through the synthetic
# frame spacing; the test radius stays 25 m:
#   nordland_pm1   a query is right within +-1 frame (VPR-Bench / SALAD style):
#                  25 m per frame; training positives are the same frame only.
#   nordland_pm10  within +-10 frames (the VPR-datasets-downloader's 25 m):
#                  2.5 m per frame; training positives +-4 frames.
# ("nordland" itself: 10 m per frame, +-2 frames at test.)
PRESETS["nordland_pm1"] = dict(PRESETS["nordland"], frame_spacing=25.0)
PRESETS["nordland_pm10"] = dict(PRESETS["nordland"], frame_spacing=2.5)


def parse_split_places(spec: str, num_frames: int) -> dict:
  """Parses ``"train:0-79,val:80-99,test:100-199"`` into ``{split: (start, stop)}``.

  Each range is either ``a-b`` (frame indices, inclusive) or ``a%-b%``
  (half-open fraction of `num_frames`: ``[round(a/100*n), round(b/100*n))``).
  Splits must be distinct members of `SPLITS`, ranges non-empty, inside
  ``[0, num_frames)`` and non-overlapping. Frames outside every range are
  left out. Returns half-open (start, stop) ints.
  """
  out = {}
  for item in [x.strip() for x in str(spec).split(",") if x.strip()]:
    name, sep, rng = item.partition(":")
    name = name.strip()
    if not sep or name not in SPLITS:
      raise ValueError(f"split-places item {item!r}: expected <split>:<a>-<b> with split "
                       f"in {SPLITS} (spec {spec!r})")
    if name in out:
      raise ValueError(f"split-places: split {name!r} given twice (spec {spec!r})")
    lo, dash, hi = rng.strip().partition("-")
    lo, hi = lo.strip(), hi.strip()
    try:
      if lo.endswith("%") and hi.endswith("%"):
        start = int(round(float(lo[:-1]) / 100.0 * num_frames))
        stop = int(round(float(hi[:-1]) / 100.0 * num_frames))
      elif not lo.endswith("%") and not hi.endswith("%"):
        start, stop = int(lo), int(hi) + 1
      else:
        raise ValueError
      if not dash:
        raise ValueError
    except ValueError:
      raise ValueError(f"split-places item {item!r}: range must be '<a>-<b>' (inclusive "
                       f"frame indices) or '<a>%-<b>%' (spec {spec!r})") from None
    if not 0 <= start < stop <= num_frames:
      raise ValueError(f"split-places item {item!r}: frames [{start}, {stop}) empty or "
                       f"outside [0, {num_frames}) (spec {spec!r})")
    out[name] = (start, stop)
  if not out:
    raise ValueError(f"split-places: empty spec {spec!r}")
  spans = sorted((v, k) for k, v in out.items())
  for (a, ka), (b, kb) in zip(spans, spans[1:]):
    if b[0] < a[1]:
      raise ValueError(f"split-places: {ka} {list(a)} and {kb} {list(b)} overlap (spec {spec!r})")
  return {k: out[k] for k in SPLITS if k in out}


def _frame_number(name: str):
  digits = re.findall(r"\d+", os.path.splitext(name)[0])
  return int(digits[-1]) if digits else None


def list_frames(folder: str) -> list:
  """Image paths of one traverse, in frame order: by the last number in the
  name when every name has one (``Image2`` before ``Image10``), else by name."""
  if not os.path.isdir(folder):
    raise ValueError(f"{folder}: traverse folder does not exist")
  paths = list_images(folder)
  if not paths:
    raise ValueError(f"{folder}: no images ({'/'.join(IMAGE_EXTENSIONS)})")
  numbers = [_frame_number(os.path.basename(p)) for p in paths]
  if all(n is not None for n in numbers):
    if len(set(numbers)) != len(numbers):
      raise ValueError(f"{folder}: two images share a frame number")
    paths = [p for _, p in sorted(zip(numbers, paths))]
  return paths


def _check_aligned(folders: list, frames: list) -> None:
  counts = [len(f) for f in frames]
  if len(set(counts)) != 1:
    detail = ", ".join(f"{d} has {n}" for d, n in zip(folders, counts))
    raise ValueError(f"traverses are not frame-aligned: different frame counts ({detail})")
  numbers = [[_frame_number(os.path.basename(p)) for p in f] for f in frames]
  if all(None not in n for n in numbers):
    for d, n in zip(folders[1:], numbers[1:]):
      if n != numbers[0]:
        i = next(k for k in range(len(n)) if n[k] != numbers[0][k])
        raise ValueError(
            f"traverses are not frame-aligned: frame {i} is {os.path.basename(frames[0][i])} "
            f"in {folders[0]} but number {n[i]} in {d}")


def _traverse_name(folder: str) -> str:
  name = os.path.basename(os.path.normpath(folder))
  if not name or "@" in name:
    raise ValueError(f"{folder}: traverse folder name {name!r} cannot be a note field")
  return name


def _load_label(path: str):
  with Image.open(path) as img:
    if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
      raise ValueError(f"{path}: label map must be single-channel class ids, got mode {img.mode}")
    arr = np.asarray(img)
  if arr.ndim != 2 or (arr.size and (arr.min() < 0 or arr.max() > 255)):
    raise ValueError(f"{path}: label map must be 2-D class ids in 0..255")
  return arr.astype(np.uint8)


def _convert_one(job) -> None:
  """Writes one image (copy, or resize to max_side) and its label map."""
  src, dst, seg_src, seg_dst, max_side = job
  with Image.open(src) as img:
    size = img.size  # (W, H)
    if max_side and max(size) > max_side:
      scale = max_side / max(size)
      new = (max(1, int(round(size[0] * scale))), max(1, int(round(size[1] * scale))))
      img.draft("RGB", new)  # JPEG: decode at a reduced scale (>= new), much faster
      img = img.convert("RGB").resize(new, Image.BILINEAR)
      size = new
      files.save_image(dst, np.asarray(img))
    else:
      files.atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
  if seg_src is not None:
    label = _load_label(seg_src)
    if label.shape != (size[1], size[0]):
      label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    files.save_image(seg_dst, label)


def _frame_params(database, queries, split_places, seg_root, max_side, frame_spacing, preset):
  folders = [os.path.abspath(database)] + [os.path.abspath(q) for q in queries]
  return {"version": CONVERT_VERSION, "preset": preset, "database": folders[0],
          "queries": folders[1:], "seg_root": os.path.abspath(seg_root) if seg_root else None,
          "split_places": str(split_places), "max_side": int(max_side) if max_side else None,
          "frame_spacing_m": float(frame_spacing)}


def _check_existing_conversion(root: str, params: dict, say: str = "") -> Optional[dict]:
  """The marker of a matching conversion at `root` (announced as `say`: ...
  when set), None when root is free."""
  marker = os.path.join(root, CONVERT_MARKER)
  if os.path.isfile(marker):
    old = files.read_json(marker)
    diff = {k: (old.get("params", {}).get(k), v) for k, v in params.items()
            if old.get("params", {}).get(k) != v}
    if diff:
      detail = "; ".join(f"{k}: {a!r} != {b!r}" for k, (a, b) in diff.items())
      raise ValueError(f"{marker}: existing conversion was made with other parameters "
                       f"({detail}); use another --out or delete it")
    if say:
      print(f"{say}: {root} already converted with these parameters "
            f"({_format_counts(old['counts'])}); nothing to do")
    return old
  if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
    raise ValueError(f"{root}: exists, is not empty and has no {CONVERT_MARKER}; "
                     f"refusing to write a conversion there")
  return None


def convert_frames(out: str, database: str, queries, split_places: str, *,
                   seg_root: Optional[str] = None, max_side: Optional[int] = None,
                   frame_spacing: float = FRAME_SPACING_M, preset: Optional[str] = None,
                   workers: Optional[int] = None, verbose: bool = True) -> dict:
  """Converts frame-aligned traverses into the layout with synthetic UTM.

  Frame i (position in `list_frames` order) of every traverse is place i and
  gets UTM east 0, north ``frame_spacing * i`` (10 m: the 25 m test radius is
  +-2 frames, the 10 m training radius +-1 frame). Names are
  ``format_name(0, north, note=<traverse folder name>, pano_id=i)`` with the
  source extension; every query traverse goes into ``queries/``, told apart
  by the note. Place ranges come from `split_places` (`parse_split_places`).

  Args:
    out: layout folder to create.
    database: traverse folder of the database images.
    queries: one or more traverse folders for the queries.
    split_places: e.g. ``"train:0-79,val:80-99,test:100-199"``.
    seg_root: optional folder with ``<traverse name>/<image stem>.png`` label
      maps; each is resized to its (possibly resized) image with NEAREST and
      written as uint8 PNG into the mirrored ``segmentations/`` tree. Every
      frame of every traverse must have one.
    max_side: resize images so their longer side is at most this (bilinear);
      None keeps the original files byte for byte.
    frame_spacing: metres between consecutive frames.
    preset: recorded in the marker only.
    workers: threads for decoding/writing (default min(4, cpus)).
    verbose: print one summary line.

  Returns:
    the marker dict (``params``, ``counts`` {split: {role: n}}, ``seconds``).

  Raises:
    ValueError: traverses with different frame counts (naming the folders),
      bad split spec, a missing label map (naming it), or `out` existing
      with another conversion's parameters (naming ``convert.json``) or
      unrelated content.

  Writes into a temporary sibling folder renamed into place when complete;
  reruns with the same parameters return the existing marker without work.
  """
  start_time = time.time()
  if isinstance(queries, str):
    queries = [queries]
  queries = list(queries)
  if not queries:
    raise ValueError("convert_frames: at least one query traverse is needed")
  root = os.path.abspath(out)
  params = _frame_params(database, queries, split_places, seg_root, max_side, frame_spacing, preset)
  existing = _check_existing_conversion(root, params, "convert-frames" if verbose else "")
  if existing is not None:
    return existing

  folders = [params["database"]] + params["queries"]
  names = [_traverse_name(f) for f in folders]
  if len(set(names)) != len(names):
    raise ValueError(f"traverse folder names must differ (they become the note field): {folders}")
  frames = [list_frames(f) for f in folders]
  _check_aligned(folders, frames)
  num_frames = len(frames[0])
  ranges = parse_split_places(split_places, num_frames)

  seg_dirs = [None] * len(folders)
  if seg_root:
    seg_dirs = [os.path.join(params["seg_root"], n) for n in names]
  # Every job is planned (and every label map checked) before anything is
  # written; destinations are relative to the output folder.
  jobs, counts = [], {}
  for split, (lo, hi) in ranges.items():
    counts[split] = {"database": 0, "queries": 0}
    for t, (name, traverse) in enumerate(zip(names, frames)):
      role = "database" if t == 0 else "queries"
      img_dir, seg_dir = split_folders("", split, role)
      for i in range(lo, hi):
        src = traverse[i]
        ext = os.path.splitext(src)[1].lower()
        if max_side and ext not in (".jpg", ".jpeg", ".png"):
          ext = ".png"
        fname = format_name(0.0, frame_spacing * i, ext=ext, pano_id=i, note=name)
        seg_src = seg_dst = None
        if seg_dirs[t] is not None:
          seg_src = os.path.join(seg_dirs[t], os.path.splitext(os.path.basename(src))[0] + ".png")
          if not os.path.isfile(seg_src):
            raise ValueError(f"{seg_src}: missing label map for {src} "
                             f"(every frame needs one when a segmentation root is given)")
          seg_dst = os.path.join(seg_dir, os.path.splitext(fname)[0] + ".png")
        jobs.append((src, os.path.join(img_dir, fname), seg_src, seg_dst, max_side))
        counts[split][role] += 1
  marker = _write_conversion(root, jobs, workers, start_time, {
      "params": params, "counts": counts, "num_frames": num_frames,
      "split_frames": {k: [lo, hi - 1] for k, (lo, hi) in ranges.items()},
      "traverses": {"database": names[0], "queries": names[1:]}})
  if verbose:
    print(f"convert-frames: {root}: {_format_counts(counts)}; "
          f"{'with' if seg_root else 'no'} segmentations; {marker['seconds']:.1f} s")
  return marker


CSV_COLUMNS = ("path", "lat", "lon", "split", "role")


def convert_csv(csv_path: str, out: str, *, max_side: Optional[int] = None,
                workers: Optional[int] = None, verbose: bool = True) -> dict:
  """Converts images listed with GPS in a CSV file into the layout.

  Columns: ``path`` (relative to the CSV's folder, or absolute), ``lat``,
  ``lon`` (WGS84 degrees), ``split`` (train / val / test), ``role``
  (database / queries); optional ``note`` (e.g. the condition) and
  ``segmentation`` (a label map for the image). UTM comes from
  `geo.latlon_to_utm`; when the rows span several UTM zones, all are
  projected into the most common one (distances stay consistent; recorded
  in the marker as ``utm_zone``). Names: ``format_name(east, north,
  utm_zone_number, utm_zone_letter, lat, lon, pano_id=<row>, note)``.

  Returns the marker (``params``, ``counts``, ``utm_zone``, ``seconds``).
  Raises ValueError naming the CSV line for a missing column or file, a bad
  number, split or role; `out` is written atomically like `convert_frames`.
  """
  start_time = time.time()
  csv_path = os.path.abspath(csv_path)
  root = os.path.abspath(out)
  params = {"version": CONVERT_VERSION, "csv": csv_path,
            "max_side": int(max_side) if max_side else None}
  existing = _check_existing_conversion(root, params, "convert-csv" if verbose else "")
  if existing is not None:
    return existing
  base = os.path.dirname(csv_path)
  with open(csv_path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise ValueError(f"{csv_path}: missing column(s) {missing}; expected {list(CSV_COLUMNS)} "
                       f"(+ optional note, segmentation)")
    rows = list(reader)
  if not rows:
    raise ValueError(f"{csv_path}: no rows")
  parsed = []
  for line, row in enumerate(rows, start=2):
    where = f"{csv_path}:{line}"
    try:
      lat, lon = float(row["lat"]), float(row["lon"])
    except ValueError:
      raise ValueError(f"{where}: lat/lon {row['lat']!r}, {row['lon']!r} are not numbers") from None
    if row["split"] not in SPLITS or row["role"] not in ROLES:
      raise ValueError(f"{where}: split {row['split']!r} / role {row['role']!r}; expected "
                       f"{SPLITS} / {ROLES}")
    src = row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"])
    if not os.path.isfile(src):
      raise ValueError(f"{where}: no such image {src}")
    seg = (row.get("segmentation") or "").strip()
    seg = None if not seg else (seg if os.path.isabs(seg) else os.path.join(base, seg))
    if seg is not None and not os.path.isfile(seg):
      raise ValueError(f"{where}: no such label map {seg}")
    if "@" in (row.get("note") or ""):
      raise ValueError(f"{where}: note must not contain '@'")
    parsed.append((src, seg, lat, lon, row))
  try:
    zones = [geo.zone_number(lat, lon) for _, _, lat, lon, _ in parsed]
    letters = [geo.zone_letter(lat) for _, _, lat, _, _ in parsed]
  except ValueError as e:
    raise ValueError(f"{csv_path}: {e}") from None
  zone = max(set(zones), key=zones.count)
  if len(set(zones)) > 1 and verbose:
    print(f"convert-csv: rows span UTM zones {sorted(set(zones))}; all projected into zone "
          f"{zone} so distances stay consistent")
  jobs, counts = [], {}
  for i, ((src, seg, lat, lon, row), letter) in enumerate(zip(parsed, letters)):
    east, north, _, _ = geo.latlon_to_utm(lat, lon, force_zone=zone)
    ext = os.path.splitext(src)[1].lower()
    if max_side and ext not in (".jpg", ".jpeg", ".png"):
      ext = ".png"
    fname = format_name(east, north, ext=ext, utm_zone_number=zone, utm_zone_letter=letter,
                        lat=row["lat"].strip(), lon=row["lon"].strip(), pano_id=i,
                        note=(row.get("note") or "").strip() or None)
    img_dir, seg_dir = split_folders("", row["split"], row["role"])
    seg_dst = None if seg is None else os.path.join(seg_dir, os.path.splitext(fname)[0] + ".png")
    jobs.append((src, os.path.join(img_dir, fname), seg, seg_dst, max_side))
    counts.setdefault(row["split"], {"database": 0, "queries": 0})[row["role"]] += 1
  marker = _write_conversion(root, jobs, workers, start_time,
                             {"params": params, "counts": counts, "utm_zone": zone})
  if verbose:
    print(f"convert-csv: {root}: {_format_counts(counts)}; UTM zone {zone}; "
          f"{marker['seconds']:.1f} s")
  return marker


def _write_conversion(root: str, jobs: list, workers: Optional[int], start_time: float,
                      marker: dict) -> dict:
  """Runs the `_convert_one` jobs (destinations relative to `root`) into a
  temporary folder renamed to `root` when complete, with `marker` (+ its
  "seconds") written as convert.json. Returns the marker."""
  with files.atomic_dir(root) as tmp:
    in_tmp = [(src, os.path.join(tmp, dst), seg_src,
               None if seg_dst is None else os.path.join(tmp, seg_dst), side)
              for src, dst, seg_src, seg_dst, side in jobs]
    for _, dst, _, seg_dst, _ in in_tmp:
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      if seg_dst is not None:
        os.makedirs(os.path.dirname(seg_dst), exist_ok=True)
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
      for _ in pool.map(_convert_one, in_tmp):
        pass
    marker = dict(marker, seconds=round(time.time() - start_time, 3))
    files.write_json(os.path.join(tmp, CONVERT_MARKER), marker, indent=1, sort_keys=False)
  return marker


def _format_counts(counts: dict) -> str:
  return ", ".join(f"{s} {c['database']} db/{c['queries']} q" for s, c in counts.items())


def convert_preset(preset: str, src: str, out: str, max_side: Optional[int] = None,
                   **kwargs) -> dict:
  """`convert_frames` with a named preset (`PRESETS`) whose folders are
  relative to `src`; e.g. ``convert_preset("gardens_point",
  "../shared/data/gardens_point", "data/gp", max_side=320)``."""
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
  p = PRESETS[preset]
  seg_root = os.path.join(src, p["seg_root"]) if p["seg_root"] else None
  if seg_root and not os.path.isdir(seg_root):
    seg_root = None  # label maps are optional
  if "frame_spacing" in p:
    kwargs["frame_spacing"] = p["frame_spacing"]    # the preset's convention wins
  return convert_frames(out, os.path.join(src, p["database"]),
                        [os.path.join(src, q) for q in p["queries"]],
                        kwargs.pop("split_places", p["split_places"]),
                        seg_root=kwargs.pop("seg_root", seg_root), max_side=max_side,
                        preset=preset, **kwargs)


def main(argv=None) -> int:
  """CLI. Examples::

    python -m structvpr_jax.data.convert convert-frames --preset gardens_point \\
        --src ../shared/data/gardens_point --out data/gardens_point_320 --max-side 320
    python -m structvpr_jax.data.convert convert-frames --preset nordland \\
        --src ../shared/data/nordland_64x32 --out data/nordland
    python -m structvpr_jax.data.convert export-records --root data/gp --image-size 480,640
    python -m structvpr_jax.data.convert convert-frames --database A --queries B \\
        [--queries C ...] [--seg-root S] --out DIR \\
        --split-places train:0-59,val:60-69,test:70-99
  """
  parser = argparse.ArgumentParser(prog="python -m structvpr_jax.data.convert")
  sub = parser.add_subparsers(dest="command", required=True)
  conv = sub.add_parser("convert-frames", help="frame-aligned traverses -> layout folder")
  conv.add_argument("--preset", choices=sorted(PRESETS))
  conv.add_argument("--src", help="dataset folder the preset's paths are relative to")
  conv.add_argument("--database", help="database traverse folder (general form)")
  conv.add_argument("--queries", action="append", help="query traverse folder (repeatable)")
  conv.add_argument("--seg-root", help="folder with <traverse name>/<stem>.png label maps")
  conv.add_argument("--split-places", help="e.g. train:0-79,val:80-99,test:100-199 "
                    "(inclusive frame indices) or train:0%%-60%%,...")
  conv.add_argument("--out", required=True)
  conv.add_argument("--max-side", type=int, default=None,
                    help="resize so the longer side is at most N pixels (default: keep)")
  conv.add_argument("--frame-spacing", type=float, default=FRAME_SPACING_M)
  conv.add_argument("--workers", type=int, default=None)
  conv_csv = sub.add_parser("convert-csv", help="images with lat/lon in a CSV -> layout folder")
  conv_csv.add_argument("--csv", required=True,
                        help="columns path, lat, lon, split, role (+ note, segmentation)")
  conv_csv.add_argument("--out", required=True)
  conv_csv.add_argument("--max-side", type=int, default=None)
  conv_csv.add_argument("--workers", type=int, default=None)
  export = sub.add_parser("export-gt", help="a split's ground truth as a Patch-NetVLAD .npz")
  export.add_argument("--root", required=True, help="layout folder")
  export.add_argument("--split", default="test", choices=SPLITS)
  export.add_argument("--out", required=True, help="the .npz to write")
  export.add_argument("--radius", type=float, default=TEST_POSITIVE_RADIUS)
  rec = sub.add_parser("export-records", help="pre-resized uint8 ArrayRecord files of a layout "
                       "(data.format=array_record)")
  rec.add_argument("--root", required=True, help="layout folder")
  rec.add_argument("--image-size", required=True, help="H,W of the records (data.image_size)")
  rec.add_argument("--out", default=None,
                   help="records folder (default <root>/records/<H>x<W>, where runs look)")
  rec.add_argument("--splits", default=",".join(SPLITS), help="comma-separated")
  rec.add_argument("--workers", type=int, default=4)
  args = parser.parse_args(argv)
  try:
    if args.command == "export-records":
      try:
        size = tuple(int(v) for v in args.image_size.split(","))
      except ValueError:
        size = ()
      if len(size) != 2 or min(size) < 1:
        parser.error(f"--image-size must be H,W (positive integers), got {args.image_size!r}")
      records.export(args.root, size, args.out, splits=args.splits.split(","),
                     num_threads=args.workers)
      return 0
    if args.command == "export-gt":
      split = read_split(args.root, args.split)
      write_patchnetvlad_gt(split, args.out, args.radius)
      print(f"export-gt: {args.out}: utmQ {split.query_utm.shape}, utmDb "
            f"{split.database_utm.shape}, posDistThr {args.radius:g} (sorted-name order)")
      return 0
    if args.command == "convert-csv":
      convert_csv(args.csv, args.out, max_side=args.max_side, workers=args.workers)
      return 0
    if args.preset:
      if not args.src or args.database or args.queries:
        parser.error("--preset takes --src (and not --database/--queries)")
      extra = {}
      if args.split_places:
        extra["split_places"] = args.split_places
      if args.seg_root:
        extra["seg_root"] = args.seg_root
      convert_preset(args.preset, args.src, args.out, max_side=args.max_side,
                     frame_spacing=args.frame_spacing, workers=args.workers, **extra)
    else:
      if not (args.database and args.queries and args.split_places):
        parser.error("without --preset, --database, --queries and --split-places are required")
      convert_frames(args.out, args.database, args.queries, args.split_places,
                     seg_root=args.seg_root, max_side=args.max_side,
                     frame_spacing=args.frame_spacing, workers=args.workers)
  except ValueError as err:
    print(f"{args.command}: error: {err}", file=sys.stderr)
    return 2
  return 0


__all__ = ["FRAME_SPACING_M", "CONVERT_MARKER", "CONVERT_VERSION", "PRESETS",
           "parse_split_places", "list_frames", "convert_frames", "convert_preset", "convert_csv",
           "CSV_COLUMNS", "main"]


if __name__ == "__main__":
  sys.exit(main())

"""The datasets_vg folder layout, UTM file names, and training ground truth.

Layout (docs/design.md, "Data layout")::

    <root>/images/{train,val,test}/{database,queries}/@<east>@<north>@...@.jpg
    <root>/segmentations/{train,val,test}/{database,queries}/<same stem>.png

File names follow the datasets_vg convention: ``@``-separated fields
``@UTM_east@UTM_north@UTM_zone_number@UTM_zone_letter@lat@lon@pano_id@
tile_num@heading@pitch@roll@height@timestamp@note@.jpg``. Only the first two
(UTM east/north, metres) are required; the others may be empty.

Frame-aligned datasets without GPS (Gardens Point, Nordland) are converted to
this layout with synthetic UTM by `structvpr_jax.data.convert`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Optional

import numpy as np

from structvpr_jax import files, retrieval

SPLITS = ("train", "val", "test")
ROLES = ("database", "queries")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

# Field positions in a datasets_vg name (0-based, after the leading '@').
FIELDS = ("utm_east", "utm_north", "utm_zone_number", "utm_zone_letter", "lat",
          "lon", "pano_id", "tile_num", "heading", "pitch", "roll", "height",
          "timestamp", "note")

# Training ground truth radii (metres), NetVLAD / MSLS convention.
TRAIN_POSITIVE_RADIUS = 10.0
NEGATIVE_RADIUS = 25.0
TEST_POSITIVE_RADIUS = 25.0


def format_name(east: float, north: float, ext: str = ".jpg", **fields) -> str:
  """Builds a datasets_vg file name, e.g. ``@12.00@340.00@@@@@@@@@@@@night@.jpg``.

  Args:
    east, north: UTM coordinates in metres, written with 2 decimals.
    ext: file extension including the dot.
    **fields: any other field of `FIELDS` by name (str or number); '@' is not
      allowed inside a field.
  """
  unknown = set(fields) - set(FIELDS[2:])
  if unknown:
    raise ValueError(f"unknown datasets_vg field(s) {sorted(unknown)}; "
                     f"known: {FIELDS[2:]}")
  values = [f"{float(east):.2f}", f"{float(north):.2f}"]
  for name in FIELDS[2:]:
    value = "" if fields.get(name) is None else str(fields[name])
    if "@" in value:
      raise ValueError(f"field {name}={value!r} must not contain '@'")
    values.append(value)
  return "@" + "@".join(values) + "@" + ext


def parse_name(path: str) -> dict[str, str]:
  """Returns the named fields of a datasets_vg file name (missing -> '').

  Raises:
    ValueError naming the file when the name is not ``@east@north@...``.
  """
  stem = os.path.splitext(os.path.basename(path))[0]
  parts = stem.split("@")
  if len(parts) < 4 or parts[0] != "":
    raise ValueError(f"{path}: not a datasets_vg name '@<utm_east>@<utm_north>@...@'")
  values = parts[1:-1] if parts[-1] == "" else parts[1:]
  out = {name: (values[i] if i < len(values) else "") for i, name in enumerate(FIELDS)}
  return out


def parse_utm(path: str) -> tuple[float, float]:
  """UTM (east, north) in metres from a datasets_vg name; ValueError names the file."""
  fields = parse_name(path)
  try:
    east, north = float(fields["utm_east"]), float(fields["utm_north"])
  except ValueError:
    raise ValueError(
        f"{path}: cannot parse UTM east/north from fields "
        f"{fields['utm_east']!r}, {fields['utm_north']!r}") from None
  if not (np.isfinite(east) and np.isfinite(north)):
    raise ValueError(f"{path}: UTM east/north must be finite numbers")
  return east, north


@dataclasses.dataclass(frozen=True)
class VprSplit:
  """One split of a layout folder. Paths are sorted by file name.

  Attributes:
    database_paths, query_paths: image paths, list of str.
    database_utm: [N, 2] float64 (east, north) metres.
    query_utm: [Q, 2] float64.
    database_seg_paths, query_seg_paths: label-map paths (same order), or None
      when the `segmentations/` tree is absent for this split.
    records: a records folder (`data.records`) holding these images pre-resized
      (`data.format="array_record"`), or None to decode the files.
  """
  root: str
  split: str
  database_paths: list
  query_paths: list
  database_utm: np.ndarray
  query_utm: np.ndarray
  database_seg_paths: Optional[list]
  query_seg_paths: Optional[list]
  records: Optional[str] = None

  @property
  def num_database(self) -> int:
    return len(self.database_paths)

  @property
  def num_queries(self) -> int:
    return len(self.query_paths)

  def query_notes(self) -> list:
    """The `note` field of every query name (the synthetic world stores the
    query condition there; empty string when absent)."""
    return [parse_name(p)["note"] for p in self.query_paths]


def is_image_name(name: str) -> bool:
  """A visible file with one of `IMAGE_EXTENSIONS`."""
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(folder: str) -> list:
  """Sorted image paths directly in `folder` ([] when it does not exist)."""
  if not os.path.isdir(folder):
    return []
  names = [n for n in os.listdir(folder) if is_image_name(n)]
  return [os.path.join(folder, n) for n in sorted(names)]


def seg_path_for(image_path: str) -> str:
  """The label-map path mirroring `image_path` (images/ -> segmentations/, .png)."""
  head, tail = image_path, []
  while True:
    head, part = os.path.split(head)
    if part == "images":
      break
    if not part:
      raise ValueError(f"{image_path}: no 'images' folder in the path")
    tail.append(part)
  stem = os.path.splitext(tail[0])[0] + ".png"
  return os.path.join(head, "segmentations", *reversed(tail[1:]), stem)


def read_split(root: str, split: str, require_segmentations: bool = False) -> VprSplit:
  """Reads `<root>/images/<split>/{database,queries}` and the mirrored labels.

  Args:
    root: layout folder.
    split: one of "train", "val", "test".
    require_segmentations: raise when any label map is missing (the seg branch
      needs them); otherwise the seg path lists are None when the split has no
      `segmentations/` folder at all.

  Raises:
    ValueError: unknown split, missing/empty database or queries folder, a
      malformed name (naming the file), or a missing label map when required or
      when the segmentations tree exists but is incomplete.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  paths = {}
  for role in ROLES:
    folder = os.path.join(root, "images", split, role)
    paths[role] = list_images(folder)
    if not paths[role]:
      raise ValueError(f"{folder}: no images (expected @east@north@...@.jpg files)")
  utm = {role: np.array([parse_utm(p) for p in paths[role]], np.float64).reshape(-1, 2)
         for role in ROLES}

  seg_root = os.path.join(root, "segmentations", split)
  seg = {role: None for role in ROLES}
  if os.path.isdir(seg_root) or require_segmentations:
    for role in ROLES:
      seg[role] = [seg_path_for(p) for p in paths[role]]
      missing = [p for p in seg[role] if not os.path.isfile(p)]
      if missing:
        raise ValueError(
            f"{missing[0]}: missing label map for {len(missing)} of "
            f"{len(seg[role])} {split}/{role} images (run the segment config)")
  return VprSplit(root=root, split=split,
                  database_paths=paths["database"], query_paths=paths["queries"],
                  database_utm=utm["database"], query_utm=utm["queries"],
                  database_seg_paths=seg["database"], query_seg_paths=seg["queries"])


def training_ground_truth(split: VprSplit,
                          positive_radius: float = TRAIN_POSITIVE_RADIUS,
                          negative_radius: float = NEGATIVE_RADIUS):
  """Positives (<= positive_radius) and soft positives (<= negative_radius).

  Returns:
    (positives, soft_positives): lists (one per query) of sorted int64 database
    indices. Negatives are every database index not in soft_positives.
  """
  positives = retrieval.positives_within(split.query_utm, split.database_utm, positive_radius)
  soft = retrieval.positives_within(split.query_utm, split.database_utm, negative_radius)
  return positives, soft


def split_folders(root: str, split: str, role: str) -> tuple[str, str]:
  """(images folder, segmentations folder) for one split/role."""
  return (os.path.join(root, "images", split, role),
          os.path.join(root, "segmentations", split, role))


def list_role(root: str, split: str, role: str) -> tuple[list, np.ndarray]:
  """(image paths sorted by name, [n, 2] float64 UTM) of one split/role folder.

  Same order as `read_split`; an absent or empty folder gives ([], [0, 2]).
  A malformed name raises ValueError naming the file.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if role not in ROLES:
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")
  paths = list_images(os.path.join(root, "images", split, role))
  utm = np.array([parse_utm(p) for p in paths], np.float64).reshape(-1, 2)
  return paths, utm


def queries_without_positives(split: VprSplit,
                              radius: float = TRAIN_POSITIVE_RADIUS) -> np.ndarray:
  """Indices (sorted int64) of the queries with no database image within
  `radius` metres; training cannot use them (no positive), evaluation counts
  them as misses."""
  positives = retrieval.positives_within(split.query_utm, split.database_utm, radius)
  return np.asarray([i for i, p in enumerate(positives) if len(p) == 0], np.int64)


def folder_split(database_folder: str, queries_folder: str, labelled: bool = True,
                 ground_truth: str = "") -> VprSplit:
  """A split from two plain image folders (what VPR-methods-evaluation users
  pass): database and queries named with UTM (`@east@north@...`).

  Args:
    database_folder, queries_folder: folders of images (not recursive).
    labelled: False for queries without UTM in their names (no recalls then:
      their UTM is NaN).
    ground_truth: optional Patch-NetVLAD `.npz` (`read_patchnetvlad_gt`)
      giving the UTM of the database and queries in sorted-name order,
      instead of the names.

  Raises:
    ValueError naming the folder when it holds no images, or the file whose
    name has no UTM.
  """
  paths = {}
  for role, folder in (("database", database_folder), ("queries", queries_folder)):
    if not os.path.isdir(folder):
      raise ValueError(f"eval.{role}_folder={folder!r}: not a folder")
    paths[role] = list_images(folder)
    if not paths[role]:
      raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
  if ground_truth:
    q_utm, db_utm, _ = read_patchnetvlad_gt(ground_truth)
    for role, utm in (("queries", q_utm), ("database", db_utm)):
      if len(utm) != len(paths[role]):
        raise ValueError(f"{ground_truth}: {len(utm)} {role} positions for "
                         f"{len(paths[role])} images in the {role} folder")
    return VprSplit(root=os.path.abspath(queries_folder), split="folders",
                    database_paths=paths["database"], query_paths=paths["queries"],
                    database_utm=db_utm, query_utm=q_utm, database_seg_paths=None,
                    query_seg_paths=None)
  db_utm = np.array([parse_utm(p) for p in paths["database"]], np.float64).reshape(-1, 2)
  if labelled:
    q_utm = np.array([parse_utm(p) for p in paths["queries"]], np.float64).reshape(-1, 2)
  else:
    q_utm = np.full((len(paths["queries"]), 2), np.nan)
  return VprSplit(root=os.path.abspath(queries_folder), split="folders",
                  database_paths=paths["database"], query_paths=paths["queries"],
                  database_utm=db_utm, query_utm=q_utm, database_seg_paths=None,
                  query_seg_paths=None)


def write_patchnetvlad_gt(split: VprSplit, path: str,
                          radius: float = TEST_POSITIVE_RADIUS) -> str:
  """The split's ground truth as a Patch-NetVLAD `.npz`: ``utmQ`` [Q, 2],
  ``utmDb`` [N, 2] (float64, in this split's order: sorted file names) and
  ``posDistThr`` (the positive radius, metres). Written atomically."""
  return files.save_npz(path, utmQ=np.asarray(split.query_utm, np.float64),
                        utmDb=np.asarray(split.database_utm, np.float64),
                        posDistThr=np.float64(radius))


def read_patchnetvlad_gt(path: str) -> tuple[np.ndarray, np.ndarray, float]:
  """(utmQ [Q, 2], utmDb [N, 2], posDistThr) from a Patch-NetVLAD ground-truth
  `.npz`; ValueError naming the file when a key is missing or malformed."""
  try:
    with np.load(path) as gt:
      missing = [k for k in ("utmQ", "utmDb", "posDistThr") if k not in gt.files]
      if missing:
        raise ValueError(f"{path}: missing {missing} (a Patch-NetVLAD ground-truth .npz has "
                         f"utmQ, utmDb, posDistThr)")
      utm_q = np.asarray(gt["utmQ"], np.float64).reshape(-1, 2)
      utm_db = np.asarray(gt["utmDb"], np.float64).reshape(-1, 2)
      radius = float(gt["posDistThr"])
  except (OSError, EOFError) as e:
    raise ValueError(f"{path}: cannot read the ground-truth .npz ({e})") from None
  return utm_q, utm_db, radius


def files_sha256(split: VprSplit) -> str:
  """SHA-256 of the split's database and query file names (in order): two
  results on "the same" dataset can be told apart by it."""
  h = hashlib.sha256()
  for role, names in (("database", split.database_paths), ("queries", split.query_paths)):
    h.update(role.encode())
    for p in names:
      h.update(b"\0" + os.path.basename(p).encode())
  return h.hexdigest()


def write_subset(split: VprSplit, dest: str, query_keep, database_keep) -> str:
  """A layout at `dest` whose `split.split` holds only the kept images.

  Images and label maps are symbolic links to the originals (nothing is
  copied); the other splits link the original split folders. Built in a
  temporary folder and renamed (files.atomic_dir). An existing `dest` built
  from the same selection is kept; one built from another selection is an
  error naming it.

  Args:
    split: the split to subset (its root is the source layout).
    dest: the new layout root.
    query_keep, database_keep: bool [Q] / [N] masks over `split`'s queries /
      database, in `read_split` order.

  Returns:
    `dest`.
  """
  keep = {"queries": np.asarray(query_keep, bool), "database": np.asarray(database_keep, bool)}
  paths = {"queries": split.query_paths, "database": split.database_paths}
  segs = {"queries": split.query_seg_paths, "database": split.database_seg_paths}
  for role in ROLES:
    if keep[role].shape != (len(paths[role]),):
      raise ValueError(f"write_subset: {role} mask has shape {keep[role].shape}, expected "
                       f"({len(paths[role])},)")
  selection = {"source": os.path.realpath(split.root), "split": split.split,
               **{role: [os.path.basename(p) for p, k in zip(paths[role], keep[role]) if k]
                  for role in ROLES}}
  marker = os.path.join(dest, "subset.json")
  if os.path.exists(dest) and os.listdir(dest):
    if os.path.isfile(marker) and files.read_json(marker) == selection:
      return dest
    raise ValueError(f"{dest}: exists and is not the subset asked for now (other source or "
                     f"selection); remove it to rebuild")
  with files.atomic_dir(dest) as tmp:
    for other in SPLITS:
      for tree in ("images", "segmentations"):
        src = os.path.join(split.root, tree, other)
        if other != split.split and os.path.isdir(src):
          os.makedirs(os.path.join(tmp, tree), exist_ok=True)
          os.symlink(os.path.realpath(src), os.path.join(tmp, tree, other))
    for role in ROLES:
      image_dir = os.path.join(tmp, "images", split.split, role)
      os.makedirs(image_dir)
      if segs[role] is not None:
        os.makedirs(os.path.join(tmp, "segmentations", split.split, role))
      for i in np.flatnonzero(keep[role]):
        os.symlink(os.path.realpath(paths[role][i]),
                   os.path.join(image_dir, os.path.basename(paths[role][i])))
        if segs[role] is not None:
          os.symlink(os.path.realpath(segs[role][i]),
                     seg_path_for(os.path.join(image_dir, os.path.basename(paths[role][i]))))
    files.write_json(os.path.join(tmp, "subset.json"), selection)
  return dest


__all__ = ["write_subset", "folder_split", "files_sha256", "write_patchnetvlad_gt",
           "read_patchnetvlad_gt", "SPLITS", "ROLES", "FIELDS", "IMAGE_EXTENSIONS", "VprSplit", "format_name",
           "parse_name", "parse_utm", "read_split", "seg_path_for", "is_image_name",
           "training_ground_truth", "split_folders", "TRAIN_POSITIVE_RADIUS",
           "NEGATIVE_RADIUS", "TEST_POSITIVE_RADIUS", "list_role",
           "queries_without_positives"]

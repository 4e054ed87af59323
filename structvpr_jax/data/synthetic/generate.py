"""Writes the synthetic city as a dataset in the project layout; montage; CLI.

`generate` renders every database place (day) and a query plan (query
conditions spread over the places, `_query_plan`) of the train / val / test
districts and writes (`structvpr_jax.data.layout`)::

    <root>/images/{train,val,test}/{database,queries}/@east@north@...@note@.jpg
    <root>/segmentations/{train,val,test}/{database,queries}/<same stem>.png
    <root>/synthetic.json     (parameters, counts, per-place regimes)

Names: ``layout.format_name(east, north, utm_zone_number="32",
utm_zone_letter="T", pano_id=<split><place:05d>, heading=<compass deg>,
timestamp=q<query:06d> (queries only), note=<condition>)``; UTM metres.

CLI (`main`)::

    python -m structvpr_jax.data.synthetic generate --root DIR [--seed 0] \
        [--height 120 --width 160] [--train N --val N --test N]
    python -m structvpr_jax.data.synthetic montage --out docs/synthetic_montage.png
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from structvpr_jax import files
from structvpr_jax.data import layout
from structvpr_jax.data.synthetic.labels import CLASS_NAMES, colorize, corrupt_labels
from structvpr_jax.data.synthetic.render import render
from structvpr_jax.data.synthetic.world import (
    BUILDING, CAR, CONDITIONS, DATABASE_CONDITION, PERSON, POLE, QUERY_CONDITIONS, SIDEWALK,
    SKY, TRAFFIC_SIGN, UTM_ORIGIN, UTM_ZONE, VEGETATION, World, _split_rng, make_world,
    query_pose)

VERSION = 1
# The CLI's description (the first line of the package docstring).
DESCRIPTION = "A procedural 2.5-D city with exact per-pixel labels (the embedded default data)."


def _normalise_counts(num_places):
  if isinstance(num_places, int):
    return {s: int(num_places) for s in layout.SPLITS}
  missing = set(layout.SPLITS) - set(num_places)
  if missing:
    raise ValueError(f"num_places needs a count for every split; missing {sorted(missing)}")
  return {s: int(num_places[s]) for s in layout.SPLITS}


def _query_plan(num_places: int, queries_per_place: float, conditions, rng):
  """(place, condition) pairs: about queries_per_place queries per place (at
  least one per condition); conditions are balanced, a place queried several
  times gets different conditions."""
  C = len(conditions)
  total = max(C, int(round(num_places * queries_per_place)))
  if total >= num_places:
    rank = rng.permutation(num_places)
    plan = [(i % num_places, (rank[i % num_places] + i // num_places) % C)
            for i in range(total)]
  else:
    places = np.sort(rng.choice(num_places, size=total, replace=False))
    plan = list(zip(places, rng.permutation(total) % C))
  return [(int(p), conditions[int(c)]) for p, c in plan]


def _params(seed, image_size, num_places, conditions, queries_per_place):
  return {"version": VERSION, "seed": int(seed), "image_size": [int(image_size[0]), int(image_size[1])],
          "num_places": {s: int(num_places[s]) for s in layout.SPLITS},
          "conditions": list(conditions), "queries_per_place": float(queries_per_place)}


def _check_existing(root, params):
  path = os.path.join(root, "synthetic.json")
  if not os.path.isfile(path):
    return False
  old = files.read_json(path)
  for key, value in params.items():
    if old.get(key) != value:
      raise ValueError(f"{path}: existing synthetic dataset differs in field {key!r}: "
                       f"{old.get(key)!r} != {value!r} (use another --root or delete it)")
  return True


def generate(root: str, seed: int = 0, image_size=(120, 160),
             num_places=None, conditions: Sequence[str] = QUERY_CONDITIONS,
             queries_per_place: float = 1, progress: bool = True) -> str:
  """Writes the synthetic dataset (all three splits) under `root`; returns root.

  Args:
    root: output folder (must not exist, be empty, or hold a matching
      synthetic.json).
    seed: world / traverse seed; same seed -> same bytes.
    image_size: (H, W).
    num_places: database places per split (dict with train/val/test, or int).
    conditions: query conditions (each query's `note`); cycled over the
      queries, so every condition appears (at least once).
    queries_per_place: queries per database place (float: 0.5 -> a random
      half of the places get one; 2 -> every place two, different conditions).
    progress: tqdm bar when stderr is a TTY, else one summary line at the end.

  Database labels get the (light) day corruption, query labels their
  condition's (`corrupt_labels`). Skips when `root/synthetic.json` matches the
  parameters; raises ValueError naming the file and the differing field when it
  does not. Builds into a temporary sibling folder and renames it into place
  when complete.
  """
  if num_places is None:
    num_places = {"train": 200, "val": 60, "test": 100}
  counts = _normalise_counts(num_places)
  conditions = tuple(conditions)
  bad = [c for c in conditions if c not in CONDITIONS]
  if bad or not conditions:
    raise ValueError(f"conditions must be a non-empty subset of {CONDITIONS}, got {conditions}")
  if queries_per_place <= 0:
    raise ValueError(f"queries_per_place must be > 0, got {queries_per_place}")
  params = _params(seed, image_size, counts, conditions, queries_per_place)
  root = os.path.abspath(root)
  if _check_existing(root, params):
    return root
  if os.path.isdir(root) and os.listdir(root):
    raise ValueError(f"{root}: exists, is not empty and has no synthetic.json")
  total = sum(counts[s] + max(len(conditions), int(round(counts[s] * queries_per_place)))
              for s in layout.SPLITS)
  bar = None
  if progress and sys.stderr.isatty():
    bar = tqdm(total=total, desc="synthetic", unit="img")
  start = time.time()
  written = 0
  meta = {"params": params, "counts": {}, "regimes": {}}
  try:
    with files.atomic_dir(root) as tmp:
      for split in layout.SPLITS:
        world = make_world(seed, split, counts[split])
        img_db, seg_db = layout.split_folders(tmp, split, "database")
        img_q, seg_q = layout.split_folders(tmp, split, "queries")
        for d in (img_db, seg_db, img_q, seg_q):
          os.makedirs(d, exist_ok=True)
        for i, pose in enumerate(world.poses):
          rng = _split_rng(seed, split, 1, i)
          rgb, lab = render(world, pose, DATABASE_CONDITION, image_size, rng=rng)
          lab = corrupt_labels(lab, DATABASE_CONDITION, rng)
          east, north, heading = world.utm(pose)
          name = layout.format_name(east, north, utm_zone_number=UTM_ZONE[0],
                                    utm_zone_letter=UTM_ZONE[1], pano_id=f"{split}{i:05d}",
                                    heading=f"{heading:.1f}", note=DATABASE_CONDITION)
          _write_pair(img_db, seg_db, name, rgb, lab)
          written += 1
          if bar is not None:
            bar.update(1)
        plan = _query_plan(world.num_places, queries_per_place, conditions,
                           _split_rng(seed, split, 2))
        for q, (place, cond) in enumerate(plan):
          rng = _split_rng(seed, split, 3, q)
          pose = query_pose(world, place, rng)
          rgb, lab = render(world, pose, cond, image_size, rng=rng)
          lab = corrupt_labels(lab, cond, rng)
          east, north, heading = world.utm(pose)
          name = layout.format_name(east, north, utm_zone_number=UTM_ZONE[0],
                                    utm_zone_letter=UTM_ZONE[1], pano_id=f"{split}{place:05d}",
                                    heading=f"{heading:.1f}", timestamp=f"q{q:06d}", note=cond)
          _write_pair(img_q, seg_q, name, rgb, lab)
          written += 1
          if bar is not None:
            bar.update(1)
        meta["counts"][split] = {"database": world.num_places, "queries": len(plan)}
        meta["regimes"][split] = [str(r) for r in world.place_regime]
      out = dict(params)
      out.update({"counts": meta["counts"], "regimes": meta["regimes"],
                  "classes": list(CLASS_NAMES),
                  "utm_origin": {s: list(UTM_ORIGIN[s]) for s in layout.SPLITS}})
      files.write_json(os.path.join(tmp, "synthetic.json"), out, indent=1, sort_keys=False)
  finally:
    if bar is not None:
      bar.close()
  elapsed = max(time.time() - start, 1e-9)
  if progress and bar is None:
    print(f"synthetic: wrote {written} images to {root} in {elapsed:.1f} s "
          f"({written / elapsed:.0f} images/s)", file=sys.stderr)
  return root


def _write_pair(img_dir, seg_dir, name, rgb, lab):
  files.save_image(os.path.join(img_dir, name), rgb)
  files.save_image(os.path.join(seg_dir, os.path.splitext(name)[0] + ".png"), lab)


# ----------------------------------------------------------------------------
# Montage and CLI
# ----------------------------------------------------------------------------

def _pick_montage_place(world: World) -> int:
  """A place whose day view shows facades, trees, cars, people, poles and sky."""
  targets = {BUILDING: 0.3, VEGETATION: 0.06, CAR: 0.04, PERSON: 0.004, POLE: 0.004,
             SKY: 0.1, SIDEWALK: 0.02, TRAFFIC_SIGN: 0.001}
  best, best_score = 0, -1.0
  for i in range(world.num_places):
    _, lab = render(world, i, "day", (60, 80))
    score = sum(min(np.mean(lab == c) / t, 1.0) for c, t in targets.items())
    if score > best_score + 1e-9:
      best, best_score = i, score
  return best


def montage(out: str, seed: int = 0, place: Optional[int] = None, image_size=(120, 160),
            split: str = "test", num_places: int = 60, scale: int = 2) -> str:
  """PNG: one place under every condition; RGB row above the (corrupted)
  Cityscapes-coloured label row."""
  world = make_world(seed, split, num_places)
  if place is None:
    place = _pick_montage_place(world)
  H, W = image_size
  tiles = []
  for ci, cond in enumerate(CONDITIONS):
    rng = np.random.default_rng([seed, 77, ci])
    pose = world.poses[place] if cond == "day" else query_pose(world, place, rng)
    rgb, lab = render(world, pose, cond, image_size, rng=rng)
    tiles.append((cond, rgb, colorize(corrupt_labels(lab, cond, rng))))
  pad, head = 4, 14
  canvas = Image.new("RGB", (len(tiles) * (W * scale + pad) + pad,
                             2 * (H * scale + pad) + pad + head), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i, (cond, rgb, col) in enumerate(tiles):
    x = pad + i * (W * scale + pad)
    draw.text((x + 2, 2), f"{cond} ({world.place_regime[place]})" if i == 0 else cond,
              fill=(0, 0, 0))
    for r, img in enumerate((rgb, col)):
      tile = Image.fromarray(img).resize((W * scale, H * scale), Image.NEAREST)
      canvas.paste(tile, (x, head + pad + r * (H * scale + pad)))
  files.atomic_write(out, canvas.save)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m structvpr_jax.data.synthetic",
                                   description=DESCRIPTION)
  sub = parser.add_subparsers(dest="command", required=True)
  g = sub.add_parser("generate", help="write the synthetic dataset layout")
  g.add_argument("--root", required=True)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--height", type=int, default=120)
  g.add_argument("--width", type=int, default=160)
  g.add_argument("--train", type=int, default=200)
  g.add_argument("--val", type=int, default=60)
  g.add_argument("--test", type=int, default=100)
  g.add_argument("--queries-per-place", type=float, default=1.0)
  g.add_argument("--conditions", default=",".join(QUERY_CONDITIONS))
  m = sub.add_parser("montage", help="one place under every condition (PNG)")
  m.add_argument("--out", required=True)
  m.add_argument("--seed", type=int, default=0)
  m.add_argument("--place", type=int, default=None)
  m.add_argument("--height", type=int, default=120)
  m.add_argument("--width", type=int, default=160)
  args = parser.parse_args(argv)
  if args.command == "generate":
    root = generate(args.root, seed=args.seed, image_size=(args.height, args.width),
                    num_places={"train": args.train, "val": args.val, "test": args.test},
                    conditions=tuple(c for c in args.conditions.split(",") if c),
                    queries_per_place=args.queries_per_place)
    print(root)
  else:
    print(montage(args.out, seed=args.seed, place=args.place,
                  image_size=(args.height, args.width)))

"""Descriptor export for any image folder, and localisation of one photo.

  extract:  python -m structvpr_jax.main --config=configs/extract.py \
                --config.checkpoint=CKPT --config.extract.images=FOLDER [--config.extract.out=DIR]
            -> DIR/descriptors.npy (float32 [N, D], unit L2), DIR/names.txt (paths
               relative to FOLDER, one per row), DIR/meta.json
  localize: python -m structvpr_jax.main --config=configs/localize.py \
                --config.checkpoint=CKPT --config.localize.database=FOLDER \
                --config.localize.query=PHOTO [--config.localize.utm_csv=FILE]
            -> prints the top-k database images with UTM and distance (with
               eval.rerank: the re-ranked top-k and each one's global rank), saves
               <workdir>/localize_<photo>.png

Database UTM comes from datasets_vg names (`@east@north@...`) or, for plain
image names, from a csv with columns `name,east,north` (name relative to the
folder). Database descriptors and the faiss index are cached in
`<database>/.structvpr_cache/<key>/` (or `<workdir>/cache/<key>/` when the
folder is read-only), where the key hashes the checkpoint's files (names,
sizes, mtimes) and the image list: a new checkpoint or changed images make a
new cache entry; the same ones reuse it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from typing import Optional

import faiss
import numpy as np

from structvpr_jax import checkpoint, files, parallel, report, rerank
from structvpr_jax.data import input_pipeline, layout
from structvpr_jax.evaluation import (Extractor, load_local_features, local_feature_paths,
                                      local_layout, rerank_settings)
from structvpr_jax.workdir import Workdir


def list_images(folder: str) -> list:
  """Sorted image paths under `folder` (recursive; hidden folders skipped)."""
  if not os.path.isdir(folder):
    raise ValueError(f"{folder}: not a folder")
  out = []
  for root, dirs, names in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    out += [os.path.join(root, f) for f in sorted(names) if layout.is_image_name(f)]
  if not out:
    raise ValueError(f"{folder}: no images ({', '.join(layout.IMAGE_EXTENSIONS)})")
  return out


def checkpoint_key(checkpoint_dir: str) -> str:
  """Hash of the checkpoint directory's file names, sizes and mtimes."""
  h = hashlib.sha256()
  for root, dirs, names in os.walk(checkpoint_dir):
    dirs.sort()
    for name in sorted(names):
      st = os.stat(os.path.join(root, name))
      h.update(f"{os.path.relpath(os.path.join(root, name), checkpoint_dir)}:{st.st_size}:"
               f"{st.st_mtime_ns};".encode())
  return h.hexdigest()[:16]


def describe_paths(spec: dict, variables, paths: list, batch_size: int,
                   progress: bool = True, local: Optional[rerank.Settings] = None):
  """float32 [len(paths), D] descriptors of image files (rgb) or label maps (seg);
  with `local` (re-ranking settings) (descriptors, float16 local features
  [n, P, F], int32 keep [n, P]) from the same pass."""
  mesh = parallel.make_mesh()
  seg = spec["view"] == "seg"
  source = input_pipeline.ImageSource(paths, paths if seg else None, spec["image_size"],
                                      cache=False)
  extractor = Extractor(spec, mesh, batch_size, local=local)
  return extractor(parallel.replicate(variables, mesh), source, progress=progress,
                   desc="describe")


def run_extract(config, wd: Workdir) -> dict:
  """Descriptors of every image in config.extract.images -> npy + names + meta."""
  if not config.get("checkpoint"):
    raise ValueError("checkpoint: set --config.checkpoint=DIR (an Orbax checkpoint directory)")
  folder = config.extract.images
  if not folder:
    raise ValueError("extract.images: set the image folder to describe")
  paths = list_images(folder)
  spec, variables, step, _ = checkpoint.restore_variables(config.checkpoint, config=config)
  t0 = time.time()
  desc = describe_paths(spec, variables, paths, config.eval.batch_size)
  out = config.extract.out or wd.path("descriptors")
  os.makedirs(out, exist_ok=True)
  names = [os.path.relpath(p, folder) for p in paths]
  meta = {"checkpoint": os.path.abspath(config.checkpoint), "step": step, "spec": spec,
          "images": os.path.abspath(folder), "count": len(paths), "dim": int(desc.shape[1]),
          "seconds": time.time() - t0}
  if parallel.is_main_process():
    files.save_npy(os.path.join(out, "descriptors.npy"), desc)
    files.write_text(os.path.join(out, "names.txt"), "\n".join(names) + "\n")
    files.write_json(os.path.join(out, "meta.json"), meta)
  print(f"[extract] {len(paths)} images -> {out}/descriptors.npy [{len(paths)}, "
        f"{desc.shape[1]}] float32 ({len(paths) / max(meta['seconds'], 1e-9):.1f} img/s)")
  return meta


def database_utm(folder: str, paths: list, utm_csv: str = "") -> np.ndarray:
  """[N, 2] UTM of the database images: from a csv (name,east,north) or the names."""
  if utm_csv:
    table = {}
    with open(utm_csv, newline="") as f:
      for row_no, row in enumerate(csv.reader(f), 1):
        if not row or row[0].startswith("#") or row[0].strip().lower() == "name":
          continue
        try:
          table[row[0].strip()] = (float(row[1]), float(row[2]))
        except (IndexError, ValueError):
          raise ValueError(f"{utm_csv}:{row_no}: expected 'name,east,north', got {row!r}") \
              from None
    missing = [p for p in paths if os.path.relpath(p, folder) not in table]
    if missing:
      raise ValueError(f"{utm_csv}: no UTM row for {len(missing)} images, e.g. "
                       f"{os.path.relpath(missing[0], folder)}")
    return np.array([table[os.path.relpath(p, folder)] for p in paths], np.float64)
  return np.array([layout.parse_utm(p) for p in paths], np.float64).reshape(-1, 2)


def _database_folder(folder: str) -> str:
  """A layout root's test database, else the folder itself."""
  for split in ("test", "val", "train"):
    d = os.path.join(folder, "images", split, "database")
    if os.path.isdir(d):
      return d
  return folder


def cached_database(config, wd: Workdir, spec: dict, variables,
                    local: Optional[rerank.Settings] = None) -> dict:
  """{paths, utm, descriptors, index, cache_dir, reused} for config.localize.database;
  with `local` (re-ranking settings) also "local": (float16 features, keep) of
  every database image, cached beside the descriptors (memory-mapped when
  reused; the settings that shape them are part of the cache key)."""
  folder = _database_folder(config.localize.database)
  paths = list_images(folder)
  shape = "" if local is None else "|" + json.dumps(
      {"features": local.features, "layer": local.layer, "patch_sizes": local.patch_sizes,
       "strides": local.strides, "max_features": local.max_features}, sort_keys=True)
  key = hashlib.sha256((checkpoint_key(config.checkpoint) + "|" + "|".join(
      f"{os.path.relpath(p, folder)}:{os.path.getsize(p)}" for p in paths) + shape
  ).encode()).hexdigest()[:16]
  cache_dir = os.path.join(folder, ".structvpr_cache", key)
  if not os.access(folder, os.W_OK):
    cache_dir = wd.path("cache", key)
  desc_path = os.path.join(cache_dir, "descriptors.npy")
  index_path = os.path.join(cache_dir, "index.faiss")
  utm = database_utm(folder, paths, config.localize.get("utm_csv", ""))
  if os.path.exists(desc_path) and os.path.exists(index_path):
    out = {"paths": paths, "utm": utm, "descriptors": np.load(desc_path),
           "index": faiss.read_index(index_path), "cache_dir": cache_dir, "reused": True}
    if local is not None:
      out["local"] = load_local_features(cache_dir, "database")
    return out
  res = describe_paths(spec, variables, paths, config.eval.batch_size, local=local)
  desc = res if local is None else res[0]
  index = faiss.IndexFlatL2(desc.shape[1])
  index.add(np.ascontiguousarray(desc))
  files.atomic_write(index_path, lambda tmp: faiss.write_index(index, tmp))
  out = {"paths": paths, "utm": utm, "descriptors": desc, "index": index,
         "cache_dir": cache_dir, "reused": False}
  if local is not None:
    feat_path, keep_path = local_feature_paths(cache_dir, "database")
    files.save_npy(feat_path, res[1])
    files.save_npy(keep_path, res[2])
    out["local"] = (res[1], res[2])
  files.save_npy(desc_path, desc)       # written last: its presence marks a complete entry
  files.write_text(os.path.join(cache_dir, "names.txt"),
              "\n".join(os.path.relpath(p, folder) for p in paths) + "\n")
  return out


def run_localize(config, wd: Workdir) -> dict:
  """Top-k database matches of one query photo; prints them and saves a picture."""
  if not config.get("checkpoint"):
    raise ValueError("checkpoint: set --config.checkpoint=DIR (an Orbax checkpoint directory)")
  query = config.localize.query
  if not query or not os.path.isfile(query):
    raise ValueError(f"localize.query={query!r}: not an image file")
  if not config.localize.database:
    raise ValueError("localize.database: set the database folder (layout root or images)")
  spec, variables, step, _ = checkpoint.restore_variables(config.checkpoint, config=config)
  if spec["view"] != "rgb":
    raise ValueError(f"checkpoint: {config.checkpoint} is a {spec['branch']} branch; "
                     "localisation needs an RGB branch (rgb or distill)")
  settings = rerank_settings(config)       # None: eval.rerank="none"
  t0 = time.time()
  db = cached_database(config, wd, spec, variables, local=settings)
  t_db = time.time() - t0
  res = describe_paths(spec, variables, [query], 1, progress=False, local=settings)
  q = res if settings is None else res[0]
  k = int(min(config.localize.top_k, len(db["paths"])))
  depth = k if settings is None else int(min(max(k, settings.topk), len(db["paths"])))
  dist, idx = db["index"].search(np.ascontiguousarray(q), depth)
  distance = dict(zip(idx[0].tolist(), np.sqrt(np.maximum(dist[0], 0)).tolist()))
  global_rank = {int(i): r for r, i in enumerate(idx[0], 1)}
  order, scores = idx[0][:k], {}
  if settings is not None:
    windows = local_layout(spec, settings)
    t1 = time.time()
    out = rerank.rerank(idx, (res[1], res[2]), db["local"], windows, settings,
                        global_distances=dist)
    t_rerank = time.time() - t1
    order = out["predictions"][0][:k]
    scores = dict(zip(out["predictions"][0][:len(out["scores"][0])].tolist(),
                      out["scores"][0].tolist()))
  rows = []
  for rank, i in enumerate(order, 1):
    row = {"rank": rank, "image": db["paths"][i], "utm_east": float(db["utm"][i, 0]),
           "utm_north": float(db["utm"][i, 1]), "descriptor_distance": float(distance[int(i)])}
    if settings is not None:
      row.update(global_rank=global_rank[int(i)], rerank_score=float(scores.get(int(i), np.nan)))
    rows.append(row)
  print(f"[localize] {query} against {len(db['paths'])} database images "
        f"({'cached' if db['reused'] else 'described'} in {t_db:.1f} s; cache "
        f"{db['cache_dir']})")
  if settings is not None:
    print(f"[localize] +R: {settings.describe()} in {1000 * t_rerank:.0f} ms; rank = "
          f"re-ranked, global = rank by descriptor distance")
  try:    # a query named @east@north@...: report how far each match really is
    q_utm = np.array(layout.parse_utm(query))
  except ValueError:
    q_utm = None
  if q_utm is not None:
    for r in rows:
      r["metres_from_query"] = float(np.hypot(r["utm_east"] - q_utm[0],
                                              r["utm_north"] - q_utm[1]))
  ranked = settings is not None
  print(f"{'rank':>4}" + (f"  {'global':>6}" if ranked else "")
        + f"  {'utm_east':>12} {'utm_north':>12}  {'distance':>8}"
        + ("  metres" if q_utm is not None else "") + "  image")
  for r in rows:
    print(f"{r['rank']:>4}" + (f"  {r['global_rank']:>6}" if ranked else "")
          + f"  {r['utm_east']:>12.2f} {r['utm_north']:>12.2f}  "
          f"{r['descriptor_distance']:>8.4f}"
          + (f"  {r['metres_from_query']:>6.1f}" if q_utm is not None else "")
          + f"  {os.path.basename(r['image'])}")
  stem = os.path.splitext(os.path.basename(query))[0][:60] or "query"
  picture = wd.path(f"localize_{stem}.png")
  if parallel.is_main_process():
    _plot(query, rows, spec["image_size"], picture)
    files.write_json(wd.path(f"localize_{stem}.json"),
                               {"query": os.path.abspath(query), "step": step,
                                "checkpoint": os.path.abspath(config.checkpoint),
                                "rerank": None if settings is None else settings.describe(),
                                "matches": rows})
  print(f"[localize] picture: {picture}")
  return {"matches": rows, "picture": picture, "reused_cache": db["reused"]}


def _plot(query: str, rows: list, image_size, path: str) -> None:
  plt = report.plt
  h, w = image_size
  fig, axes = plt.subplots(1, len(rows) + 1, figsize=(2.2 * (len(rows) + 1), 2.2 * h / w + 0.6))
  axes[0].imshow(input_pipeline.read_rgb(query, image_size))
  axes[0].set_title("query", fontsize=8)
  for ax, r in zip(axes[1:], rows):
    ax.imshow(input_pipeline.read_rgb(r["image"], image_size))
    ax.set_title(f"#{r['rank']}" + (f" (global #{r['global_rank']})" if "global_rank" in r
                                     else "")
                 + f" ({r['utm_east']:.0f}, {r['utm_north']:.0f})\n"
                 f"d={r['descriptor_distance']:.3f}", fontsize=7)
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  report.save_figure(fig, path)

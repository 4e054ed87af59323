"""Descriptor extraction (data parallel), Recall@N reports, eval from a checkpoint.

A branch is described by a small JSON-able dict (the "spec", stored in every
checkpoint's `meta` item) so that a checkpoint directory alone is enough to
rebuild the model and evaluate it:

  {"branch": "rgb"|"seg", "view": "rgb"|"seg", "backbone", "width", "dim",
   "num_clusters", "blocks", "slme", "normalization", "image_size": [H, W]}
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np

from structvpr_jax import checkpoint, parallel, retrieval, slme, whitening
from structvpr_jax.data import layout, pipeline
from structvpr_jax.models.branch import Branch


def build_model(spec: dict, bn_axis_name: Optional[str] = None) -> Branch:
  blocks = spec.get("blocks")
  return Branch(backbone=spec["backbone"], width=float(spec["width"]),
                dim=int(spec.get("dim") or 0) or None, num_clusters=int(spec["num_clusters"]),
                blocks=None if not blocks else tuple(tuple(b) for b in blocks),
                bn_axis_name=bn_axis_name)


def input_channels(spec: dict) -> int:
  return 3 if spec["view"] == "rgb" else slme.num_channels(spec.get("slme", "slme"))


def model_input(spec: dict, x):
  """uint8 images [..., H, W, 3] or label maps [..., H, W] -> float32 model input."""
  if spec["view"] == "rgb":
    return pipeline.normalize_rgb(x, spec.get("normalization", "imagenet"))
  table, values = slme.grouping(spec.get("slme", "slme"))
  return slme.encode(x, table, values)


class Extractor:
  """Global descriptors of many images, data parallel over a mesh.

  Batches have a fixed size, `per_device_batch` images on every device (the
  last batch is padded and its padding dropped), so the function compiles
  once and each device runs the same program whatever the device count:
  descriptors are bitwise equal on 1 and on 8 devices.
  """

  def __init__(self, spec: dict, mesh, per_device_batch: int = 32):
    self.spec = spec
    self.mesh = mesh
    self.batch_size = max(1, int(per_device_batch)) * mesh.size
    model = build_model(spec)

    def embed(variables, x):
      return model.apply(variables, model_input(spec, x), train=False)

    self._apply = parallel.data_parallel_apply(embed, mesh)

  def __call__(self, variables, source: pipeline.ImageSource, indices=None,
               progress: bool = False, desc: str = "extract") -> np.ndarray:
    """float32 [n, D] for `indices` (default all) of `source`.

    `variables` should be replicated on the mesh (`parallel.replicate`).
    """
    indices = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
    view = self.spec["view"]
    bs = self.batch_size
    starts = list(range(0, len(indices), bs))

    def load(i):
      idx = indices[starts[i]:starts[i] + bs]
      x = source.get(view, idx)
      padded, mask = parallel.pad_to_multiple(x, bs)
      return padded, int(mask.sum())

    bar = _progress(len(indices), desc) if progress else None
    out = []
    for padded, n in pipeline._prefetch(load, len(starts), 2):
      desc_b = self._apply(variables, parallel.shard_batch(padded, self.mesh))
      out.append(np.asarray(jax.device_get(desc_b))[:n])
      if bar is not None:
        bar.update(n)
    if bar is not None:
      bar.close()
    if not out:
      return np.zeros((0, 0), np.float32)
    return np.concatenate(out).astype(np.float32)


def _progress(total: int, desc: str):
  import sys
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, unit="img", disable=not sys.stderr.isatty(),
              leave=False)


def recall_report(q_desc, db_desc, query_utm, db_utm, notes: Optional[Sequence[str]] = None,
                  ns=(1, 5, 10, 20), radius: float = 25.0) -> dict:
  """{"R@n": percent, ..., "per_condition": {note: {...}}, counts}."""
  _, predictions = retrieval.search(q_desc, db_desc, max(ns))
  overall = retrieval.recall_from_predictions(predictions, query_utm, db_utm, ns, radius)
  report = {f"R@{n}": v for n, v in overall.items()}
  report.update(num_queries=int(len(q_desc)), num_database=int(len(db_desc)))
  if notes is not None:
    notes = np.asarray(list(notes))
    per = {}
    for note in sorted(set(notes.tolist())):
      sel = notes == note
      rec = retrieval.recall_from_predictions(predictions[sel], np.asarray(query_utm)[sel],
                                              db_utm, ns, radius)
      per[note or "all"] = {f"R@{n}": v for n, v in rec.items()}
      per[note or "all"]["num_queries"] = int(sel.sum())
    report["per_condition"] = per
  report["_predictions"] = predictions
  return report


def evaluate_split(spec: dict, variables, root: str, split: str, mesh, batch_size: int = 32,
                   ns=(1, 5, 10, 20), radius: float = 25.0, progress: bool = False,
                   extractor: Optional[Extractor] = None, cache: bool = False,
                   pca: Optional[dict] = None) -> dict:
  """Extracts descriptors of one split and returns its recall report.

  `pca`: optional `whitening.fit` result applied to queries and database
  before the search (see `pca_from_config`).
  """
  vs = layout.read_split(root, split, require_segmentations=spec["view"] == "seg")
  without = layout.queries_without_positives(vs, radius)
  if len(without) == len(vs.query_utm):
    raise ValueError(f"{root}/images/{split}: none of the {len(without)} queries has a "
                     f"database image within {radius} m (eval.radius); check the UTM in the "
                     f"file names")
  if len(without):
    from absl import logging
    logging.warning("%s/images/%s: %d of %d queries have no database image within %.0f m; "
                    "they count as misses", root, split, len(without), len(vs.query_utm),
                    radius)
  t0 = time.perf_counter()
  descs = describe_split(spec, variables, vs, mesh, batch_size, progress, extractor, cache,
                         label=split)
  extract_s = time.perf_counter() - t0
  q, db = descs["queries"], descs["database"]
  if pca is not None:
    q, db = whitening.apply(pca, q), whitening.apply(pca, db)
  report = recall_report(q, db, vs.query_utm, vs.database_utm, vs.query_notes(), ns, radius)
  report["extract_s"] = extract_s
  report["split"] = split
  report["num_queries_without_positive"] = int(len(without))
  report["descriptor_dim"] = int(q.shape[1])
  return report


def describe_split(spec: dict, variables, vs: layout.VprSplit, mesh, batch_size: int = 32,
                   progress: bool = False, extractor: Optional[Extractor] = None,
                   cache: bool = False, label: str = "") -> dict:
  """{"database": [N, D], "queries": [Q, D]} float32 descriptors of one split."""
  images = pipeline.SplitImages(vs, spec["image_size"], views=(spec["view"],), cache=cache,
                                num_classes=slme.NUM_CITYSCAPES_CLASSES)
  extractor = extractor or Extractor(spec, mesh, batch_size)
  replicated = parallel.replicate(variables, mesh)
  return {role: extractor(replicated, images.sources[role], progress=progress,
                          desc=f"{label} {role}".strip())
          for role in ("database", "queries")}


def pca_from_config(config, spec: dict, variables, root: str, mesh,
                    progress: bool = False) -> Optional[dict]:
  """None when `eval.pca_dim` is 0, else PCA(-whitening, `eval.pca_whiten`) to
  eval.pca_dim fitted on the train split's descriptors (database and
  queries) of the model; see `whitening.fit`."""
  dim = int(config.eval.get("pca_dim", 0) or 0)
  if dim < 0:
    raise ValueError(f"eval.pca_dim={dim} must be 0 (off) or positive")
  if dim == 0:
    return None
  vs = layout.read_split(root, "train", require_segmentations=spec["view"] == "seg")
  descs = describe_split(spec, variables, vs, mesh, config.eval.batch_size, progress,
                         label="train")
  return whitening.fit(np.concatenate([descs["database"], descs["queries"]]), dim,
                       bool(config.eval.get("pca_whiten", True)))


def write_json_atomic(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def public(report: dict) -> dict:
  """The report without private (underscore) entries, JSON-able."""
  return {k: v for k, v in report.items() if not k.startswith("_")}


def restore_variables(checkpoint_dir: str, step: Optional[int] = None):
  """(spec, variables, step, meta) from a checkpoint directory alone."""
  directory, step_from_path = checkpoint.resolve_directory(checkpoint_dir)
  if not os.path.isdir(directory):
    raise ValueError(f"checkpoint: {checkpoint_dir} is not a checkpoint directory")
  mngr = checkpoint.manager(directory, read_only=True)
  step = step if step is not None else step_from_path
  step = step if step is not None else checkpoint.best_step(mngr)
  if step is None:
    raise ValueError(f"checkpoint: no checkpoint steps in {directory}")
  meta = checkpoint.read_meta(mngr, step)
  spec = meta["spec"]
  restored = checkpoint.restore(mngr, step, abstract_variables(spec))
  return spec, restored["variables"], step, meta


def abstract_variables(spec: dict):
  """ShapeDtypeStructs of {"params", "batch_stats"} of the model `spec` builds."""
  model = build_model(spec)
  h, w = spec["image_size"]
  shape = (1, h, w, 3) if spec["view"] == "rgb" else (1, h, w)

  def init():
    x = jax.numpy.zeros(shape, jax.numpy.uint8)
    v = model.init(jax.random.PRNGKey(0), model_input(spec, x))
    return {"params": v["params"], "batch_stats": v["batch_stats"]}
  return jax.eval_shape(init)


def run(config, workdir: str) -> dict:
  """Eval mode: restore `config.checkpoint`, write `<workdir>/eval/<split>/recalls.json`."""
  if not config.get("checkpoint"):
    raise ValueError("checkpoint: set --config.checkpoint=DIR (an Orbax checkpoint directory)")
  spec, variables, step, _ = restore_variables(config.checkpoint)
  root = config.data.root or os.path.join(workdir, "data")
  split = config.get("eval_split", "test")
  mesh = parallel.make_mesh()
  pca = pca_from_config(config, spec, variables, root, mesh, progress=True)
  report = evaluate_split(spec, variables, root, split, mesh, config.eval.batch_size,
                          tuple(config.eval.ns), config.eval.radius, progress=True, pca=pca)
  out = public(report)
  out.update(branch=spec["branch"], checkpoint=os.path.abspath(config.checkpoint), step=step)
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, "eval", split, "recalls.json"), out)
  return out

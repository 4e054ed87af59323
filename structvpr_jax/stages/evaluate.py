"""Evaluation: test recalls of every finished branch, the figures and report.md.

  run(config, wd, root)     after the pipeline: <workdir>/eval/summary.json
                            (one record per branch + the fields and inputs),
                            eval/<split>/recalls_<branch>.json, recalls.json
                            (the distilled RGB branch: the deliverable),
                            eval/<split>/per_query_<branch>.json (hits per query),
                            examples.png, recall_at_n.png, report.md
  run_checkpoint(config, wd)  eval mode: one checkpoint directory on
                            data.root -> <workdir>/eval/<split>/recalls.json
"""

from __future__ import annotations

import copy
import os
from typing import Optional, Sequence

import numpy as np
from absl import logging

from structvpr_jax import (checkpoint, config_lib, files, parallel, report, rerank, retrieval,
                           stats)
from structvpr_jax.data import layout, synthetic
from structvpr_jax.evaluation import (RecallEvaluator, describe_split, extractor_from_config,
                                      global_ranks, index_from_config, local_layout,
                                      pca_from_config, public, rerank_report, rerank_settings)
from structvpr_jax.workdir import Workdir


def descriptor_store(config, wd: Workdir, split: str, branch: str) -> dict:
  """`describe_split`'s store/dtype keywords: eval.descriptors="disk" streams
  them to <workdir>/eval/<split>/descriptors/<branch>/ as eval.descriptor_dtype."""
  if config.eval.get("descriptors", "memory") != "disk":
    return {}
  return {"store": os.path.join(wd.eval_split_dir(split), "descriptors", branch),
          "dtype": config.eval.get("descriptor_dtype", "float32")}


def _evaluate_checkpoint(config, spec, variables, root, mesh, split, store: dict) -> dict:
  pca = pca_from_config(config, spec, variables, root, mesh)
  return RecallEvaluator(spec, root, split, mesh, config.eval.batch_size,
                         tuple(config.eval.ns), config.eval.radius, progress=True,
                         extractor=extractor_from_config(config, spec, mesh, local=True),
                         index=index_from_config(config),
                         vs=config_lib.read_split(config, root, split, spec["view"] == "seg"),
                         **store).run(variables, pca)


def run(config, wd: Workdir, root: str, stages=("rgb", "seg", "distill")) -> dict:
  """Test-split R@N per query condition for each finished stage in `stages`."""
  split = config.get("eval_split", "test")
  mesh = parallel.make_mesh()
  fields = config_lib.stage_fields(config, "eval")
  consumed = {s: wd.run_id(s) for s in stages if wd.record(s) is not None}
  table, predictions = {}, {}
  for stage, label in report.BRANCH_LABELS.items():
    if stage not in stages:
      continue
    spec, variables, step, _ = checkpoint.restore_variables(wd.checkpoints(stage), config=config)
    rep = _evaluate_checkpoint(config, spec, variables, root, mesh, split,
                               descriptor_store(config, wd, split, stage))
    predictions[stage] = (spec, rep["_predictions"])
    record = public(rep)
    record.update(branch=stage, label=label, step=step,
                  checkpoint=os.path.join(wd.checkpoints(stage), str(step)))
    table[stage] = record
    rows = [(stage, rep, record)]
    if "_rerank" in rep:        # the same branch, its top-K re-ranked: the "+R" row
      plus = rerank_key(stage)
      rerank_record = public(rep["_rerank"])
      rerank_record.update(branch=plus, label=f"{label} +R", step=step,
                           checkpoint=record["checkpoint"],
                           extract_s=rep["extract_s"], split=split)
      table[plus] = rerank_record
      rows.append((plus, rep["_rerank"], rerank_record))
      print(f"[eval] {label}: R@1 {record['R@1']:.1f} global, {rerank_record['R@1']:.1f} +R "
            f"({rerank_record['rerank']['ms_per_query']:.1f} ms per query to re-rank)",
            flush=True)
    if parallel.is_main_process():
      for key, r, rec in rows:
        files.write_json(wd.recalls_json(split, key), rec)
        files.write_json(wd.per_query_json(split, key), per_query(r, root, split),
                         indent=None)
      if stage == "distill":  # the deliverable: the distilled RGB branch
        files.write_json(wd.recalls_json(split), record)
  wd.finish("eval", {"split": split, "branches": table}, fields, consumed,
            path=wd.eval_summary)
  if parallel.is_main_process():
    write_figures_and_report(config, wd, root, split, predictions)
  print(report.format_table(table))
  return table


def rerank_key(branch: str) -> str:
  """The table key and file suffix of a branch's re-ranked row: "<branch>+R"
  (recalls_<branch>+R.json, per_query_<branch>+R.json)."""
  return f"{branch}+R"


def per_query(report: dict, root: str, split: str, vs=None) -> dict:
  """{"queries": [file names], "conditions": [note], "hits": {"R@n": [0/1]}} in the
  split's query order (sorted names): what paired comparisons of two branches
  or runs on the same queries need. `vs`: the split already read (else
  `layout.read_split(root, split)`)."""
  vs = layout.read_split(root, split) if vs is None else vs
  return {"queries": [os.path.basename(p) for p in vs.query_paths],
          "conditions": vs.query_notes(),
          "hits": {f"R@{n}": [int(h) for h in hits] for n, hits in report["_hits"].items()}}


def write_figures_and_report(config, wd: Workdir, root: str, split: str,
                             predictions: dict) -> None:
  """examples.png of the deliverable branch, the synthetic montage, report.md."""
  for stage in ("distill", "rgb"):          # the distilled RGB branch, else stage-1 RGB
    if stage in predictions:
      spec, preds = predictions[stage]
      label = report.BRANCH_LABELS[stage]
      report.examples_for_split(root, split, preds, spec["image_size"], config.eval.radius,
                                wd.examples_png,
                                title=f"{label}: {split} queries and their top-5")
      break
  if config.data.name == "synthetic":
    montage = os.path.join(root, "montage.png")
    if not os.path.exists(montage):
      synthetic.montage(montage, seed=config.seed, image_size=tuple(config.data.image_size),
                        split="test", num_places=int(config.data.synthetic_places["test"]))
  print(f"report: {report.write_report(wd)}")


def run_checkpoint(config, wd: Workdir) -> dict:
  """Eval mode: restore `config.checkpoint` and evaluate it on a layout root's
  `eval_split` (`data.root`) or on two plain folders (`eval.database_folder`,
  `eval.queries_folder`; `eval.no_labels` for queries without UTM). Prints
  `< #queries: Q; #database: N >` and the recall line; writes
  <workdir>/eval/<split>/recalls.json (recalls, counts, radius, image size, a
  hash of both file lists), with labels per_query_<branch>.json (hits per
  query, for paired comparisons of checkpoints), optional preds/ (`eval.num_preds_to_save`,
  `eval.save_only_wrong`) and descriptors (`eval.save_descriptors`)."""
  if not config.get("checkpoint"):
    raise ValueError("checkpoint: set --config.checkpoint=DIR (an Orbax checkpoint directory)")
  ev = config.eval
  db_folder, q_folder = ev.get("database_folder", ""), ev.get("queries_folder", "")
  if bool(db_folder) != bool(q_folder):
    raise ValueError("eval.database_folder and eval.queries_folder go together: set both "
                     "(two plain image folders) or neither (data.root, a layout folder)")
  labelled = not bool(ev.get("no_labels", False))
  if not db_folder and not labelled:
    raise ValueError("eval.no_labels needs eval.database_folder / eval.queries_folder")
  if not db_folder and config.data.name == "folder" and not config.data.root:
    raise ValueError("data.root is not set: give the layout folder to evaluate on with "
                     "--config.data.root=DIR, or two folders with "
                     "--config.eval.database_folder=DIR --config.eval.queries_folder=DIR")
  spec, variables, step, _ = checkpoint.restore_variables(config.checkpoint, config=config)
  trained_size = tuple(int(x) for x in spec["image_size"])
  size = tuple(int(x) for x in (ev.get("image_size", ()) or ()))
  size = trained_size if not size or not all(size) else size
  if size != trained_size:
    logging.warning("evaluating at %dx%d, the checkpoint trained at %dx%d (eval.image_size): "
                    "recalls are not comparable with its training-size results",
                    *size, *trained_size)
    print(f"warning: eval.image_size {size[0]}x{size[1]} differs from the checkpoint's "
          f"training size {trained_size[0]}x{trained_size[1]}")
  spec = dict(spec, image_size=list(size))
  if db_folder:
    vs = layout.folder_split(db_folder, q_folder, labelled, ev.get("ground_truth", "") or "")
    split, root = "folders", None
  else:
    root = config.data.root or wd.data
    split = config.get("eval_split", "test")
    vs = layout.read_split(root, split, require_segmentations=spec["view"] == "seg")
  if spec["view"] == "seg" and db_folder:
    raise ValueError("two-folder evaluation takes RGB checkpoints (rgb or distill); a seg "
                     "checkpoint needs label maps: evaluate it on a layout folder")
  print(f"< #queries: {vs.num_queries}; #database: {vs.num_database} >", flush=True)
  mesh = parallel.make_mesh()
  k = max(tuple(ev.ns))
  extractor = extractor_from_config(config, spec, mesh, local=True)
  settings = extractor.local        # None: eval.rerank="none"
  global_rank = None
  if labelled:
    pca = pca_from_config(config, spec, variables, root, mesh) if root else None
    if pca is None and int(ev.get("pca_dim", 0) or 0):
      raise ValueError("eval.pca_dim needs a layout folder (data.root) with a train split")
    rep = RecallEvaluator(spec, root, split, mesh, ev.batch_size, tuple(ev.ns), ev.radius,
                          progress=True, extractor=extractor,
                          index=index_from_config(config), vs=vs,
                          **descriptor_store(config, wd, split, spec["branch"])
                          ).run(variables, pca)
    predictions, descs = rep["_predictions"], rep["_descriptors"]
    line = ", ".join(f"R@{n}: {rep[f'R@{n}']:.1f}" for n in ev.ns)
    out = public(rep)
    if settings is None:
      print(line, flush=True)
    else:       # one line per stage, each saying which it is
      plus = rep["_rerank"]
      print(f"{line} (global retrieval)", flush=True)
      print(", ".join(f"R@{n}: {plus[f'R@{n}']:.1f}" for n in ev.ns)
            + f" (+R: {settings.describe()}; {plus['rerank']['ms_per_query']:.1f} ms per query)",
            flush=True)
      out["rerank"] = public(plus)
      predictions, global_rank = plus["_predictions"], plus["_global_rank"]
  else:
    descs = describe_split(spec, variables, vs, mesh, ev.batch_size, progress=True,
                           extractor=extractor,
                           **descriptor_store(config, wd, split, spec["branch"]))
    depth = k if settings is None else max(k, settings.topk)
    distances, predictions = retrieval.search(descs["queries"], descs["database"], depth,
                                              **index_from_config(config))
    out = {"num_queries": vs.num_queries, "num_database": vs.num_database,
           "descriptor_dim": int(descs["queries"].shape[1]), "labels": False}
    print("no labels (eval.no_labels): predictions only", flush=True)
    if settings is not None:
      res = rerank.rerank(predictions, descs["local"]["queries"], descs["local"]["database"],
                          extractor.layout, settings, global_distances=distances)
      global_rank = global_ranks(predictions, res["predictions"])
      predictions = res["predictions"]
      out["rerank"] = {"ms_per_query": 1000.0 * res["seconds"] / max(vs.num_queries, 1),
                       "method": settings.method, "topk": settings.topk}
      print(f"+R: {settings.describe()} ({out['rerank']['ms_per_query']:.1f} ms per query)",
            flush=True)
  out.update(branch=spec["branch"], checkpoint=os.path.abspath(config.checkpoint), step=step,
             radius=float(ev.radius), image_size=list(size), trained_image_size=list(trained_size),
             files_sha256=layout.files_sha256(vs), split=split,
             database=os.path.dirname(vs.database_paths[0]),
             queries=os.path.dirname(vs.query_paths[0]))
  if parallel.is_main_process():
    files.write_json(wd.recalls_json(split), out)
    if labelled:
      files.write_json(wd.per_query_json(split, spec["branch"]),
                       per_query(rep, root, split, vs))
      if settings is not None:
        files.write_json(wd.per_query_json(split, rerank_key(spec["branch"])),
                         per_query(rep["_rerank"], root, split, vs))
    num_preds = int(ev.get("num_preds_to_save", 0) or 0)
    if num_preds:     # with eval.rerank: the re-ranked top-K, each marked with its global rank
      n = report.save_predictions(os.path.join(wd.eval_split_dir(split), "preds"), vs,
                                  predictions, num_preds, size, float(ev.radius), labelled,
                                  bool(ev.get("save_only_wrong", False)),
                                  global_rank=global_rank)
      print(f"preds: {n} queries -> {os.path.join(wd.eval_split_dir(split), 'preds')}")
    if ev.get("save_descriptors", False):
      for role in ("database", "queries"):
        files.save_npy(os.path.join(wd.eval_split_dir(split), f"{role}_descriptors.npy"),
                       np.asarray(descs[role], np.float32))
  return out


# rerank.Settings fields that decide the extracted local features, and their
# eval.* names: the settings of one `rerank_checkpoint_variants` call agree on them.
EXTRACTION_FIELDS = {"features": "rerank_features", "layer": "rerank_layer",
                     "patch_sizes": "rerank_patch_sizes", "strides": "rerank_patch_strides",
                     "max_features": "rerank_max_features"}


def rerank_checkpoint(config, checkpoint_dir: str, root: str, split: str = "test",
                      store: Optional[str] = None) -> dict:
  """Global retrieval and its re-ranking for one checkpoint on a layout split,
  paired on the same queries: the function ablations call (e.g.
  experiments/synthetic_structure.py on each seed's workdir, or
  experiments/rerank_gardens_point.py), without touching the workdir.

  Args:
    config: a run config whose eval.rerank* fields say how to re-rank
      (eval.rerank must not be "none"); eval.ns, eval.radius, eval.index and
      eval.batch_size apply as in the pipeline's evaluation.
    checkpoint_dir: an Orbax directory, e.g. `Workdir(w).checkpoints("distill")`.
    root: the layout root (e.g. `Workdir(w).data`); split: its split.
    store: a folder to stream descriptors and local features to (float16 local
      features, eval.descriptor_dtype descriptors), else memory.

  Returns:
    {"global": public recall report, "rerank": the re-ranked one (with
     "rerank": settings, ms per query (compilation left out), local bytes
     per image), "per_query": {"global": per_query(...), "rerank": ...},
     "paired": {"R@n": stats.paired_bootstrap of rerank vs global hits}
     (overall and per condition under "per_condition"), "step": checkpoint step}.
  """
  return rerank_checkpoint_variants(config, checkpoint_dir, root, split, [{}], store)[0]


def with_eval(config, overrides: dict):
  """A copy of `config` with config.eval[field] = value for each override; an
  unknown field is an error naming it."""
  c = copy.deepcopy(config)
  for key, value in overrides.items():
    if key not in c.eval:
      raise ValueError(f"eval.{key}: no such field (override {key}={value!r})")
    c.eval[key] = value
  return c


def rerank_checkpoint_variants(config, checkpoint_dir: str, root: str, split: str,
                               variants: Sequence[dict], store: Optional[str] = None) -> list:
  """`rerank_checkpoint` for several re-ranking settings of the same local
  features: the checkpoint is restored and the split described (global
  descriptors, local features) and searched once, then each variant re-ranks
  that search (what a selection grid over methods, top-K and fusion needs).

  Args:
    config, checkpoint_dir, root, split, store: as `rerank_checkpoint`.
    variants: one {eval field: value} per setting, applied over config.eval
      (`with_eval`), e.g. {"rerank": "ransac", "rerank_topk": 10,
      "rerank_global_weight": 1.0}; {} is the config's own setting. They may
      differ in method, top-K, fusion, set weights and the RANSAC model, not
      in what is extracted (`EXTRACTION_FIELDS`: an error naming the field).

  Returns:
    one `rerank_checkpoint` result per variant, in order; "global" and
    per_query["global"] are the same in each (one search, as deep as the
    largest top-K).
  """
  if not len(variants):
    raise ValueError("variants: expected at least one re-ranking setting ({} = the config's)")
  for v in variants:
    if any(not str(key).startswith("rerank") for key in v):
      raise ValueError(f"variants: {dict(v)} sets fields other than eval.rerank*; the "
                       "variants of one call share the global evaluation")
  configs = [with_eval(config, dict(v)) for v in variants]
  settings = []
  for v, c in zip(variants, configs):
    s = rerank_settings(c)
    if s is None:
      raise ValueError("eval.rerank: rerank_checkpoint needs a re-ranking method "
                       f"(one of {rerank.METHODS[1:]}), got 'none'"
                       + (f" (variant {dict(v)})" if v else ""))
    settings.append(s)
  for v, s in zip(variants, settings):
    for attr, field in EXTRACTION_FIELDS.items():
      if getattr(s, attr) != getattr(settings[0], attr):
        raise ValueError(f"eval.{field}: variant {dict(v)} extracts other local features "
                         f"({getattr(s, attr)!r}, the first {getattr(settings[0], attr)!r}); "
                         "evaluate it in a call of its own")
  deepest = max(range(len(settings)), key=lambda i: (settings[i].topk, -i))
  spec, variables, step, _ = checkpoint.restore_variables(checkpoint_dir, config=config)
  mesh = parallel.make_mesh()
  kw = {} if store is None else {"store": store,
                                 "dtype": config.eval.get("descriptor_dtype", "float32")}
  rep = _evaluate_checkpoint(configs[deepest], spec, variables, root, mesh, split, kw)
  vs = config_lib.read_split(config, root, split, spec["view"] == "seg")
  windows = local_layout(spec, settings[0])
  out = []
  for i, (c, s) in enumerate(zip(configs, settings)):
    if i == deepest:
      plus = rep["_rerank"]
    else:
      plus = rerank_report(rep["_search"]["predictions"], rep["_local"], windows, s, vs,
                           tuple(c.eval.ns), float(c.eval.radius), index_from_config(c),
                           global_distances=rep["_search"]["distances"])
    out.append({"global": public(rep), "rerank": public(plus), "step": step,
                "per_query": {"global": per_query(rep, root, split, vs),
                              "rerank": per_query(plus, root, split, vs)},
                "paired": paired_hits(rep["_hits"], plus["_hits"], vs.query_notes())})
  return out


def paired_hits(base: dict, other: dict, notes: Sequence[str]) -> dict:
  """{"R@n": stats.paired_bootstrap(base, other) over all queries, ...,
  "per_condition": {note: {"R@n": ...}}} of two {n: hits [Q]} of the same
  queries (one seed; `notes` the queries' conditions, "" read as "all")."""
  notes = np.asarray(list(notes))
  paired = {f"R@{n}": stats.paired_bootstrap({0: hits}, {0: other[n]})
            for n, hits in base.items()}
  paired["per_condition"] = {
      note or "all": {f"R@{n}": stats.paired_bootstrap({0: np.asarray(hits)[notes == note]},
                                                       {0: np.asarray(other[n])[notes == note]})
                      for n, hits in base.items()}
      for note in sorted(set(notes.tolist()))}
  return paired

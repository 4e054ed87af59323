"""The partition: both frozen stage-1 branches over the training set.

Every training query is described by the seg teacher and the RGB student;
one jitted pass computes retrieval margins and ranks, the groups D1-D4 and
the per-sample distillation weights of Eq. 3 (our reconstruction of the
criterion and the weight: docs/design.md, "Partition and weights").

  <workdir>/partition/partition.npz   groups, weights, margins, ranks [Q]
  <workdir>/partition/summary.json    group counts and mean weights, fields, run id
  <workdir>/partition/groups.png

Before the partition, both stage-1 branches are compared on the val split
(R@1 overall and per query condition; `teacher_vs_student`): recorded in
summary.json as "val_teacher_vs_student" and printed; when the teacher is
not better than the student anywhere (e.g. a segmenter that fails on the
user's images), one warning line says so in the log, summary.json and
report.md, naming the numbers: distilling it can only copy its errors.

With distill.partition = "crossfit" the branches of <workdir>/crossfit/fold<k>
(trained on fold k's places) describe and partition the other fold's queries
against the other fold's database; partition.npz then also holds `fold` [Q].
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import jax
import numpy as np
from absl import logging

from structvpr_jax import checkpoint, config_lib, files, parallel, partition, report, slme
from structvpr_jax.data import input_pipeline, layout
from structvpr_jax.evaluation import RecallEvaluator, extractor_from_config
from structvpr_jax.workdir import Workdir

UPSTREAM = ("rgb", "seg")


def run(config, wd: Workdir, root: str) -> dict:
  """Partitions the training queries of `root`; returns summary.json."""
  with wd.stage_lock("partition"):
    return _run_unlocked(config, wd, root)


def _run_unlocked(config, wd: Workdir, root: str) -> dict:
  """`run` inside the stage lock (`Workdir.stage_lock`)."""
  fields = config_lib.stage_fields(config, "partition")
  crossfit = config.distill.get("partition", "stage1") == "crossfit"
  if crossfit:
    consumed = {f"crossfit/fold{k}/{b}": rid for k in (0, 1)
                for b, rid in wd.crossfit_fold(k).consumed(UPSTREAM).items()}
  else:
    consumed = wd.consumed(UPSTREAM)
  if wd.begin("partition", fields, consumed, config.get("rerun_from", "")) == "done":
    print(f"[partition] already finished ({wd.partition_npz}); skipping")
    return wd.record("partition")
  t0 = time.time()
  mesh = parallel.make_mesh()
  split = config_lib.read_split(config, root, "train", require_segmentations=True)
  print(f"[partition] describing {split.num_queries} queries + {split.num_database} database "
        f"training images with both frozen branches on {mesh.size} device(s) "
        f"[{jax.devices()[0].platform}]; weighting {config.distill.weighting}"
        + ("; cross-fitted (each fold judged by the other fold's branches)" if crossfit
           else ""), flush=True)
  comparison = teacher_vs_student(config, wd, root, mesh)
  warning = teacher_warning(comparison)
  print("[partition] val R@1 teacher (seg) / student (rgb): " + ", ".join(
      f"{c} {comparison['teacher'][c]:.1f} / {comparison['student'][c]:.1f}"
      for c in comparison["teacher"]), flush=True)
  if warning:
    logging.warning("%s", warning)
    print(f"[partition] {warning}", flush=True)
  common = dict(pos_radius=layout.TRAIN_POSITIVE_RADIUS, neg_radius=layout.NEGATIVE_RADIUS,
                tau=config.distill.tau, beta=config.distill.beta,
                kind=config.distill.weighting, mesh=mesh)
  if not crossfit:
    result = _partition_split(config, wd, split, mesh, common)
  else:
    q_fold, db_fold = partition.crossfit_folds(split.query_utm, split.database_utm)
    result = None
    for k in (0, 1):
      held_out = _subsplit(split, q_fold != k, db_fold != k)
      part = _partition_split(config, wd.crossfit_fold(k), held_out, mesh, common)
      if result is None:
        result = {name: np.zeros((split.num_queries,) + v.shape[1:], v.dtype)
                  for name, v in part.items()}
      for name, v in part.items():
        result[name][q_fold != k] = v
    result["fold"] = q_fold
  summary = partition.group_summary(result["groups"], result["weights"])
  summary["weighting"] = config.distill.weighting
  summary["partition"] = "crossfit" if crossfit else "stage1"
  summary["num_queries"] = int(len(result["groups"]))
  summary["val_teacher_vs_student"] = comparison
  summary["teacher_warning"] = warning
  summary["seconds"] = time.time() - t0
  if parallel.is_main_process():
    files.save_npz(wd.partition_npz, **result)
    report.plot_groups(result, wd.groups_png)
  summary = wd.finish("partition", summary, fields, consumed, path=wd.partition_summary)
  parallel.sync("partition done")
  counts = " ".join(f"{k} {v['count']}" for k, v in summary.items()
                    if isinstance(v, dict) and "count" in v)
  print(f"[partition] {counts}")
  return summary


def teacher_vs_student(config, wd: Workdir, root: str, mesh) -> dict:
  """Val R@1 (percent) of the run's stage-1 seg teacher and RGB student,
  overall ("all") and per query condition (the layout's notes).

  Returns:
    {"teacher": {"all": r, <condition>: r, ...}, "student": {...},
     "teacher_better_on": [the keys where the teacher's R@1 is higher]}.
  """
  out = {}
  for role, stage in (("teacher", "seg"), ("student", "rgb")):
    spec, variables, _, _ = checkpoint.restore_variables(wd.checkpoints(stage), config=config)
    vs = config_lib.read_split(config, root, "val", require_segmentations=spec["view"] == "seg")
    rep = RecallEvaluator(spec, root, "val", mesh, config.eval.batch_size, ns=(1,),
                          radius=config.eval.radius, vs=vs,
                          extractor=extractor_from_config(config, spec, mesh)).run(variables)
    rec = {"all": float(rep["R@1"])}
    rec.update({c: float(v["R@1"]) for c, v in sorted(rep.get("per_condition", {}).items())
                if c != "all" and len(rep["per_condition"]) > 1})
    out[role] = rec
  out["teacher_better_on"] = [c for c, r in out["teacher"].items() if r > out["student"][c]]
  return out


def teacher_warning(comparison: dict) -> Optional[str]:
  """One warning line when the teacher is better than the student nowhere on
  val (overall or in any condition), else None."""
  if comparison["teacher_better_on"]:
    return None
  numbers = ", ".join(f"{c} {comparison['teacher'][c]:.1f} / {comparison['student'][c]:.1f}"
                      for c in comparison["teacher"])
  return (f"warning: the seg teacher is not better than the RGB student anywhere on val "
          f"(R@1 teacher / student: {numbers}); distillation can only copy its errors: "
          f"check the label maps (the segmenter on these images) before trusting stage 2")


def _subsplit(split: layout.VprSplit, query_keep, database_keep) -> layout.VprSplit:
  """The queries / database images of `split` selected by the bool masks."""
  q, db = np.flatnonzero(query_keep), np.flatnonzero(database_keep)
  pick = lambda paths, idx: None if paths is None else [paths[i] for i in idx]  # noqa: E731
  return dataclasses.replace(
      split, query_paths=pick(split.query_paths, q), database_paths=pick(split.database_paths, db),
      query_utm=split.query_utm[q], database_utm=split.database_utm[db],
      query_seg_paths=pick(split.query_seg_paths, q),
      database_seg_paths=pick(split.database_seg_paths, db))


def _partition_split(config, branches: Workdir, split: layout.VprSplit, mesh, common) -> dict:
  """partition.partition of `split`'s queries against its database, described
  by the stage-1 checkpoints of `branches` (a workdir with rgb/ and seg/)."""
  descs = {}
  for stage in ("seg", "rgb"):
    spec, variables, _, _ = checkpoint.restore_variables(branches.checkpoints(stage), config=config)
    images = input_pipeline.SplitImages(split, spec["image_size"], views=(spec["view"],),
                                        cache=False, num_classes=slme.NUM_CITYSCAPES_CLASSES)
    extractor = extractor_from_config(config, spec, mesh)
    replicated = parallel.replicate(variables, mesh)
    descs[stage] = (extractor(replicated, images.sources["queries"], progress=True),
                    extractor(replicated, images.sources["database"], progress=True))
  return partition.partition(descs["seg"][0], descs["seg"][1], descs["rgb"][0], descs["rgb"][1],
                             split.query_utm, split.database_utm, **common)

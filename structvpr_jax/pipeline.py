"""The StructVPR run: data -> stage 1 rgb -> stage 1 seg -> partition -> stage 2
-> evaluation -> report, and the single-stage entries of the other modes.

Each stage is skipped when its record in the workdir says it finished with the
same settings, resumed when it started, and refused (one line naming each
differing field) when it ran with other settings, unless `rerun_from` asks to
redo it (see `workdir.Workdir.check_stage`).
"""

from __future__ import annotations

import time

import jax

from structvpr_jax import config_lib, files, parallel
from structvpr_jax.stages import data, distill, evaluate, partition, train
from structvpr_jax.workdir import Workdir


def start(config, wd: Workdir, stages) -> None:
  """Validates the config, checks the workdir's records of `stages` against it
  (one error naming every differing field, before any compute), then writes
  <workdir>/config.json (the config of the latest command that ran)."""
  config_lib.validate_config(config)
  wd.preflight({s: config_lib.stage_fields(config, s) for s in stages},
               config.get("rerun_from", ""))
  if parallel.is_main_process():
    files.write_text(wd.config_json, config.to_json_best_effort(indent=2))


def run_structvpr(config, wd: Workdir) -> dict:
  """The whole method; returns the test table {branch: recall record}."""
  start(config, wd, ("rgb", "seg", "partition", "distill"))
  t0 = time.time()
  print(f"[structvpr] workdir {wd.root}: rgb -> seg -> partition -> distill -> eval on "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es); finished stages are skipped", flush=True)
  root = data.prepare(config, wd)
  train.run(config, wd, "rgb", root)
  train.run(config, wd, "seg", root)
  crossfit_stage1(config, wd, root)
  partition.run(config, wd, root)
  distill.run(config, wd, root)
  table = evaluate.run(config, wd, root)
  print(f"pipeline finished in {time.time() - t0:.0f} s; summary in {wd.eval_summary}")
  return table


def crossfit_stage1(config, wd: Workdir, root: str) -> None:
  """With distill.partition = "crossfit": stage 1 of both branches on each
  spatial fold of the training places (<workdir>/crossfit/fold<k>), so that
  the partition judges every query by branches that never trained on it."""
  if config.distill.get("partition", "stage1") != "crossfit":
    return
  for k, fold_root in enumerate(data.crossfit_layouts(config, wd, root)):
    for branch in ("rgb", "seg"):
      print(f"[crossfit] fold {k}: stage 1 {branch}", flush=True)
      train.run(config, wd.crossfit_fold(k), branch, fold_root)


def run_stage1(config, wd: Workdir, branch: str) -> dict:
  """Stage 1 of one branch alone (modes train_rgb, train_seg)."""
  start(config, wd, (branch,))
  return train.run(config, wd, branch, data.prepare(config, wd))


def run_partition(config, wd: Workdir) -> dict:
  """The partition alone (mode partition); both stage-1 branches must be done."""
  start(config, wd, ("partition",))
  root = data.prepare(config, wd)
  crossfit_stage1(config, wd, root)
  return partition.run(config, wd, root)


def run_eval(config, wd: Workdir) -> dict:
  """Eval mode: one checkpoint directory (config.checkpoint) on data.root."""
  files.write_text(wd.config_json, config.to_json_best_effort(indent=2))
  return evaluate.run_checkpoint(config, wd)

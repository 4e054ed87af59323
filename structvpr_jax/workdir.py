"""The workdir of a run: every path in one object, and each stage's record.

  <root>/config.json                        the config of the latest command
  <root>/metrics.jsonl                      one JSON line per log / val event
  <root>/data/                              generated or converted layout
  <root>/{rgb,seg,distill}/checkpoints/N/   Orbax (best val R@5 + latest)
  <root>/{rgb,seg,distill}/stage.json       fields the stage runs with (at start)
  <root>/{rgb,seg,distill}/done.json        written when the stage finishes
  <root>/partition/{partition.npz,summary.json,groups.png}
  <root>/eval/summary.json, eval/<split>/recalls*.json, eval/*.png
  <root>/report.md, training_curves.png

Stage records. A training stage writes `stage.json` when it starts and
`done.json` when it finishes; the partition and the evaluation keep theirs in
their `summary.json`. Each record holds `config` (the fields the stage
depends on, `config_lib.stage_fields`), `consumed` (the run ids of the
upstream stages it read) and its own `run_id`. `check_stage` compares a
record with the current command: a difference stops the run naming every
field and both values, unless `rerun_from` names this stage or an earlier
one, in which case the stale results are removed and the stage runs again.
Stages handed forward through the workdir never import each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from typing import Iterator, Optional

from structvpr_jax import config_lib, files, parallel

PARTITION = "partition"
EVAL = "eval"


class Workdir:
  """Names every path of a run rooted at `root`."""

  def __init__(self, root: str):
    self.root = root

  # ---- run-level files
  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  @property
  def config_json(self) -> str:
    return self.path("config.json")

  @property
  def metrics(self) -> str:
    return self.path("metrics.jsonl")

  @property
  def data(self) -> str:
    return self.path("data")

  @property
  def report_md(self) -> str:
    return self.path("report.md")

  @property
  def training_curves_png(self) -> str:
    return self.path("training_curves.png")

  # ---- training stages (rgb, seg, distill)
  def stage_dir(self, stage: str) -> str:
    return self.path(stage)

  def checkpoints(self, stage: str) -> str:
    return self.path(stage, "checkpoints")

  def done_json(self, stage: str) -> str:
    return self.path(stage, "done.json")

  def stage_json(self, stage: str) -> str:
    return self.path(stage, "stage.json")

  def done(self, stage: str) -> Optional[dict]:
    """The finished stage's done.json (None while unfinished)."""
    p = self.done_json(stage)
    return files.read_json(p) if os.path.exists(p) else None

  # ---- partition
  @property
  def partition_dir(self) -> str:
    return self.path(PARTITION)

  @property
  def partition_npz(self) -> str:
    return self.path(PARTITION, "partition.npz")

  @property
  def partition_summary(self) -> str:
    return self.path(PARTITION, "summary.json")

  @property
  def groups_png(self) -> str:
    return self.path(PARTITION, "groups.png")

  # ---- cross-fitted partition (distill.partition = "crossfit")
  def crossfit_fold(self, k: int) -> "Workdir":
    """Fold k's own workdir, <workdir>/crossfit/fold<k>: its data/ is the
    layout of fold k's training places, its rgb/ and seg/ the stage-1
    branches trained there (they partition the other fold)."""
    return Workdir(self.path("crossfit", f"fold{k}"))

  # ---- evaluation
  @property
  def eval_dir(self) -> str:
    return self.path(EVAL)

  @property
  def eval_summary(self) -> str:
    return self.path(EVAL, "summary.json")

  def eval_split_dir(self, split: str) -> str:
    return self.path(EVAL, split)

  def recalls_json(self, split: str, stage: Optional[str] = None) -> str:
    return self.path(EVAL, split, "recalls.json" if stage is None else f"recalls_{stage}.json")

  def per_query_json(self, split: str, stage: str) -> str:
    """Per-query hits of one branch: eval/<split>/per_query_<stage>.json."""
    return self.path(EVAL, split, f"per_query_{stage}.json")

  @property
  def recall_png(self) -> str:
    return self.path(EVAL, "recall_at_n.png")

  @property
  def examples_png(self) -> str:
    return self.path(EVAL, "examples.png")

  # ---- stage records
  def record(self, stage: str) -> Optional[dict]:
    """The finished record of any stage: done.json (training stages) or the
    summary.json of the partition / evaluation; None when not finished."""
    if stage in config_lib.TRAIN_STAGES:
      return self.done(stage)
    path = self.partition_summary if stage == PARTITION else self.eval_summary
    if stage == PARTITION and not os.path.exists(self.partition_npz):
      return None
    return files.read_json(path) if os.path.exists(path) else None

  def started_record(self, stage: str) -> Optional[dict]:
    """stage.json of a training stage that has started (finished or not)."""
    p = self.stage_json(stage)
    return files.read_json(p) if os.path.exists(p) else None

  def run_id(self, stage: str) -> Optional[str]:
    rec = self.record(stage)
    return None if rec is None else rec.get("run_id", "unrecorded")

  def consumed(self, stages) -> dict:
    """{stage: run_id} of the finished upstream `stages` a stage reads."""
    out = {}
    for s in stages:
      rid = self.run_id(s)
      if rid is None:
        raise ValueError(f"{self.path(s)}: stage {s!r} has not finished; it must run first")
      out[s] = rid
    return out

  def record_path(self, stage: str) -> str:
    """The file holding a stage's record (done.json or summary.json)."""
    if stage in config_lib.TRAIN_STAGES:
      return self.done_json(stage)
    return self.partition_summary if stage == PARTITION else self.eval_summary

  def preflight(self, fields_by_stage: dict, rerun_from: str = "") -> None:
    """Before any compute: every recorded stage whose fields differ from this
    command's (and that `rerun_from` does not cover) -> one ValueError naming
    each stage, field and both values."""
    problems, first = [], None
    for stage, fields in fields_by_stage.items():
      rec = self.record(stage) or (self.started_record(stage)
                                   if stage in config_lib.TRAIN_STAGES else None)
      if rec is None or "config" not in rec or _allows_rerun(rerun_from, stage):
        continue
      diffs = config_lib.field_differences(rec["config"], fields)
      if diffs and stage in config_lib.TRAIN_STAGES and config_lib.stopping_extension(
          rec["config"], fields, self.record(stage)):
        continue                           # goes on from its latest checkpoint
      if diffs:
        first = first or stage
        where = self.record_path(stage) if self.record(stage) else self.stage_json(stage)
        problems.append(f"stage {stage!r} ({where}): " + "; ".join(diffs))
    if problems:
      raise ValueError(f"{self.root} holds results made with other settings: "
                       + " | ".join(problems) + f". Use another --workdir, or "
                       f"--config.rerun_from={first} to redo that stage and every later one")

  def check_stage(self, stage: str, fields: dict, consumed: dict, rerun_from: str = "") -> str:
    """Compares a stage's record with the current command.

    Returns "done" (finished, same fields and inputs: skip), "resume" (started,
    unfinished, same fields) or "new" (nothing yet, or stale results removed
    because `rerun_from` allows it). Raises ValueError naming each differing
    field (and any upstream stage rerun since) otherwise.
    """
    record = self.record(stage)
    started = self.started_record(stage) if stage in config_lib.TRAIN_STAGES else None
    rec = record or started
    if rec is None:
      return "new"
    if "config" not in rec:   # written before stages recorded their settings
      print(f"[{stage}] {self.path(stage)}: no recorded settings (an older workdir); "
            f"trusting it", flush=True)
      return "done" if record is not None else "resume"
    diffs = config_lib.field_differences(rec.get("config", {}), fields)
    for up, rid in consumed.items():
      was = rec.get("consumed", {}).get(up)
      if was != rid:
        diffs.append(f"input {up}: read run {was}, now run {rid}")
    if not diffs:
      return "done" if record is not None else "resume"
    extension = (config_lib.stopping_extension(rec["config"], fields, record)
                 if stage in config_lib.TRAIN_STAGES and not any(
                     d.startswith("input ") for d in diffs) else None)
    if extension:
      self._extend(stage, rec, fields, record, extension)
      return "resume"
    if _allows_rerun(rerun_from, stage):
      self.remove_stage(stage)
      print(f"[{stage}] recorded results differ from this command ({'; '.join(diffs)}); "
            f"rerun_from={rerun_from!r}: removed, running it again", flush=True)
      return "new"
    raise ValueError(
        f"{self.record_path(stage)}: stage {stage!r} was run with other settings: {'; '.join(diffs)}. "
        f"Use another --workdir, or --config.rerun_from={stage} to redo it and every later "
        f"stage")

  def _extend(self, stage: str, rec: dict, fields: dict, record: Optional[dict],
              extension: str) -> None:
    """A training stage goes on under a more patient early-stopping rule
    (`config_lib.stopping_extension`): its done.json is removed and stage.json
    takes the new fields; its checkpoints and metrics stay, and training
    resumes from the latest checkpoint (kept beside the best one), where the
    stopper re-decides with the new rule. Later stages that read it are
    stale then (their recorded input run changes)."""
    if record is not None:
      where = (f"stopped by {record.get('stop_reason')} after epoch {record.get('epochs')}"
               f" (best epoch {record.get('best_epoch')})")
    else:
      where = "unfinished"
    print(f"[{stage}] {where}; the early-stopping rule changed ({extension}): going on from "
          f"its latest checkpoint, as a run with this rule from the start would", flush=True)
    if parallel.is_main_process():
      files.write_json(self.stage_json(stage), {"stage": stage, "config": fields,
                                                "consumed": rec.get("consumed", {}),
                                                "extended_from": rec["config"]})
      if record is not None:
        os.remove(self.done_json(stage))

  @contextlib.contextmanager
  def stage_lock(self, stage: str) -> Iterator[None]:
    """Holds `<workdir>/.<stage>.lock` (an exclusive `flock`) while a stage runs,
    so two commands on one workdir (e.g. an experiment's chains) never train
    or write the same stage at once: the second waits, saying so, then finds
    the stage finished and skips it. The OS releases the lock when a process
    dies, so a killed run leaves nothing to clean up. Process 0 only (the
    writer; the others meet it at the stage's collectives)."""
    if not parallel.is_main_process():
      yield
      return
    os.makedirs(self.root, exist_ok=True)
    path = self.path(f".{stage}.lock")
    with open(path, "a+") as f:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        print(f"[{stage}] waiting: another process is running stage {stage} in {self.root} "
              f"(lock {path})", flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(f, fcntl.LOCK_UN)

  def begin(self, stage: str, fields: dict, consumed: dict, rerun_from: str = "") -> str:
    """`check_stage`, then (training stages, when new) writes stage.json with
    the fields and inputs the stage starts with. Returns the check's status."""
    status = self.check_stage(stage, fields, consumed, rerun_from)
    if status == "new" and stage in config_lib.TRAIN_STAGES and parallel.is_main_process():
      files.write_json(self.stage_json(stage), {"stage": stage, "config": fields,
                                                "consumed": consumed})
    return status

  def finish(self, stage: str, result: dict, fields: dict, consumed: dict,
             path: Optional[str] = None) -> dict:
    """Writes a finished stage's record: `result` plus its fields, inputs and a
    new run id, to done.json (training stages) or `path`. Returns it."""
    record = {"stage": stage, **result, "config": fields, "consumed": consumed,
              "run_id": new_run_id()}
    if parallel.is_main_process():
      files.write_json(path or self.done_json(stage), record)
    return record

  def remove_stage(self, stage: str) -> None:
    """Deletes a stage's results and its lines in metrics.jsonl."""
    if stage == EVAL:
      _remove_dir(self.eval_dir)
      for p in (self.report_md,):
        if os.path.exists(p):
          os.remove(p)
      return
    _remove_dir(self.path(stage))
    records = files.read_jsonl(self.metrics)
    kept = [r for r in records if r.get("stage") != stage]
    if len(kept) != len(records):
      files.write_text(self.metrics, "".join(json.dumps(r, sort_keys=True) + "\n"
                                             for r in kept))


def _remove_dir(path: str) -> None:
  """Removes a stage's folder; a folder linked from another workdir (an
  experiment's shared stage) loses only the link, never the other's files.
  Anything that cannot be removed raises, so a stage is never rerun on top
  of stale checkpoints."""
  if os.path.islink(path):
    os.unlink(path)
  elif os.path.exists(path):
    shutil.rmtree(path)


def _allows_rerun(rerun_from: str, stage: str) -> bool:
  if not rerun_from:
    return False
  order = config_lib.STAGES
  return order.index(stage) >= order.index(rerun_from)


def new_run_id() -> str:
  """An id naming one finished run of a stage (downstream stages record it)."""
  return uuid.uuid4().hex[:12]

"""Orbax checkpoints: best by validation R@5 plus the latest, for resume.

One `CheckpointManager` per stage, in `<workdir>/<stage>/checkpoints/<step>/`
with these items per step:
  variables  {"params", "batch_stats"} -- all evaluation needs
  opt        {"opt_state", "step", "rng"} -- only for resuming training
  meta       JSON: the branch spec (everything needed to rebuild the model
             without the run's config), the stage, data position, metrics
  mining     the hard-negative mining cache (numpy arrays)
The preservation policy keeps the best checkpoint by `val_R@5` and the
latest one. `restore_variables` rebuilds a model from the checkpoint
directory alone (meta -> spec -> abstract tree -> restore).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from structvpr_jax.models import spec as model_spec

BEST_METRIC = "val_R@5"


TIE_BREAK_METRIC = "val_R@1"
# The fit loop's selection score (train.select_metric with its tie-break,
# early_stopping.selection_score), saved with every checkpoint's metrics;
# checkpoints written before it fall back to val R@5 + 1e-4 val R@1.
SELECT_SCORE = "select_score"


def _metric(metrics) -> float:
  """The selection score when recorded, else val R@5 with ties broken by val R@1
  (small val splits saturate R@5)."""
  if metrics.get(SELECT_SCORE) is not None:
    return float(metrics[SELECT_SCORE])
  return float(metrics.get(BEST_METRIC, -1.0)) + 1e-4 * float(metrics.get(TIE_BREAK_METRIC, 0.0))


def _rank(metrics, step) -> tuple:
  """Checkpoints sort by (selection score, earlier step first among equal
  scores): a tie is not an improvement, as for early stopping."""
  return (_metric(metrics), -float(step))


def manager(directory: str, read_only: bool = False, keep_best: bool = True):
  """A CheckpointManager keeping the latest and the best (by the selection
  score, the earliest of equal scores)."""
  policies = [cm.LatestN(n=1)]
  if keep_best:
    policies.append(cm.BestN(get_metric_fn=lambda m: _rank(m, m.get("step", 0)),
                             reverse=False, n=1,
                             keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=cm.AnyPreservationPolicy(policies),
      enable_async_checkpointing=False, read_only=read_only, create=not read_only)
  mngr = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("variables", "opt", "meta", "mining"))
  if keep_best and not read_only:
    _reload_metrics(mngr)
  return mngr


def _reload_metrics(mngr) -> None:
  """Gives the checkpoints already on disk their metrics (from each step's
  meta item) in a reopened manager. Orbax reads metrics back only for its
  `best_fn` option, not for a preservation policy's BestN: without this, a
  resumed run's next save saw the earlier checkpoints as "without metrics"
  and deleted them, the best one included (tests/test_checkpoint.py)."""
  infos = getattr(mngr, "_checkpoints", None)
  if infos is None:
    raise RuntimeError("orbax CheckpointManager has no _checkpoints: this orbax version "
                       "is not one structvpr_jax.checkpoint supports (see _reload_metrics)")
  for info in infos:
    if info.metrics is None:
      metrics = read_meta(mngr, info.step).get("metrics") or {}
      if metrics:
        info.metrics = {**{k: float(v) for k, v in metrics.items()}, "step": float(info.step)}


def save(mngr, step: int, variables, meta: dict, opt=None, mining: Optional[dict] = None,
         metrics: Optional[dict] = None) -> None:
  """Saves one step (all processes call this; Orbax writes from the primary).

  Orbax writes into a temporary folder and renames it when complete, so an
  interrupted save leaves the previous checkpoints restorable.
  """
  items = {"variables": ocp.args.StandardSave(jax.device_get(variables)),
           "meta": ocp.args.JsonSave(meta)}
  if opt is not None:
    items["opt"] = ocp.args.StandardSave(jax.device_get(opt))
  if mining is not None:
    items["mining"] = ocp.args.StandardSave({k: np.asarray(v) for k, v in mining.items()})
  metrics = {k: float(v) for k, v in (metrics or {}).items()}
  if metrics:
    metrics["step"] = float(step)
  mngr.save(int(step), args=ocp.args.Composite(**items), metrics=metrics, force=True)
  mngr.wait_until_finished()


def best_step(mngr) -> Optional[int]:
  """The step with the highest selection score (val R@5, then R@1, by default),
  the earliest of equal scores (the latest step when none has metrics)."""
  steps = mngr.all_steps()
  if not steps:
    return None
  scored = []
  for s in steps:
    meta = mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta.get("metrics", {}).get(BEST_METRIC) is not None or \
        meta.get("metrics", {}).get(SELECT_SCORE) is not None:
      scored.append((_rank(meta["metrics"], s), s))
  return max(scored)[1] if scored else max(steps)


def read_meta(mngr, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(mngr, step: int, abstract_variables, abstract_opt=None,
            with_mining: bool = False) -> dict:
  """{"variables", "meta", "opt"?, "mining"?} of `step`, restored into the
  given abstract trees (ShapeDtypeStructs)."""
  items = {"variables": ocp.args.StandardRestore(abstract_variables),
           "meta": ocp.args.JsonRestore()}
  if abstract_opt is not None:
    items["opt"] = ocp.args.StandardRestore(abstract_opt)
  has_mining = os.path.isdir(os.path.join(str(mngr.directory), str(step), "mining"))
  if with_mining and has_mining:
    items["mining"] = ocp.args.StandardRestore()
  out = mngr.restore(int(step), args=ocp.args.Composite(**items))
  return {k: out[k] for k in items}


def resolve_directory(path: str) -> tuple[str, Optional[int]]:
  """(manager directory, step or None) from a stage dir, checkpoints dir or step dir."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit() and os.path.isdir(os.path.join(path, "variables")):
    return os.path.dirname(path), int(base)
  return path, None


def abstract_like(tree) -> Any:
  """ShapeDtypeStructs of a (possibly concrete) tree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def restore_variables(checkpoint_dir: str, step: Optional[int] = None, config=None):
  """(spec, variables, step, meta) from a checkpoint directory alone.

  `checkpoint_dir` is a stage folder, its `checkpoints/` folder or one step
  folder; without a step the best one (val R@5, then R@1, then latest).
  With `config` (to run the branch now: evaluation, partition, a teacher,
  extract, localize), the spec's how-to-run fields come from it
  (`models/spec.with_runtime`: model.depthwise, model.fused_blocks), not
  from what the checkpoint was trained with; `meta["spec"]` keeps those.
  """
  directory, step_from_path = resolve_directory(checkpoint_dir)
  if not os.path.isdir(directory):
    raise ValueError(f"checkpoint: {checkpoint_dir} is not a checkpoint directory")
  mngr = manager(directory, read_only=True)
  step = step if step is not None else step_from_path
  step = step if step is not None else best_step(mngr)
  if step is None:
    raise ValueError(f"checkpoint: no checkpoint steps in {directory}")
  meta = read_meta(mngr, step)
  spec = meta["spec"]
  restored = restore(mngr, step, model_spec.abstract_variables(spec))
  if config is not None:
    spec = model_spec.with_runtime(spec, config)
  return spec, restored["variables"], step, meta

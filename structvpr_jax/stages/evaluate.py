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

import os

from structvpr_jax import checkpoint, config_lib, files, parallel, report
from structvpr_jax.data import layout, synthetic
from structvpr_jax.evaluation import RecallEvaluator, index_from_config, pca_from_config, public
from structvpr_jax.workdir import Workdir


def _evaluate_checkpoint(config, spec, variables, root, mesh, split) -> dict:
  pca = pca_from_config(config, spec, variables, root, mesh)
  return RecallEvaluator(spec, root, split, mesh, config.eval.batch_size,
                         tuple(config.eval.ns), config.eval.radius, progress=True,
                         index=index_from_config(config)).run(variables, pca)


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
    spec, variables, step, _ = checkpoint.restore_variables(wd.checkpoints(stage))
    rep = _evaluate_checkpoint(config, spec, variables, root, mesh, split)
    predictions[stage] = (spec, rep["_predictions"])
    record = public(rep)
    record.update(branch=stage, label=label, step=step,
                  checkpoint=os.path.join(wd.checkpoints(stage), str(step)))
    table[stage] = record
    if parallel.is_main_process():
      files.write_json(wd.recalls_json(split, stage), record)
      files.write_json(wd.per_query_json(split, stage), per_query(rep, root, split),
                       indent=None)
      if stage == "distill":  # the deliverable: the distilled RGB branch
        files.write_json(wd.recalls_json(split), record)
  wd.finish("eval", {"split": split, "branches": table}, fields, consumed,
            path=wd.eval_summary)
  if parallel.is_main_process():
    write_figures_and_report(config, wd, root, split, predictions)
  print(report.format_table(table))
  return table


def per_query(report: dict, root: str, split: str) -> dict:
  """{"queries": [file names], "conditions": [note], "hits": {"R@n": [0/1]}} in the
  split's query order (sorted names): what paired comparisons of two branches
  or runs on the same queries need."""
  vs = layout.read_split(root, split)
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
  """Eval mode: restore `config.checkpoint`, evaluate it on `data.root`'s
  `eval_split`, write <workdir>/eval/<split>/recalls.json."""
  if not config.get("checkpoint"):
    raise ValueError("checkpoint: set --config.checkpoint=DIR (an Orbax checkpoint directory)")
  if config.data.name == "folder" and not config.data.root:
    raise ValueError("data.root is not set: give the layout folder to evaluate on with "
                     "--config.data.root=DIR")
  root = config.data.root or wd.data
  spec, variables, step, _ = checkpoint.restore_variables(config.checkpoint)
  split = config.get("eval_split", "test")
  mesh = parallel.make_mesh()
  out = public(_evaluate_checkpoint(config, spec, variables, root, mesh, split))
  out.update(branch=spec["branch"], checkpoint=os.path.abspath(config.checkpoint), step=step)
  if parallel.is_main_process():
    files.write_json(wd.recalls_json(split), out)
  return out

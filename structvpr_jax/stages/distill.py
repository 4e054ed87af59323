"""Stage 2: distill the seg teacher into the RGB student.

The student (the RGB branch, initialised from stage 1's best checkpoint)
trains with the triplet margin loss plus the per-sample weighted
distillation term towards the frozen seg teacher, restored read-only and
never re-saved; the weights are the partition's Eq. 3 weights. The KD form
(`distill.kd`: feature, adaptor, relational) is ours, see losses.py; the
adaptor's head trains with the student and is not part of its checkpoint.

  <workdir>/distill/checkpoints/N/, stage.json, done.json   as stage 1
"""

from __future__ import annotations

import numpy as np

from structvpr_jax import checkpoint, config_lib, losses, parallel, partition, train_lib
from structvpr_jax.data import layout
from structvpr_jax.models import spec as model_spec
from structvpr_jax.workdir import Workdir

UPSTREAM = ("rgb", "seg", "partition")


def run(config, wd: Workdir, root: str) -> dict:
  """Trains the distilled RGB branch on the layout at `root`; returns done.json."""
  with wd.stage_lock("distill"):
    return _run_unlocked(config, wd, root)


def _run_unlocked(config, wd: Workdir, root: str) -> dict:
  """`run` inside the stage lock (`Workdir.stage_lock`)."""
  stage = "distill"
  fields = config_lib.stage_fields(config, stage)
  consumed = wd.consumed(UPSTREAM)
  if wd.begin(stage, fields, consumed, config.get("rerun_from", "")) == "done":
    done = wd.done(stage)
    print(f"[{stage}] already finished: {train_lib.finished_line(done)}")
    return done
  spec = model_spec.branch_spec(config, stage)
  mesh = parallel.make_mesh()
  split = config_lib.read_split(config, root, "train", require_segmentations=True)
  teacher_spec, teacher_host, _, _ = checkpoint.restore_variables(wd.checkpoints("seg"),
                                                                  config=config)
  weights = np.load(wd.partition_npz)["weights"].astype(np.float32)
  if len(weights) != len(split.query_paths):
    raise ValueError(f"{wd.partition_npz} has {len(weights)} weights for "
                     f"{len(split.query_paths)} training queries: rerun the partition "
                     f"(--config.rerun_from=partition)")
  kd = config.distill.get("kd", "feature")
  heads = ({train_lib.ADAPTOR: losses.adaptor_init(spec["num_clusters"] * spec["dim"])}
           if kd == "adaptor" else {})
  teacher = train_lib.Teacher(spec=teacher_spec,
                              variables=parallel.replicate(teacher_host, mesh),
                              weights=weights, lambda_kd=float(config.distill.lambda_kd),
                              kd=kd, temperature=float(config.distill.get("temperature", 0.1)),
                              teacher_temperature=float(
                                  config.distill.get("teacher_temperature", 0.0)),
                              normalize=partition.kd_normalization(config.distill.weighting),
                              loss_heads=heads)

  def init_variables(database, tc):
    if config.distill.get("init_from_rgb", True):
      return checkpoint.restore_variables(wd.checkpoints("rgb"))[1]
    return train_lib.fresh_variables(spec, config.seed, database, mesh, tc,
                                     config.eval.batch_size)

  result = train_lib.train_stage(config, stage=stage, spec=spec, split=split, root=root,
                                 views=("rgb", "seg"), mesh=mesh,
                                 checkpoint_dir=wd.checkpoints(stage), metrics_path=wd.metrics,
                                 init_variables=init_variables, teacher=teacher)
  done = wd.finish(stage, result, fields, consumed)
  parallel.sync(f"{stage} done")
  return done

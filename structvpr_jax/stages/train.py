"""Stage 1: train one branch alone (RGB, or seg on SLME-encoded label maps).

  <workdir>/<branch>/checkpoints/N/   best val R@5 + latest (spec in meta)
  <workdir>/<branch>/stage.json       the fields it started with
  <workdir>/<branch>/done.json        best step, val R@5, its fields, run id

The branch starts from its init (ImageNet for RGB when found, random for
seg) with NetVLAD centroids from k-means on its own local features, and
trains with the triplet margin loss on mined hard negatives.
"""

from __future__ import annotations

from absl import logging

from structvpr_jax import config_lib, parallel, train_lib
from structvpr_jax.data import layout
from structvpr_jax.models import spec as model_spec
from structvpr_jax.workdir import Workdir

BRANCHES = ("rgb", "seg")


def run(config, wd: Workdir, branch: str, root: str) -> dict:
  """Trains `branch` ("rgb" | "seg") on the layout at `root`; returns done.json.

  Skipped when finished with the same settings; resumed when started.
  """
  with wd.stage_lock(branch):
    return _run_unlocked(config, wd, branch, root)


def _run_unlocked(config, wd: Workdir, branch: str, root: str) -> dict:
  """`run` inside the stage lock (`Workdir.stage_lock`)."""
  if branch not in BRANCHES:
    raise ValueError(f"stage 1 trains 'rgb' or 'seg', not {branch!r}")
  fields = config_lib.stage_fields(config, branch)
  status = wd.begin(branch, fields, {}, config.get("rerun_from", ""))
  if status == "done":
    done = wd.done(branch)
    logging.info("stage %s already finished (%s); skipping", branch, wd.done_json(branch))
    print(f"[{branch}] already finished: {train_lib.finished_line(done)}")
    return done
  spec = model_spec.branch_spec(config, branch)
  mesh = parallel.make_mesh()
  split = config_lib.read_split(config, root, "train", require_segmentations=branch == "seg")

  def init_variables(database, tc):
    return train_lib.fresh_variables(spec, config.seed, database, mesh, tc,
                                     config.eval.batch_size)

  result = train_lib.train_stage(config, stage=branch, spec=spec, split=split, root=root,
                                 views=(spec["view"],), mesh=mesh,
                                 checkpoint_dir=wd.checkpoints(branch), metrics_path=wd.metrics,
                                 init_variables=init_variables)
  done = wd.finish(branch, result, fields, {})
  parallel.sync(f"{branch} done")
  return done

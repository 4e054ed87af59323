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

from structvpr_jax import config_lib, files, parallel, train_lib
from structvpr_jax.data import layout
from structvpr_jax.evaluation import Extractor, RecallEvaluator
from structvpr_jax.models import spec as model_spec
from structvpr_jax.workdir import Workdir

BRANCHES = ("rgb", "seg")


def run(config, wd: Workdir, branch: str, root: str) -> dict:
  """Trains `branch` ("rgb" | "seg") on the layout at `root`; returns done.json.

  Skipped when finished with the same settings; resumed when started.
  """
  if branch not in BRANCHES:
    raise ValueError(f"stage 1 trains 'rgb' or 'seg', not {branch!r}")
  fields = config_lib.stage_fields(config, branch)
  status = wd.begin(branch, fields, {}, config.get("rerun_from", ""))
  if status == "done":
    done = wd.done(branch)
    logging.info("stage %s already finished (%s); skipping", branch, wd.done_json(branch))
    print(f"[{branch}] already finished: best val R@5 {done.get('best_val_R@5')}")
    return done
  tc = config_lib.stage_train_config(config, branch)
  spec = model_spec.branch_spec(config, branch)
  mesh = parallel.make_mesh()
  split = layout.read_split(root, "train", require_segmentations=branch == "seg")
  views = (spec["view"],)
  batcher = train_lib.make_batcher(
      split, spec, views, tc, config.seed + train_lib.MINING_SEED_OFFSET[branch],
      num_threads=int(config.data.get("num_threads", 2)),
      prefetch=int(config.data.get("prefetch", 2)))
  extractor = Extractor(spec, mesh, config.eval.batch_size)
  val = RecallEvaluator(spec, root, "val", mesh, config.eval.batch_size, tuple(config.eval.ns),
                        config.eval.radius, extractor=extractor)

  def init_variables():
    return train_lib.fresh_variables(spec, config.seed, batcher.images.sources["database"],
                                     mesh, tc, config.eval.batch_size)

  result = train_lib.fit(stage=branch, spec=spec, tc=tc, mesh=mesh, batcher=batcher,
                         views=views, checkpoint_dir=wd.checkpoints(branch),
                         init_variables=init_variables, extractor=extractor,
                         validate=val.run, metrics=files.MetricsWriter(
                             wd.metrics, parallel.is_main_process()),
                         seed=config.seed)
  done = wd.finish(branch, result, fields, {})
  parallel.sync(f"{branch} done")
  return done

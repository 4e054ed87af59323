"""The partition: both frozen stage-1 branches over the training set.

Every training query is described by the seg teacher and the RGB student;
one jitted pass computes retrieval margins and ranks, the groups D1-D4 and
the per-sample distillation weights of Eq. 3 (our reconstruction of the
criterion and the weight: docs/design.md, "Partition and weights").

  <workdir>/partition/partition.npz   groups, weights, margins, ranks [Q]
  <workdir>/partition/summary.json    group counts and mean weights, fields, run id
  <workdir>/partition/groups.png
"""

from __future__ import annotations

import time

import jax

from structvpr_jax import checkpoint, config_lib, files, parallel, partition, report, slme
from structvpr_jax.data import input_pipeline, layout
from structvpr_jax.evaluation import Extractor
from structvpr_jax.workdir import Workdir

UPSTREAM = ("rgb", "seg")


def run(config, wd: Workdir, root: str) -> dict:
  """Partitions the training queries of `root`; returns summary.json."""
  fields = config_lib.stage_fields(config, "partition")
  consumed = wd.consumed(UPSTREAM)
  if wd.begin("partition", fields, consumed, config.get("rerun_from", "")) == "done":
    print(f"[partition] already finished ({wd.partition_npz}); skipping")
    return wd.record("partition")
  t0 = time.time()
  mesh = parallel.make_mesh()
  split = layout.read_split(root, "train", require_segmentations=True)
  print(f"[partition] describing {split.num_queries} queries + {split.num_database} database "
        f"training images with both frozen branches on {mesh.size} device(s) "
        f"[{jax.devices()[0].platform}]; weighting {config.distill.weighting}", flush=True)
  descs = {}
  for stage in ("seg", "rgb"):
    spec, variables, _, _ = checkpoint.restore_variables(wd.checkpoints(stage))
    images = input_pipeline.SplitImages(split, spec["image_size"], views=(spec["view"],),
                                        cache=False, num_classes=slme.NUM_CITYSCAPES_CLASSES)
    extractor = Extractor(spec, mesh, config.eval.batch_size)
    replicated = parallel.replicate(variables, mesh)
    descs[stage] = (extractor(replicated, images.sources["queries"], progress=True),
                    extractor(replicated, images.sources["database"], progress=True))
  result = partition.partition(
      descs["seg"][0], descs["seg"][1], descs["rgb"][0], descs["rgb"][1], split.query_utm,
      split.database_utm, pos_radius=layout.TRAIN_POSITIVE_RADIUS,
      neg_radius=layout.NEGATIVE_RADIUS, tau=config.distill.tau, beta=config.distill.beta,
      kind=config.distill.weighting, mesh=mesh)
  summary = partition.group_summary(result["groups"], result["weights"])
  summary["weighting"] = config.distill.weighting
  summary["num_queries"] = int(len(result["groups"]))
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

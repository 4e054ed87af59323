"""Stage 0: the layout folder every later stage reads.

`data.name`: "synthetic" generates the embedded synthetic city into
<workdir>/data (skipped when already there with the same parameters); a
preset name (`convert.PRESETS`, e.g. "gardens_point") converts `data.source`
into <workdir>/data; "folder" uses `data.root` as it is.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from structvpr_jax import config_lib, parallel, partition
from structvpr_jax.data import convert, layout, records, synthetic
from structvpr_jax.workdir import Workdir


def prepare(config, wd: Workdir) -> str:
  """The layout root of this run (generated / converted on process 0), with
  its records exported when data.format="array_record"."""
  with wd.stage_lock("data"):
    return _prepare_unlocked(config, wd)


def _prepare_unlocked(config, wd: Workdir) -> str:
  """`prepare` inside the stage lock (`Workdir.stage_lock`)."""
  root = _layout_root(config, wd)
  ensure_records(config, root)
  return root


def ensure_records(config, root: str) -> None:
  """data.format="array_record": writes <root>/records/<H>x<W> once (process
  0). A finished export of the same files is reused, also one of only some
  splits (`export-records --splits train`: the others decode their files);
  one of other files stops the run naming the folder."""
  where = config_lib.records_dir(config, root)
  if where is None:
    return
  splits = layout.SPLITS
  if os.path.isfile(os.path.join(where, records.MANIFEST)):   # e.g. `--splits train` only
    splits = sorted({name.rsplit("_", 1)[0] for name in records.read_manifest(where)["splits"]})
  if parallel.is_main_process():
    records.export(root, tuple(config.data.image_size), where, splits=splits,
                   num_threads=int(config.data.get("num_threads", 2)))
  parallel.sync("records export")


def _layout_root(config, wd: Workdir) -> str:
  if config.data.name == "synthetic":
    if parallel.is_main_process():
      synthetic.generate(wd.data, seed=config.seed, image_size=tuple(config.data.image_size),
                         num_places=dict(config.data.synthetic_places),
                         queries_per_place=config.data.get("queries_per_place", 1),
                         progress=sys.stderr.isatty())
    parallel.sync("synthetic data")
    return wd.data
  if config.data.name in convert.PRESETS:
    if parallel.is_main_process():
      convert.convert_preset(config.data.name, config.data.source, wd.data,
                             max_side=int(config.data.get("max_side", 0)) or None,
                             verbose=True)
    parallel.sync(f"{config.data.name} conversion")
    return wd.data
  if not config.data.root:
    raise ValueError("data.root is not set: give the layout folder with "
                     "--config.data.root=DIR (data.name='folder')")
  return config.data.root


def crossfit_layouts(config, wd: Workdir, root: str) -> list:
  """The two fold layouts of the cross-fitted partition (distill.partition =
  "crossfit"): <workdir>/crossfit/fold<k>/data holds fold k's training
  queries and database (`partition.crossfit_folds`, links to `root`'s files)
  and links `root`'s val and test splits. Returns [fold 0 root, fold 1 root].
  """
  split = layout.read_split(root, "train")
  q_fold, db_fold = partition.crossfit_folds(split.query_utm, split.database_utm)
  roots = [wd.crossfit_fold(k).data for k in (0, 1)]
  if parallel.is_main_process():
    for k, fold_root in enumerate(roots):
      layout.write_subset(split, fold_root, q_fold == k, db_fold == k)
      print(f"[crossfit] fold {k}: {int(np.sum(q_fold == k))} training queries, "
            f"{int(np.sum(db_fold == k))} database images -> {fold_root}", flush=True)
  parallel.sync("crossfit layouts")
  for fold_root in roots:
    ensure_records(config, fold_root)
  return roots

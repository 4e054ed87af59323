"""Stage 0: the layout folder every later stage reads.

`data.name`: "synthetic" generates the embedded synthetic city into
<workdir>/data (skipped when already there with the same parameters); a
preset name (`convert.PRESETS`, e.g. "gardens_point") converts `data.source`
into <workdir>/data; "folder" uses `data.root` as it is.
"""

from __future__ import annotations

import sys

from structvpr_jax import parallel
from structvpr_jax.data import convert, synthetic
from structvpr_jax.workdir import Workdir


def prepare(config, wd: Workdir) -> str:
  """The layout root of this run (generated / converted on process 0)."""
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

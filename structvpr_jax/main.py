"""Entry point: parse flags and a config file, log the environment, dispatch.

  python -m structvpr_jax.main --config=configs/distill.py [--workdir=DIR]
      [--config.field=value ...]
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default runs/<config name>).")


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", name)


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/distill.py")
  if config.get("distributed", False):
    from structvpr_jax import parallel
    parallel.initialize_distributed()
  import flax
  import jax
  workdir = _WORKDIR.value or config.get("workdir") or default_workdir(
      flags.FLAGS["config"].config_filename)
  logging.info("jax %s, flax %s; process %d/%d; devices: %s", jax.__version__,
               flax.__version__, jax.process_index(), jax.process_count(), jax.devices())
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  if config.mode == "distill":
    from structvpr_jax.data import synthetic
    if config.data.name != "synthetic":
      raise app.UsageError("data.name='folder' training lands with the pipeline issue")
    root = os.path.join(workdir, "data")
    synthetic.generate(root, seed=config.seed, image_size=tuple(config.data.image_size),
                       num_places=dict(config.data.synthetic_places),
                       progress=sys.stderr.isatty())
    with open(os.path.join(root, "synthetic.json")) as f:
      info = json.load(f)
    print(f"synthetic city ready in {root}: "
          f"{json.dumps(info.get('counts', {}), sort_keys=True)}")
    print("stage 1 / partition / stage 2 / evaluation are not implemented yet (issue 4).")
  else:
    raise app.UsageError(f"unknown config.mode {config.mode!r}")


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())  # so config files can `from configs import base`
  app.run(main)

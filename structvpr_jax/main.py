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
  if not flags.FLAGS["verbosity"].present:  # Orbax/absl INFO chatter: opt in with --verbosity=0
    logging.set_verbosity(logging.WARNING)
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
  _enable_compilation_cache(config)
  from structvpr_jax import evaluate, train
  mode = config.mode
  if mode == "distill":
    train.run_structvpr(config, workdir)
  elif mode in ("train_rgb", "train_seg"):
    train.train_stage(config, workdir, mode.split("_")[1])
  elif mode == "partition":
    train.run_partition(config, workdir)
  elif mode == "eval":
    out = evaluate.run(config, workdir)
    print(json.dumps({k: v for k, v in out.items() if k.startswith("R@")}))
  elif mode == "segment":
    from structvpr_jax import segment
    segment.run(config)
  else:
    raise app.UsageError(f"unknown config.mode {mode!r}")


def _enable_compilation_cache(config) -> None:
  """JAX persistent compilation cache (reruns and later stages skip XLA compiles)."""
  import jax
  path = config.get("compilation_cache", "default")
  if path == "default":
    path = os.path.join(os.path.expanduser("~"), ".cache", "structvpr_jax", "xla")
  if path:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())  # so config files can `from configs import base`
  app.run(main)

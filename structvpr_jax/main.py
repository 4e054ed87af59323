"""Entry point: parse flags and a config file, log the environment, dispatch.

  python -m structvpr_jax.main --config=configs/distill.py [--workdir=DIR]
      [--config.field=value ...]
"""

import json
import os
import sys

if __name__ == "__main__":
  # glibc reads its tunables at process start: re-execute once with
  # transparent huge pages for malloc (XLA:CPU temporaries), measured 1.5x
  # on forward and train steps here; see structvpr_jax/hugepages.py.
  from structvpr_jax import hugepages
  hugepages.reexec_with_hugepages()

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default runs/<config name>).")


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", name)


# Errors that mean "bad input or a stopped run", reported as one line (exit 2)
# unless --verbosity is given, in which case the traceback is shown too.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError,
               KeyError, OSError)


def main(argv):
  verbose = flags.FLAGS["verbosity"].present
  if not verbose:  # Orbax/absl INFO chatter: opt in with --verbosity=0
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().addFilter(_drop_orbax_read_only_notes)
  try:
    _main(argv)
  except USER_ERRORS as e:
    if verbose:
      raise
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def _drop_orbax_read_only_notes(record) -> bool:
  """Orbax warns on every read-only CheckpointManager (how eval and the teacher
  open checkpoints on purpose); keep every other warning."""
  msg = str(record.msg).lower().replace("_", " ")
  return not (record.pathname.endswith("checkpoint_manager.py") and "read only" in msg)


def _main(argv):
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
  logging.info("jax %s, flax %s; process %d/%d; devices: %s; GLIBC_TUNABLES=%r",
               jax.__version__, flax.__version__, jax.process_index(), jax.process_count(),
               jax.devices(), os.environ.get("GLIBC_TUNABLES", ""))
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(path + ".tmp", path)
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
  elif mode == "extract":
    from structvpr_jax import localize
    localize.run_extract(config, workdir)
  elif mode == "localize":
    from structvpr_jax import localize
    localize.run_localize(config, workdir)
  elif mode == "report":
    from structvpr_jax import report
    print(f"report: {report.write_report(workdir)}")
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


def _parse_flags(argv):
  """absl flag parsing; a bad --config.<field> override is one error line (exit 2)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error:
    raise
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    if "--verbosity" in " ".join(argv):
      raise
    name = str(e).strip("'\" ")
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    culprit = [a for a in overrides if name and name in a.split("=")[0]] or overrides
    field = culprit[0].split("=")[0][len("--"):] if culprit else "--config"
    print(f"error: {field}: unknown or invalid config field ({type(e).__name__}: {name}); "
          f"see the config file for the available fields", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())  # so config files can `from configs import base`
  app.run(main, flags_parser=_parse_flags)

"""Entry point: parse flags and a config file, log the environment, hand over.

  python -m structvpr_jax.main --config=configs/distill.py [--workdir=DIR]
      [--config.field=value ...]

`config.mode` picks the entry in `MODES` (a dict, flax/scenic style); each
takes (config, workdir.Workdir). Bad input is one `error:` line, exit 2.
"""

import json
import os
import sys

if __name__ == "__main__":
  # glibc reads its tunables at process start: re-execute once with
  # transparent huge pages for malloc and XLA:CPU temporaries kept between
  # runs (measured 1.5x and then 1.1x on train steps here); see
  # structvpr_jax/hugepages.py.
  from structvpr_jax import hugepages, xla_flags
  hugepages.reexec_with_hugepages()
  # XLA:CPU options read when the backend starts (structvpr_jax/xla_flags.py).
  xla_flags.apply()

import flax  # noqa: E402
import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

# Importing the package runs no JAX computation, so jax.distributed can still
# be initialised in _main (tested: tests/test_multihost.py).
from structvpr_jax import files, hugepages, localize, parallel, pipeline  # noqa: E402
from structvpr_jax import report, workdir  # noqa: E402
from structvpr_jax.data import segment  # noqa: E402

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


def _run_extract(config, wd):
  return localize.run_extract(config, wd)


def _run_localize(config, wd):
  return localize.run_localize(config, wd)


def _run_eval(config, wd):
  out = pipeline.run_eval(config, wd)  # writes config.json
  print(json.dumps({k: v for k, v in out.items() if k.startswith("R@")}))
  return out


def _run_report(config, wd):
  del config
  print(f"report: {report.write_report(wd)}")


def _run_segment(config, wd):
  del wd
  return segment.run(config)


# config.mode -> entry(config, Workdir). "distill" is the original name of the
# whole-pipeline mode (configs/distill.py keeps it); "structvpr" is the same.
MODES = {
    "structvpr": lambda c, wd: pipeline.run_structvpr(c, wd),
    "distill": lambda c, wd: pipeline.run_structvpr(c, wd),
    "train_rgb": lambda c, wd: pipeline.run_stage1(c, wd, "rgb"),
    "train_seg": lambda c, wd: pipeline.run_stage1(c, wd, "seg"),
    "partition": lambda c, wd: pipeline.run_partition(c, wd),
    "eval": _run_eval,
    "extract": _run_extract,
    "localize": _run_localize,
    "report": _run_report,
    "segment": _run_segment,
}


# Modes whose workdir gets the command's config.json here; the pipeline modes
# write it themselves once the workdir's records agree with the command, and
# report mode only reads what the stages recorded.
WRITES_CONFIG = ("extract", "localize", "segment")


def _main(argv):
  del argv
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/distill.py")
  if config.mode not in MODES:
    raise app.UsageError(f"unknown config.mode {config.mode!r}; expected one of "
                         f"{sorted(MODES)}")
  if config.get("distributed", False):
    parallel.initialize_distributed()
  root = _WORKDIR.value or config.get("workdir") or default_workdir(
      flags.FLAGS["config"].config_filename)
  logging.info("jax %s, flax %s; process %d/%d; devices: %s; GLIBC_TUNABLES=%r",
               jax.__version__, flax.__version__, jax.process_index(), jax.process_count(),
               jax.devices(), os.environ.get("GLIBC_TUNABLES", ""))
  wd = workdir.Workdir(root)
  os.makedirs(root, exist_ok=True)
  if parallel.is_main_process() and config.mode in WRITES_CONFIG:
    files.write_text(wd.config_json, config.to_json_best_effort(indent=2))
  _enable_compilation_cache(config)
  MODES[config.mode](config, wd)


def _enable_compilation_cache(config) -> None:
  """JAX persistent compilation cache (reruns and later stages skip XLA compiles)."""
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
  # where glibc keeps freed blocks (the tunables of the re-exec above), run
  # each computation on this thread so its temporaries are kept (hugepages.py)
  hugepages.configure_jax()
  app.run(main, flags_parser=_parse_flags)

"""XLA:CPU options the entry points set for themselves (before JAX starts).

`--xla_cpu_enable_concurrency_optimized_scheduler=false`: XLA:CPU's default
scheduler orders a program for concurrency, which keeps more temporaries
alive at once. Measured on this project's 2-core machine:
- the compiled RGB train step of 2 triplets x 6 images at 480x640 needs
  5.1 GB of temporaries instead of 10.5 GB (experiments/performance/step_memory.py); a
  short 480x640 RGB stage peaks at 7.9 instead of 13.1 GB RSS
  (experiments/performance/scale.py);
- with huge pages (what the entry points run with) speed is unchanged within
  noise (frozen step at 224: 27.4 vs 28.2 img/s, 2 rounds of fresh
  processes, experiments/results/xla_cpu_flags.md);
- descriptors are bitwise equal (scheduling does not change what is computed).
It was found with experiments/performance/xla_cpu_flags.py among the options of this
jaxlib's flag reference; none of the others (XNNPACK / oneDNN fusion, fast
math, vector width, the memory-optimised scheduler) was faster beyond noise.

The option is appended to XLA_FLAGS unless XLA_FLAGS already names it (the
user's choice wins) or STRUCTVPR_NO_XLA_DEFAULTS=1. Only the CPU backend
reads it. Standard library only: it runs before JAX is imported.
"""

from __future__ import annotations

import os

DEFAULT_CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)
OPT_OUT_ENV = "STRUCTVPR_NO_XLA_DEFAULTS"


def with_defaults(environ=None) -> dict:
  """A copy of `environ` with `DEFAULT_CPU_FLAGS` appended to XLA_FLAGS
  (each unless XLA_FLAGS already sets that option, or the opt-out is set)."""
  env = dict(os.environ if environ is None else environ)
  if env.get(OPT_OUT_ENV, "") not in ("", "0"):
    return env
  flags = env.get("XLA_FLAGS", "")
  present = {f.split("=", 1)[0] for f in flags.split()}
  extra = [f for f in DEFAULT_CPU_FLAGS if f.split("=", 1)[0] not in present]
  if extra:
    env["XLA_FLAGS"] = " ".join([flags] + extra if flags else extra)
  return env


def apply() -> None:
  """Sets the defaults in this process's environment (call before importing jax)."""
  env = with_defaults()
  if env.get("XLA_FLAGS") is not None:
    os.environ["XLA_FLAGS"] = env["XLA_FLAGS"]

"""glibc malloc settings for XLA:CPU buffers (Linux, glibc): huge pages, and
temporaries kept between runs.

XLA:CPU allocates the temporary buffers of every executable run afresh
(419 MB for the MobileNetV2 train step at 224: 4 triplets x 3 images).
glibc serves an allocation that large with a fresh mmap and returns it with
munmap, so every run faults the whole block in again and the kernel zeroes
it. Two steps, measured on this project's 2-core VM:

1. Huge pages (`glibc.malloc.hugetlb=1`): on a kernel whose THP mode is
   `madvise` (the common default), each first touch was a 4 KiB page fault:
   47.6k minor faults per call of a 190 MB-temporary kernel, 142 ms wall,
   172 ms system CPU; with the tunable malloc asks for transparent huge
   pages: 620 faults, 68 ms. On the whole model forward 16x224x224 went
   from 52 to 79 img/s, the 4-triplet train step from 4.8 to 7.5 img/s
   (experiments/performance/bench.py).
2. Keeping the block (`glibc.malloc.mmap_max=0`,
   `glibc.malloc.trim_threshold` 16 GiB, and JAX's synchronous dispatch on
   the CPU, `configure_jax`): the run then executes on the calling thread,
   whose allocations come from glibc's main arena; with mmap off and no
   trimming that arena keeps the freed block for the next run. Train step
   at 224 (`experiments/performance/step_faults.py --steps 20`): 707 -> 0 minor faults
   and 28 -> 1.7 ms system CPU per step, 131 -> 117 ms wall. Either half
   alone changes nothing (729 and 741 faults): asynchronous dispatch runs
   on a worker thread, whose arena falls back to mmap above 64 MB whatever
   the tunables say; synchronous dispatch without them still mmaps. Multi-device programs
   (the simulated 8-device CPU mesh) run their devices on worker threads
   as before.

The tunables are read by glibc at process start, so an entry point that
wants them re-executes itself once with `GLIBC_TUNABLES` extended
(`reexec_with_hugepages`) and, after importing JAX, calls `configure_jax`.
A tunable the user already set (by name) is left as it is. Nothing changes
numerically; opt out of all of it with `STRUCTVPR_NO_HUGEPAGES=1`.
"""

from __future__ import annotations

import os
import platform
import sys

HUGE_PAGES = "glibc.malloc.hugetlb=1"
KEEP_BUFFERS = ("glibc.malloc.mmap_max=0", "glibc.malloc.trim_threshold=17179869184")
TUNABLES = (HUGE_PAGES,) + KEEP_BUFFERS
OPT_OUT_ENV = "STRUCTVPR_NO_HUGEPAGES"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _names(tunables) -> set:
  """The names set in a GLIBC_TUNABLES value or list ("a=1:b=2" -> {"a", "b"})."""
  items = tunables.split(":") if isinstance(tunables, str) else tunables
  return {t.split("=", 1)[0] for t in items if t}


def thp_mode(path: str = _THP_MODE) -> str:
  """The kernel's THP mode ("always", "madvise", "never"), "" when unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return ""
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else ""


def useful(environ=None, mode: str | None = None) -> bool:
  """True when re-executing with the tunables would change anything: Linux +
  glibc, a wanted tunable not yet set (by name), and no opt-out. Huge pages
  matter only in THP mode `madvise` (`mode`, default: the kernel's), so
  outside it only `KEEP_BUFFERS` are wanted."""
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT_ENV, "") not in ("", "0"):
    return False
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return False
  wanted = TUNABLES if (thp_mode() if mode is None else mode) == "madvise" else KEEP_BUFFERS
  return not _names(wanted) <= _names(environ.get("GLIBC_TUNABLES", ""))


def environ_with_hugepages(environ=None) -> dict:
  """A copy of `environ` with each of `TUNABLES` whose name GLIBC_TUNABLES
  does not set yet appended to it."""
  env = dict(os.environ if environ is None else environ)
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  present = _names(tunables)
  env["GLIBC_TUNABLES"] = ":".join(tunables + [t for t in TUNABLES if not _names([t]) & present])
  return env


def environ_without_hugepages(environ=None) -> dict:
  """A copy of `environ` without any tunable named in `TUNABLES` (glibc's
  defaults for those; other tunables kept, GLIBC_TUNABLES dropped if empty)."""
  env = dict(os.environ if environ is None else environ)
  ours = _names(TUNABLES)
  kept = [t for t in env.pop("GLIBC_TUNABLES", "").split(":") if t and not _names([t]) & ours]
  if kept:
    env["GLIBC_TUNABLES"] = ":".join(kept)
  return env


def keeps_buffers(environ=None) -> bool:
  """True when this process's glibc keeps freed large blocks: mmap_max=0 in
  GLIBC_TUNABLES (glibc reads them at start, so the environment tells)."""
  environ = os.environ if environ is None else environ
  return KEEP_BUFFERS[0] in environ.get("GLIBC_TUNABLES", "").split(":")


def configure_jax(environ=None) -> bool:
  """With `keeps_buffers`, switch JAX to synchronous dispatch on the CPU
  (`jax_cpu_enable_async_dispatch=False`: a run executes on the calling
  thread, so its temporaries come from glibc's main arena, where they are
  kept). Call after importing JAX, before the first computation. Returns
  whether it did."""
  if not keeps_buffers(environ):
    return False
  import jax
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True


def reexec_with_hugepages() -> None:
  """Replace this process by the same command line with the tunables set
  (returns without doing anything when it would not help). Call it first
  thing in a `__main__`, before heavy imports and before any output."""
  if not useful():
    return
  argv = list(getattr(sys, "orig_argv", []) or [sys.executable] + sys.argv)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, environ_with_hugepages())

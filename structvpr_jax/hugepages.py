"""Transparent huge pages for XLA:CPU buffers (Linux, glibc).

XLA:CPU allocates the temporary buffers of every executable run afresh; on
a Linux machine whose THP mode is `madvise` (the common default), each
first touch of those pages is a 4 KiB page fault. A MobileNetV2 train step
at 224x224 touches ~1.7 GB of temporaries and spent more time in the kernel
(page faults) than in arithmetic: measured on this project's 2-core VM,
47.6k minor faults per call of a 190 MB-temporary kernel, 142 ms wall, 172 ms
system CPU. glibc's `glibc.malloc.hugetlb=1` tunable makes malloc request
transparent huge pages (madvise) for its mmapped chunks: 620 faults, 68 ms.
On the whole model, forward 16x224x224 went from 52 to 79 img/s and the
4-triplet train step from 4.8 to 7.5 img/s (experiments/bench.py).

The tunable is read by glibc at process start, so an entry point that wants
it re-executes itself once with `GLIBC_TUNABLES` extended
(`reexec_with_hugepages`). Nothing changes numerically; opt out with
`STRUCTVPR_NO_HUGEPAGES=1`.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT_ENV = "STRUCTVPR_NO_HUGEPAGES"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


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
  """True when re-executing with the tunable would change anything: Linux +
  glibc, THP mode `madvise`, tunable not yet set, and no opt-out."""
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT_ENV, "") not in ("", "0"):
    return False
  if TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":"):
    return False
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return False
  return (thp_mode() if mode is None else mode) == "madvise"


def environ_with_hugepages(environ=None) -> dict:
  """A copy of `environ` with the tunable appended to GLIBC_TUNABLES."""
  env = dict(os.environ if environ is None else environ)
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  env["GLIBC_TUNABLES"] = ":".join(tunables + [TUNABLE])
  return env


def reexec_with_hugepages() -> None:
  """Replace this process by the same command line with the tunable set
  (returns without doing anything when it would not help). Call it first
  thing in a `__main__`, before heavy imports and before any output."""
  if not useful():
    return
  argv = list(getattr(sys, "orig_argv", []) or [sys.executable] + sys.argv)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, environ_with_hugepages())

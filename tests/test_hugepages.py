"""structvpr_jax.hugepages: when the re-exec happens and what it sets."""

import os
import subprocess
import sys

import pytest

from structvpr_jax import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


ALL = ":".join(hugepages.TUNABLES)
KEEP = ":".join(hugepages.KEEP_BUFFERS)


def test_useful_while_a_tunable_is_missing(monkeypatch):
  monkeypatch.setattr(hugepages.sys, "platform", "linux")
  monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("glibc", "2.36"))
  assert hugepages.useful({}, mode="madvise")
  # THP "always" / "never": huge pages change nothing, keeping buffers does
  for mode in ("always", "never", ""):
    assert hugepages.useful({}, mode=mode)
    assert not hugepages.useful({"GLIBC_TUNABLES": KEEP}, mode=mode)
  assert hugepages.useful({"GLIBC_TUNABLES": KEEP}, mode="madvise")
  assert hugepages.useful({"GLIBC_TUNABLES": hugepages.HUGE_PAGES}, mode="madvise")
  assert not hugepages.useful({"GLIBC_TUNABLES": ALL}, mode="madvise")
  assert not hugepages.useful({"GLIBC_TUNABLES": "a=1:" + ALL}, mode="madvise")
  # a tunable the user set with another value counts as set
  mine = "glibc.malloc.mmap_max=8:glibc.malloc.trim_threshold=1:" + hugepages.HUGE_PAGES
  assert not hugepages.useful({"GLIBC_TUNABLES": mine}, mode="madvise")
  assert not hugepages.useful({hugepages.OPT_OUT_ENV: "1"}, mode="madvise")
  assert hugepages.useful({hugepages.OPT_OUT_ENV: "0"}, mode="madvise")
  monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("", ""))   # musl etc.
  assert not hugepages.useful({}, mode="madvise")


def test_environ_keeps_other_and_user_tunables():
  env = hugepages.environ_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2",
                                          "X": "y"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + ALL
  assert env["X"] == "y"
  assert hugepages.environ_with_hugepages({})["GLIBC_TUNABLES"] == ALL
  mine = hugepages.environ_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=8"})
  assert mine["GLIBC_TUNABLES"].split(":") == [
      "glibc.malloc.mmap_max=8", hugepages.HUGE_PAGES, hugepages.KEEP_BUFFERS[1]]


def test_environ_without_drops_only_ours():
  env = hugepages.environ_without_hugepages(
      {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.mmap_max=8:" + ALL, "X": "y"})
  assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "y"}
  assert hugepages.environ_without_hugepages({"GLIBC_TUNABLES": ALL}) == {}


def test_configure_jax_only_where_glibc_keeps_buffers():
  import jax
  before = jax.config.values["jax_cpu_enable_async_dispatch"]
  assert not hugepages.keeps_buffers({"GLIBC_TUNABLES": hugepages.HUGE_PAGES})
  assert not hugepages.keeps_buffers({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=8"})
  assert hugepages.keeps_buffers({"GLIBC_TUNABLES": "a=1:" + KEEP})
  assert not hugepages.configure_jax({"GLIBC_TUNABLES": hugepages.HUGE_PAGES})
  assert jax.config.values["jax_cpu_enable_async_dispatch"] == before


def test_thp_mode_parses_the_kernel_file(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert hugepages.thp_mode(str(f)) == "madvise"
  assert hugepages.thp_mode(str(tmp_path / "missing")) == ""


@pytest.mark.skipif(not hugepages.useful(dict(os.environ, GLIBC_TUNABLES="")),
                    reason="re-exec does nothing on this machine (not Linux + glibc)")
def test_reexec_sets_the_tunable_once_and_keeps_argv():
  code = ("import os, sys; from structvpr_jax import hugepages; "
          "print('start', flush=True); hugepages.reexec_with_hugepages(); "
          "print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  proc = subprocess.run([sys.executable, "-c", code, "a", "--b=1"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines == ["start", "start", f"{ALL} ['a', '--b=1']"]


# A jitted function whose run needs ~200 MB of XLA temporaries; prints the
# minor page faults of its last 3 runs (after 2 warm-up runs).
FAULTS = """
import resource, sys
from structvpr_jax import hugepages
import jax, jax.numpy as jnp
print(hugepages.configure_jax(), flush=True)
f = jax.jit(lambda x: jnp.sum(jnp.sin(x)[::-1] * jnp.cos(x)))
x = jnp.ones((25_000_000,))
for _ in range(2):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or
                    hugepages.platform.libc_ver()[0] != "glibc", reason="glibc tunables")
def test_kept_buffers_stop_the_page_faults_of_later_runs():
  """With the tunables and configure_jax, later runs of an executable reuse
  its temporaries (no page faults); without them every run faults its
  temporaries in afresh."""
  def faults(tunables):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
    env.update(GLIBC_TUNABLES=tunables, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", FAULTS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    configured, count = proc.stdout.split()
    return configured == "True", int(count)

  kept_configured, kept = faults(ALL)
  fresh_configured, fresh = faults("")
  assert kept_configured and not fresh_configured
  assert fresh > 100, fresh          # 3 runs x ~200 MB faulted in again
  assert kept < fresh / 10, (kept, fresh)

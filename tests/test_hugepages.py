"""structvpr_jax.hugepages: when the re-exec happens and what it sets."""

import os
import subprocess
import sys

import pytest

from structvpr_jax import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_useful_only_for_madvise_without_the_tunable(monkeypatch):
  monkeypatch.setattr(hugepages.sys, "platform", "linux")
  monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("glibc", "2.36"))
  assert hugepages.useful({}, mode="madvise")
  assert not hugepages.useful({}, mode="always")        # already huge pages
  assert not hugepages.useful({}, mode="never")
  assert not hugepages.useful({}, mode="")
  assert not hugepages.useful({"GLIBC_TUNABLES": hugepages.TUNABLE}, mode="madvise")
  assert not hugepages.useful({"GLIBC_TUNABLES": "a=1:" + hugepages.TUNABLE}, mode="madvise")
  assert not hugepages.useful({hugepages.OPT_OUT_ENV: "1"}, mode="madvise")
  assert hugepages.useful({hugepages.OPT_OUT_ENV: "0"}, mode="madvise")
  monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("", ""))   # musl etc.
  assert not hugepages.useful({}, mode="madvise")


def test_environ_keeps_other_tunables():
  env = hugepages.environ_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2",
                                          "X": "y"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + hugepages.TUNABLE
  assert env["X"] == "y"
  assert hugepages.environ_with_hugepages({})["GLIBC_TUNABLES"] == hugepages.TUNABLE


def test_thp_mode_parses_the_kernel_file(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert hugepages.thp_mode(str(f)) == "madvise"
  assert hugepages.thp_mode(str(tmp_path / "missing")) == ""


@pytest.mark.skipif(not hugepages.useful(dict(os.environ, GLIBC_TUNABLES="")),
                    reason="re-exec does nothing on this machine (THP mode not madvise)")
def test_reexec_sets_the_tunable_once_and_keeps_argv():
  code = ("import os, sys; from structvpr_jax import hugepages; "
          "print('start', flush=True); hugepages.reexec_with_hugepages(); "
          "print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  proc = subprocess.run([sys.executable, "-c", code, "a", "--b=1"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines == ["start", "start", f"{hugepages.TUNABLE} ['a', '--b=1']"]

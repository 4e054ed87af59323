"""tests/conftest.py's required test groups, the guard that keeps CI from
passing with a group silently skipped: run in a throwaway checkout layout
(repo/tests/ beside shared/data/) with pytest in a subprocess, alone and
under pytest-xdist (README's test command runs the suite on two workers)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

CONFTEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conftest.py")

CASES = '''
import pytest

@pytest.mark.shared_data
def test_uses_shared_data():
  if SKIP:
    pytest.skip("../shared/data is absent")

def test_plain():
  pass

@pytest.mark.shared_data
@pytest.mark.parametrize("k", [0, 1, 2])
def test_more_shared(k):
  pass
'''


def run_session(tmp_path, skip: bool, require: str, workers: int):
  repo = tmp_path / "repo"
  (repo / "tests").mkdir(parents=True, exist_ok=True)
  (tmp_path / "shared" / "data").mkdir(parents=True, exist_ok=True)
  shutil.copy(CONFTEST, repo / "tests" / "conftest.py")
  (repo / "tests" / "test_cases.py").write_text(f"SKIP = {skip}\n" + CASES)
  report = tmp_path / "groups.json"
  env = dict(os.environ, STRUCTVPR_REQUIRE=require, STRUCTVPR_GROUP_REPORT=str(report))
  cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "tests"]
  if workers:
    cmd += ["-n", str(workers)]
  proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  return proc, json.loads(report.read_text())


@pytest.mark.parametrize("workers", [0, 2])
def test_a_required_group_that_skips_fails_the_session(tmp_path, workers):
  pytest.importorskip("xdist") if workers else None
  proc, groups = run_session(tmp_path, skip=True, require="shared_data", workers=workers)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out
  assert "requires test group 'shared_data'" in out, out
  assert "../shared/data is absent" in out, out
  assert groups["shared_data"] == {"passed": 3, "failed": 1, "skipped": 0, "required": True}


@pytest.mark.parametrize("workers", [0, 2])
def test_the_same_skip_passes_where_the_group_is_not_required(tmp_path, workers):
  pytest.importorskip("xdist") if workers else None
  proc, groups = run_session(tmp_path, skip=True, require="", workers=workers)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert groups["shared_data"] == {"passed": 3, "failed": 0, "skipped": 1, "required": False}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_required_group_that_runs_passes_and_is_counted(tmp_path, workers):
  pytest.importorskip("xdist") if workers else None
  proc, groups = run_session(tmp_path, skip=False, require="shared_data", workers=workers)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "shared_data (required): 4 passed, 0 failed, 0 skipped" in proc.stdout
  assert groups["shared_data"] == {"passed": 4, "failed": 0, "skipped": 0, "required": True}
  assert groups["native"]["passed"] == 0

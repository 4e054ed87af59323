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


# (the test skips, STRUCTVPR_REQUIRE, exit code, the shared_data group's
# counts, a line the session must print)
CASES_RUN = [
    (True, "shared_data", 1, {"passed": 3, "failed": 1, "skipped": 0, "required": True},
     "requires test group 'shared_data'"),
    (True, "", 0, {"passed": 3, "failed": 0, "skipped": 1, "required": False},
     "shared_data (not required): 3 passed, 0 failed, 1 skipped"),
    (False, "shared_data", 0, {"passed": 4, "failed": 0, "skipped": 0, "required": True},
     "shared_data (required): 4 passed, 0 failed, 0 skipped"),
]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("skip, require, returncode, counts, line", CASES_RUN,
                         ids=["required-skip-fails", "skip-not-required", "required-runs"])
def test_required_groups_alone_and_under_xdist(tmp_path, workers, skip, require, returncode,
                                               counts, line):
  """A skip in a required group fails the session naming the group and the
  skip's reason; the same skip passes where the group is not required; the
  counts reach the report from pytest-xdist's workers as from one process."""
  if workers:
    pytest.importorskip("xdist")
  proc, groups = run_session(tmp_path, skip=skip, require=require, workers=workers)
  out = proc.stdout + proc.stderr
  assert proc.returncode == returncode, out
  assert line in out, out
  if returncode:
    assert "../shared/data is absent" in out, out
  assert groups["shared_data"] == counts
  assert groups["native"]["passed"] == 0

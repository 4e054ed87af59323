"""Test-session safety and the test groups CI must not skip.

Network: nothing a test runs may reach beyond the loopback. A pretrained
file missing on the machine would otherwise be downloaded from its pinned
public URL (`structvpr_jax.models.weights`); the tests point the download
base at a closed loopback port instead (tests that exercise the download
serve the files from a local HTTP server on 127.0.0.1). Subprocesses
inherit the variable.

Test groups. Some tests skip themselves where what they need is missing:
  native       the native C++ kernels (`structvpr_jax.models.native`), which
               build wherever a C++ compiler is found, and silently do not
               build when kernels.cc has a compile error;
  shared_data  the real data in ../shared/data (beside the checkout).
A skip is right on a machine without them and wrong on one with them: a
broken kernels.cc would otherwise pass CI exactly where it runs.
`STRUCTVPR_REQUIRE=native,shared_data` (set by .ci/run for what the machine
has) turns every skip of a listed group into a failure naming the group and
the skip's reason; with `native` required, a kernel build that fails stops
the session at once with the compiler's message. A test belongs to a group
by its mark (`@pytest.mark.native`, `@pytest.mark.shared_data`), by living
in tests/test_native_kernels.py (native), or by its skip reason naming the
native kernels or shared/data. `STRUCTVPR_GROUP_REPORT=<path>` writes
{group: {"passed", "failed", "skipped", "required"}} as JSON at the end, which
.ci/run checks (each required group must have passed tests).
"""

import json
import os

import pytest

os.environ.setdefault("STRUCTVPR_WEIGHTS_URL", "http://127.0.0.1:9/closed")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))
REQUIRE_ENV = "STRUCTVPR_REQUIRE"
REPORT_ENV = "STRUCTVPR_GROUP_REPORT"
GROUPS = {
    "native": "the native C++ kernels (structvpr_jax/models/native)",
    "shared_data": f"the real data in ../shared/data ({SHARED_DATA})",
}
NATIVE_MODULES = ("test_native_kernels.py",)

_counts = {g: {"passed": 0, "failed": 0, "skipped": 0} for g in GROUPS}


def required_groups(config=None) -> set:
  raw = os.environ.get(REQUIRE_ENV, "")
  names = {g.strip() for g in raw.split(",") if g.strip()}
  unknown = names - set(GROUPS)
  if unknown:
    raise pytest.UsageError(f"${REQUIRE_ENV}={raw!r}: unknown group(s) {sorted(unknown)}; "
                            f"known: {sorted(GROUPS)}")
  return names


def pytest_configure(config):
  for group, what in GROUPS.items():
    config.addinivalue_line("markers", f"{group}: needs {what}; a skip fails the run when "
                                       f"${REQUIRE_ENV} lists {group!r} (tests/conftest.py)")
  required = required_groups()
  if "shared_data" in required and not os.path.isdir(SHARED_DATA):
    raise pytest.UsageError(f"${REQUIRE_ENV} requires shared_data but {SHARED_DATA} is not "
                            "a folder")
  if "native" in required:
    if os.environ.get("STRUCTVPR_NATIVE", "1") == "0":
      raise pytest.UsageError(f"${REQUIRE_ENV} requires native but STRUCTVPR_NATIVE=0 "
                              "disables the native kernels")
    from structvpr_jax.models import native
    status = native.status()
    if not status["ok"]:
      raise pytest.UsageError(
          f"${REQUIRE_ENV} requires native, but the native kernels "
          f"(structvpr_jax/models/native/kernels.cc) did not build:\n{status['reason']}")


def _skip_reason(report) -> str:
  longrepr = report.longrepr
  if isinstance(longrepr, tuple) and len(longrepr) == 3:
    return str(longrepr[2])
  return str(longrepr or "")


def _reason_groups(text: str) -> set:
  text_l = text.lower()
  groups = set()
  if "native" in text_l:
    groups.add("native")
  if "shared/data" in text_l or "shared_data" in text_l or SHARED_DATA.lower() in text_l:
    groups.add("shared_data")
  return groups


def groups_of(item) -> set:
  """The groups a collected test belongs to (before it runs)."""
  groups = {g for g in GROUPS if item.get_closest_marker(g) is not None}
  if os.path.basename(str(item.fspath)) in NATIVE_MODULES:
    groups.add("native")
  for mark in item.iter_markers("skipif"):
    groups |= _reason_groups(str(mark.kwargs.get("reason", "")))
  return groups


GROUPS_PROPERTY = "structvpr_groups"


def _is_xdist_worker(config) -> bool:
  return hasattr(config, "workerinput")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """Where the test runs (this process, or a pytest-xdist worker): a skip of
  a required group becomes a failure, and the report carries its groups."""
  outcome = yield
  report = outcome.get_result()
  groups = groups_of(item)
  if report.skipped:
    groups |= _reason_groups(_skip_reason(report))
    missed = sorted(groups & required_groups())
    if missed and not hasattr(report, "wasxfail"):
      reason = _skip_reason(report)
      report.outcome = "failed"
      report.longrepr = (f"skipped, but ${REQUIRE_ENV} requires test group {missed[0]!r} "
                         f"({GROUPS[missed[0]]}) on this machine: {reason}")
  # user_properties travel with the report to the xdist controller
  report.user_properties.append((GROUPS_PROPERTY, sorted(groups)))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  """A module skipped as a whole at import (pytest.skip(allow_module_level=True))."""
  outcome = yield
  report = outcome.get_result()
  if report.skipped:
    groups = _reason_groups(_skip_reason(report))
    if os.path.basename(str(getattr(collector, "fspath", ""))) in NATIVE_MODULES:
      groups.add("native")
    missed = sorted(groups & required_groups())
    if missed:
      report.outcome = "failed"
      report.longrepr = (f"module skipped, but ${REQUIRE_ENV} requires test group "
                         f"{missed[0]!r}: {_skip_reason(report)}")


def pytest_runtest_logreport(report):
  """Counted where the session's reports meet: this process, or the xdist
  controller (a worker's own counts are never read)."""
  if report.when == "call" or report.skipped or report.failed:
    for g in dict(report.user_properties).get(GROUPS_PROPERTY, ()):
      _counts[g][report.outcome] += 1


def pytest_collectreport(report):
  if report.skipped or report.failed:
    groups = _reason_groups(_skip_reason(report)) if report.longrepr else set()
    if os.path.basename(report.nodeid.split("::")[0]) in NATIVE_MODULES:
      groups.add("native")
    for g in groups:
      _counts[g]["skipped" if report.skipped else "failed"] += 1


def pytest_terminal_summary(terminalreporter):
  if _is_xdist_worker(terminalreporter.config):
    return
  required = required_groups()
  if not required and not any(any(c.values()) for c in _counts.values()):
    return                                   # no group test in this session
  parts = []
  for g, c in _counts.items():
    flag = "required" if g in required else "not required"
    parts.append(f"{g} ({flag}): {c['passed']} passed, {c['failed']} failed, "
                 f"{c['skipped']} skipped")
  terminalreporter.write_line("structvpr test groups: " + "; ".join(parts))
  for g in sorted(required):
    if _counts[g]["passed"] == 0:
      terminalreporter.write_line(f"structvpr test groups: {g} is required but no test of "
                                  "it passed", red=True)


def pytest_sessionfinish(session, exitstatus):
  if _is_xdist_worker(session.config):
    return
  required = required_groups()
  if any(_counts[g]["passed"] == 0 for g in required) and session.testscollected:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
  path = os.environ.get(REPORT_ENV)
  if path:
    with open(path, "w") as f:
      json.dump({g: dict(c, required=g in required) for g, c in _counts.items()}, f, indent=2)

"""Wall time and peak RSS of whole program runs, two variants alternating.

  python experiments/performance/run_time.py [--runs 3] [--config configs/distill.py]
      [--b=--config.model.fused_blocks=False --b=--config.eval.micro_batch=16 ...]
      [--out experiments/results/run_time]

Runs `python -m structvpr_jax.main --config=CONFIG --workdir=<fresh folder>`
as the user does (variant A: as given; variant B: with the `--b` flags
added), first once each untimed so both find XLA's persistent compilation
cache warm, then `--runs` pairs with the order alternating (A B, B A, ...),
each in a fresh workdir that is deleted afterwards. The default run's wall
time drifts by more than 10 % between hours on this shared VM, so a run
timed today is not comparable with one timed yesterday; alternating pairs
are. Per run: wall seconds and the peak RSS of the program's process
(its VmHWM, polled while it runs: `timed_run`). Prints and
writes <out>.json / <out>.md: each variant's median, and B's seconds / A's
seconds per pair (median, bootstrap interval over pairs:
`paired_ratio.ratio_summary`; with 3 pairs it is no more than their range).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))   # the repository root
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)


def _vm_hwm_mb(pid: int):
  """The process's peak resident set (VmHWM of /proc/PID/status) in MB, or
  None where there is no such file (not Linux, or the process is gone)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except (OSError, ValueError):
    return None
  return None


def timed_run(command: list, env: dict | None = None, poll_s: float = 0.05) -> dict:
  """Runs `command` in REPO; {"s": wall seconds, "peak_rss_mb"}. A failed run
  is an error naming the command and the end of its output.

  The peak RSS is the program's own high-water mark (VmHWM), read while it
  runs: a new program image starts a new one, so neither this process's
  memory (which the child's `ru_maxrss` inherits across fork and exec) nor
  the program's own re-exec is counted; a peak in its last `poll_s` before
  exiting can be missed. None off Linux.
  """
  with tempfile.TemporaryFile() as log:
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    peak = None
    while proc.poll() is None:
      hwm = _vm_hwm_mb(proc.pid)
      if hwm is not None:
        peak = hwm if peak is None else max(peak, hwm)
      time.sleep(poll_s)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
      log.seek(0)
      tail = log.read().decode(errors="replace")[-2000:]
      raise SystemExit(f"run_time: {' '.join(command)} exited {proc.returncode}:\n{tail}")
  return {"s": wall, "peak_rss_mb": peak}


def main_command(config: str, workdir: str, extra: list) -> list:
  """The program as the user runs it, on `config` in `workdir`, plus `extra`
  flags (also experiments/performance/compile_time.py's command)."""
  return [sys.executable, "-m", "structvpr_jax.main", f"--config={config}",
          f"--workdir={workdir}", *extra]


def run(config: str, b_flags: list, runs: int, scratch: str, command=main_command) -> dict:
  """`command(config, workdir, flags)` -> the argv of one run (tests pass
  another)."""
  import numpy as np
  import paired_ratio
  variants = {"a": [], "b": list(b_flags)}
  started = time.strftime("%Y-%m-%d %H:%M")
  results = {"a": [], "b": []}
  count = 0

  def one(name):
    nonlocal count
    count += 1
    folder = os.path.join(scratch, f"{name}{count}")
    try:
      return dict(timed_run(command(config, folder, variants[name])), workdir=folder)
    finally:
      shutil.rmtree(folder, ignore_errors=True)

  warm = {name: one(name) for name in ("a", "b")}
  for i in range(runs):
    for name in (("a", "b") if i % 2 == 0 else ("b", "a")):
      results[name].append(one(name))
  a_s = [r["s"] for r in results["a"]]
  b_s = [r["s"] for r in results["b"]]
  summary = paired_ratio.ratio_summary(a_s, b_s, images=1)
  return {"config": config, "b_flags": list(b_flags), "runs": runs,
          "a_median_s": float(np.median(a_s)), "b_median_s": float(np.median(b_s)),
          "a_peak_rss_mb": _median_or_none([r["peak_rss_mb"] for r in results["a"]]),
          "b_peak_rss_mb": _median_or_none([r["peak_rss_mb"] for r in results["b"]]),
          "b_over_a": summary["ratio"], "ci95": summary["ci95"],
          "warm_up": warm, "a": results["a"], "b": results["b"],
          "started": started}


def _median_or_none(values):
  import numpy as np
  return None if any(v is None for v in values) else float(np.median(values))


def markdown(res: dict, command: str) -> str:
  def mmss(s):
    return f"{int(s // 60)} min {s % 60:04.1f} s"
  lines = ["# Whole runs, two variants alternating", "", f"`{command}`", "",
           f"Started {res['started']}; {res['runs']} pairs after one untimed run each "
           f"(compilation cache warm). A: `--config={res['config']}`; B: A plus "
           f"`{' '.join(res['b_flags'])}`.", "",
           "| variant | median wall | median peak RSS | runs (s) |", "|---|---|---|---|"]
  for name in ("a", "b"):
    rss = res[name + "_peak_rss_mb"]
    lines.append(f"| {name.upper()} | {mmss(res[name + '_median_s'])} | "
                 + (f"{rss / 1024:.2f} GB | " if rss is not None else "- | ")
                 + ", ".join(f"{r['s']:.1f}" for r in res[name]) + " |")
  lines += ["", f"B's time / A's time, median of the pairs: {res['b_over_a']:.3f} "
            f"[{res['ci95'][0]:.3f}, {res['ci95'][1]:.3f}] (bootstrap over pairs; with few "
            f"pairs no more than their range)."]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/distill.py")
  parser.add_argument("--b", action="append", default=[], metavar="FLAG",
                      help="a flag variant B adds (repeatable; write --b=--config.x=y)")
  parser.add_argument("--runs", type=int, default=3, help="timed pairs (3)")
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "run_time"))
  args = parser.parse_args(argv)
  if args.runs < 1:
    parser.error("--runs must be at least 1")
  if not args.b:
    parser.error("give variant B's flags with --b=--config.FIELD=VALUE")
  bad = [f for f in args.b if not f.startswith("--")]
  if bad:
    parser.error(f"--b takes program flags (--config.FIELD=VALUE), not {bad}")
  with tempfile.TemporaryDirectory(prefix="run_time_") as scratch:
    res = run(args.config, args.b, args.runs, scratch)
  command = ("python experiments/performance/run_time.py" + (f" --runs {args.runs}" if args.runs != 3 else "")
             + (f" --config {args.config}" if args.config != "configs/distill.py" else "")
             + "".join(f" --b={f}" for f in args.b))
  from structvpr_jax import files
  text = markdown(res, command)
  files.write_json(args.out + ".json", res)
  files.write_text(args.out + ".md", text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())

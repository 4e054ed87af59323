"""What a first-time user waits for XLA compilation, and what the persistent
compilation cache removes on a second run.

  python experiments/performance/compile_time.py [--workdir /tmp/compile_time] [--config configs/rgb.py]

Runs the same stage twice as a user would, with an empty persistent cache
(`--config.compilation_cache=<fresh folder>`) and then with the cache the first
run filled, each in a new workdir (so nothing else is reused). For each run:
wall time, time from start to the first training log line (data, k-means
init, the first mining refresh and the train step's compilation), and the
stage's own seconds. Writes experiments/results/compile_time.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))   # the repository root
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from run_time import main_command  # noqa: E402
from structvpr_jax import files  # noqa: E402


def timed_run(config: str, workdir: str, cache: str) -> dict:
  cmd = main_command(config, workdir, [f"--config.compilation_cache={cache}"])
  t0 = time.time()
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True)
  first_step = None
  for line in proc.stdout:
    if first_step is None and " step " in line and "/" in line.split(" step ")[1][:12]:
      first_step = time.time() - t0
  if proc.wait() != 0:
    raise SystemExit(f"{' '.join(cmd)} failed")
  wall = time.time() - t0
  stage = files.read_json(os.path.join(workdir, "rgb", "done.json"))
  return {"wall_s": round(wall, 1), "to_first_step_log_s": round(first_step or float("nan"), 1),
          "stage_s": round(float(stage["seconds_this_run"]), 1)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="/tmp/compile_time")
  parser.add_argument("--config", default="configs/rgb.py")
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results",
                                                    "compile_time"))
  args = parser.parse_args(argv)
  if os.path.exists(args.workdir):
    shutil.rmtree(args.workdir)
  cache = os.path.join(args.workdir, "xla_cache")
  res = {"cold_cache": timed_run(args.config, os.path.join(args.workdir, "cold"), cache),
         "warm_cache": timed_run(args.config, os.path.join(args.workdir, "warm"), cache)}
  res["saved_by_cache_s"] = round(res["cold_cache"]["wall_s"] - res["warm_cache"]["wall_s"], 1)
  files.write_json(args.out + ".json", dict(res, config=args.config))
  lines = [f"# Compilation: first run vs a rerun with the persistent cache ({args.config})", "",
           "`python experiments/performance/compile_time.py` (each run in a new workdir; the second reads "
           "the cache the first wrote).", "",
           "| run | wall s | start to first step log s | stage s |", "|---|---|---|---|"]
  for name in ("cold_cache", "warm_cache"):
    r = res[name]
    lines.append(f"| {name.replace('_', ' ')} | {r['wall_s']} | {r['to_first_step_log_s']} "
                 f"| {r['stage_s']} |")
  lines += ["", f"The cache saved {res['saved_by_cache_s']} s of wall time."]
  files.write_text(args.out + ".md", "\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""What `train.trainable_from` costs in recall and saves in time.

  python experiments/trainable_from.py [--workdir /tmp/trainable_from]
      [--values 0 14] [--seeds 0 1 2] [--gardens-point]

Runs the RGB stage (stage 1) as a user would, once per value of
`train.trainable_from` and seed, on the synthetic default world
(`configs/rgb.py`), and with --gardens-point once per value on Gardens Point
(`configs/gardens_point.py` in mode train_rgb). Reads only validation
figures (the selected checkpoint's val R@1 / R@5 from the stage record, the
training images/s from the metrics): test splits are not touched.

Writes experiments/results/trainable_from.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from structvpr_jax import files  # noqa: E402


def run_stage(config: str, workdir: str, seed: int, value: int, extra=()) -> dict:
  done = os.path.join(workdir, "rgb", "done.json")
  t0 = time.time()
  if not os.path.isfile(done):
    cmd = [sys.executable, "-m", "structvpr_jax.main", f"--config={config}",
           f"--workdir={workdir}", f"--config.seed={seed}",
           f"--config.train.trainable_from={value}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
      raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
  wall = time.time() - t0
  record = files.read_json(done)
  metrics = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  best_step = record["best_step"]
  val = [m for m in metrics if m.get("event") == "val" and m.get("stage") == "rgb"
         and m["step"] == best_step]
  rates = [m["img_s"] for m in metrics if m.get("stage") == "rgb" and "img_s" in m]
  return {"val_R@1": val[-1]["val_R@1"] if val else None,
          "val_R@5": val[-1]["val_R@5"] if val else None, "best_step": best_step,
          "train_img_s": statistics.median(rates[1:] or rates) if rates else None,
          "stage_s": round(float(record.get("seconds_this_run", float("nan"))), 1),
          "wall_s": round(wall, 1)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="/tmp/trainable_from")
  parser.add_argument("--values", type=int, nargs="+", default=[0, 14])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--gardens-point", action="store_true")
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results",
                                                    "trainable_from"))
  args = parser.parse_args(argv)
  results = {"synthetic": {}, "gardens_point": {}}
  for seed in args.seeds:
    for value in args.values:
      work = os.path.join(args.workdir, f"synthetic_seed{seed}_from{value}")
      res = run_stage("configs/rgb.py", work, seed, value)
      results["synthetic"][f"seed{seed}_from{value}"] = res
      print(json.dumps({f"synthetic seed {seed} trainable_from {value}": res}), flush=True)
  if args.gardens_point:
    for value in args.values:
      work = os.path.join(args.workdir, f"gardens_point_from{value}")
      res = run_stage("configs/gardens_point.py", work, 0, value, ["--config.mode=train_rgb"])
      results["gardens_point"][f"from{value}"] = res
      print(json.dumps({f"gardens_point trainable_from {value}": res}), flush=True)
  files.write_json(args.out + ".json", results)
  lines = ["# `train.trainable_from`: val recall and training speed of the RGB stage", "",
           "`python experiments/trainable_from.py" + (" --gardens-point" if args.gardens_point
                                                       else "") + "` (validation only).", "",
           "| data | seed | trainable_from | val R@1 | val R@5 | best step | train img/s "
           "| stage s |", "|---|---|---|---|---|---|---|---|"]
  for data, rows in results.items():
    for key, r in rows.items():
      seed = key.split("_")[0].replace("seed", "") if key.startswith("seed") else "0"
      value = key.rsplit("from", 1)[1]
      lines.append(f"| {data} | {seed} | {value} | {r['val_R@1']:.1f} | {r['val_R@5']:.1f} | "
                   f"{r['best_step']} | {r['train_img_s']:.1f} | {r['stage_s']} |")
  files.write_text(args.out + ".md", "\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())

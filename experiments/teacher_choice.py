"""Choose the seg teacher's training on val, over seeds (stage 1 seg only).

The StructVPR claim rests on a teacher that is better than the student where
it teaches; a from-scratch seg branch whose val R@1 swings between seeds
cannot be. This trains the seg branch of each seed under each candidate
setting (config overrides, e.g. `seg.norm=batch` vs `seg.norm=group`) by
the config's own stopping rule, and reports the selected checkpoint's val
R@1 / R@5 per seed, mean and std over seeds, and how each run stopped. It
reads val only (the choice it informs must not see test).

  python experiments/teacher_choice.py [--config=configs/ablation.py] [--seeds 0 1 2]
      [--candidates seg.norm=batch seg.norm=group] [--workdir runs/teacher_choice]
      [--out experiments/results/teacher_choice]

Each candidate is one string of comma-separated overrides ("a=1,b=2").
Every run is `python -m structvpr_jax.main --config.mode=train_seg` (the
user's code path); finished runs are skipped, so it resumes. The seed's
synthetic city is generated once and linked into the other candidates'
workdirs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from structvpr_jax import files  # noqa: E402
from structvpr_jax.workdir import Workdir  # noqa: E402


def run_main(config, workdir, overrides):
  cmd = [sys.executable, "-m", "structvpr_jax.main", f"--config={config}",
         f"--workdir={workdir}"] + [f"--config.{o}" for o in overrides]
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, cwd=REPO, check=True)


def label(candidate: str) -> str:
  return candidate.replace("=", "-").replace(",", "_").replace("/", "_")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/ablation.py")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--candidates", nargs="+", default=["seg.norm=batch", "seg.norm=group"])
  parser.add_argument("--workdir", default="runs/teacher_choice")
  parser.add_argument("--override", nargs="*", default=[])
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results",
                                                    "teacher_choice"))
  args = parser.parse_args()
  results = {c: {} for c in args.candidates}
  for seed in args.seeds:
    first = None
    for cand in args.candidates:
      wd = Workdir(os.path.join(args.workdir, f"seed{seed}", label(cand)))
      os.makedirs(wd.root, exist_ok=True)
      if first is not None and not os.path.exists(wd.data):
        os.symlink(os.path.abspath(first.data), wd.data)
      run_main(args.config, wd.root, [f"seed={seed}", "mode=train_seg", *args.override,
                                      *cand.split(",")])
      done = wd.done("seg")
      best = done.get("best_val") or {}
      results[cand][seed] = {"val_R@1": best.get("val_R@1"), "val_R@5": best.get("val_R@5"),
                             "stop_reason": done.get("stop_reason"),
                             "epochs": done.get("epochs"), "best_epoch": done.get("best_epoch"),
                             "seconds": done.get("seconds_this_run")}
      first = first or wd
  summary = {}
  for cand, per_seed in results.items():
    r1 = [v["val_R@1"] for v in per_seed.values()]
    summary[cand] = {"mean_R@1": float(np.mean(r1)), "std_R@1": float(np.std(r1)),
                     "min_R@1": float(np.min(r1)), "max_R@1": float(np.max(r1))}
  train_s = sum(float(v["seconds"] or 0.0) for r in results.values() for v in r.values())
  chosen = max(summary, key=lambda c: (summary[c]["mean_R@1"], -summary[c]["std_R@1"]))
  lines = ["# Seg teacher: training choice on val", "",
           f"Command: `python experiments/teacher_choice.py --config={args.config} --seeds "
           f"{' '.join(map(str, args.seeds))} --candidates {' '.join(args.candidates)}`", "",
           "Val R@1 / R@5 (percent) of the selected checkpoint of the seg branch, trained "
           "from scratch by the config's stopping rule; val only (test not read). "
           f"Training time {train_s:.0f} s in all (the runs' own seconds, on a machine "
           f"shared with other jobs) on {os.cpu_count()} CPU cores.", "",
           "| candidate | " + " | ".join(f"seed {s}" for s in args.seeds)
           + " | mean ± std R@1 |", "|---|" + "---|" * (len(args.seeds) + 1)]
  for cand, per_seed in results.items():
    cells = [f"{v['val_R@1']:.1f} / {v['val_R@5']:.1f} ({v['stop_reason']} "
             f"{v['epochs']}, best {v['best_epoch']})" for v in per_seed.values()]
    lines.append(f"| `{cand}` | " + " | ".join(cells)
                 + f" | {summary[cand]['mean_R@1']:.1f} ± {summary[cand]['std_R@1']:.1f} |")
  lines += ["", f"Chosen (highest mean val R@1, then the lower std): `{chosen}`."]
  files.write_text(args.out + ".md", "\n".join(lines) + "\n")
  files.write_json(args.out + ".json", {"seeds": args.seeds, "candidates": args.candidates,
                                        "results": {c: {str(s): v for s, v in r.items()}
                                                    for c, r in results.items()},
                                        "summary": summary, "chosen": chosen,
                                        "config": args.config, "overrides": args.override})
  print("\n".join(lines))


if __name__ == "__main__":
  main()

"""Does a change of kernels (same function, other float rounding) change what
the RGB stage learns? Validation only.

  python experiments/kernel_val.py --baseline-repo /path/to/checkout/of/the/old/code
      [--other NAME=FLAGS ...] [--workdir /tmp/kernel_val] [--seeds 0 1 2]
      [--out experiments/results/kernel_val]

A faster kernel that computes the same function in another order (a custom
VJP, BatchNorm folded into the convolution) gives the same values to float
tolerance for one forward and one gradient (the float64 tests), but a
training run amplifies the different rounding into a different trajectory,
as a different seed does. This script measures whether that changes recall
beyond the seed-to-seed spread: for each seed it runs the RGB stage
(`configs/rgb.py`, as a user would) once per variant, evaluates the selected
checkpoint on the **val** split with per-query hits (`configs/eval.py
--config.eval_split=val`), and compares the variants paired by seed.

Variants:
  baseline   the code in --baseline-repo (e.g. `git worktree add /tmp/old REV`)
  kernels    this checkout, default config
  NAME       each --other NAME=FLAGS: this checkout with those config flags
             (space-separated), e.g. --other "fold_bn=--config.model.fold_bn=True"
Pairs: kernels - baseline, and for each other NAME: NAME - kernels, NAME - baseline.

Reported per pair (other - base, val R@1 and R@5 points): the per-seed
differences, their mean, the seed-to-seed standard deviation of each
variant, and the paired bootstrap over queries within seed
(`stats.paired_bootstrap`). The bootstrap only covers which queries were
drawn, not which trajectory training took, so the seed spread is the yardstick
for a kernel change. Test splits are not touched.

Writes <out>.json and <out>.md.
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

from structvpr_jax import files, stats  # noqa: E402


def parse_other(text: str) -> tuple[str, list]:
  """"NAME=FLAGS" -> (NAME, [flags]); NAME must not be a built-in variant."""
  name, sep, flags = text.partition("=")
  if not sep or not name or name in ("baseline", "kernels"):
    raise SystemExit(f"--other {text!r}: expected NAME=FLAGS with NAME not baseline/kernels")
  return name, flags.split()


def pairs(others) -> list:
  """(base, other) pairs compared: kernels vs baseline, then each other
  variant vs kernels and vs baseline."""
  out = [("baseline", "kernels")]
  for name in others:
    out += [("kernels", name), ("baseline", name)]
  return out


def run(cmd: list, cwd: str) -> None:
  proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} (in {cwd}) failed:\n{proc.stdout[-2000:]}\n"
                     f"{proc.stderr[-2000:]}")


def run_variant(repo: str, workdir: str, seed: int, extra: list) -> dict:
  """RGB stage (the code in `repo`) then val evaluation of its selected
  checkpoint (this checkout's eval mode, which writes per-query hits; the
  checkpoint carries its spec); returns the val hits per query and the
  stage's record."""
  t0 = time.time()
  if not os.path.isfile(os.path.join(workdir, "rgb", "done.json")):
    run([sys.executable, "-m", "structvpr_jax.main", "--config=configs/rgb.py",
         f"--workdir={workdir}", f"--config.seed={seed}", *extra], repo)
  stage_wall = time.time() - t0
  eval_dir = os.path.join(workdir, "val_eval")
  per_query = os.path.join(eval_dir, "eval", "val", "per_query_rgb.json")
  if not os.path.isfile(per_query):
    run([sys.executable, "-m", "structvpr_jax.main", "--config=configs/eval.py",
         f"--workdir={eval_dir}", f"--config.checkpoint={os.path.join(workdir, 'rgb', 'checkpoints')}",
         f"--config.data.root={os.path.join(workdir, 'data')}", "--config.eval_split=val"],
        REPO)
  if not os.path.isfile(per_query):
    raise SystemExit(f"{per_query}: not written by the evaluation")
  hits = files.read_json(per_query)
  record = files.read_json(os.path.join(workdir, "rgb", "done.json"))
  metrics = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  rates = [m["img_s"] for m in metrics if m.get("stage") == "rgb" and "img_s" in m]
  return {"queries": hits["queries"], "R@1": hits["hits"]["R@1"], "R@5": hits["hits"]["R@5"],
          "best_step": record["best_step"],
          "train_img_s": statistics.median(rates[1:] or rates) if rates else None,
          "stage_s": round(float(record.get("seconds_this_run", float("nan"))), 1),
          "wall_s": round(stage_wall, 1)}


def check_beside_shared(baseline: str, repo: str) -> None:
  """Both checkouts must see the same `../shared/data` (the ImageNet init of
  the RGB branch is read from there): a baseline elsewhere would train from
  a random init and lose ~45 val R@1 points for that reason alone (seen
  with a baseline worktree in /tmp)."""
  def shared(root):
    return os.path.realpath(os.path.join(root, "..", "shared", "data"))
  if os.path.isdir(shared(repo)) and shared(baseline) != shared(repo):
    raise SystemExit(f"--baseline-repo {baseline}: it does not sit beside {shared(repo)} as "
                     f"this checkout does ({shared(baseline)} instead), so it would train "
                     "without the same data and pretrained weights; put the checkout next to "
                     f"this one (e.g. git worktree add {os.path.dirname(repo)}/baseline REV)")


def pct(hits) -> float:
  return 100.0 * sum(hits) / len(hits)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--baseline-repo", required=True,
                      help="a checkout of the code to compare against")
  parser.add_argument("--other", action="append", default=[], metavar="NAME=FLAGS",
                      help="another variant of this checkout with these config flags")
  parser.add_argument("--workdir", default="/tmp/kernel_val")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results",
                                                    "kernel_val"))
  args = parser.parse_args(argv)
  baseline = os.path.abspath(args.baseline_repo)
  if not os.path.isfile(os.path.join(baseline, "structvpr_jax", "main.py")):
    raise SystemExit(f"--baseline-repo {baseline}: no structvpr_jax/main.py there")
  check_beside_shared(baseline, REPO)
  revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=baseline,
                            capture_output=True, text=True).stdout.strip()
  others = dict(parse_other(text) for text in args.other)
  variants = {"baseline": (baseline, []), "kernels": (REPO, []),
              **{name: (REPO, flags) for name, flags in others.items()}}
  results = {name: {} for name in variants}
  for seed in args.seeds:
    for name, (repo, extra) in variants.items():
      res = run_variant(repo, os.path.join(args.workdir, f"seed{seed}_{name}"), seed, extra)
      results[name][str(seed)] = res
      print(json.dumps({"seed": seed, "variant": name, "val_R@1": round(pct(res["R@1"]), 1),
                        "val_R@5": round(pct(res["R@5"]), 1), "train_img_s": res["train_img_s"],
                        "stage_s": res["stage_s"]}), flush=True)
  seeds = [str(s) for s in args.seeds]
  for name in variants:
    for s in seeds:
      if results[name][s]["queries"] != results["baseline"][s]["queries"]:
        raise SystemExit(f"seed {s}: {name} was evaluated on other val queries than baseline")
  comparisons = {}
  for base, other in pairs(others):
    comparisons[f"{other} - {base}"] = {}
    for metric in ("R@1", "R@5"):
      per_seed = [pct(results[other][s][metric]) - pct(results[base][s][metric]) for s in seeds]
      boot = stats.paired_bootstrap({s: results[base][s][metric] for s in seeds},
                                    {s: results[other][s][metric] for s in seeds})
      comparisons[f"{other} - {base}"][metric] = {
          "per_seed": [round(d, 2) for d in per_seed], "mean": round(statistics.mean(per_seed), 2),
          "query_bootstrap_ci": [round(boot["ci_low"], 2), round(boot["ci_high"], 2)]}
  spread = {name: {metric: round(statistics.stdev([pct(results[name][s][metric]) for s in seeds]), 2)
                   if len(seeds) > 1 else None for metric in ("R@1", "R@5")}
            for name in variants}
  files.write_json(args.out + ".json", {"baseline_revision": revision, "seeds": args.seeds,
                                        "results": results, "comparisons": comparisons,
                                        "seed_sd": spread})
  n = len(results["baseline"][seeds[0]]["queries"])
  lines = [f"# Kernel changes and what the RGB stage learns: validation only ({time.strftime('%Y-%m-%d')})",
           "",
           f"`python experiments/kernel_val.py --baseline-repo <checkout of {revision}>`: "
           f"`configs/rgb.py` per seed and variant, the selected checkpoint evaluated on "
           f"{n} val queries (`configs/eval.py --config.eval_split=val`).",
           "", "| seed | variant | val R@1 | val R@5 | best step | train img/s | stage s |",
           "|---|---|---|---|---|---|---|"]
  for s in seeds:
    for name in variants:
      r = results[name][s]
      lines.append(f"| {s} | {name} | {pct(r['R@1']):.1f} | {pct(r['R@5']):.1f} | "
                   f"{r['best_step']} | {r['train_img_s']:.1f} | {r['stage_s']} |")
  lines += ["", "Seed-to-seed standard deviation (points): " + "; ".join(
      f"{name} R@1 {spread[name]['R@1']}, R@5 {spread[name]['R@5']}" for name in variants), "",
            "| comparison | metric | per seed | mean | query bootstrap 95 % CI |",
            "|---|---|---|---|---|"]
  for pair, by_metric in comparisons.items():
    for metric, c in by_metric.items():
      lines.append(f"| {pair} | {metric} | {', '.join(f'{d:+.1f}' for d in c['per_seed'])} | "
                   f"{c['mean']:+.1f} | [{c['query_bootstrap_ci'][0]:+.1f}, "
                   f"{c['query_bootstrap_ci'][1]:+.1f}] |")
  files.write_text(args.out + ".md", "\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())

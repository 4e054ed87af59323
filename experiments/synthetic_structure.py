"""Ablation on the synthetic city: does structure distillation help the RGB branch?

For each seed: stage 1 RGB and seg once (`base/`); then partition + stage 2 +
test evaluation for each stage-2 variant in its own workdir, which links the
base's data and stage-1 branches:

  triplet_only   the same stage 2 (steps, init from stage 1) with lambda_kd = 0:
                 the control; a KD variant's gain over it is the distillation's
  uniform        KD with weight 1 on every query (plain distillation)
  teacher_only   KD only where the teacher retrieves correctly (1[r_T <= tau])
  sigmoid        KD weighted by our Eq. 3 reconstruction (StructVPR)
  *_crossfit     the same with the cross-fitted partition (distill.partition =
                 crossfit: stage 1 on each spatial half of the training places
                 judges the other half; the folds train once per seed, in base/)

The KD form of every KD variant is `--kd` (distill.kd: feature, adaptor,
relational) and lambda `--lambda-kd`, or, with `--select-kd` / `--select-lambda`,
the combination whose StructVPR (sigmoid) run has the best val R@1 (then
R@5) on the first seed; selection reads only val, never test. Every run is
`python -m structvpr_jax.main` (the user's code path); finished stages are
skipped, so an interrupted experiment resumes.

Writes <out>.json:
  {"per_query": {method: {seed: [0/1 R@1 hit per test query]}},
   "conditions": {seed: [condition per test query]},
   "regimes": {seed: [regime of the query's place]},
   "table": {method: {"<condition> R@1": [mean, std, per-seed]}},
   "paired": {"<a> vs <b>": paired_bootstrap result},
   "partition": {seed: {"stage1" | "crossfit": D1-D4 counts}},
   "selection": {"<kd> lambda <l>": val R@1, R@5}, "seeds", "kd", "lambda_kd",
   "overrides", "wall_s"}
and <out>.md: the table (mean +- std over seeds), the teacher and student per
condition and regime, and paired differences with bootstrap 95 % CIs
(queries resampled within seed, `structvpr_jax.stats`). Queries differ
between seeds (each seed generates its own city), so the per-query lists are
per seed; within a seed every method answers the same queries in the same
order (sorted file names).

  python experiments/synthetic_structure.py [--config=configs/distill.py]
      [--seeds 0 1 2 3 4] [--test-places 400] [--kd feature] [--lambda-kd 1]
      [--select-kd feature relational] [--select-lambda 0.3 1 3] [--variants ...]
      [--workdir runs/synthetic_structure] [--override k=v ...] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from structvpr_jax import files, stats  # noqa: E402
from structvpr_jax.data import layout  # noqa: E402
from structvpr_jax.workdir import Workdir  # noqa: E402

VARIANTS = {"triplet_only": ["distill.lambda_kd=0.0"],
            "uniform": ["distill.weighting=uniform"],
            "teacher_only": ["distill.weighting=teacher_only"],
            "sigmoid": ["distill.weighting=sigmoid"],
            "teacher_only_crossfit": ["distill.weighting=teacher_only",
                                      "distill.partition=crossfit"],
            "sigmoid_crossfit": ["distill.weighting=sigmoid", "distill.partition=crossfit"]}
METHODS = (("rgb", "RGB baseline (stage 1)"), ("seg", "seg teacher"),
           ("triplet_only", "stage 2 without KD (control)"),
           ("uniform", "uniform KD"), ("teacher_only", "teacher_only KD"),
           ("sigmoid", "StructVPR sigmoid (Eq. 3, ours)"),
           ("teacher_only_crossfit", "teacher_only KD, cross-fitted partition"),
           ("sigmoid_crossfit", "StructVPR sigmoid, cross-fitted partition"))
# (other, base): the comparisons the method's claims rest on.
COMPARISONS = (("sigmoid", "triplet_only"), ("sigmoid", "uniform"), ("sigmoid", "rgb"),
               ("uniform", "triplet_only"), ("teacher_only", "triplet_only"),
               ("sigmoid_crossfit", "triplet_only"), ("sigmoid_crossfit", "uniform"),
               ("sigmoid_crossfit", "sigmoid"), ("teacher_only_crossfit", "triplet_only"),
               ("seg", "rgb"))
APPEARANCE = ("dusk", "fog", "night", "repaint")
SPLIT = "test"


def run_main(config, workdir, overrides):
  cmd = [sys.executable, "-m", "structvpr_jax.main", f"--config={config}",
         f"--workdir={workdir}"] + [f"--config.{o}" for o in overrides]
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, cwd=REPO, check=True)


def link_stage1(base: Workdir, variant: Workdir) -> None:
  """The variant's workdir reuses the base's data and stage-1 branches (and
  the cross-fitted folds' branches, trained once per seed in base/crossfit)."""
  os.makedirs(variant.root, exist_ok=True)
  os.makedirs(base.path("crossfit"), exist_ok=True)
  for src, dst in ((base.data, variant.data),
                   (base.stage_dir("rgb"), variant.stage_dir("rgb")),
                   (base.stage_dir("seg"), variant.stage_dir("seg")),
                   (base.path("crossfit"), variant.path("crossfit"))):
    if not os.path.exists(dst):
      os.symlink(os.path.abspath(src), dst)


def _same(recorded, wanted: str) -> bool:
  try:
    return float(recorded) == float(wanted)
  except (TypeError, ValueError):
    return str(recorded) == wanted


def evaluated_with(variant: Workdir, overrides) -> bool:
  """True when the variant's test evaluation already read its current stages
  and every override is what its stage 2 recorded (so an experiment resumed
  or extended with new variants does not re-evaluate the finished ones)."""
  summary, done = variant.record("eval"), variant.done("distill")
  if summary is None or done is None or summary.get("split") != SPLIT or not all(
      os.path.exists(variant.per_query_json(SPLIT, b)) for b in ("rgb", "seg", "distill")):
    return False
  try:
    if summary.get("consumed") != variant.consumed(("distill", "rgb", "seg")):
      return False
  except ValueError:
    return False
  for override in overrides:
    key, value = override.split("=", 1)
    parent, _, leaf = key.rpartition(".")
    if key in done["config"]:
      recorded = done["config"][key]
    elif isinstance(done["config"].get(parent), dict) and leaf in done["config"][parent]:
      recorded = done["config"][parent][leaf]
    else:
      return False     # not recorded: cannot tell, evaluate again
    if not _same(recorded, value):
      return False
  return True


def best_val(wd: Workdir, stage: str) -> tuple:
  """(val R@1, val R@5) of a finished stage's selected checkpoint."""
  best = wd.done(stage)["best_step"]
  rec = [r for r in files.read_jsonl(wd.metrics)
         if r.get("stage") == stage and r.get("event") == "val" and r.get("step") == best]
  return rec[-1]["val_R@1"], rec[-1]["val_R@5"]


def select_on_val(args, common, base: Workdir, seed: int) -> tuple:
  """(kd, lambda, {label: (val R@1, R@5)}): the StructVPR run with the best val
  R@1 (ties: R@5) over --select-kd x --select-lambda, on one seed."""
  scores = {}
  for kd in args.select_kd or [args.kd]:
    for lam in args.select_lambda or [args.lambda_kd]:
      wd = Workdir(os.path.join(args.workdir, f"seed{seed}", f"select_{kd}_lambda{lam:g}"))
      link_stage1(base, wd)
      # evaluated on val (eval_split), so that choosing never reads test
      run_main(args.config, wd.root, common + VARIANTS["sigmoid"]
               + [f"distill.kd={kd}", f"distill.lambda_kd={lam}", "eval_split=val"])
      scores[(kd, lam)] = best_val(wd, "distill")
  kd, lam = max(scores, key=lambda k: (scores[k], -k[1]))
  return kd, lam, {f"{k} lambda {v:g}": list(sc) for (k, v), sc in scores.items()}


def query_regimes(root: str) -> list:
  """The regime (structure / repetitive / mixed) of each test query's place."""
  regimes = files.read_json(os.path.join(root, "synthetic.json"))["regimes"][SPLIT]
  vs = layout.read_split(root, SPLIT)
  return [regimes[int(layout.parse_name(p)["pano_id"][len(SPLIT):])] for p in vs.query_paths]


def rate(hits, mask=None) -> float:
  hits = np.asarray(hits, np.float64)
  return float(100.0 * (hits if mask is None else hits[np.asarray(mask)]).mean())


def breakdown(per_query: dict, labels: dict, methods, values) -> dict:
  """{method: {value: [per-seed R@1 over queries labelled value]}}."""
  out = {}
  for m in methods:
    out[m] = {v: [rate(per_query[m][s], np.asarray(labels[s]) == v) for s in per_query[m]
                  if np.any(np.asarray(labels[s]) == v)] for v in values}
  return out


def fmt(values) -> str:
  return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if len(values) else "-"


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/distill.py")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument("--test-places", type=int, default=400,
                      help="synthetic test places (2 queries each by default): >= 800 queries")
  parser.add_argument("--kd", default="feature", help="distill.kd of the KD variants")
  parser.add_argument("--lambda-kd", type=float, default=1.0, help="distill.lambda_kd")
  parser.add_argument("--select-kd", nargs="*", default=[],
                      help="KD forms to choose from on val (first seed)")
  parser.add_argument("--select-lambda", type=float, nargs="*", default=[],
                      help="lambda_kd values to choose from on val (first seed)")
  parser.add_argument("--workdir", default="runs/synthetic_structure")
  parser.add_argument("--override", nargs="*", default=[],
                      help="config overrides without the --config. prefix, e.g. train.num_steps=50")
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results",
                                                    "synthetic_structure"))
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--resamples", type=int, default=10000)
  parser.add_argument("--rerun-eval", action="store_true",
                      help="evaluate every variant again even when its test evaluation "
                           "already read its current stages with these settings")
  args = parser.parse_args()
  methods = [m for m, _ in METHODS if m in ("rgb", "seg") or m in args.variants]
  labels = dict(METHODS)
  t0 = time.time()
  stage1_cfg = {b: args.config.replace("distill.py", f"{b}.py") for b in ("rgb", "seg")}
  per_query = {m: {} for m in methods}
  conditions, regimes, partitions, selection = {}, {}, {}, {}
  for seed in args.seeds:
    common = [f"seed={seed}", f"data.synthetic_places.test={args.test_places}"] + args.override
    base = Workdir(os.path.join(args.workdir, f"seed{seed}", "base"))
    for branch in ("rgb", "seg"):
      run_main(stage1_cfg[branch], base.root, common)
    if seed == args.seeds[0] and (args.select_kd or args.select_lambda):
      args.kd, args.lambda_kd, selection = select_on_val(args, common, base, seed)
      print(f"selected on val: kd {args.kd}, lambda {args.lambda_kd:g} ({selection})",
            flush=True)
    common += [f"distill.kd={args.kd}"]
    for kind in args.variants:
      variant = Workdir(os.path.join(args.workdir, f"seed{seed}", kind))
      link_stage1(base, variant)
      lam = [] if kind == "triplet_only" else [f"distill.lambda_kd={args.lambda_kd}"]
      overrides = common + lam + VARIANTS[kind]
      if args.rerun_eval or not evaluated_with(variant, overrides):
        run_main(args.config, variant.root, overrides)
      else:
        print(f"[seed {seed}] {kind}: evaluated with these settings already; read as is",
              flush=True)
      per_query[kind][seed] = files.read_json(variant.per_query_json(SPLIT, "distill"))
      if kind == args.variants[-1]:
        for branch in ("rgb", "seg"):
          per_query[branch][seed] = files.read_json(variant.per_query_json(SPLIT, branch))
      if kind != "triplet_only":
        part = files.read_json(variant.partition_summary)
        partitions.setdefault(seed, {})[part.get("partition", "stage1")] = {
            g: part[g]["count"] for g in ("D1", "D2", "D3", "D4")}
    first = per_query[methods[0]][seed]
    for m in methods:    # every method answered the same queries in the same order
      if per_query[m][seed]["queries"] != first["queries"]:
        raise RuntimeError(f"seed {seed}: {m} was evaluated on other queries")
    conditions[seed] = first["conditions"]
    regimes[seed] = query_regimes(base.data)
    for m in methods:
      per_query[m][seed] = per_query[m][seed]["hits"]["R@1"]

  conds = sorted({c for s in conditions.values() for c in s})
  by_condition = breakdown(per_query, conditions, methods, conds)
  by_regime = breakdown(per_query, regimes, methods,
                        sorted({r for s in regimes.values() for r in s}))
  appearance = [c for c in conds if c in APPEARANCE]
  table = {m: {**{f"{c} R@1": by_condition[m][c] for c in conds},
               "all R@1": [rate(per_query[m][s]) for s in args.seeds],
               "appearance R@1": [float(np.mean([rate(per_query[m][s],
                                                      np.asarray(conditions[s]) == c)
                                                 for c in appearance])) for s in args.seeds]}
           for m in methods}
  paired = {}
  for other, base_m in COMPARISONS:
    if other in methods and base_m in methods:
      paired[f"{other} vs {base_m}"] = {
          "all": stats.paired_bootstrap(per_query[base_m], per_query[other], args.resamples),
          **{c: stats.paired_bootstrap(
              {s: np.asarray(per_query[base_m][s])[np.asarray(conditions[s]) == c]
               for s in args.seeds},
              {s: np.asarray(per_query[other][s])[np.asarray(conditions[s]) == c]
               for s in args.seeds}, args.resamples) for c in appearance}}
  wall = time.time() - t0
  command = (f"python experiments/synthetic_structure.py --config={args.config} --seeds "
             f"{' '.join(map(str, args.seeds))} --test-places {args.test_places} --kd {args.kd} "
             f"--lambda-kd {args.lambda_kd:g} --variants {' '.join(args.variants)}"
             + (f" --override {' '.join(args.override)}" if args.override else ""))
  n_queries = {s: len(conditions[s]) for s in args.seeds}
  lines = [
      "# StructVPR ablation on the synthetic city", "",
      f"Command: `{command}`", "",
      f"Seeds {args.seeds}; test queries per seed {n_queries}; KD form `{args.kd}`, lambda "
      f"{args.lambda_kd:g}" + (f" (chosen on val R@1 of seed {args.seeds[0]}: "
                               + ", ".join(f"{k}: {v[0]:.1f}" for k, v in selection.items())
                               + ")" if selection else "") + ". R@1 in "
      "percent, mean ± std over seeds. The partition criterion, the Eq. 3 weight and the KD "
      "form are our reconstruction (docs/design.md), not the paper's published constants; "
      "these are our numbers, not the paper's.",
      f"Wall time: {wall:.0f} s on {os.cpu_count()} CPU cores.", "",
      "| method | " + " | ".join(conds) + " | appearance mean | all |",
      "|---|" + "---|" * (len(conds) + 2)]
  for m in methods:
    lines.append(f"| {labels[m]} | " + " | ".join(fmt(table[m][f"{c} R@1"]) for c in conds)
                 + f" | {fmt(table[m]['appearance R@1'])} | {fmt(table[m]['all R@1'])} |")
  lines += ["", "## Paired differences (R@1 points, other − base; bootstrap 95 % CI, "
            "queries resampled within seed)", "",
            "| comparison | all | " + " | ".join(appearance) + " |",
            "|---|---|" + "---|" * len(appearance)]
  for name, res in paired.items():
    cells = [f"{r['diff']:+.1f} [{r['ci_low']:+.1f}, {r['ci_high']:+.1f}]"
             for r in [res["all"]] + [res[c] for c in appearance]]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", "## Teacher and student by the place's regime (R@1)", "",
            "| method | " + " | ".join(by_regime[methods[0]]) + " |",
            "|---|" + "---|" * len(by_regime[methods[0]])]
  for m in methods:
    lines.append(f"| {labels[m]} | " + " | ".join(fmt(v) for v in by_regime[m].values()) + " |")
  if partitions:
    lines += ["", "Partition of the training queries (D1 both right, D2 teacher only, D3 "
              "student only, D4 neither; `stage1` = the paper's, judged by the run's own "
              "stage-1 branches; `crossfit` = judged by branches trained on the other "
              "spatial fold):", ""]
    for s, by_kind in partitions.items():
      for kind, p in by_kind.items():
        lines.append(f"- seed {s}, {kind}: " + ", ".join(f"{g} {n}" for g, n in p.items()))
  files.write_text(args.out + ".md", "\n".join(lines) + "\n")
  files.write_json(args.out + ".json", {
      "unit": "percent", "seeds": args.seeds, "kd": args.kd, "lambda_kd": args.lambda_kd,
      "selection": selection, "overrides": args.override,
      "test_places": args.test_places, "command": command, "wall_s": wall,
      "per_query": {m: {str(s): [int(h) for h in v] for s, v in per_query[m].items()}
                    for m in methods},
      "conditions": {str(s): v for s, v in conditions.items()},
      "regimes": {str(s): v for s, v in regimes.items()},
      "table": table, "by_regime": by_regime, "paired": paired,
      "partition": {str(s): p for s, p in partitions.items()}}, sort_keys=False)
  print("\n".join(lines))


if __name__ == "__main__":
  main()

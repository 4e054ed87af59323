"""Ablation on the synthetic city: does structure distillation help the RGB branch?

For each seed: stage 1 RGB and seg once (`base/`); then partition + stage 2 +
test evaluation for each stage-2 variant in its own workdir, which links the
base's data and stage-1 branches:

  triplet_only   the same stage 2 (same stopping rule, init from stage 1) with
                 lambda_kd = 0: the control; a KD variant's gain over it is the
                 distillation's
  uniform        KD with weight 1 on every query (plain distillation)
  teacher_only   KD only where the teacher retrieves correctly (1[r_T <= tau])
  sigmoid        KD weighted by our Eq. 3 reconstruction (StructVPR)
  gate           teacher_only's 0/1 weights, the KD normalised by their sum
                 (a reliability gate, as StructVPR++ zeroes "noisy" pairs)
  *_crossfit     the same with the cross-fitted partition (distill.partition =
                 crossfit: stage 1 on each spatial half of the training places
                 judges the other half; the folds train once per seed, in base/)

The KD form of every KD variant is `--kd` (`KD_CHOICES`: feature, adaptor,
relational, relational_batch with a sharper teacher, rkd) and lambda
`--lambda-kd`, or, with `--select-kd` / `--select-lambda`, the combination
whose StructVPR (sigmoid) run has the best val R@1 (then R@5) on the first
seed; selection reads only val, never test. Every run is
`python -m structvpr_jax.main` (the user's code path); finished stages are
skipped, so an interrupted experiment resumes.

Seeds are the unit of progress: each finished seed is written to
`<out>_seeds/seed<k>.json` (and, with `--commit`, committed to git at once),
and a later invocation reads it instead of training that seed again (the KD
choice too), so the experiment may span sessions. The report aggregates
every requested seed that has a file.

Writes <out>.json:
  {"per_query": {method: {seed: [0/1 R@1 hit per test query]}},
   "conditions": {seed: [condition per test query]},
   "regimes": {seed: [regime of the query's place]},
   "table": {method: {"<condition> R@1": [mean, std, per-seed]}},
   "paired": {"<a> vs <b>": paired_bootstrap result},
   "partition": {seed: {"stage1" | "crossfit": D1-D4 counts}},
   "stages": {seed: {method: {stop_reason, epochs, best_epoch, steps, best_val, seconds,
                              val_curve: [[epoch, val R@1], ...]}}},
   "teacher_vs_student": {seed: val R@1 per condition},
   "selection": {"<kd> lambda <l>": val R@1, R@5}, "seeds", "kd", "lambda_kd",
   "overrides", "wall_s",
   "targets": [{"target", "measured", "met"}]: each target of the ablation,
     the best weighting (sigmoid or gate) chosen on val}
and <out>.md: the table (mean +- std over seeds), the teacher and student per
condition and regime, paired differences with bootstrap 95 % CIs (queries
resampled within seed, `structvpr_jax.stats`), how each stage stopped, and
the per-seed teacher-vs-student gaps. Queries differ between seeds (each
seed generates its own city), so the per-query lists are per seed; within a
seed every method answers the same queries in the same order (sorted file
names).

  python experiments/synthetic_structure.py [--config=configs/ablation.py]
      [--seeds 0 1 2 3 4] [--kd relational] [--lambda-kd 1]
      [--select-kd relational relational_batch rkd] [--select-lambda 0.3 1 3]
      [--variants ...] [--workdir runs/synthetic_structure] [--override k=v ...]
      [--out PATH] [--commit] [--aggregate-only]
"""

from __future__ import annotations

import argparse
import os
import platform
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
            "gate": ["distill.weighting=gate"],
            "teacher_only_crossfit": ["distill.weighting=teacher_only",
                                      "distill.partition=crossfit"],
            "sigmoid_crossfit": ["distill.weighting=sigmoid", "distill.partition=crossfit"]}
DEFAULT_VARIANTS = ("triplet_only", "uniform", "sigmoid", "gate")
# KD forms as the ablation names them: the config overrides of each.
KD_CHOICES = {"feature": ["distill.kd=feature"],
              "adaptor": ["distill.kd=adaptor"],
              "relational": ["distill.kd=relational"],
              # every candidate of the batch, a sharper teacher (CSD / SEED / SFRS: 0.01-0.07)
              "relational_batch": ["distill.kd=relational_batch", "distill.temperature=0.1",
                                   "distill.teacher_temperature=0.05"],
              "rkd": ["distill.kd=rkd"]}
METHODS = (("rgb", "RGB baseline (stage 1)"), ("seg", "seg teacher"),
           ("triplet_only", "stage 2 without KD (control)"),
           ("uniform", "uniform KD"), ("teacher_only", "teacher_only KD"),
           ("sigmoid", "StructVPR sigmoid (Eq. 3, ours)"),
           ("gate", "StructVPR gate (teacher-right pairs, ours)"),
           ("teacher_only_crossfit", "teacher_only KD, cross-fitted partition"),
           ("sigmoid_crossfit", "StructVPR sigmoid, cross-fitted partition"))
# (other, base): the comparisons the method's claims rest on.
COMPARISONS = (("sigmoid", "triplet_only"), ("gate", "triplet_only"), ("sigmoid", "uniform"),
               ("gate", "uniform"), ("uniform", "triplet_only"), ("gate", "sigmoid"),
               ("triplet_only", "rgb"), ("sigmoid", "rgb"),
               ("teacher_only", "triplet_only"),
               ("sigmoid_crossfit", "triplet_only"), ("sigmoid_crossfit", "uniform"),
               ("sigmoid_crossfit", "sigmoid"), ("teacher_only_crossfit", "triplet_only"),
               ("seg", "rgb"))
APPEARANCE = ("dusk", "fog", "night", "repaint")
SPLIT = "test"
STAGE_FIELDS = ("stop_reason", "epochs", "best_epoch", "steps", "best_step", "best_val",
                "seconds_this_run")


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


def select_on_val(args, config, common, base: Workdir, seed: int) -> tuple:
  """(kd, lambda, {label: (val R@1, R@5)}): the StructVPR run with the best val
  R@1 (ties: R@5, then the smaller lambda) over --select-kd x --select-lambda,
  on one seed."""
  scores = {}
  for kd in args.select_kd or [args.kd]:
    for lam in args.select_lambda or [args.lambda_kd]:
      wd = Workdir(os.path.join(args.workdir, f"seed{seed}", f"select_{kd}_lambda{lam:g}"))
      link_stage1(base, wd)
      # evaluated on val (eval_split), so that choosing never reads test
      run_main(config, wd.root, common + VARIANTS["sigmoid"] + KD_CHOICES[kd]
               + [f"distill.lambda_kd={lam}", "eval_split=val"])
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


def val_curve(wd: Workdir, stage: str) -> list:
  """[[epoch, val R@1], ...] of a training stage, from its metrics.jsonl (an
  epoch validated again after a resume counts once, its last reading). A
  stage linked from another workdir (the chosen KD selection run) is read
  from that workdir's metrics."""
  real = os.path.realpath(wd.stage_dir(stage))
  if real != os.path.abspath(wd.stage_dir(stage)):
    wd = Workdir(os.path.dirname(real))
  if not os.path.exists(wd.metrics):
    return []
  curve = {int(r["epoch"]): float(r["val_R@1"]) for r in files.read_jsonl(wd.metrics)
           if r.get("event") == "val" and r.get("stage") == stage and "val_R@1" in r}
  return [[e, curve[e]] for e in sorted(curve)]


def recorded_curve(stage: dict, wd: Workdir) -> list:
  """A stage-2 record's val curve; for records written before curves were
  recorded, the workdir's, if it is the same run (its last epoch and its best
  epoch's val R@1 are the record's), else []."""
  if stage.get("val_curve"):
    return stage["val_curve"]
  curve = dict((int(e), v) for e, v in val_curve(wd, "distill"))
  best = (stage.get("best_val") or {}).get("val_R@1")
  if (curve and max(curve) == stage.get("epochs") and best is not None
      and curve.get(stage.get("best_epoch")) == best):
    return [[e, v] for e, v in sorted(curve.items())]
  return []


def trained_epochs(curve: list) -> list:
  """The val R@1 of a curve's trained epochs (epoch >= 1; epoch 0 is the start)."""
  return [v for e, v in curve or [] if e >= 1]


def stage_record(wd: Workdir, stage: str) -> dict:
  """How a finished training stage ran: its done.json's stopping fields and
  its val curve."""
  done = wd.done(stage) or {}
  return {**{k: done.get(k) for k in STAGE_FIELDS}, "val_curve": val_curve(wd, stage)}


def host() -> str:
  """The CPU's model name (/proc/cpuinfo), else the platform's."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def commit(path: str, message: str) -> None:
  """`git add` + `git commit --only` of one file in its repository (retried
  while another git command holds the index lock)."""
  repo = subprocess.run(["git", "-C", os.path.dirname(path), "rev-parse", "--show-toplevel"],
                        capture_output=True, text=True, check=True).stdout.strip()
  for attempt in range(20):
    add = subprocess.run(["git", "-C", repo, "add", path], capture_output=True, text=True)
    done = add.returncode == 0 and subprocess.run(
        ["git", "-C", repo, "commit", "-m", message, "--only", "--", path],
        capture_output=True, text=True).returncode == 0
    if done:
      print(f"committed {os.path.relpath(path, repo)}", flush=True)
      return
    time.sleep(3 + attempt)
  print(f"warning: could not commit {path}; commit it by hand", flush=True)


def run_seed(args, seed: int, kd_choice) -> dict:
  """Trains and evaluates every variant of one seed; returns its record."""
  t0 = time.time()
  config = args.config
  common = [f"seed={seed}"] + args.override
  base = Workdir(os.path.join(args.workdir, f"seed{seed}", "base"))
  for branch in ("rgb", "seg"):
    run_main(config, base.root, common + [f"mode=train_{branch}"])
  selection = {}
  if kd_choice is None:
    kd, lam = args.kd, args.lambda_kd
    if args.select_kd or args.select_lambda:
      kd, lam, selection = select_on_val(args, config, common, base, seed)
      print(f"selected on val: kd {kd}, lambda {lam:g} ({selection})", flush=True)
  else:
    kd, lam = kd_choice
  record = {"seed": seed, "kd": kd, "lambda_kd": lam, "selection": selection,
            "overrides": args.override, "config": config,
            "native": os.environ.get("STRUCTVPR_NATIVE", "auto"), "host": host(),
            "per_query": {}, "stages": {"rgb": stage_record(base, "rgb"),
                                        "seg": stage_record(base, "seg")},
            "partition": {}, "teacher_vs_student": None}
  for kind in args.variants:
    variant = Workdir(os.path.join(args.workdir, f"seed{seed}", kind))
    link_stage1(base, variant)
    if kind == "sigmoid" and selection:
      # the chosen selection run is this variant's stage 2 (the same fields;
      # only its evaluation read val): reuse its partition and stage 2
      chosen = Workdir(os.path.join(args.workdir, f"seed{seed}", f"select_{kd}_lambda{lam:g}"))
      for stage_dir in (chosen.partition_dir, chosen.stage_dir("distill")):
        dst = os.path.join(variant.root, os.path.basename(stage_dir))
        if not os.path.exists(dst):
          os.symlink(os.path.abspath(stage_dir), dst)
    lam_o = [] if kind == "triplet_only" else [f"distill.lambda_kd={lam}"]
    overrides = common + KD_CHOICES[kd] + lam_o + VARIANTS[kind]
    if args.rerun_eval or not evaluated_with(variant, overrides):
      run_main(config, variant.root, overrides)
    else:
      print(f"[seed {seed}] {kind}: evaluated with these settings already; read as is",
            flush=True)
    hits = files.read_json(variant.per_query_json(SPLIT, "distill"))
    record["per_query"][kind] = hits
    if os.path.exists(variant.per_query_json(SPLIT, "distill+R")):   # eval.rerank on
      record["per_query"][f"{kind}+R"] = files.read_json(
          variant.per_query_json(SPLIT, "distill+R"))
    record["stages"][kind] = stage_record(variant, "distill")
    if kind == args.variants[-1]:
      for branch in ("rgb", "seg", "rgb+R", "seg+R"):
        if branch in ("rgb", "seg") or os.path.exists(variant.per_query_json(SPLIT, branch)):
          record["per_query"][branch] = files.read_json(variant.per_query_json(SPLIT, branch))
    part = files.read_json(variant.partition_summary)
    if kind != "triplet_only":
      record["partition"][part.get("partition", "stage1")] = {
          g: part[g]["count"] for g in ("D1", "D2", "D3", "D4")}
    if part.get("val_teacher_vs_student") and record["teacher_vs_student"] is None:
      record["teacher_vs_student"] = part["val_teacher_vs_student"]
      record["teacher_warning"] = part.get("teacher_warning")
  first = next(iter(record["per_query"].values()))
  for m, rec in record["per_query"].items():   # every method answered the same queries
    if rec["queries"] != first["queries"]:
      raise RuntimeError(f"seed {seed}: {m} was evaluated on other queries")
  record["conditions"] = first["conditions"]
  record["queries"] = first["queries"]
  record["regimes"] = query_regimes(base.data)
  record["per_query"] = {m: [int(h) for h in rec["hits"]["R@1"]]
                         for m, rec in record["per_query"].items()}
  record["wall_s"] = time.time() - t0
  return record


def method_labels() -> tuple:
  """METHODS with each method's re-ranked row ("<method>+R") after it."""
  out = []
  for m, label in METHODS:
    out += [(m, label), (f"{m}+R", f"{label} +R")]
  return tuple(out)


# the re-ranked rows against their global-only rows
RERANK_COMPARISONS = tuple((f"{m}+R", m) for m, _ in METHODS)


# The StructVPR weightings; the ablation's targets test the one val prefers.
WEIGHTINGS = ("sigmoid", "gate")


def _ci(res: dict) -> str:
  return f"{res['diff']:+.1f} [{res['ci_low']:+.1f}, {res['ci_high']:+.1f}]"


def target_checks(records: dict, resamples: int, robustness: dict | None = None,
                  curves: dict | None = None) -> list:
  """Each target of the ablation, measured on the seed records {seed: record}.

  The best StructVPR weighting is chosen on val, never on test: the mean over
  seeds of each weighting's best val R@1; ties (e.g. every variant kept its
  start, the stage-1 checkpoint) broken by the mean val R@1 of its trained
  epochs (`curves` {seed: {method: [[epoch, val R@1], ...]}}, epochs >= 1),
  then by the order of WEIGHTINGS. Returns a list of
  {"target", "measured", "met"}; "met" is None where the records cannot
  measure it (a method or the robustness rerun is missing, one seed only).
  """
  seeds = sorted(records)
  def hits(m, cond=None):
    out = {}
    for s in seeds:
      h = np.asarray(records[s]["per_query"][m])
      out[s] = h if cond is None else h[np.asarray(records[s]["conditions"]) == cond]
    return out
  have = lambda *ms: all(m in records[s]["per_query"] for m in ms for s in seeds)
  checks = []
  def add(target, measured, met):
    checks.append({"target": target, "measured": measured,
                   "met": None if met is None else bool(met)})
  if have("rgb", "triplet_only"):
    res = stats.paired_bootstrap(hits("rgb"), hits("triplet_only"), resamples)
    add("converged: no-KD control within 2 points of stage-1 RGB",
        f"control − RGB {_ci(res)}", abs(res["diff"]) <= 2.0)
  if have("seg"):
    teacher = [rate(records[s]["per_query"]["seg"]) for s in seeds]
    add("stable: seed-to-seed std of the teacher's test R@1 ≤ 5",
        f"std {np.std(teacher):.1f} over {len(seeds)} seed{'s' * (len(seeds) > 1)} ("
        + ", ".join(f"{t:.1f}" for t in teacher) + ")",
        None if len(seeds) < 2 else np.std(teacher) <= 5.0)
  if robustness:
    worst = max((abs(robustness[m]["other"][k] - robustness[m]["this"][k]), m, k)
                for m in robustness for k in robustness[m]["this"])
    add("stable: STRUCTVPR_NATIVE=0 rerun within 3 points for every branch",
        f"largest gap {worst[0]:.1f} ({worst[1]}, seed {worst[2]})", worst[0] <= 3.0)
  else:
    add("stable: STRUCTVPR_NATIVE=0 rerun within 3 points for every branch",
        "not run (--compare-to)", None)
  if have("rgb", "seg"):
    student, teacher = hits("rgb", "night"), hits("seg", "night")
    per_seed = {s: stats.paired_bootstrap({s: student[s]}, {s: teacher[s]}, resamples)
                for s in seeds}
    add("teacher beats the stage-1 student at night, CI > 0 in every seed",
        "; ".join(f"seed {s} {_ci(r)}" for s, r in per_seed.items()),
        all(r["ci_low"] > 0 for r in per_seed.values()))
  weightings = [w for w in WEIGHTINGS if have(w)]
  if weightings and have("triplet_only"):
    val = {w: float(np.mean([(records[s]["stages"][w].get("best_val") or {}).get("val_R@1",
                                                                                 np.nan)
                             for s in seeds])) for w in weightings}
    trained = {w: float(np.mean([np.mean(trained_epochs((curves or {}).get(s, {}).get(w))
                                         or [np.nan]) for s in seeds]))
               for w in weightings}
    best = max(weightings, key=lambda w: (not np.isnan(val[w]), val[w],
                                          not np.isnan(trained[w]), trained[w]))
    chosen = (f"{best} (best val R@1 " + ", ".join(f"{w} {v:.1f}" for w, v in val.items())
              + ("; mean over trained epochs " + ", ".join(
                  f"{w} {v:.1f}" for w, v in trained.items())
                 if not any(np.isnan(v) for v in trained.values()) else "") + ")")
    res = stats.paired_bootstrap(hits("triplet_only"), hits(best), resamples)
    add("the best weighting (chosen on val) beats the no-KD control by ≥ +3, CI > 0",
        f"{chosen}: {_ci(res)}", res["diff"] >= 3.0 and res["ci_low"] > 0)
    if have("uniform"):
      res = stats.paired_bootstrap(hits("uniform"), hits(best), resamples)
      add("the best weighting beats uniform KD, CI > 0", f"{best} − uniform {_ci(res)}",
          res["ci_low"] > 0)
    res = stats.paired_bootstrap(hits("triplet_only", "night"), hits(best, "night"), resamples)
    add("distilled night R@1 above the control's, CI > 0", f"{best} − control at night "
        f"{_ci(res)}", res["ci_low"] > 0)
  return checks


def seed_path(args, seed: int) -> str:
  return os.path.join(args.out + "_seeds", f"seed{seed}.json")


def aggregate(args, records: dict) -> None:
  """<out>.md / <out>.json from the seed records {seed: record}."""
  seeds = sorted(records)
  first = records[seeds[0]]
  methods = [m for m, _ in method_labels()
             if all(m in records[s]["per_query"] for s in seeds)]
  labels = dict(method_labels())
  per_query = {m: {s: records[s]["per_query"][m] for s in seeds} for m in methods}
  conditions = {s: records[s]["conditions"] for s in seeds}
  regimes = {s: records[s]["regimes"] for s in seeds}
  conds = sorted({c for v in conditions.values() for c in v})
  by_condition = breakdown(per_query, conditions, methods, conds)
  by_regime = breakdown(per_query, regimes, methods, sorted({r for v in regimes.values()
                                                              for r in v}))
  appearance = [c for c in conds if c in APPEARANCE]
  table = {m: {**{f"{c} R@1": by_condition[m][c] for c in conds},
               "all R@1": [rate(per_query[m][s]) for s in seeds],
               "appearance R@1": [float(np.mean([rate(per_query[m][s],
                                                      np.asarray(conditions[s]) == c)
                                                 for c in appearance])) for s in seeds]}
           for m in methods}
  paired = {}
  for other, base_m in COMPARISONS + RERANK_COMPARISONS:
    if other in methods and base_m in methods:
      paired[f"{other} vs {base_m}"] = {
          "all": stats.paired_bootstrap(per_query[base_m], per_query[other], args.resamples),
          **{c: stats.paired_bootstrap(
              {s: np.asarray(per_query[base_m][s])[np.asarray(conditions[s]) == c]
               for s in seeds},
              {s: np.asarray(per_query[other][s])[np.asarray(conditions[s]) == c]
               for s in seeds}, args.resamples) for c in appearance}}
  kd, lam = first["kd"], first["lambda_kd"]
  selection = first.get("selection") or {}
  wall = sum(float(records[s].get("wall_s", 0.0)) for s in seeds)
  command = (f"python experiments/synthetic_structure.py --config={first['config']} --seeds "
             f"{' '.join(map(str, seeds))} --kd {kd} --lambda-kd {lam:g} --variants "
             f"{' '.join(m for m in methods if m not in ('rgb', 'seg') and not m.endswith('+R'))}"
             + (f" --override {' '.join(first['overrides'])}" if first["overrides"] else ""))
  n_queries = {s: len(conditions[s]) for s in seeds}
  lines = [
      "# StructVPR ablation on the synthetic city", "",
      f"Command: `{command}`", "",
      f"Seeds {seeds} (each a file in `{os.path.relpath(args.out, REPO)}_seeds/`); test "
      f"queries per seed {n_queries}; KD form `{kd}` ({', '.join(KD_CHOICES[kd])}), lambda "
      f"{lam:g}" + (f" (chosen on val R@1 of seed {seeds[0]}: "
                    + ", ".join(f"{k}: {v[0]:.1f}" for k, v in selection.items())
                    + ")" if selection else "") + ". R@1 in "
      "percent, mean ± std over seeds. The partition criterion, the Eq. 3 weight, the gate "
      "and the KD forms are our reconstruction (docs/design.md), not the paper's published "
      "constants; these are our numbers, not the paper's.",
      f"Wall time: {wall:.0f} s for these seeds on {os.cpu_count()} CPU cores "
      f"({first.get('host', '?')}; kernels STRUCTVPR_NATIVE={first.get('native', 'auto')}).",
      "",
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
  lines += ["", "## Per seed (test R@1, all conditions)", "",
            "| seed | " + " | ".join(labels[m] for m in methods) + " |",
            "|---|" + "---|" * len(methods)]
  for s in seeds:
    lines.append(f"| {s} | " + " | ".join(f"{rate(per_query[m][s]):.1f}" for m in methods)
                 + " |")
  trained = [m for m in methods if not m.endswith("+R")]
  lines += ["", "## How each stage stopped (epochs of the early-stopping rule; best epoch "
            "by val R@1)", "",
            "| seed | " + " | ".join(m for m in trained) + " |",
            "|---|" + "---|" * len(trained)]
  for s in seeds:
    cells = []
    for m in trained:
      st = records[s]["stages"].get(m, {})
      cells.append(f"{st.get('stop_reason') or '-'} {st.get('epochs', '-')} "
                   f"(best {st.get('best_epoch', '-')})" if st.get("epochs") is not None
                   else (st.get("stop_reason") or "-"))
    lines.append(f"| {s} | " + " | ".join(cells) + " |")
  curves = {s: {m: recorded_curve(records[s]["stages"].get(m, {}),
                                  Workdir(os.path.join(args.workdir, f"seed{s}", m)))
                 for m in trained if m not in ("rgb", "seg")} for s in seeds}
  stage2 = [m for m in trained if m not in ("rgb", "seg")]
  if any(c for by_m in curves.values() for c in by_m.values()):
    lines += ["", "## Stage 2 on val (R@1: the start, epoch 0 = stage-1 RGB / mean / best of "
              "the trained epochs)", "",
              "Every stage-2 variant starts from the same weights and data order; the mean "
              "over its trained epochs shows a KD effect on val that the selection (which "
              "keeps the start unless an epoch beats it) may hide.", "",
              "| seed | " + " | ".join(stage2) + " |", "|---|" + "---|" * len(stage2)]
    for s in seeds:
      cells = []
      for m in stage2:
        curve = curves[s].get(m) or []
        start = dict(curve).get(0)
        trained_vals = trained_epochs(curve)
        cells.append("-" if not trained_vals else
                     f"{'-' if start is None else f'{start:.1f}'} / {np.mean(trained_vals):.1f}"
                     f" / {max(trained_vals):.1f} ({len(trained_vals)} ep)")
      lines.append(f"| {s} | " + " | ".join(cells) + " |")
  tvs = {s: records[s].get("teacher_vs_student") for s in seeds
         if records[s].get("teacher_vs_student")}
  if tvs:
    keys = list(next(iter(tvs.values()))["teacher"])
    lines += ["", "## Stage-1 teacher vs student on val (R@1, teacher / student)", "",
              "| seed | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for s, c in tvs.items():
      lines.append(f"| {s} | " + " | ".join(
          f"{c['teacher'][k]:.1f} / {c['student'][k]:.1f}" for k in keys) + " |")
    warned = [s for s in seeds if records[s].get("teacher_warning")]
    if warned:
      lines += ["", f"Teacher warning (not better than the student anywhere on val): seeds "
                f"{warned}."]
  lines += ["", "## Teacher and student by the place's regime (R@1)", "",
            "| method | " + " | ".join(by_regime[methods[0]]) + " |",
            "|---|" + "---|" * len(by_regime[methods[0]])]
  for m in methods:
    lines.append(f"| {labels[m]} | " + " | ".join(fmt(v) for v in by_regime[m].values()) + " |")
  partitions = {s: records[s]["partition"] for s in seeds if records[s]["partition"]}
  if partitions:
    lines += ["", "Partition of the training queries (D1 both right, D2 teacher only, D3 "
              "student only, D4 neither; `stage1` = the paper's, judged by the run's own "
              "stage-1 branches; `crossfit` = judged by branches trained on the other "
              "spatial fold):", ""]
    for s, by_kind in partitions.items():
      for kind, p in by_kind.items():
        lines.append(f"- seed {s}, {kind}: " + ", ".join(f"{g} {n}" for g, n in p.items()))
  robustness = {}
  if args.compare_to:
    other = {}
    for s_ in seeds:
      path = os.path.join(os.path.abspath(args.compare_to) + "_seeds", f"seed{s_}.json")
      if os.path.exists(path):
        other[s_] = files.read_json(path)
    if other:
      o_first = other[min(other)]
      lines += ["", f"## Robustness: the same seeds with other kernels "
                f"(STRUCTVPR_NATIVE={o_first.get('native', '?')}; "
                f"`{os.path.relpath(os.path.abspath(args.compare_to), REPO)}`)", "",
                "Test R@1, all conditions: this run, the other run, and other − this "
                "(bootstrap 95 % CI over queries within seed).", "",
                "| method | " + " | ".join(f"seed {s_}" for s_ in other) + " | other − this |",
                "|---|" + "---|" * (len(other) + 1)]
      for m in methods:
        if not all(m in other[s_]["per_query"] for s_ in other):
          continue
        for s_ in other:
          if other[s_]["queries"] != records[s_]["queries"]:
            raise RuntimeError(f"seed {s_}: the compared run answered other queries")
        mine = {s_: records[s_]["per_query"][m] for s_ in other}
        theirs = {s_: other[s_]["per_query"][m] for s_ in other}
        res = stats.paired_bootstrap(mine, theirs, args.resamples)
        robustness[m] = {"this": {str(s_): rate(mine[s_]) for s_ in other},
                         "other": {str(s_): rate(theirs[s_]) for s_ in other}, **res}
        cells = [f"{rate(mine[s_]):.1f} / {rate(theirs[s_]):.1f}" for s_ in other]
        lines.append(f"| {labels[m]} | " + " | ".join(cells)
                     + f" | {res['diff']:+.1f} [{res['ci_low']:+.1f}, {res['ci_high']:+.1f}] |")
  checks = target_checks(records, args.resamples, robustness, curves)
  lines += ["", "## Targets (test R@1; paired 95 % CIs; the weighting chosen on val)", "",
            "| target | measured | met |", "|---|---|---|"]
  for c in checks:
    met = "not measurable yet" if c["met"] is None else ("yes" if c["met"] else "no")
    lines.append(f"| {c['target']} | {c['measured']} | {met} |")
  if os.path.exists(args.out + ".findings.md"):
    with open(args.out + ".findings.md") as f:
      lines += ["", f.read().rstrip()]
  files.write_text(args.out + ".md", "\n".join(lines) + "\n")
  files.write_json(args.out + ".json", {
      "unit": "percent", "seeds": seeds, "kd": kd, "lambda_kd": lam,
      "selection": selection, "overrides": first["overrides"], "command": command,
      "wall_s": wall,
      "per_query": {m: {str(s): v for s, v in per_query[m].items()} for m in methods},
      "conditions": {str(s): v for s, v in conditions.items()},
      "regimes": {str(s): v for s, v in regimes.items()},
      "table": table, "by_regime": by_regime, "paired": paired,
      "partition": {str(s): p for s, p in partitions.items()},
      "stages": {str(s): records[s]["stages"] for s in seeds},
      "teacher_vs_student": {str(s): v for s, v in tvs.items()},
      "robustness": robustness, "targets": checks}, sort_keys=False)
  print("\n".join(lines))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/ablation.py")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument("--kd", default="relational", choices=list(KD_CHOICES),
                      help="the KD form of the KD variants")
  parser.add_argument("--lambda-kd", type=float, default=1.0, help="distill.lambda_kd")
  parser.add_argument("--select-kd", nargs="*", default=[], choices=list(KD_CHOICES),
                      help="KD forms to choose from on val (first seed)")
  parser.add_argument("--select-lambda", type=float, nargs="*", default=[],
                      help="lambda_kd values to choose from on val (first seed)")
  parser.add_argument("--workdir", default="runs/synthetic_structure")
  parser.add_argument("--override", nargs="*", default=[],
                      help="config overrides without the --config. prefix, e.g. train.patience=5")
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results",
                                                    "synthetic_structure"))
  parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                      choices=list(VARIANTS))
  parser.add_argument("--resamples", type=int, default=10000)
  parser.add_argument("--rerun-eval", action="store_true",
                      help="evaluate every variant again even when its test evaluation "
                           "already read its current stages with these settings")
  parser.add_argument("--commit", action="store_true",
                      help="git-commit each finished seed's file as soon as it is written")
  parser.add_argument("--compare-to", default="",
                      help="another run's --out (e.g. the same seeds with STRUCTVPR_NATIVE=0): "
                           "a robustness table of every method, this run vs that one")
  parser.add_argument("--aggregate-only", action="store_true",
                      help="train nothing: write the report from the seed files present")
  args = parser.parse_args()
  args.out = os.path.abspath(args.out)
  records, kd_choice = {}, None
  for seed in args.seeds:
    path = seed_path(args, seed)
    if os.path.exists(path):
      records[seed] = files.read_json(path)
      print(f"[seed {seed}] finished earlier: {os.path.relpath(path, REPO)}", flush=True)
      continue
    if args.aggregate_only:
      continue
    if records:
      kd_choice = (records[min(records)]["kd"], records[min(records)]["lambda_kd"])
    records[seed] = run_seed(args, seed, kd_choice)
    files.write_json(path, records[seed])
    if args.commit:
      commit(path, f"synthetic_structure: seed {seed} finished ({len(records)} of "
                   f"{len(args.seeds)} seeds; per-query test hits of every method)")
    aggregate(args, records)
  if not records:
    raise SystemExit("no finished seed to report")
  aggregate(args, records)


if __name__ == "__main__":
  main()

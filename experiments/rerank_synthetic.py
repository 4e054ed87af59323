"""Synthetic ablation world: + R (re-ranking the global top-K) vs global retrieval, over seeds.

  python experiments/rerank_synthetic.py [--workdir runs/ablation] [--seeds 0 1 2 3 4]
      [--variants triplet_only uniform sigmoid gate] [--config configs/ablation.py]
      [--selection-seed 0] [--grid full|quick] [--out experiments/results/rerank_synthetic]
      [--resamples 10000] [--aggregate-only]

Reads the workdirs experiments/synthetic_structure.py writes (trains
nothing): <workdir>/seed<k>/base (data/, the stage-1 RGB branch in rgb/) and
<workdir>/seed<k>/<variant>/distill (the distilled RGB branch of each stage-2
variant), each used once its done.json exists. The structure follows
experiments/rerank_gardens_point.py; every evaluation is
`stages.evaluate.rerank_checkpoint_variants` (one extraction, several
re-ranking settings) or `rerank_checkpoint`.

1. Selection, on val of the selection seed only (the ablation's), stage-1
   RGB checkpoint: every setting of `GRID` (layer x patch sizes x method x
   top-K x fusion: eval.rerank_global_weight 0 = the local score alone, as
   Patch-NetVLAD, or 1 = + the global similarity z-normalised over the
   top-K, `rerank.fuse_global`); the chosen one has the best val R@1, ties
   broken by val R@5, then by the lower re-ranking time. No test image is
   read in this step. Written to <out>_seeds/selection.json and reused by
   later runs made with the same grid, --config, checkpoint folder, step
   and training run (done.json's run id; selected again otherwise).
2. Test, read once per checkpoint: per seed, the stage-1 RGB ("rgb") and
   each finished variant's distilled branch, global retrieval and the
   chosen + R from one extraction of the test split; recalls, per-query hits
   (every R@n) and conditions go to <out>_seeds/seed<k>.json, rewritten
   (atomically) after each checkpoint. A method already in the file is not
   evaluated again while its training stage is the same run (done.json's run
   id; retrained or unfinished since: dropped and evaluated again when
   finished); a seed whose file holds every requested method is
   skipped; methods not finished at the time are added by a later run (the
   file says which were missing). A file made with another chosen setting
   or --config is an error (move it away to evaluate again).
3. Aggregate over the seeds with files (only the requested methods): per
   method the paired difference of + R minus global (R@1, R@5), mean over
   seeds, bootstrap 95 % CI with queries resampled within each seed
   (`stats.paired_bootstrap`), overall and per condition -> <out>.json and
   <out>.md.

<out>.json: {"command", "unit", "config", "grid", "selection": {"seed",
"split", "config", "checkpoint", "step", "rows": [{setting, global, rerank,
step}], "chosen", "seconds"}, "seeds": {method: [seeds]}, "methods":
{method: {"label", "seeds", "steps", "global": {"R@n": [per seed]},
"rerank": {...}, "paired": {"R@n": ..., "per_condition": {cond: {"R@n":
..., "global R@1": [per seed], "rerank R@1": [per seed]}}}, "ms_per_query":
[per seed]}}, "per_query": {method: {seed: R@1 hits of global retrieval},
"<method>+R": {seed: R@1 hits of + R}} (synthetic_structure.json's form:
experiments/paired.py reads it, e.g. `<out>.json:rgb <out>.json:rgb+R`),
"conditions": {seed: [condition per query]}, "incomplete": {seed: [methods
missing]}, "wall_s"}. Every write goes through structvpr_jax.files (a
temporary file renamed into place).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "experiments"))

import synthetic_structure  # noqa: E402  (the ablation's variants and their labels)
from structvpr_jax import checkpoint, files, stats  # noqa: E402
from structvpr_jax.stages import evaluate  # noqa: E402
from structvpr_jax.workdir import Workdir  # noqa: E402

# (layer, patch sizes, method, top-K, global weight): 2 x 3 x 2 x 3 x 2 = 72
# settings, "local" features (each window's mean normalised feature), stride 1.
# One extraction per (layer, patch sizes).
GRIDS = {
    "full": list(itertools.product(("final", "stride16"), ((1,), (2,), (1, 2)),
                                   ("rss", "ransac"), (5, 10, 100), (0.0, 1.0))),
    # the smoke test's: one extraction, four settings
    "quick": list(itertools.product(("stride16",), ((2,),), ("rss", "ransac"), (5,),
                                    (0.0, 1.0))),
}
NS = (1, 5)            # the recalls compared
LABELS = dict(synthetic_structure.METHODS)
LABELS["rgb"] = "stage-1 RGB"


def load_config(spec: str):
  """configs/<name>.py[:arg] -> its get_config(arg)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("experiment_config",
                                                       os.path.join(REPO, path))
  if module_spec is None or not os.path.isfile(os.path.join(REPO, path)):
    raise SystemExit(f"--config {spec}: {path} is not a config file")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def overrides(setting) -> dict:
  layer, sizes, method, topk, weight = setting
  return {"rerank": method, "rerank_layer": layer, "rerank_patch_sizes": tuple(sizes),
          "rerank_patch_strides": (1,) * len(sizes), "rerank_topk": int(topk),
          "rerank_global_weight": float(weight)}


def flags(setting) -> str:
  """The setting as --config.eval.* flags."""
  return " ".join(f"--config.eval.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
                  for k, v in overrides(setting).items())


def plain(setting) -> list:
  return [list(x) if isinstance(x, tuple) else x for x in setting]


def checkpoint_step(checkpoint_dir: str):
  """The step `rerank_checkpoint` restores from `checkpoint_dir` (the best on
  val; `checkpoint.restore_variables`'s rule), without restoring it."""
  directory, step = checkpoint.resolve_directory(checkpoint_dir)
  if step is None and os.path.isdir(directory):
    step = checkpoint.best_step(checkpoint.manager(directory, read_only=True))
  return step


def wanted_methods(args) -> list:
  return ["rgb"] + [v for v in args.variants if v != "rgb"]


def select(config, wd: Workdir, grid: list) -> list:
  """Every grid setting on val of `wd`'s stage-1 RGB branch: one
  rerank_checkpoint_variants call per (layer, patch sizes)."""
  rows = []
  groups = {}
  for setting in grid:
    groups.setdefault(tuple(setting[:2]), []).append(setting)
  for key, settings in groups.items():
    t0 = time.time()
    results = evaluate.rerank_checkpoint_variants(
        config, wd.checkpoints("rgb"), wd.data, "val", [overrides(s) for s in settings])
    for s, r in zip(settings, results):
      rows.append({"setting": plain(s), "global": r["global"], "rerank": r["rerank"],
                   "step": r["step"]})
      print(f"val {s}: R@1 {r['global']['R@1']:.1f} -> {r['rerank']['R@1']:.1f}, "
            f"R@5 {r['global']['R@5']:.1f} -> {r['rerank']['R@5']:.1f}, "
            f"{r['rerank']['rerank']['ms_per_query']:.1f} ms/query", flush=True)
    print(f"  ({key}: {time.time() - t0:.0f} s)", flush=True)
  return rows


def choose(rows: list) -> dict:
  """Best val R@1, ties by R@5, then by the lower ms per query."""
  return max(rows, key=lambda r: (r["rerank"]["R@1"], r["rerank"]["R@5"],
                                  -r["rerank"]["rerank"]["ms_per_query"]))


def selection(args, config, grid) -> dict:
  wd = Workdir(os.path.join(args.workdir, f"seed{args.selection_seed}", "base"))
  if wd.done("rgb") is None:
    raise SystemExit(f"{wd.done_json('rgb')}: missing; the selection seed's stage-1 RGB "
                     "branch has not finished")
  path = os.path.join(args.out + "_seeds", "selection.json")
  ckpt = wd.checkpoints("rgb")
  if os.path.exists(path):
    rec = files.read_json(path)
    made = {k: rec.get(k) for k in ("grid", "config", "checkpoint", "step", "run_id")}
    now = {"grid": [plain(s) for s in grid], "config": args.config, "checkpoint": ckpt,
           "step": checkpoint_step(ckpt), "run_id": wd.run_id("rgb")}
    if made == now:
      print(f"[selection] read {path} (chosen {rec['chosen']})", flush=True)
      return rec
    differ = sorted(k for k in now if made[k] != now[k])
    print(f"[selection] {path} was made with another {', '.join(differ)}: selecting again",
          flush=True)
  t0 = time.time()
  rows = select(config, wd, grid)
  best = choose(rows)
  rec = {"seed": args.selection_seed, "split": "val", "config": args.config,
         "checkpoint": ckpt, "run_id": wd.run_id("rgb"), "step": best["step"], "grid": [plain(s) for s in grid], "rows": rows,
         "chosen": best["setting"], "seconds": time.time() - t0}
  files.write_json(path, rec)
  print(f"[selection] chosen on val: {best['setting']} ({rec['seconds']:.0f} s)", flush=True)
  return rec


def checkpoints_of_seed(args, seed: int) -> tuple:
  """({method: (checkpoint dir, run id of its training stage)} of the finished
  branches, [methods not finished])."""
  root = os.path.join(args.workdir, f"seed{seed}")
  stages = [("rgb", Workdir(os.path.join(root, "base")), "rgb")] + [
      (v, Workdir(os.path.join(root, v)), "distill") for v in args.variants]
  found, missing = {}, []
  for method, wd, stage in stages:
    if wd.done(stage) is not None:
      found[method] = (wd.checkpoints(stage), wd.run_id(stage))
    else:
      missing.append(method)
  return found, missing


def test_seed(args, config, chosen, seed: int) -> dict:
  """Adds the missing finished methods of one seed to its file; returns the record."""
  path = os.path.join(args.out + "_seeds", f"seed{seed}.json")
  rec = files.read_json(path) if os.path.exists(path) else None
  if rec is not None and (rec.get("setting"), rec.get("config")) != (chosen, args.config):
    raise SystemExit(f"{path}: made with setting {rec.get('setting')} and --config "
                     f"{rec.get('config')}, now {chosen} and {args.config}; move it away to "
                     "evaluate this seed again")
  wanted = wanted_methods(args)
  found, missing = checkpoints_of_seed(args, seed)
  if rec is not None:
    # a method whose training stage ran again since (another run id; or now
    # unfinished) is evaluated again, never reported from the old weights
    for m in list(rec["methods"]):
      now = found.get(m, (None, None))[1]
      if rec["methods"][m].get("run_id") != now:
        print(f"[seed {seed}] {m}: its checkpoint changed since {path} was written "
              f"(run {rec['methods'][m].get('run_id')} -> {now}); evaluating it again",
              flush=True)
        del rec["methods"][m]
  if rec is not None and all(m in rec["methods"] for m in wanted):
    print(f"[seed {seed}] finished earlier ({path})", flush=True)
    rec["missing"] = []
    return rec
  rec = rec or {"seed": seed, "setting": chosen, "config": args.config, "split": "test",
                "methods": {}}
  todo = [m for m in wanted if m in found and m not in rec["methods"]]
  rec["missing"] = [m for m in wanted if m not in rec["methods"]]
  if not todo:
    print(f"[seed {seed}] nothing new finished (missing: {missing})", flush=True)
    return rec
  data = Workdir(os.path.join(args.workdir, f"seed{seed}", "base")).data
  cfg = evaluate.with_eval(config, overrides(chosen))
  for m in todo:
    t0 = time.time()
    ckpt, run_id = found[m]
    r = evaluate.rerank_checkpoint(cfg, ckpt, data, "test")
    pq = r["per_query"]
    if "queries" in rec and rec["queries"] != pq["global"]["queries"]:
      raise SystemExit(f"{path}: {m}'s test queries differ from the seed's others")
    rec["queries"], rec["conditions"] = pq["global"]["queries"], pq["global"]["conditions"]
    rec["methods"][m] = {
        "checkpoint": ckpt, "run_id": run_id, "step": r["step"], "global": r["global"],
        "rerank": r["rerank"], "paired": r["paired"],
        "hits": {"global": pq["global"]["hits"], "rerank": pq["rerank"]["hits"]},
        "seconds": time.time() - t0}
    g, p = r["global"], r["rerank"]
    print(f"[seed {seed}] {m}: test R@1 {g['R@1']:.1f} global, {p['R@1']:.1f} +R "
          f"({p['rerank']['ms_per_query']:.1f} ms/query)", flush=True)
    # after each checkpoint: an interrupted run keeps what it evaluated
    rec["missing"] = [w for w in wanted if w not in rec["methods"]]
    files.write_json(path, rec, indent=None)      # the hit lists: one line
  return rec


def aggregate(records: dict, resamples: int, wanted) -> dict:
  """Per method of `wanted` (in that order) with a record: recalls per seed and
  the paired + R minus global difference."""
  methods = {}
  present = {m for rec in records.values() for m in rec["methods"]}
  for m in [m for m in wanted if m in present]:
    seeds = [s for s in sorted(records) if m in records[s]["methods"]]
    per = {s: records[s]["methods"][m] for s in seeds}
    out = {"seeds": seeds, "label": LABELS.get(m, m),
           "global": {f"R@{n}": [per[s]["global"][f"R@{n}"] for s in seeds] for n in NS},
           "rerank": {f"R@{n}": [per[s]["rerank"][f"R@{n}"] for s in seeds] for n in NS},
           "ms_per_query": [per[s]["rerank"]["rerank"]["ms_per_query"] for s in seeds],
           "steps": [per[s]["step"] for s in seeds]}
    paired = {}
    for n in NS:
      key = f"R@{n}"
      paired[key] = stats.paired_bootstrap(
          {s: per[s]["hits"]["global"][key] for s in seeds},
          {s: per[s]["hits"]["rerank"][key] for s in seeds}, num_resamples=resamples)
    conds = sorted({c for s in seeds for c in records[s]["conditions"]})
    paired["per_condition"] = {}
    for c in conds:
      sel = {s: np.asarray(records[s]["conditions"]) == c for s in seeds}
      keep = [s for s in seeds if sel[s].any()]
      paired["per_condition"][c or "all"] = {
          f"R@{n}": stats.paired_bootstrap(
              {s: np.asarray(per[s]["hits"]["global"][f"R@{n}"])[sel[s]] for s in keep},
              {s: np.asarray(per[s]["hits"]["rerank"][f"R@{n}"])[sel[s]] for s in keep},
              num_resamples=resamples) for n in NS}
      paired["per_condition"][c or "all"]["global R@1"] = [
          100 * float(np.mean(np.asarray(per[s]["hits"]["global"]["R@1"])[sel[s]]))
          for s in keep]
      paired["per_condition"][c or "all"]["rerank R@1"] = [
          100 * float(np.mean(np.asarray(per[s]["hits"]["rerank"]["R@1"])[sel[s]]))
          for s in keep]
    out["paired"] = paired
    methods[m] = out
  return methods


def mean_std(values) -> str:
  v = np.asarray(values, np.float64)
  return f"{v.mean():.1f}" if len(v) == 1 else f"{v.mean():.1f} +- {v.std(ddof=1):.1f}"


def ci(d: dict) -> str:
  return f"{d['diff']:+.1f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]"


def write_report(args, config, sel: dict, records: dict, methods: dict,
                 wall_s: float) -> None:
  chosen = sel["chosen"]
  rows = sel["rows"]
  best = next(r for r in rows if r["setting"] == chosen)
  g0 = best["global"]
  seeds = sorted(records)
  incomplete = {s: records[s].get("missing", []) for s in seeds if records[s].get("missing")}
  n_q = {s: len(records[s]["queries"]) for s in seeds}
  cmd = "python experiments/rerank_synthetic.py " + " ".join(args.argv)
  places = dict(config.data.synthetic_places)
  h, w = tuple(config.data.image_size)
  conditions = sorted({c for rec in records.values() for c in rec["conditions"] if c})
  lines = [
      "# Synthetic ablation world: + R (re-ranking the global top-K) vs global retrieval",
      "",
      f"Command: `{cmd}` (this invocation {wall_s:.0f} s on {os.cpu_count()} CPU cores; "
      f"the selection took {sel['seconds']:.0f} s when it ran). "
      f"Checkpoints: the workdirs of experiments/synthetic_structure.py "
      f"(`{args.config}`: {h}x{w} images, {places['train']:,} train / {places['val']:,} val / "
      f"{places['test']:,} test places, {config.data.queries_per_place} queries per place, "
      f"conditions {' / '.join(conditions)}); stage-1 RGB = `base/rgb`, the "
      "distilled branches = `<variant>/distill`, each the checkpoint its run selected on val.",
      "",
      f"Re-ranking settings chosen on val of seed {sel['seed']} (the ablation's selection "
      f"seed), stage-1 RGB checkpoint (step {sel['step']}), among the {len(rows)} below by val "
      "R@1 (ties: R@5, then time); test read once per checkpoint with the chosen setting. "
      "Paired differences: + R minus global on the same queries, mean over seeds, 95 % "
      f"bootstrap CI resampling queries within each seed ({args.resamples} resamples). Our "
      "numbers, not the paper's.",
      "",
      f"Chosen: `{flags(chosen)}` (val R@1 {g0['R@1']:.1f} global -> "
      f"{best['rerank']['R@1']:.1f} + R, R@5 {g0['R@5']:.1f} -> {best['rerank']['R@5']:.1f}).",
      "",
      f"## Test: + R vs global per method (seeds {', '.join(map(str, seeds))}; "
      f"{', '.join(f'{n_q[s]}' for s in seeds)} queries)",
      "",
      "| method | seeds | global R@1 | + R R@1 | R@1 difference [95 % CI] | wins / losses "
      "| global R@5 | + R R@5 | R@5 difference [95 % CI] | ms/query |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for m, rec in methods.items():
    d1, d5 = rec["paired"]["R@1"], rec["paired"]["R@5"]
    lines.append(
        f"| {rec['label']} (`{m}`) | {','.join(map(str, rec['seeds']))} | "
        f"{mean_std(rec['global']['R@1'])} | {mean_std(rec['rerank']['R@1'])} | {ci(d1)} | "
        f"{d1['wins']} / {d1['losses']} | {mean_std(rec['global']['R@5'])} | "
        f"{mean_std(rec['rerank']['R@5'])} | {ci(d5)} | {np.mean(rec['ms_per_query']):.1f} |")
  conds = sorted({c for rec in methods.values() for c in rec["paired"]["per_condition"]})
  lines += ["", "Recalls: mean +- std over seeds (one seed: its value). ms/query: the "
            "re-ranking alone (the jitted matching compiled before the timed run), mean over "
            "seeds; a timing on a shared machine is indicative only.", "",
            "## Test per condition: R@1 global -> + R, difference [95 % CI]", "",
            "| method | " + " | ".join(conds) + " |", "|---|" + "---|" * len(conds)]
  for m, rec in methods.items():
    cells = []
    for c in conds:
      p = rec["paired"]["per_condition"].get(c)
      cells.append("" if p is None else
                   f"{np.mean(p['global R@1']):.1f} -> {np.mean(p['rerank R@1']):.1f}, "
                   f"{ci(p['R@1'])}")
    lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
  if incomplete:
    lines += ["", "Not finished when this ran (left out of the seed's rows; a later run "
              "adds them): " + "; ".join(f"seed {s}: {', '.join(v)}" for s, v in
                                         sorted(incomplete.items())) + "."]
  lines += ["", f"## Selection on val (seed {sel['seed']}, stage-1 RGB; "
            f"{g0['num_queries']} queries; percent)", "",
            f"Global retrieval on val: R@1 {g0['R@1']:.1f}, R@5 {g0['R@5']:.1f}. Fusion 0: "
            "the local score alone (Patch-NetVLAD); 1: + the global similarity, z-normalised "
            "over the top-K (`eval.rerank_global_weight`).", "",
            "| layer | patch sizes | method | top-K | fusion | + R R@1 | + R R@5 | "
            "R@1 per condition | ms/query |", "|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (-r["rerank"]["R@1"], -r["rerank"]["R@5"],
                                       r["rerank"]["rerank"]["ms_per_query"])):
    lay, sz, meth, k, w = r["setting"]
    mark = " **(chosen)**" if r["setting"] == chosen else ""
    per = r["rerank"]["per_condition"]
    lines.append(f"| {lay} | {','.join(map(str, sz))} | {meth} | {k} | {w:g} | "
                 f"{r['rerank']['R@1']:.1f}{mark} | {r['rerank']['R@5']:.1f} | "
                 + " / ".join(f"{c} {per[c]['R@1']:.1f}" for c in sorted(per)) +
                 f" | {r['rerank']['rerank']['ms_per_query']:.1f} |")
  if args.notes:
    lines += ["", "## Notes", ""] + [f"- {n}" for n in args.notes]
  files.write_text(args.out + ".md", "\n".join(lines) + "\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/ablation")
  parser.add_argument("--config", default="configs/ablation.py")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument("--variants", nargs="*", default=list(synthetic_structure.DEFAULT_VARIANTS))
  parser.add_argument("--selection-seed", type=int, default=0)
  parser.add_argument("--grid", default="full", choices=sorted(GRIDS))
  parser.add_argument("--resamples", type=int, default=10000)
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results",
                                                    "rerank_synthetic"))
  parser.add_argument("--aggregate-only", action="store_true",
                      help="no evaluation: aggregate the seed files that exist")
  parser.add_argument("--note", dest="notes", action="append", default=[],
                      help="a line for the report's Notes (repeatable)")
  argv = sys.argv[1:] if argv is None else argv
  args = parser.parse_args(argv)
  args.argv = [a for a in argv]
  args.workdir = os.path.abspath(args.workdir)
  unknown = [v for v in args.variants if v not in synthetic_structure.VARIANTS]
  if unknown:
    raise SystemExit(f"--variants: unknown {unknown}; expected some of "
                     f"{sorted(synthetic_structure.VARIANTS)}")
  t0 = time.time()
  config = load_config(args.config)
  grid = GRIDS[args.grid]
  seeds_dir = args.out + "_seeds"
  os.makedirs(seeds_dir, exist_ok=True)
  if args.aggregate_only:
    if not os.path.exists(os.path.join(seeds_dir, "selection.json")):
      raise SystemExit(f"--aggregate-only: no {seeds_dir}/selection.json; run without it first")
    sel = files.read_json(os.path.join(seeds_dir, "selection.json"))
  else:
    sel = selection(args, config, grid)
  records = {}
  for seed in args.seeds:
    path = os.path.join(seeds_dir, f"seed{seed}.json")
    if args.aggregate_only:
      if os.path.exists(path):
        rec = files.read_json(path)
        rec["missing"] = [m for m in wanted_methods(args) if m not in rec["methods"]]
        records[seed] = rec
      continue
    rec = test_seed(args, config, sel["chosen"], seed)
    if rec["methods"]:
      records[seed] = rec
  if not records:
    raise SystemExit(f"no finished seed among {args.seeds} under {args.workdir}")
  methods = aggregate(records, args.resamples, wanted_methods(args))
  if not methods:
    raise SystemExit(f"no requested method ({wanted_methods(args)}) in the seed files")
  wall_s = time.time() - t0
  files.write_json(args.out + ".json", {
      "command": "python experiments/rerank_synthetic.py " + " ".join(args.argv),
      "unit": "percent", "config": args.config, "grid": [plain(s) for s in grid],
      "selection": {k: sel.get(k) for k in ("seed", "split", "config", "checkpoint", "step",
                                            "rows", "chosen", "seconds")},
      "seeds": {m: rec["seeds"] for m, rec in methods.items()},
      "methods": methods,
      # R@1 hits as synthetic_structure.json: "<m>" global, "<m>+R" re-ranked
      "per_query": {m + suffix: {str(s): records[s]["methods"][m]["hits"][kind]["R@1"]
                                 for s in rec["seeds"]}
                    for m, rec in methods.items()
                    for kind, suffix in (("global", ""), ("rerank", "+R"))},
      "conditions": {str(s): records[s]["conditions"] for s in records},
      "incomplete": {str(s): records[s]["missing"] for s in records if records[s].get("missing")},
      "wall_s": wall_s}, indent=None)
  write_report(args, config, sel, records, methods, wall_s)
  with open(args.out + ".md") as f:
    print(f.read())


if __name__ == "__main__":
  main()

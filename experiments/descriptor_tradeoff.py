"""Descriptor size vs recall on the synthetic world: PCA and PCA-whitening.

  python experiments/descriptor_tradeoff.py --workdir runs/distill \
      [--stage distill] [--dims 2048 1024 512 256 128 64 32]

Takes a finished pipeline workdir (default command: `python -m
structvpr_jax.main --config=configs/distill.py`), restores the stage's best
checkpoint, extracts train (database + queries) and test descriptors once,
fits PCA / PCA-whitening (structvpr_jax/whitening.py) on the train
descriptors for each dim and reports test R@1/5/10 (all queries, and the mean
over query conditions). Writes experiments/results/descriptor_tradeoff.{md,json}.
In a run the same is `--config.eval.pca_dim=D [--config.eval.pca_whiten=False]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from structvpr_jax import checkpoint, evaluation, files, parallel, whitening  # noqa: E402
from structvpr_jax.data import layout  # noqa: E402
from structvpr_jax.workdir import Workdir  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def describe(spec, variables, root, split, mesh):
  vs = layout.read_split(root, split, require_segmentations=spec["view"] == "seg")
  return vs, evaluation.describe_split(spec, variables, vs, mesh)


def recalls(q, db, vs):
  rep = evaluation.recall_report(q, db, vs.query_utm, vs.database_utm, vs.query_notes())
  per = rep.get("per_condition", {})
  row = {f"R@{n}": rep[f"R@{n}"] for n in (1, 5, 10)}
  if per:
    row["mean_condition_R@1"] = float(np.mean([v["R@1"] for v in per.values()]))
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/distill")
  parser.add_argument("--stage", default="distill")
  parser.add_argument("--dims", type=int, nargs="+", default=[2048, 1024, 512, 256, 128, 64, 32])
  parser.add_argument("--out", default=os.path.join(RESULTS, "descriptor_tradeoff"))
  args = parser.parse_args()

  t0 = time.time()
  wd = Workdir(args.workdir)
  spec, variables, step, _ = checkpoint.restore_variables(wd.checkpoints(args.stage))
  root = wd.data
  mesh = parallel.make_mesh()
  _, train_desc = describe(spec, variables, root, "train", mesh)
  test_vs, test_desc = describe(spec, variables, root, "test", mesh)
  fit_on = np.concatenate([train_desc["database"], train_desc["queries"]])
  full_dim = int(fit_on.shape[1])
  rows = [{"method": "full", "dim": full_dim,
           **recalls(test_desc["queries"], test_desc["database"], test_vs)}]
  for dim in args.dims:
    if not 1 <= dim < min(full_dim, len(fit_on)):   # 0 = only the full descriptor
      continue
    for whiten in (False, True):
      params = whitening.fit(fit_on, dim, whiten)
      rows.append({"method": "pca_whiten" if whiten else "pca", "dim": dim,
                   **recalls(whitening.apply(params, test_desc["queries"]),
                             whitening.apply(params, test_desc["database"]), test_vs)})
  out = {"unit": "percent", "workdir": os.path.abspath(args.workdir), "stage": args.stage,
         "step": int(step), "spec": {k: spec[k] for k in ("backbone", "dim", "num_clusters",
                                                          "image_size")},
         "num_train_descriptors": int(len(fit_on)),
         "num_test_queries": int(len(test_desc["queries"])),
         "num_test_database": int(len(test_desc["database"])), "rows": rows,
         "wall_s": round(time.time() - t0, 1)}
  lines = [f"# Descriptor size vs recall ({args.stage} branch, synthetic test split)", "",
           f"Command: `python experiments/descriptor_tradeoff.py --workdir {args.workdir} "
           f"--stage {args.stage}`", "",
           f"Checkpoint step {step}; PCA fitted on {len(fit_on)} train descriptors "
           f"(database + queries); test: {out['num_test_queries']} queries, "
           f"{out['num_test_database']} database images. R@N in percent.", "",
           "| method | dim | bytes/image (fp32) | R@1 | R@5 | R@10 | mean R@1 over conditions |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['dim']} | {4 * r['dim']} | {r['R@1']:.1f} | "
                 f"{r['R@5']:.1f} | {r['R@10']:.1f} | {r.get('mean_condition_R@1', float('nan')):.1f} |")
  files.write_json(args.out + ".json", out, sort_keys=False)
  files.write_text(args.out + ".md", "\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()

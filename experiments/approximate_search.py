"""Recall cost of approximate search (eval.index="ivf_pq") on a finished run.

  python experiments/approximate_search.py --workdir runs/distill [--stage distill]
      [--split test] [--nprobe 1 4 16] [--pq-m 0 16]

Restores the stage's best checkpoint, describes the split once, and reports
R@1/5/10 of exact search (faiss IndexFlatL2, the VPR convention) next to faiss
IVF-PQ (`retrieval.make_index`) for each nprobe x pq_m (0 = automatic), with
the search time and the index's bytes per database vector. The same choice
in a run is `--config.eval.index=ivf_pq [--config.eval.nprobe=N]`.
Writes experiments/results/approximate_search.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from structvpr_jax import checkpoint, evaluation, files, parallel  # noqa: E402
from structvpr_jax.data import layout  # noqa: E402
from structvpr_jax.workdir import Workdir  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/distill")
  parser.add_argument("--stage", default="distill")
  parser.add_argument("--split", default="test")
  parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16])
  parser.add_argument("--pq-m", type=int, nargs="+", default=[0, 16])
  parser.add_argument("--out", default=os.path.join(RESULTS, "approximate_search"))
  args = parser.parse_args()

  wd = Workdir(args.workdir)
  spec, variables, step, _ = checkpoint.restore_variables(wd.checkpoints(args.stage))
  vs = layout.read_split(wd.data, args.split, require_segmentations=spec["view"] == "seg")
  descs = evaluation.describe_split(spec, variables, vs, parallel.make_mesh())
  q, db = descs["queries"], descs["database"]
  settings = [{"index": "flat"}] + [{"index": "ivf_pq", "nprobe": p, "pq_m": m}
                                    for m in args.pq_m for p in args.nprobe]
  rows = []
  for index in settings:
    t0 = time.perf_counter()
    rep = evaluation.recall_report(q, db, vs.query_utm, vs.database_utm, vs.query_notes(),
                                   index=index)
    seconds = time.perf_counter() - t0
    params = rep.get("index_params", {})
    code_bytes = (params["m"] * params["nbits"] / 8 if params else 4 * db.shape[1])
    rows.append({"setting": index, "index_params": params, "search_s": seconds,
                 "bytes_per_vector": code_bytes,
                 **{f"R@{n}": rep[f"R@{n}"] for n in (1, 5, 10)}})
  exact = rows[0]
  lines = ["# Exact vs approximate search", "",
           f"`python experiments/approximate_search.py --workdir {args.workdir} --stage "
           f"{args.stage} --split {args.split}`: {len(q)} queries, {len(db)} database "
           f"images, {db.shape[1]}-d descriptors ({args.stage} step {step}).", "",
           "| index | nlist | m x nbits | nprobe | bytes / vector | R@1 | R@5 | R@10 | "
           "R@1 − exact | search s |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    p = r["index_params"]
    lines.append(
        f"| {r['setting']['index']} | {p.get('nlist', '-')} | "
        f"{str(p['m']) + ' x ' + str(p['nbits']) if p else '-'} | {p.get('nprobe', '-')} | "
        f"{r['bytes_per_vector']:.0f} | {r['R@1']:.1f} | {r['R@5']:.1f} | {r['R@10']:.1f} | "
        f"{r['R@1'] - exact['R@1']:+.1f} | {r['search_s']:.3f} |")
  files.write_text(args.out + ".md", "\n".join(lines) + "\n")
  files.write_json(args.out + ".json", {"workdir": args.workdir, "stage": args.stage,
                                        "split": args.split, "num_queries": len(q),
                                        "num_database": len(db), "rows": rows})
  print("\n".join(lines))


if __name__ == "__main__":
  main()

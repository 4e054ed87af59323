"""Paired comparison of two methods from saved per-query hits.

  python experiments/paired.py BASE.json:METHOD OTHER.json:METHOD [--condition night]
      [--seeds 0 1] [--resamples 10000]

Each file is an `experiments/synthetic_structure.py` result (its "per_query"
{method: {seed: [0/1]}} and "conditions" {seed: [condition]}); the two may
come from different invocations (e.g. another KD form on the same seed), as
long as the seeds' queries are the same (same seed and --test-places). Prints
other - base in R@1 points with the bootstrap 95 % CI over queries resampled
within seed (`structvpr_jax.stats.paired_bootstrap`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from structvpr_jax import files, stats  # noqa: E402


def load(spec: str, seeds, condition):
  path, _, method = spec.rpartition(":")
  result = files.read_json(path)
  if method not in result["per_query"]:
    raise SystemExit(f"{path}: no method {method!r}; has {sorted(result['per_query'])}")
  hits = result["per_query"][method]
  out = {}
  for s in seeds or sorted(hits, key=int):
    h = np.asarray(hits[str(s)])
    if condition:
      h = h[np.asarray(result["conditions"][str(s)]) == condition]
    out[str(s)] = h
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("base")
  parser.add_argument("other")
  parser.add_argument("--seeds", nargs="*", default=None)
  parser.add_argument("--condition", default="")
  parser.add_argument("--resamples", type=int, default=10000)
  args = parser.parse_args()
  base = load(args.base, args.seeds, args.condition)
  other = load(args.other, args.seeds or sorted(base, key=int), args.condition)
  res = stats.paired_bootstrap(base, other, args.resamples)
  print(json.dumps({"base": args.base, "other": args.other,
                    "condition": args.condition or "all", **res}))


if __name__ == "__main__":
  main()

"""XLA:CPU options on the RGB branch: speed and whether results change.

  python experiments/performance/xla_cpu_flags.py [--rounds 3] [--repeats 5] [--quick]

Run it as the main program runs (huge pages: GLIBC_TUNABLES=glibc.malloc.hugetlb=1,
structvpr_jax/hugepages.py); the workers inherit the environment.

Each candidate XLA_FLAGS setting (names and values from the XLA flag
reference of this jaxlib, `xla/debug_options_flags.cc`; none guessed) runs
in a fresh process, interleaved over `--rounds` rounds, measuring what
`experiments/performance/bench.py` measures for the paired figures: the RGB branch
(MobileNetV2-1.0 + NetVLAD-64) forward of 16 images at 224 through
`evaluation.Extractor`, and the frozen-BatchNorm train step of 4 triplets at
224. Each worker also writes the descriptors of a fixed batch; the report
gives their largest difference from the default setting's (0 = the option
does not change results).

Writes experiments/results/xla_cpu_flags.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))   # the repository root
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

CANDIDATES = {
    "default": "",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "xnn_fusion_all": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "onednn": "--xla_cpu_use_onednn=true",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "no_concurrency_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    "memory_scheduler": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "vector_width_512": "--xla_cpu_prefer_vector_width=512",
}


def worker(out: str, quick: bool, repeats: int) -> None:
  import jax
  import numpy as np
  import bench
  from structvpr_jax import parallel
  from structvpr_jax.evaluation import Extractor
  from structvpr_jax.models import spec as model_spec
  mesh = parallel.make_mesh(jax.devices()[:1])
  spec = bench.make_spec("rgb", bench.image_sizes(quick)["224"], quick, dim=0,
                         num_clusters=8 if quick else 64)
  variables = model_spec.init_variables(spec, seed=0)
  replicated = parallel.replicate(variables, mesh)
  forward = bench.bench_forward(spec, replicated, mesh, repeats)
  step = bench.bench_train_step(spec, variables, mesh, "frozen", bench.TRAIN_TRIPLETS["224"],
                                repeats)
  desc = Extractor(spec, mesh, 16)(replicated, bench.RandomImages(spec, 16, seed=3))
  np.save(out + ".npy", desc)
  with open(out, "w") as f:
    json.dump({"forward_224_img_s": forward["img_s"], "forward_224_compile_s": forward["compile_s"],
               "train_step_224_frozen_img_s": step["img_s"],
               "train_step_224_frozen_compile_s": step["compile_s"]}, f)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--only", nargs="*", default=None, help="candidate names")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results",
                                                    "xla_cpu_flags"))
  args = parser.parse_args(argv)
  if args.worker:
    worker(args.worker, args.quick, args.repeats)
    return 0
  import numpy as np
  names = args.only or list(CANDIDATES)
  samples = {n: {} for n in names}
  descs = {}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.rounds):
      for name in names:
        out = os.path.join(tmp, f"{name}_{r}.json")
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=" ".join(f for f in (os.environ.get("XLA_FLAGS", ""),
                                                  CANDIDATES[name]) if f))
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", out,
               "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
          print(f"{name}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
          samples[name]["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
          continue
        with open(out) as f:
          for key, value in json.load(f).items():
            samples[name].setdefault(key, []).append(value)
        descs[name] = np.load(out + ".npy")
        print(f"round {r + 1}: {name}: {open(out).read()}", file=sys.stderr, flush=True)
  results = {}
  for name in names:
    if "error" in samples[name]:
      results[name] = {"flag": CANDIDATES[name], "error": samples[name]["error"]}
      continue
    res = {"flag": CANDIDATES[name]}
    for key, values in samples[name].items():
      res[key] = statistics.median(values)
      res[key + "_min_max"] = [min(values), max(values)]
    if "default" in descs and name in descs:
      res["max_abs_descriptor_diff"] = float(np.max(np.abs(descs[name] - descs["default"])))
    results[name] = res
  out = {"rounds": args.rounds, "repeats": args.repeats, "quick": args.quick,
         "results": results}
  with open(args.out + ".json", "w") as f:
    json.dump(out, f, indent=2, sort_keys=True)
  base = results.get("default", {})
  lines = ["# XLA:CPU options on the RGB branch (224, 1 device)", "",
           f"`python experiments/performance/xla_cpu_flags.py --rounds {args.rounds} --repeats "
           f"{args.repeats}`: medians over rounds of fresh processes, [min, max].", "",
           "| option | forward 16x224 img/s | frozen train step img/s | vs default (fwd / step) "
           "| max descriptor change |", "|---|---|---|---|---|"]
  for name, r in results.items():
    if "error" in r:
      lines.append(f"| `{r['flag'] or 'default'}` | failed: {r['error']} | | | |")
      continue
    f, s = r["forward_224_img_s"], r["train_step_224_frozen_img_s"]
    rel = (f"{f / base['forward_224_img_s']:.2f} / {s / base['train_step_224_frozen_img_s']:.2f}"
           if base and "forward_224_img_s" in base else "")
    lines.append(
        f"| `{r['flag'] or 'default'}` | {f:.1f} {[round(v, 1) for v in r['forward_224_img_s_min_max']]} "
        f"| {s:.2f} {[round(v, 2) for v in r['train_step_224_frozen_img_s_min_max']]} | {rel} "
        f"| {r.get('max_abs_descriptor_diff', float('nan')):.2e} |")
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())

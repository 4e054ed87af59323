"""Page faults, system CPU and wall time per train step under each allocator
setting: why structvpr_jax/hugepages.py keeps XLA's temporaries.

  python experiments/performance/step_faults.py [--steps 20] [--out experiments/results/step_faults]

Runs the frozen-BN RGB train step at 224 (`bench.train_step_call`: 4
triplets, Adam, the pipeline's model; one device), after 3 warm-up steps,
`--steps` times in a fresh worker process per setting, and reports per
step: wall ms, user and system CPU ms, minor page faults, voluntary
context switches (getrusage). Settings, each a GLIBC_TUNABLES value and a
JAX dispatch mode:
  glibc_defaults      none of ours, asynchronous dispatch (JAX's default)
  huge_pages          glibc.malloc.hugetlb=1, asynchronous
  tunables_async      all of hugepages.TUNABLES, asynchronous dispatch
  sync_huge_pages     glibc.malloc.hugetlb=1, synchronous dispatch
  program             all of hugepages.TUNABLES + synchronous dispatch
                      (`hugepages.configure_jax`: what the main program runs)
The settings run one after another, so their wall times carry the
machine's drift; faults and system CPU are the robust figures.
Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))   # the repository root
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from structvpr_jax import files, hugepages, xla_flags  # noqa: E402  (stdlib only)

SETTINGS = {  # name -> (GLIBC_TUNABLES, synchronous dispatch)
    "glibc_defaults": ("", False),
    "huge_pages": (hugepages.HUGE_PAGES, False),
    "tunables_async": (":".join(hugepages.TUNABLES), False),
    "sync_huge_pages": (hugepages.HUGE_PAGES, True),
    "program": (":".join(hugepages.TUNABLES), True),
}


def worker(steps: int, sync: bool) -> dict:
  import resource
  import jax
  if sync:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  import bench
  from structvpr_jax import parallel
  from structvpr_jax.models import spec as model_spec
  mesh = parallel.make_mesh(jax.devices()[:1])
  spec = bench.make_spec("rgb", (224, 224), False, dim=0, num_clusters=64)
  call = bench.train_step_call(spec, model_spec.init_variables(spec, seed=0), mesh, "frozen",
                               bench.TRAIN_TRIPLETS["224"])
  for _ in range(3):
    call()
  r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for _ in range(steps):
    call()
  wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
  per = lambda v: round(v / steps, 2)
  return {"wall_ms": per(1000 * wall), "user_ms": per(1000 * (r1.ru_utime - r0.ru_utime)),
          "sys_ms": per(1000 * (r1.ru_stime - r0.ru_stime)),
          "minor_faults": per(r1.ru_minflt - r0.ru_minflt),
          "voluntary_switches": per(r1.ru_nvcsw - r0.ru_nvcsw)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results",
                                                    "step_faults"))
  parser.add_argument("--worker", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  if args.worker:
    print(json.dumps(worker(args.steps, SETTINGS[args.worker][1])))
    return 0
  base = hugepages.environ_without_hugepages(xla_flags.with_defaults(dict(os.environ)))
  results = {}
  for name, (tunables, _) in SETTINGS.items():
    env = dict(base, **({"GLIBC_TUNABLES": tunables} if tunables else {}))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name,
                           "--steps", str(args.steps)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
      raise SystemExit(f"step_faults: the {name} worker failed:\n{proc.stderr[-2000:]}")
    results[name] = dict(json.loads(proc.stdout.strip().splitlines()[-1]),
                         glibc_tunables=tunables, synchronous_dispatch=SETTINGS[name][1])
    print(f"step_faults: {name}: {results[name]}", file=sys.stderr, flush=True)
  out = {"steps": args.steps, "started": time.strftime("%Y-%m-%d %H:%M"), "settings": results}
  lines = ["# Page faults and system CPU per train step, by allocator setting", "",
           f"`python experiments/performance/step_faults.py --steps {args.steps}` ({out['started']}; frozen-BN "
           "RGB step at 224, 12 images, one fresh process per setting, run one after another)",
           "", "| setting | GLIBC_TUNABLES | sync dispatch | wall ms | user ms | sys ms | "
           "minor faults | voluntary switches |", "|---|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    lines.append(f"| {name} | `{r['glibc_tunables'] or 'unset'}` | "
                 f"{'yes' if r['synchronous_dispatch'] else 'no'} | {r['wall_ms']} | "
                 f"{r['user_ms']} | {r['sys_ms']} | {r['minor_faults']} | "
                 f"{r['voluntary_switches']} |")
  files.write_json(args.out + ".json", out)
  files.write_text(args.out + ".md", "\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())

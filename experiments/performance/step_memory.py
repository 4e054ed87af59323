"""XLA's compiled memory of the RGB train step at 480x640.

  python experiments/performance/step_memory.py [--variants plain remat grouped]

For each variant (plain; `train.remat`; `model.depthwise=grouped`) compiles
`train_lib.make_train_step` (frozen BN, Adam, 2 triplets x (q, p, 4
negatives) = 12 images, MobileNetV2-1.0 + 1x1 to 128 + NetVLAD-32) and prints
XLA's memory analysis (temporaries, arguments, outputs; GB) as JSON lines.
Nothing runs: the figures are what the compiled program allocates. Compare
XLA:CPU options by running it under different XLA_FLAGS, e.g.
`XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=true` (the
scheduler this project's entry points turn off, structvpr_jax/xla_flags.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))   # the repository root
sys.path.insert(0, HERE)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", nargs="+", default=["plain", "remat", "grouped"])
  args = parser.parse_args(argv)
  import jax
  import bench
  from structvpr_jax import parallel, train_lib
  from structvpr_jax.models import spec as model_spec
  mesh = parallel.make_mesh(jax.devices()[:1])
  for variant in args.variants:
    spec = bench.make_spec("rgb", (480, 640), False, dim=128, num_clusters=32)
    if variant == "grouped":
      spec["depthwise"] = "grouped"
    tc = {"num_steps": 1000, "learning_rate": 1e-4, "warmup_steps": 0, "margin": 0.1,
          "grad_clip": 1.0, "batchnorm": "frozen", "remat": variant == "remat"}
    variables = model_spec.init_variables(spec, seed=0)
    tx, _ = train_lib.make_optimizer(tc)
    step = train_lib.make_train_step(spec, tc, mesh)
    batch = parallel.shard_batch({"rgb": bench.random_inputs(spec, (2, 6), seed=1)}, mesh)
    state = parallel.replicate(train_lib.new_state(variables, tx), mesh)
    m = step.lower(state, batch, jax.random.PRNGKey(0)).compile().memory_analysis()
    print(json.dumps({"variant": variant, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                      **{k: round(getattr(m, k + "_in_bytes") / 2 ** 30, 2)
                         for k in ("temp_size", "argument_size", "output_size")}}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

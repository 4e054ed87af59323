"""Where the RGB train step's time goes on XLA:CPU: a per-operation profile.

  python experiments/performance/profile_step.py [--unfolded] [--depthwise shifted] [--size 224]
      [--steps 3] [--top 25] [--out experiments/results/profile_step]

Builds the step `experiments/performance/bench.py` times (train_lib.make_train_step,
frozen BatchNorm, 4 triplets x (q, p, 1 negative) at 224, Adam, one device)
for the pipeline's default model (model.fold_bn, model.depthwise="auto": the
native kernels on the CPU) or, with --unfolded / --depthwise, a departure
from it,
runs it 3 times to warm up, then `--steps` times under `jax.profiler.trace`
(with a Perfetto trace), and joins every executed XLA operation of the trace
with the compiled module's text (its fusion names and the `op_name` of the
JAX code it came from). Prints and writes (<out>[_unfolded][_<depthwise>].md
/ .json):
  - per step: the wall time under the profiler, the time some operation ran
    ("busy") and the sum of the operations' trace durations, which exceeds
    the busy time where XLA ran operations at once (`attribute_concurrent`);
  - milliseconds per step by (pass, layer kind), each instant split evenly
    among the operations running then (the events' own durations beside
    them): pass "bwd" when the JAX op
    is under `transpose(...)` (the backward pass, custom VJPs' rules
    included), else "fwd" (an operation XLA shares between the passes, e.g.
    a slice both need, counts as fwd); layer kind from the module path
    (stem, depthwise, expand, expand+depthwise, project, last, netvlad,
    other);
  - the `--top` most expensive operations (split time, and duration) with
    their shapes.
It runs as the main program does: re-executed with the glibc tunables of
structvpr_jax/hugepages.py, synchronous CPU dispatch, and the XLA:CPU
defaults of structvpr_jax/xla_flags.py. Times include the profiler's own overhead (a few %).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))   # the repository root
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from structvpr_jax import files, xla_flags  # noqa: E402  (stdlib only: no JAX yet)

# A layer kind from its name in the op_name: "depthwise" and "netvlad"
# anywhere; the others as a whole component, "/expand/" (a module) or
# "jvp(expand)/" (a `jax.named_scope` under autodiff, as in
# ops.fused.inverted_residual_layers, which the fused blocks' VJP runs);
# "expand_depthwise" (that function's scope where the expand 1x1 and the
# depthwise layer share one native backward) as the pair: its forward 1x1,
# its forward depthwise and the joint backward.
LAYER_KINDS = tuple((re.compile(pattern), kind) for pattern, kind in (
    (r"(?:^|[/(])stem(?:[/)]|$)", "stem"), (r"expand_depthwise", "expand+depthwise"),
    (r"depthwise", "depthwise"),
    (r"(?:^|[/(])expand(?:[/)]|$)", "expand"), (r"(?:^|[/(])project(?:[/)]|$)", "project"),
    (r"(?:^|[/(])last(?:[/)]|$)", "last"), (r"netvlad", "netvlad")))
TOP_OPS_SAVED = 200   # the JSON keeps the most expensive operations only
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) .*?op_name=\"([^\"]+)\"")


def op_metadata(module_text: str) -> dict:
  """{instruction name: (shape, op_name)} of an optimised HLO module's text."""
  out = {}
  for line in module_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      out.setdefault(m.group(1), (m.group(2), m.group(3)))
  return out


def classify(op_name: str) -> tuple[str, str]:
  """(pass, layer kind) of an operation from its JAX op_name."""
  backward = "transpose(" in op_name
  lowered = op_name.lower()
  kind = next((k for pattern, k in LAYER_KINDS if pattern.search(lowered)), "other")
  return ("bwd" if backward else "fwd"), kind


def trace_events(trace_dir: str, names) -> list:
  """Complete ("X") events of the operations in `names` in the Perfetto
  trace: [(name, thread, start us, end us)], thread = (pid, tid)."""
  found = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
  if not found:
    raise SystemExit(f"{trace_dir}: no perfetto_trace.json.gz written by jax.profiler")
  with gzip.open(found[0]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [(e["name"], (e.get("pid"), e.get("tid")), e.get("ts", 0), e.get("ts", 0) + e.get("dur", 0))
          for e in events if e.get("ph") == "X" and e.get("name") in names]


def attribute_concurrent(events) -> tuple[collections.Counter, float]:
  """Splits the traced time among the operations running at each instant.

  XLA:CPU runs independent operations of a step at once on its intra-op
  pool (in the backward pass, a 1x1 layer's input and kernel gradients);
  on a 2-core machine each then runs slower, and its trace event's
  duration includes the other's share of the cores, so durations summed
  per operation exceed the step's time and overstate what removing the
  operation would save. Here every instant covered by at least one event
  is charged evenly to the operations running then: on each thread the
  innermost event (an operation inside a `while` body, not the loop), one
  per thread. `events`: [(name, thread, start, end)] (`trace_events`).
  Returns ({name: attributed time}, busy time = the time covered by at
  least one event); the attributed times sum to the busy time.
  """
  points = []
  for i, (_, _, start, end) in enumerate(events):
    if end > start:
      points.append((start, 1, i))
      points.append((end, 0, i))    # at a tie, ends before starts
  points.sort()
  active = collections.defaultdict(list)   # thread -> indices of open events, oldest first
  charged, busy, last = collections.Counter(), 0.0, None
  for t, is_start, i in points:
    if last is not None and t > last:
      running = [stack[-1] for stack in active.values() if stack]
      if running:
        share = (t - last) / len(running)
        for j in running:
          charged[events[j][0]] += share
        busy += t - last
    last = t
    stack = active[events[i][1]]
    if is_start:
      stack.append(i)
    else:
      stack.remove(i)
  return charged, busy


def profile(fold_bn: bool, size: int, steps: int, depthwise: str = "auto") -> dict:
  import jax
  import bench
  from structvpr_jax import parallel, train_lib
  from structvpr_jax.models import spec as model_spec
  mesh = parallel.make_mesh(jax.devices()[:1])
  spec = dict(bench.make_spec("rgb", (size, size), False, dim=0, num_clusters=64),
              fold_bn=fold_bn, depthwise=depthwise)
  variables = model_spec.init_variables(spec, seed=0)
  tc = {"num_steps": 1000, "learning_rate": 1e-4, "warmup_steps": 0, "margin": 0.1,
        "grad_clip": 1.0, "batchnorm": "frozen", "trainable_from": 0}
  tx, _ = train_lib.make_optimizer(tc, train_lib.frozen_below(0))
  step = train_lib.make_train_step(spec, tc, mesh)
  triplets = bench.TRAIN_TRIPLETS["224"]
  batch = parallel.shard_batch({"rgb": bench.random_inputs(spec, (triplets, 3), seed=1)}, mesh)
  rng = jax.random.PRNGKey(0)
  state = parallel.replicate(train_lib.new_state(variables, tx), mesh)
  meta = op_metadata(step.lower(state, batch, rng).compile().as_text())
  for _ in range(3):
    state, _ = step(state, batch, rng)
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(steps):
        state, _ = step(state, batch, rng)
      jax.block_until_ready(state)
      wall = time.perf_counter() - start
    events = trace_events(trace_dir, meta)
  per_op = collections.Counter()
  for name, _, begin, end in events:
    per_op[name] += end - begin
  charged, busy = attribute_concurrent(events)
  by_kind, charged_by_kind = collections.Counter(), collections.Counter()
  for name, us in per_op.items():
    kind = "/".join(classify(meta[name][1]))
    by_kind[kind] += us
    charged_by_kind[kind] += charged[name]
  ms = lambda us: round(us / steps / 1000.0, 2)
  from structvpr_jax.models.ops import dispatch
  return {"fold_bn": fold_bn, "depthwise": dispatch.resolve_depthwise(depthwise), "size": size, "images_per_step": 3 * triplets, "steps": steps,
          "wall_ms_per_step": round(wall / steps * 1000.0, 2),
          "total_ms_per_step": ms(sum(per_op.values())),
          "busy_ms_per_step": ms(busy),
          "by_pass_and_layer_ms": {k: ms(v) for k, v in charged_by_kind.most_common()},
          "by_pass_and_layer_durations_ms": {k: ms(by_kind[k]) for k, _ in charged_by_kind.most_common()},
          "ops_ms": [{"name": n, "ms": ms(us), "duration_ms": ms(per_op[n]), "shape": meta[n][0],
                      "op_name": meta[n][1]} for n, us in charged.most_common(TOP_OPS_SAVED)]}


def markdown(res: dict, top: int, command: str) -> str:
  busy = res["busy_ms_per_step"]
  model = ("fold_bn" if res["fold_bn"] else "unfolded") + f", {res.get('depthwise', '?')} depthwise"
  durations = res["by_pass_and_layer_durations_ms"]
  lines = [f"# Profile of the RGB train step (frozen BN, {model}, "
           f"{res['images_per_step']} images at {res['size']})", "", f"`{command}`", "",
           f"Per step: {res['wall_ms_per_step']:.1f} ms wall under the profiler; operations "
           f"running {busy:.1f} ms of it; their trace durations sum to "
           f"{res['total_ms_per_step']:.1f} ms (the excess: operations XLA ran at once, "
           "each event also covering the other's share of the cores). \"ms\" below "
           "splits every instant evenly among the operations running then (sums to the "
           "running time); \"durations\" are the events' own lengths.", "",
           "| pass / layer | ms per step | share | durations |", "|---|---|---|---|"]
  for k, v in res["by_pass_and_layer_ms"].items():
    lines.append(f"| {k} | {v:.1f} | {100 * v / busy:.1f} % | {durations[k]:.1f} |")
  lines += ["", f"Top {top} operations:", "", "| ms | duration | operation | shape | JAX op |",
            "|---|---|---|---|---|"]
  for op in res["ops_ms"][:top]:
    lines.append(f"| {op['ms']:.2f} | {op['duration_ms']:.2f} | {op['name']} | `{op['shape']}` "
                 f"| `{op['op_name'][-90:]}` |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--unfolded", action="store_true",
                      help="model.fold_bn=False (frozen BN as its own affine pass)")
  parser.add_argument("--depthwise", default="auto",
                      choices=("auto", "native", "shifted", "grouped"),
                      help="model.depthwise (default auto: native on the CPU)")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results",
                                                    "profile_step"))
  args = parser.parse_args(argv)
  xla_flags.apply()
  res = profile(not args.unfolded, args.size, args.steps, args.depthwise)
  suffix = ("_unfolded" if args.unfolded else "") + (
      f"_{args.depthwise}" if args.depthwise != "auto" else "")
  out = args.out + suffix
  command = "python experiments/performance/profile_step.py" + (" --unfolded" if args.unfolded else "") + (
      f" --depthwise {args.depthwise}" if args.depthwise != "auto" else "") + (
      f" --size {args.size}" if args.size != 224 else "") + (
      f" --steps {args.steps}" if args.steps != 3 else "")
  text = markdown(res, args.top, command)
  files.write_json(out + ".json", res)
  files.write_text(out + ".md", text)
  print(text)
  return 0


if __name__ == "__main__":
  from structvpr_jax import hugepages
  hugepages.reexec_with_hugepages()
  xla_flags.apply()
  hugepages.configure_jax()
  sys.exit(main())

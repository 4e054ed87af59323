"""In-process A/B of the RGB forward (or train step): two model variants, single calls alternating.

  python experiments/performance/ab_forward.py [--size 224 | 480x640] [--pairs 16]
      [--call forward | train_step_frozen]
      [--a depthwise=native ...] [--b fused_blocks=False ...]
      [--a-micro-batch 0] [--b-micro-batch 0]
      [--b-kernels OTHER/kernels.cc] [--b-march x86-64-v3] [--quick]

Both variants are the forward `bench.py` times (`bench.forward_call`: one
host batch of 16 uint8 images to host descriptors through the extractor's
jitted function, the pipeline's default RGB model) compiled in this one
process on the same parameters; after two warm-up calls each, `--pairs`
pairs of single calls run with the order alternating, so a slow minute of
this shared VM slows both halves of a pair. Variant A is the default model;
B changes spec fields (`--b FIELD=VALUE`, e.g. fused_blocks=False,
fold_bn=False, depthwise=shifted), the micro-batch and/or the native
kernels' source (`--b-kernels`: another kernels.cc, built with the same
flags and registered under its own target names, so that a kernel change
is measured against the current one in one process) and/or their -march
target (`--b-march`, e.g. x86-64-v3: the current kernels.cc built for AVX2;
A's kernels follow $STRUCTVPR_NATIVE_MARCH, default native). `--a` changes
A's spec likewise (e.g. `--a depthwise=native`, where "auto" would not take
the native kernels). `--call train_step_frozen` times `bench.train_step_call`
(frozen BatchNorm, 4 triplets at 224, 2 at 480x640, Adam; each side
continues from its own state) instead of the forward. Prints one JSON
object: each side's median ms per call and img/s, and the speed-up of A
over B (B's seconds / A's seconds, median of the pairs, 95 % bootstrap
interval over 4 runs of consecutive pairs: `paired_ratio.ratio_summary`'s
cluster bootstrap, as pairs timed seconds apart share the machine's state;
results before 2026-12-03 resampled single pairs). Runs with the main
program's allocator settings and XLA flags (it re-executes itself with
them, as `python -m structvpr_jax.main` does).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import sys
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))   # the repository root
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)


def parse_change(text: str) -> tuple:
  """"FIELD=VALUE" -> (FIELD, value); VALUE is a Python literal (False, 2,
  'shifted') or else the bare string."""
  field, sep, value = text.partition("=")
  if not sep or not field:
    raise SystemExit(f"--b {text!r}: expected FIELD=VALUE, e.g. fused_blocks=False")
  try:
    return field, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return field, value


BLOCKS = 4   # runs of consecutive pairs the interval resamples
DEFAULT_KERNELS = os.path.join(REPO, "structvpr_jax", "models", "native", "kernels.cc")


_REGISTERED_VARIANTS: set = set()   # suffixes registered in this process


def load_variant_kernels(source: str, march: str = "") -> str:
  """Builds `source` (a kernels.cc) with native's flags (`native.build`;
  -march=`march` when given, else native's), registers its targets under
  native's names + the returned suffix, and deletes the built file (the
  loaded library stays mapped). The suffix names the source's content and
  the target, so a changed source is never served by targets registered for
  an earlier one in the same process."""
  import hashlib
  import tempfile
  from pathlib import Path
  from structvpr_jax.models import native
  compiler = native._compiler()
  if compiler is None or not native.load():
    raise SystemExit("--b-kernels needs the native kernels (a C++ compiler)")
  with open(source, "rb") as f:
    suffix = "_variant_" + hashlib.sha256(f.read() + march.encode()).hexdigest()[:16]
  if suffix in _REGISTERED_VARIANTS:       # XLA refuses a name registered twice
    return suffix
  with tempfile.TemporaryDirectory(prefix="ab_kernels_") as tmp:
    target = Path(tmp) / "kernels.so"
    try:
      warnings = native.build(compiler, target, Path(source), march=march or None)
    except RuntimeError as e:
      raise SystemExit(f"--b-kernels {source}: {e}") from None
    if warnings:
      print(f"--b-kernels {source}: compiler warnings:\n{warnings}", file=sys.stderr)
    native.register_targets(target, suffix)
    isa = native.library_isa(target)
  print(f"variant kernels {source} -march={march or native.march()}: {isa}", file=sys.stderr)
  _REGISTERED_VARIANTS.add(suffix)
  return suffix


class variant_targets:
  """While active, native's ffi calls traced use the targets registered
  with `suffix` (`load_variant_kernels`)."""

  def __init__(self, suffix: str):
    self.suffix = suffix

  def __enter__(self):
    import jax
    self.original = original = jax.ffi.ffi_call
    suffix = self.suffix

    def renamed(target_name, *args, **kwargs):
      if target_name.startswith("structvpr_"):
        target_name += suffix
      return original(target_name, *args, **kwargs)
    jax.ffi.ffi_call = renamed
    return self

  def __exit__(self, *exc):
    import jax
    jax.ffi.ffi_call = self.original


CALLS = ("forward", "train_step_frozen")


def run(size: str, pairs: int, changes: dict, micro_batches: tuple, quick: bool,
        b_kernels: str = "", a_changes: Optional[dict] = None, b_march: str = "",
        what: str = "forward") -> dict:
  import jax
  import bench
  import paired_ratio
  from structvpr_jax import hugepages, parallel
  from structvpr_jax.models import spec as model_spec
  hugepages.configure_jax()
  mesh = parallel.make_mesh(jax.devices()[:1])
  hw = bench.image_sizes(quick)[size]
  spec = bench.make_spec("rgb", hw, quick, dim=0, num_clusters=8 if quick else 64)
  a_changes = a_changes or {}
  for side, side_changes in (("--a", a_changes), ("--b", changes)):
    unknown = sorted(set(side_changes) - set(spec))
    if unknown:
      raise SystemExit(f"{side}: unknown spec field(s) {unknown}; the spec has {sorted(spec)}")
    for field, value in side_changes.items():
      if spec[field] is not None and type(value) is not type(spec[field]):
        raise SystemExit(f"{side} {field}={value!r}: expected a {type(spec[field]).__name__} "
                         f"like the spec's {spec[field]!r}")
  host_variables = model_spec.init_variables(spec, seed=0)
  variables = parallel.replicate(host_variables, mesh)
  specs = {"a": dict(spec, **a_changes), "b": dict(spec, **changes)}
  if what == "forward":
    images = 16
    calls = {name: bench.forward_call(specs[name], variables, mesh, images, mb)
             for name, mb in zip(("a", "b"), micro_batches)}
  elif what == "train_step_frozen":
    triplets = bench.TRAIN_TRIPLETS[size]
    images = 3 * triplets
    calls = {name: bench.train_step_call(specs[name], host_variables, mesh, "frozen", triplets)
             for name in ("a", "b")}
  else:
    raise SystemExit(f"--call {what!r}: expected one of {CALLS}")
  suffix = load_variant_kernels(b_kernels or DEFAULT_KERNELS, b_march) if (
      b_kernels or b_march) else ""
  for name, call in calls.items():
    with (variant_targets(suffix) if suffix and name == "b" else contextlib.nullcontext()):
      call()                                 # compile (B: with the variant's kernels)
    for _ in range(2):                       # then two warm-up calls
      call()
  times = {"a": [], "b": []}
  for i in range(pairs):
    for name in (("a", "b") if i % 2 == 0 else ("b", "a")):
      t0 = time.perf_counter()
      calls[name]()
      times[name].append(time.perf_counter() - t0)
  # consecutive pairs share the machine's state: the interval resamples
  # blocks of them (paired_ratio's cluster bootstrap), not single pairs
  blocks = [b for b, size in enumerate(paired_ratio.block_sizes(pairs, BLOCKS))
            for _ in range(size)]
  summary = paired_ratio.ratio_summary(times["a"], times["b"], images=images, clusters=blocks)
  from structvpr_jax.models import native
  from structvpr_jax.models.ops import dispatch
  return {"size": size, "call": what, "images_per_call": images, "pairs": pairs,
          "blocks": summary["clusters"], "a_changes": a_changes, "b_changes": changes,
          "depthwise_resolved": {n: dispatch.resolve_depthwise(specs[n]["depthwise"])
                                 for n in specs},
          "a_kernels": {k: native.status()[k] for k in ("march", "isa")},
          "b_kernels": b_kernels, "b_march": b_march,
          "micro_batch": {"a": micro_batches[0], "b": micro_batches[1]},
          "a_img_s": summary["jax_img_s"], "b_img_s": summary["torch_img_s"],
          "speedup_a_over_b": summary["ratio"], "ci95": summary["ci95"],
          "a_s": times["a"], "b_s": times["b"]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", choices=("224", "480x640"), default="224")
  parser.add_argument("--pairs", type=int, default=16)
  parser.add_argument("--call", choices=CALLS, default="forward")
  parser.add_argument("--a", action="append", default=[], metavar="FIELD=VALUE",
                      help="a spec change of variant A (repeatable)")
  parser.add_argument("--b", action="append", default=[], metavar="FIELD=VALUE",
                      help="a spec change of variant B (repeatable)")
  parser.add_argument("--a-micro-batch", type=int, default=0, help="0 = auto")
  parser.add_argument("--b-micro-batch", type=int, default=0, help="0 = auto")
  parser.add_argument("--b-kernels", default="", metavar="KERNELS_CC",
                      help="variant B's native kernels built from this source")
  parser.add_argument("--b-march", default="", metavar="TARGET",
                      help="variant B's native kernels built with -march=TARGET "
                           "(from --b-kernels or the current kernels.cc)")
  parser.add_argument("--quick", action="store_true", help="tiny sizes (figures meaningless)")
  args = parser.parse_args(argv)
  if args.pairs < 2:
    parser.error("--pairs must be at least 2")
  changes = dict(parse_change(c) for c in args.b)
  a_changes = dict(parse_change(c) for c in args.a)
  if (changes == a_changes and args.a_micro_batch == args.b_micro_batch
      and not args.b_kernels and not args.b_march):
    parser.error("variant B equals A: give --b FIELD=VALUE, another --b-micro-batch, "
                 "--b-kernels or --b-march")
  if args.b_kernels and not os.path.isfile(args.b_kernels):
    parser.error(f"--b-kernels {args.b_kernels}: no such file")
  out = run(args.size, args.pairs, changes, (args.a_micro_batch, args.b_micro_batch),
            args.quick, args.b_kernels, a_changes, args.b_march, args.call)
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  from structvpr_jax import hugepages, xla_flags
  hugepages.reexec_with_hugepages()
  xla_flags.apply()
  sys.exit(main())

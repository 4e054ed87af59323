"""In-process A/B of the RGB forward: two model variants, single calls alternating.

  python experiments/performance/ab_forward.py [--size 224 | 480x640] [--pairs 16]
      [--b fused_blocks=False ...] [--a-micro-batch 0] [--b-micro-batch 0]
      [--b-kernels OTHER/kernels.cc] [--quick]

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
is measured against the current one in one process). Prints one JSON
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


_REGISTERED_VARIANTS: set = set()   # suffixes registered in this process


def load_variant_kernels(source: str) -> str:
  """Builds `source` (a kernels.cc) with native's flags (`native.build`),
  registers its targets under native's names + the returned suffix, and
  deletes the built file (the loaded library stays mapped). The suffix
  names the source's content, so a changed source is never served by
  targets registered for an earlier one in the same process."""
  import hashlib
  import tempfile
  from pathlib import Path
  from structvpr_jax.models import native
  compiler = native._compiler()
  if compiler is None or not native.load():
    raise SystemExit("--b-kernels needs the native kernels (a C++ compiler)")
  with open(source, "rb") as f:
    suffix = "_variant_" + hashlib.sha256(f.read()).hexdigest()[:16]
  if suffix in _REGISTERED_VARIANTS:       # XLA refuses a name registered twice
    return suffix
  with tempfile.TemporaryDirectory(prefix="ab_kernels_") as tmp:
    target = Path(tmp) / "kernels.so"
    try:
      native.build(compiler, target, Path(source))
    except RuntimeError as e:
      raise SystemExit(f"--b-kernels {source}: {e}") from None
    native.register_targets(target, suffix)
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


def run(size: str, pairs: int, changes: dict, micro_batches: tuple, quick: bool,
        b_kernels: str = "") -> dict:
  import jax
  import bench
  import paired_ratio
  from structvpr_jax import hugepages, parallel
  from structvpr_jax.models import spec as model_spec
  hugepages.configure_jax()
  mesh = parallel.make_mesh(jax.devices()[:1])
  hw = bench.image_sizes(quick)[size]
  spec = bench.make_spec("rgb", hw, quick, dim=0, num_clusters=8 if quick else 64)
  unknown = sorted(set(changes) - set(spec))
  if unknown:
    raise SystemExit(f"--b: unknown spec field(s) {unknown}; the spec has {sorted(spec)}")
  for field, value in changes.items():
    if spec[field] is not None and type(value) is not type(spec[field]):
      raise SystemExit(f"--b {field}={value!r}: expected a {type(spec[field]).__name__} "
                       f"like the spec's {spec[field]!r}")
  variables = parallel.replicate(model_spec.init_variables(spec, seed=0), mesh)
  calls = {"a": bench.forward_call(spec, variables, mesh, 16, micro_batches[0]),
           "b": bench.forward_call(dict(spec, **changes), variables, mesh, 16,
                                   micro_batches[1])}
  suffix = load_variant_kernels(b_kernels) if b_kernels else ""
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
  summary = paired_ratio.ratio_summary(times["a"], times["b"], images=16, clusters=blocks)
  return {"size": size, "pairs": pairs, "blocks": summary["clusters"], "b_changes": changes,
          "b_kernels": b_kernels,
          "micro_batch": {"a": micro_batches[0], "b": micro_batches[1]},
          "a_img_s": summary["jax_img_s"], "b_img_s": summary["torch_img_s"],
          "speedup_a_over_b": summary["ratio"], "ci95": summary["ci95"],
          "a_s": times["a"], "b_s": times["b"]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", choices=("224", "480x640"), default="224")
  parser.add_argument("--pairs", type=int, default=16)
  parser.add_argument("--b", action="append", default=[], metavar="FIELD=VALUE",
                      help="a spec change of variant B (repeatable)")
  parser.add_argument("--a-micro-batch", type=int, default=0, help="0 = auto")
  parser.add_argument("--b-micro-batch", type=int, default=0, help="0 = auto")
  parser.add_argument("--b-kernels", default="", metavar="KERNELS_CC",
                      help="variant B's native kernels built from this source")
  parser.add_argument("--quick", action="store_true", help="tiny sizes (figures meaningless)")
  args = parser.parse_args(argv)
  if args.pairs < 2:
    parser.error("--pairs must be at least 2")
  changes = dict(parse_change(c) for c in args.b)
  if not changes and args.a_micro_batch == args.b_micro_batch and not args.b_kernels:
    parser.error("variant B equals A: give --b FIELD=VALUE, another --b-micro-batch "
                 "or --b-kernels")
  if args.b_kernels and not os.path.isfile(args.b_kernels):
    parser.error(f"--b-kernels {args.b_kernels}: no such file")
  out = run(args.size, args.pairs, changes, (args.a_micro_batch, args.b_micro_batch),
            args.quick, args.b_kernels)
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  from structvpr_jax import hugepages, xla_flags
  hugepages.reexec_with_hugepages()
  xla_flags.apply()
  sys.exit(main())

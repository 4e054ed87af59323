"""Native (C++) CPU kernels, built on first use and called through XLA FFI.

`kernels.cc` holds the 3x3 depthwise convolution and its gradients, the
full 3x3 convolution of few input channels (the stem) with its kernel
gradient (float32, NHWC, stride 1 or 2, 'SAME', with a fused bias and
optional relu6), and MobileNetV2's whole inverted-residual block (expand
1x1, depthwise, project 1x1, residual) as one forward-only pass;
`load()` compiles it with the C++
compiler (`$CXX`, else `g++`), caches the shared library and registers its
handlers with XLA. Nothing here is required: when there is no compiler, the
build fails or times out, or `STRUCTVPR_NATIVE=0` is set, `load()` returns
False (with one warning naming the reason; `status()` has it, and the
compiler's first error lines under "error") and the model uses the XLA
implementation.

Build: `-O3 -march=native -Wall` (`flags`; `$STRUCTVPR_NATIVE_MARCH` names
another target, e.g. x86-64-v3 for AVX2, as an A/B does), at most
`$STRUCTVPR_NATIVE_BUILD_TIMEOUT` seconds (default 300). The compiler's
messages go to a build log beside the library (`<library>.log`); warnings
are logged with its path. `status()["isa"]` says which vector instruction
set the library was built for (`avx512`, `avx2`, ...): "auto" takes the
native kernels only where they were measured faster (`ops/dispatch.py`).

Cache: `$STRUCTVPR_NATIVE_CACHE`, else `~/.cache/structvpr_jax/native`. The
file name is a hash of the source, the FFI headers, the compiler command,
the compiler's version and the host CPU's features (`cpu_features`: the
"flags" line of /proc/cpuinfo on x86, "Features" on aarch64), so a change to
any of them builds anew and a cache shared between different CPUs or
compilers never runs the wrong code. The library is written to a temporary
name and renamed into place: concurrent first uses (tests, multi-process
runs) never see a half-written file.

Under `jax.jit` with a batch-sharded input (no shard_map), each FFI call
runs per shard on its own rows (`jax.experimental.custom_partitioning`;
gradients of weights summed over the shards), not on the gathered batch;
inside shard_map, or on one device, the calls are the plain FFI calls.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Optional

import jax
import numpy as np
from absl import logging
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from structvpr_jax import files

_SOURCE = Path(__file__).with_name("kernels.cc")
_TARGETS = {
    "structvpr_depthwise_forward": "StructvprDepthwiseForward",
    "structvpr_depthwise_backward": "StructvprDepthwiseBackward",
    "structvpr_conv3x3_forward": "StructvprConv3x3Forward",
    "structvpr_conv3x3_kernel_gradient": "StructvprConv3x3KernelGradient",
    "structvpr_inverted_residual_forward": "StructvprInvertedResidualForward",
    "structvpr_expand_depthwise_backward": "StructvprExpandDepthwiseBackward",
}
MARCH_ENV = "STRUCTVPR_NATIVE_MARCH"
TIMEOUT_ENV = "STRUCTVPR_NATIVE_BUILD_TIMEOUT"
DEFAULT_BUILD_TIMEOUT_S = 300.0
_CPUINFO = Path("/proc/cpuinfo")
_QUERY_TIMEOUT_S = 60.0          # `g++ --version` and the like
_ERROR_LINES = 20                # of the compiler's messages in status() / warnings

_lock = threading.Lock()
_state: dict = {}  # "ok", "reason", "path", "error", "build_log", "march", "isa", "compiler"


class BuildError(RuntimeError):
  """The compiler failed or timed out; `error` holds its first error lines
  (or the timeout), `log` the build log's path."""

  def __init__(self, message: str, error: str, log: Optional[Path]):
    super().__init__(message)
    self.error, self.log = error, log


def march() -> str:
  """The -march target: `$STRUCTVPR_NATIVE_MARCH`, else "native"."""
  value = os.environ.get(MARCH_ENV, "").strip() or "native"
  if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", value):
    raise ValueError(f"{MARCH_ENV}={value!r} is not a -march target name")
  return value


def flags(target: Optional[str] = None) -> tuple:
  """The compiler flags for -march=`target` (default `march()`). Warnings
  on (-Wall; the FFI headers are included as system headers) except GCC's
  -Wpsabi notes: built without AVX-512, the 64-byte vectors the inline
  helpers pass by value would have another ABI than in an AVX-512 build,
  which matters only across a library boundary, and none crosses it."""
  return ("-O3", f"-march={target or march()}", "-std=c++17", "-shared", "-fPIC",
          "-fno-math-errno", "-Wall", "-Wno-psabi")


def build_timeout() -> float:
  """Seconds a build may take: `$STRUCTVPR_NATIVE_BUILD_TIMEOUT`, else 300."""
  text = os.environ.get(TIMEOUT_ENV, "").strip()
  try:
    value = float(text) if text else DEFAULT_BUILD_TIMEOUT_S
  except ValueError:
    raise ValueError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
  if not value > 0:
    raise ValueError(f"{TIMEOUT_ENV}={text!r} must be > 0")
  return value


def _query(cmd: list) -> Optional[str]:
  """stdout of a short informational command, or None when it fails."""
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_QUERY_TIMEOUT_S)
  except (OSError, subprocess.SubprocessError):
    return None
  return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def cpu_features(compiler: Optional[str] = None, cpuinfo: Optional[Path] = None) -> str:
  """The host CPU's instruction-set features for the cache key: the
  "flags" lines (x86) and "Features" lines (aarch64) of /proc/cpuinfo;
  where it has neither, what `compiler -march=native -Q --help=target`
  enables; failing that, the machine and processor names."""
  try:
    lines = Path(cpuinfo or _CPUINFO).read_text(errors="replace").splitlines()
  except OSError:
    lines = []
  found = sorted({" ".join(line.split()) for line in lines
                  if line.partition(":")[0].strip() in ("flags", "Features")})
  if found:
    return "\n".join(found)
  resolved = _query([compiler, "-march=native", "-Q", "--help=target"]) if compiler else None
  if resolved:
    return resolved
  return f"{platform.machine()} {platform.processor()}"


def compiler_version(compiler: str) -> str:
  """`compiler --version` and `-dumpfullversion` (GCC's full version; other
  compilers may not answer it), for the cache key."""
  return "\n".join(_query([compiler, arg]) or f"({arg}: no answer)"
                   for arg in ("--version", "-dumpfullversion"))


def cache_dir() -> Path:
  env = os.environ.get("STRUCTVPR_NATIVE_CACHE")
  return Path(env) if env else Path.home() / ".cache" / "structvpr_jax" / "native"


def _compiler() -> Optional[str]:
  return shutil.which(os.environ.get("CXX", "g++"))


def library_path(compiler: str, target: Optional[str] = None) -> Path:
  """Where the library for this source, FFI version, compiler (command,
  flags with -march=`target`, version) and CPU lives."""
  include = Path(jax.ffi.include_dir())
  digest = hashlib.sha256()
  digest.update(_SOURCE.read_bytes())
  for header in sorted(include.rglob("*.h")):
    digest.update(header.read_bytes())
  for part in (" ".join((compiler,) + flags(target)), compiler_version(compiler),
               cpu_features(compiler), platform.machine()):
    digest.update(part.encode() + b"\0")
  return cache_dir() / f"kernels-{digest.hexdigest()[:16]}.so"


def _first_error_lines(messages: str) -> str:
  """The compiler's messages from the first line naming an error (else from
  the start), at most `_ERROR_LINES` lines."""
  lines = messages.strip().splitlines()
  start = next((i for i, line in enumerate(lines) if "error" in line.lower()), 0)
  return "\n".join(lines[start:start + _ERROR_LINES])


def build(compiler: str, target: Path, source: Optional[Path] = None,
          march: Optional[str] = None, timeout: Optional[float] = None) -> str:
  """Compiles `source` (default kernels.cc; another version of it for an A/B,
  `experiments/ab_forward.py --b-kernels`) into `target` (a temporary
  name, then renamed: `files.atomic_write`) with `flags(march)`, within
  `timeout` seconds (default `build_timeout()`). The compiler's messages
  go to `target` with the suffix .log.

  Returns the compiler's warnings ('' when none). Raises BuildError with
  the compiler's first error lines when it fails or times out.
  """
  source = _SOURCE if source is None else source
  timeout = build_timeout() if timeout is None else timeout
  log = Path(target).with_suffix(".log")

  def compile_to(tmp: str) -> str:
    cmd = [compiler, *flags(march), "-isystem", jax.ffi.include_dir(), str(source), "-o", tmp]
    # its own process group: a timeout ends the driver and the compilers it ran
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
      messages, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      messages, _ = proc.communicate()
      error = f"the build timed out after {timeout:g} s ({TIMEOUT_ENV})"
      files.write_text(str(log), f"$ {' '.join(cmd)}\n{messages}\n{error}\n")
      raise BuildError(f"{error}: {' '.join(cmd)}; build log {log}", error, log) from None
    files.write_text(str(log), f"$ {' '.join(cmd)}\n{messages}\nexit status {proc.returncode}\n")
    if proc.returncode != 0:
      error = _first_error_lines(messages) or f"exit status {proc.returncode}, no message"
      raise BuildError(f"{' '.join(cmd)} failed ({proc.returncode}); build log {log}:\n{error}",
                       error, log)
    return messages.strip()

  warnings = []
  files.atomic_write(str(target), lambda tmp: warnings.append(compile_to(tmp)))
  return warnings[0]


def register_targets(path: Path, suffix: str = "") -> None:
  """Loads the built library at `path` and registers each handler with
  XLA's CPU backend as its target name + `suffix`."""
  lib = ctypes.cdll.LoadLibrary(str(path))
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(name + suffix, jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform="cpu")


def library_isa(path: Path) -> str:
  """The vector instruction set the library at `path` was compiled for
  ("avx512", "avx2", "aarch64", "other"; "unknown" for a library without the
  `StructvprTargetIsa` query)."""
  lib = ctypes.cdll.LoadLibrary(str(path))
  query = getattr(lib, "StructvprTargetIsa", None)
  if query is None:
    return "unknown"
  query.restype = ctypes.c_char_p
  return query().decode()


def load() -> bool:
  """Builds (once per cache) and registers the native kernels; True when
  they can be used, False (after one warning naming why) when not."""
  with _lock:
    if "ok" in _state:
      return _state["ok"]
    ok, reason, path, error, log, target, isa = False, "", None, None, None, None, None
    compiler = None
    if os.environ.get("STRUCTVPR_NATIVE", "1") == "0":
      reason = "disabled by STRUCTVPR_NATIVE=0"
    elif platform.system() != "Linux":
      reason = f"not built on {platform.system()}"
    elif (compiler := _compiler()) is None:
      reason = f"no C++ compiler ({os.environ.get('CXX', 'g++')} not found; set $CXX)"
    else:
      try:
        target = march()
        path = library_path(compiler, target)
        log = path.with_suffix(".log")
        if not path.exists():
          warnings = build(compiler, path, march=target)
          if warnings:
            logging.warning("native CPU kernels: the compiler warned (build log %s):\n%s",
                            log, "\n".join(warnings.splitlines()[:_ERROR_LINES]))
        register_targets(path)
        isa = library_isa(path)
        ok = True
        logging.info("native CPU kernels: %s (%s)", path, isa)
      except BuildError as e:
        reason, error = f"{type(e).__name__}: {e}", e.error
      except (OSError, RuntimeError, AttributeError, ValueError) as e:
        reason, error = f"{type(e).__name__}: {e}", str(e)
    if not ok and reason != "disabled by STRUCTVPR_NATIVE=0":
      logging.warning("native CPU kernels unavailable, using the XLA implementation: %s",
                      reason)
    _state.update(ok=ok, reason=reason, path=path, error=error,
                  build_log=log if log is not None and log.exists() else None, march=target,
                  isa=isa, compiler=compiler)
    return ok


def status() -> dict:
  """The last `load()`: {"ok": bool, "reason": str (why not, '' when ok),
  "error": str | None (the compiler's first error lines, or the timeout),
  "path", "build_log": str | None, "march": the -march target, "isa": the
  library's instruction set ("avx512", "avx2", ...; None when not loaded),
  "compiler": str | None}."""
  load()
  out = dict(_state)
  for key in ("path", "build_log"):
    out[key] = str(out[key]) if out[key] else None
  return out


def _varying_axes(a) -> frozenset:
  """The manual mesh axes `a` varies over inside shard_map (empty outside)."""
  t = jax.typeof(a)
  if hasattr(t, "vma"):
    return frozenset(t.vma)
  mat = getattr(t, "mat", None)                      # jax 0.10: manual_axis_type
  return frozenset(getattr(mat, "varying", ()) or ())


def match_varying(*arrays):
  """`arrays`, each marked varying over the union of their manual axes.

  An FFI call's outputs carry the type its caller declares, so inside
  shard_map every input must agree on the axes it varies over (and the
  outputs get the same): a replicated kernel applied to a per-device batch
  is cast to per-device first (`lax.pcast`; no data moves), and autodiff
  turns that cast into the sum over devices its transpose is.
  """
  from jax import lax
  axes = frozenset().union(*(_varying_axes(a) for a in arrays))
  if not axes:
    return arrays
  out = []
  for a in arrays:
    missing = tuple(sorted(axes - _varying_axes(a)))
    if missing:
      a = (lax.pcast(a, missing, to="varying") if hasattr(lax, "pcast")
           else lax.pvary(a, missing))
    out.append(a)
  return tuple(out)


def _explicit(a):
  """`a`'s sharding where its type carries one over Explicit mesh axes, else None."""
  sharding = getattr(jax.typeof(a), "sharding", None)
  types = getattr(getattr(sharding, "mesh", None), "axis_types", None) or ()
  return sharding if any(t == AxisType.Explicit for t in types) else None


def weight_gradient_sharding(batch, weight):
  """The `out_sharding` a weight's gradient summed over `batch`'s rows must
  name where `batch` is sharded over Explicit mesh axes (under jax.jit with
  inputs on a `jax.make_mesh` mesh, whose axes are Explicit by default; a
  contraction over a sharded axis is otherwise ambiguous): the weight's
  own sharding on that mesh, else replicated. None elsewhere (the plain
  contraction). For the custom VJPs that sum over the batch themselves
  (`ops/pointwise.py`, `netvlad.residual_sums`)."""
  sharding = _explicit(batch)
  if sharding is None:
    return None
  own = _explicit(weight)
  if own is not None and own.mesh == sharding.mesh:
    return own
  return NamedSharding(sharding.mesh, PartitionSpec())


def _result(like, shape, per_image: bool = True) -> "jax.core.ShapedArray":
  """float32 result type of `shape` varying over the same mesh axes as `like`
  (x, the batch). Where `like` carries an explicit sharding, a per-image
  result ([B, ...]) is sharded over the batch as x is and a sum over the
  batch (a weight's gradient) is replicated."""
  t = jax.typeof(like)
  extra = {}
  sharding = getattr(t, "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is not None and len(shape):
    lead = spec[0] if per_image and len(spec) else None
    extra["sharding"] = sharding.update(spec=PartitionSpec(lead, *(None,) * (len(shape) - 1)))
  return t.update(shape=tuple(shape), dtype=np.dtype(np.float32), **extra)


def _same_out(size: int, stride: int) -> int:
  return -(-size // stride)


# --- per-shard calls under jax.jit ------------------------------------------
#
# An FFI call is opaque to XLA's SPMD partitioner: under plain jax.jit with a
# batch-sharded x it gathers the batch onto every device and runs the whole
# call everywhere. Every call here is batch-parallel (each image's rows are
# computed from that image alone; a weight's gradient is a sum over the
# images), so `_call` wraps it in `custom_partitioning`: each device runs it
# on its own shard of the batch and the sums over the batch are `psum`med.
# Its batching rule (`custom_vmap`) maps the plain call (custom_partitioning
# has none). On one device, inside shard_map (manual axes) and where x is
# not sharded the call is the plain FFI call, unchanged.


def _batch_axes(sharding, shape):
  """The mesh axes x's batch (axis 0) is split over, when it is split evenly
  (else None: the call takes the whole batch)."""
  spec = getattr(sharding, "spec", None)
  mesh = getattr(sharding, "mesh", None)
  if not spec or spec[0] is None or mesh is None:
    return None
  axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  shards = int(np.prod([mesh.shape[a] for a in axes]))
  return axes if shape[0] % shards == 0 else None


@functools.lru_cache(maxsize=None)
def _per_shard(fn, static: tuple, batched: tuple, per_image: tuple):
  """`fn(*arrays, **dict(static))` as custom_partitioning (per-shard calls)
  with a custom_vmap batching rule; `batched[i]`: array i has the batch on
  axis 0 (x first); `per_image[j]`: result j is [B, ...] (else a sum over
  the batch)."""
  def call(*arrays):
    return fn(*arrays, **dict(static))

  partitioned = custom_partitioning(call)

  def partition(mesh, arg_shapes, result_shape):
    axes = _batch_axes(arg_shapes[0].sharding, arg_shapes[0].shape)
    batch_spec = PartitionSpec(axes) if axes else PartitionSpec()
    arg_shardings = tuple(NamedSharding(mesh, batch_spec if b else PartitionSpec())
                          for b in batched)
    result_shardings = tuple(NamedSharding(mesh, batch_spec if r else PartitionSpec())
                             for r in per_image)

    def lower(*args):
      outs = call(*args)
      if axes is None:
        return outs
      flat = (outs,) if len(per_image) == 1 else tuple(outs)
      flat = tuple(o if r else jax.lax.psum(o, axes) for o, r in zip(flat, per_image))
      return flat[0] if len(per_image) == 1 else flat

    return (mesh, lower, result_shardings[0] if len(per_image) == 1 else result_shardings,
            arg_shardings)

  def sharding_rule(mesh, operand_types, result_types):
    """Only the batch factor "b" may be sharded (per-image results keep it;
    sums over the batch are the partition's own psum)."""
    operands = [" ".join((["b"] if b else []) + [f"i{i}_{d}" for d in range(int(b), len(t.shape))])
                for i, (t, b) in enumerate(zip(operand_types, batched))]
    results = [" ".join((["b"] if r else []) + [f"o{i}_{d}" for d in range(int(r), len(t.shape))])
               for i, (t, r) in enumerate(zip(result_types, per_image))]
    others = tuple(f for part in operands + results for f in part.split() if f != "b")
    return ", ".join(operands) + " -> " + ", ".join(results), {
        "need_replication_factors": others}

  partitioned.def_partition(partition=partition, sharding_rule=sharding_rule)
  batchable = jax.custom_batching.custom_vmap(lambda *args: partitioned(*args))

  @batchable.def_vmap
  def _vmap_rule(axis_size, in_batched, *args):
    out = jax.vmap(call, in_axes=tuple(0 if b else None for b in in_batched))(*args)
    return out, jax.tree.map(lambda _: True, out)

  return batchable


def _call(fn, arrays: tuple, batched: tuple, per_image: tuple, **static):
  """`fn(*arrays, **static)`, an FFI call with x = arrays[0]: as one call
  inside shard_map (arrays varying over manual axes), else through
  `_per_shard` (per-shard calls when jax.jit partitions x's batch; the
  plain call on one device)."""
  if any(_varying_axes(a) for a in arrays):
    return fn(*arrays, **static)
  return _per_shard(fn, tuple(sorted(static.items())), batched, per_image)(*arrays)


def _depthwise_forward(x, kernel, bias, pbias, *, stride, relu6, prologue):
  b, h, w, c = x.shape
  out = _result(x, (b, _same_out(h, stride), _same_out(w, stride), c))
  return jax.ffi.ffi_call("structvpr_depthwise_forward", out, vmap_method="sequential")(
      x, kernel, bias, pbias, stride=np.int64(stride), relu6=np.int64(relu6),
      prologue=np.int64(prologue))


def depthwise_forward(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int,
                      relu6: bool, prologue_bias: Optional[jax.Array] = None) -> jax.Array:
  """z = act(depthwise(in(x), kernel) + bias): the 3x3 'SAME' depthwise
  convolution of x [B, H, W, C] float32 with kernel [3, 3, C] float32, plus
  bias [C] float32, then min(max(., 0), 6) when `relu6`; [B, ceil(H/s),
  ceil(W/s), C]. in(x) = x, or relu6(x + prologue_bias) when that [C] is
  given (x then is the previous layer's pre-activation). Requires `load()`;
  inside shard_map all inputs must vary over the same mesh axes
  (`match_varying`)."""
  prologue = prologue_bias is not None
  return _call(_depthwise_forward, (x, kernel, bias, prologue_bias if prologue else bias),
               (True, False, False, False), (True,), stride=int(stride), relu6=bool(relu6),
               prologue=prologue)


def _depthwise_backward(x, kernel, pbias, z, dz, *, stride, relu6, prologue):
  c = kernel.shape[-1]
  shapes = (_result(x, x.shape), _result(x, kernel.shape, False), _result(x, (c,), False),
            _result(x, (c,), False))
  return jax.ffi.ffi_call("structvpr_depthwise_backward", shapes, vmap_method="sequential")(
      x, kernel, pbias, z, dz, stride=np.int64(stride), relu6=np.int64(relu6),
      prologue=np.int64(prologue))


def depthwise_backward(x: jax.Array, kernel: jax.Array, z: jax.Array, dz: jax.Array,
                       stride: int, relu6: bool, prologue_bias: Optional[jax.Array] = None
                       ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(dx [B, H, W, C], dkernel [3, 3, C], dbias [C], dprologue_bias [C]) of
  `depthwise_forward` at (x, kernel, prologue_bias) for the output
  cotangent dz; z is its output (read only when `relu6`: the activation
  passes dz where 0 < z < 6). With a prologue, dx is the gradient of the
  pre-activation x (passed where 0 < x + prologue_bias < 6); without,
  dprologue_bias is 0. Requires `load()`."""
  prologue = prologue_bias is not None
  return _call(_depthwise_backward,
               (x, kernel, prologue_bias if prologue else kernel[0, 0], z, dz),
               (True, False, False, True, True), (True, False, False, False),
               stride=int(stride), relu6=bool(relu6), prologue=prologue)


def _conv3x3_forward(x, kernel, bias, *, stride, relu6):
  b, h, w, _ = x.shape
  out = _result(x, (b, _same_out(h, stride), _same_out(w, stride), kernel.shape[-1]))
  return jax.ffi.ffi_call("structvpr_conv3x3_forward", out, vmap_method="sequential")(
      x, kernel, bias, stride=np.int64(stride), relu6=np.int64(relu6))


def conv3x3_forward(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int,
                    relu6: bool) -> jax.Array:
  """z = act(conv(x, kernel) + bias): the full 3x3 'SAME' convolution of x
  [B, H, W, Cin] float32 with kernel [3, 3, Cin, Cout] (HWIO) float32, plus
  bias [Cout], then min(max(., 0), 6) when `relu6`; [B, ceil(H/s),
  ceil(W/s), Cout]. Requires `load()` and one varying type (`match_varying`)."""
  return _call(_conv3x3_forward, (x, kernel, bias), (True, False, False), (True,),
               stride=int(stride), relu6=bool(relu6))


def _conv3x3_kernel_gradient(x, z, dz, *, stride, relu6):
  cin, cout = x.shape[-1], z.shape[-1]
  shapes = (_result(x, (3, 3, cin, cout), False), _result(x, (cout,), False))
  return jax.ffi.ffi_call("structvpr_conv3x3_kernel_gradient", shapes,
                          vmap_method="sequential")(
      x, z, dz, stride=np.int64(stride), relu6=np.int64(relu6))


def conv3x3_kernel_gradient(x: jax.Array, z: jax.Array, dz: jax.Array, stride: int,
                            relu6: bool) -> tuple[jax.Array, jax.Array]:
  """(dkernel [3, 3, Cin, Cout], dbias [Cout]) of `conv3x3_forward` at x for
  the output cotangent dz; z is its output (read only when `relu6`)."""
  return _call(_conv3x3_kernel_gradient, (x, z, dz), (True, True, True), (False, False),
               stride=int(stride), relu6=bool(relu6))


def _inverted_residual_forward(x, expand_kernel, expand_bias, depthwise_kernel,
                               depthwise_bias, project_kernel, project_bias, *, stride, expand,
                               residual):
  b, h, w, _ = x.shape
  out = _result(x, (b, _same_out(h, stride), _same_out(w, stride), project_kernel.shape[-1]))
  return jax.ffi.ffi_call("structvpr_inverted_residual_forward", out,
                          vmap_method="sequential")(
      x, expand_kernel, expand_bias, depthwise_kernel, depthwise_bias, project_kernel,
      project_bias, stride=np.int64(stride), expand=np.int64(expand),
      residual=np.int64(residual))


def inverted_residual_forward(x: jax.Array, expand_kernel: Optional[jax.Array],
                              expand_bias: Optional[jax.Array], depthwise_kernel: jax.Array,
                              depthwise_bias: jax.Array, project_kernel: jax.Array,
                              project_bias: jax.Array, stride: int, residual: bool
                              ) -> jax.Array:
  """MobileNetV2's inverted-residual block with folded BatchNorm, forward
  only, in one native pass (no gradient: `ops/fused.py` differentiates the
  unfused layers):
    e = relu6(x @ expand_kernel + expand_bias)   (e = x without an expand layer)
    d = relu6(depthwise(e, depthwise_kernel, stride) + depthwise_bias)
    y = d @ project_kernel + project_bias (+ x when `residual`)
  x [B, H, W, C], expand_kernel [C, Ce], expand_bias [Ce], depthwise_kernel
  [3, 3, Ce], depthwise_bias [Ce], project_kernel [Ce, Cout], project_bias
  [Cout], all float32 -> y [B, ceil(H/s), ceil(W/s), Cout]. Requires
  `load()` and one varying type (`match_varying`)."""
  expand = expand_kernel is not None
  if not expand:
    expand_kernel = expand_bias = depthwise_bias
  return _call(_inverted_residual_forward,
               (x, expand_kernel, expand_bias, depthwise_kernel, depthwise_bias,
                project_kernel, project_bias), (True,) + (False,) * 6, (True,),
               stride=int(stride), expand=expand, residual=bool(residual))


def _expand_depthwise_backward(x, expand_kernel, m, depthwise_kernel, expand_bias, z, dz, *,
                               stride):
  c, ce = expand_kernel.shape
  shapes = (_result(x, x.shape), _result(x, (c, ce), False), _result(x, (3, 3, ce), False),
            _result(x, (ce,), False), _result(x, (ce,), False))
  return jax.ffi.ffi_call("structvpr_expand_depthwise_backward", shapes,
                          vmap_method="sequential")(
      x, expand_kernel, m, depthwise_kernel, expand_bias, z, dz, stride=np.int64(stride))


def expand_depthwise_backward(x: jax.Array, expand_kernel: jax.Array, m: jax.Array,
                              depthwise_kernel: jax.Array, expand_bias: jax.Array,
                              z: jax.Array, dz: jax.Array, stride: int
                              ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """The backward of MobileNetV2's expand 1x1 and depthwise layers (folded
  BN) in one pass,
    m = x @ expand_kernel,
    z = relu6(depthwise(relu6(m + expand_bias), depthwise_kernel, stride) + bias):
  (dx [B, H, W, C], dexpand_kernel [C, Ce], ddepthwise_kernel [3, 3, Ce],
  dbias [Ce], dexpand_bias [Ce]) for the cotangent dz [B, Ho, Wo, Ce],
  given x [B, H, W, C], m [B, H, W, Ce] and z. The gradient of m, the
  block's largest, is made one row at a time and consumed at once, never
  written out. float32; Ce a multiple of 16 and C of 4; requires `load()`
  and one varying type (`match_varying`)."""
  return _call(_expand_depthwise_backward,
               (x, expand_kernel, m, depthwise_kernel, expand_bias, z, dz),
               (True, False, True, False, False, True, True),
               (True, False, False, False, False), stride=int(stride))

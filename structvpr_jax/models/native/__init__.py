"""Native (C++) CPU kernels, built on first use and called through XLA FFI.

`kernels.cc` holds the 3x3 depthwise convolution and its gradients, the
full 3x3 convolution of few input channels (the stem) with its kernel
gradient (float32, NHWC, stride 1 or 2, 'SAME', with a fused bias and
optional relu6), and MobileNetV2's whole inverted-residual block (expand
1x1, depthwise, project 1x1, residual) as one forward-only pass;
`load()` compiles it with the C++
compiler (`$CXX`, else `g++`), caches the shared library and registers its
handlers with XLA. Nothing here is required: when there is no compiler, the
build fails or `STRUCTVPR_NATIVE=0` is set, `load()` returns False (with one
warning naming the reason) and the model uses the XLA implementation.

Cache: `$STRUCTVPR_NATIVE_CACHE`, else `~/.cache/structvpr_jax/native`. The
file name is a hash of the source, the FFI headers, the compiler command and
the host CPU's feature flags (the library is built with -march=native), so a
change to any of them builds anew and a cache shared between different CPUs
never runs the wrong code. The library is written to a temporary name and
renamed into place: concurrent first uses (tests, multi-process runs) never
see a half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Optional

import jax
import numpy as np

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
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno",
          "-w")

_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "reason": str, "path": Path


def _cpu_flags() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line
  except OSError:
    pass
  return platform.processor()


def cache_dir() -> Path:
  env = os.environ.get("STRUCTVPR_NATIVE_CACHE")
  return Path(env) if env else Path.home() / ".cache" / "structvpr_jax" / "native"


def _compiler() -> Optional[str]:
  return shutil.which(os.environ.get("CXX", "g++"))


def library_path(compiler: str) -> Path:
  """Where the library for this source, compiler, FFI version and CPU lives."""
  include = Path(jax.ffi.include_dir())
  digest = hashlib.sha256()
  digest.update(_SOURCE.read_bytes())
  for header in sorted(include.rglob("*.h")):
    digest.update(header.read_bytes())
  digest.update(" ".join((compiler,) + _FLAGS).encode())
  digest.update(_cpu_flags().encode())
  digest.update(platform.machine().encode())
  return cache_dir() / f"kernels-{digest.hexdigest()[:16]}.so"


def build(compiler: str, target: Path, source: Path = _SOURCE) -> None:
  """Compiles `source` (kernels.cc; another version of it for an A/B,
  `experiments/ab_forward.py --b-kernels`) into `target` (a temporary
  name, then renamed: `files.atomic_write`).

  Raises RuntimeError with the compiler's message when it fails.
  """
  def compile_to(tmp: str) -> None:
    cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")

  files.atomic_write(str(target), compile_to)


def register_targets(path: Path, suffix: str = "") -> None:
  """Loads the built library at `path` and registers each handler with
  XLA's CPU backend as its target name + `suffix`."""
  lib = ctypes.cdll.LoadLibrary(str(path))
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(name + suffix, jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform="cpu")


def load() -> bool:
  """Builds (once per cache) and registers the native kernels; True when
  they can be used, False (after one warning naming why) when not."""
  with _lock:
    if "ok" in _state:
      return _state["ok"]
    ok, reason, path = False, "", None
    if os.environ.get("STRUCTVPR_NATIVE", "1") == "0":
      reason = "disabled by STRUCTVPR_NATIVE=0"
    elif platform.system() != "Linux":
      reason = f"not built on {platform.system()}"
    elif (compiler := _compiler()) is None:
      reason = f"no C++ compiler ({os.environ.get('CXX', 'g++')} not found; set $CXX)"
    else:
      try:
        path = library_path(compiler)
        if not path.exists():
          build(compiler, path)
        register_targets(path)
        ok = True
        logging.info("native CPU kernels: %s", path)
      except (OSError, RuntimeError, AttributeError) as e:
        reason = f"{type(e).__name__}: {e}"
    if not ok and reason != "disabled by STRUCTVPR_NATIVE=0":
      logging.warning("native CPU kernels unavailable, using the XLA implementation: %s",
                      reason)
    _state.update(ok=ok, reason=reason, path=path)
    return ok


def status() -> dict:
  """{"ok": bool, "reason": str, "path": str | None} of the last `load()`."""
  load()
  return {"ok": _state["ok"], "reason": _state["reason"],
          "path": str(_state["path"]) if _state["path"] else None}


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


def _result(like, shape) -> "jax.core.ShapedArray":
  """float32 result type of `shape` varying over the same mesh axes as `like`."""
  return jax.typeof(like).update(shape=tuple(shape), dtype=np.dtype(np.float32))


def _same_out(size: int, stride: int) -> int:
  return -(-size // stride)


def depthwise_forward(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int,
                      relu6: bool, prologue_bias: Optional[jax.Array] = None) -> jax.Array:
  """z = act(depthwise(in(x), kernel) + bias): the 3x3 'SAME' depthwise
  convolution of x [B, H, W, C] float32 with kernel [3, 3, C] float32, plus
  bias [C] float32, then min(max(., 0), 6) when `relu6`; [B, ceil(H/s),
  ceil(W/s), C]. in(x) = x, or relu6(x + prologue_bias) when that [C] is
  given (x then is the previous layer's pre-activation). Requires `load()`;
  inside shard_map all inputs must vary over the same mesh axes
  (`match_varying`)."""
  b, h, w, c = x.shape
  out = _result(x, (b, _same_out(h, stride), _same_out(w, stride), c))
  prologue = prologue_bias is not None
  return jax.ffi.ffi_call("structvpr_depthwise_forward", out, vmap_method="sequential")(
      x, kernel, bias, prologue_bias if prologue else bias, stride=np.int64(stride),
      relu6=np.int64(bool(relu6)), prologue=np.int64(prologue))


def depthwise_backward(x: jax.Array, kernel: jax.Array, z: jax.Array, dz: jax.Array,
                       stride: int, relu6: bool, prologue_bias: Optional[jax.Array] = None
                       ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(dx [B, H, W, C], dkernel [3, 3, C], dbias [C], dprologue_bias [C]) of
  `depthwise_forward` at (x, kernel, prologue_bias) for the output
  cotangent dz; z is its output (read only when `relu6`: the activation
  passes dz where 0 < z < 6). With a prologue, dx is the gradient of the
  pre-activation x (passed where 0 < x + prologue_bias < 6); without,
  dprologue_bias is 0. Requires `load()`."""
  c = kernel.shape[-1]
  prologue = prologue_bias is not None
  shapes = (_result(x, x.shape), _result(x, kernel.shape), _result(x, (c,)), _result(x, (c,)))
  return jax.ffi.ffi_call("structvpr_depthwise_backward", shapes, vmap_method="sequential")(
      x, kernel, prologue_bias if prologue else kernel[0, 0], z, dz, stride=np.int64(stride),
      relu6=np.int64(bool(relu6)), prologue=np.int64(prologue))


def conv3x3_forward(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int,
                    relu6: bool) -> jax.Array:
  """z = act(conv(x, kernel) + bias): the full 3x3 'SAME' convolution of x
  [B, H, W, Cin] float32 with kernel [3, 3, Cin, Cout] (HWIO) float32, plus
  bias [Cout], then min(max(., 0), 6) when `relu6`; [B, ceil(H/s),
  ceil(W/s), Cout]. Requires `load()` and one varying type (`match_varying`)."""
  b, h, w, _ = x.shape
  out = _result(x, (b, _same_out(h, stride), _same_out(w, stride), kernel.shape[-1]))
  return jax.ffi.ffi_call("structvpr_conv3x3_forward", out, vmap_method="sequential")(
      x, kernel, bias, stride=np.int64(stride), relu6=np.int64(bool(relu6)))


def conv3x3_kernel_gradient(x: jax.Array, z: jax.Array, dz: jax.Array, stride: int,
                            relu6: bool) -> tuple[jax.Array, jax.Array]:
  """(dkernel [3, 3, Cin, Cout], dbias [Cout]) of `conv3x3_forward` at x for
  the output cotangent dz; z is its output (read only when `relu6`)."""
  cin, cout = x.shape[-1], z.shape[-1]
  shapes = (_result(x, (3, 3, cin, cout)), _result(x, (cout,)))
  return jax.ffi.ffi_call("structvpr_conv3x3_kernel_gradient", shapes,
                          vmap_method="sequential")(
      x, z, dz, stride=np.int64(stride), relu6=np.int64(bool(relu6)))



def inverted_residual_forward(x: jax.Array, expand_kernel: Optional[jax.Array],
                              expand_bias: Optional[jax.Array], depthwise_kernel: jax.Array,
                              depthwise_bias: jax.Array, project_kernel: jax.Array,
                              project_bias: jax.Array, stride: int, residual: bool
                              ) -> jax.Array:
  """MobileNetV2's inverted-residual block with folded BatchNorm, forward
  only, in one native pass (no gradient: `mobilenet.InvertedResidual`
  differentiates the unfused layers):
    e = relu6(x @ expand_kernel + expand_bias)   (e = x without an expand layer)
    d = relu6(depthwise(e, depthwise_kernel, stride) + depthwise_bias)
    y = d @ project_kernel + project_bias (+ x when `residual`)
  x [B, H, W, C], expand_kernel [C, Ce], expand_bias [Ce], depthwise_kernel
  [3, 3, Ce], depthwise_bias [Ce], project_kernel [Ce, Cout], project_bias
  [Cout], all float32 -> y [B, ceil(H/s), ceil(W/s), Cout]. Requires
  `load()` and one varying type (`match_varying`)."""
  b, h, w, _ = x.shape
  out = _result(x, (b, _same_out(h, stride), _same_out(w, stride), project_kernel.shape[-1]))
  expand = expand_kernel is not None
  if not expand:
    expand_kernel = expand_bias = depthwise_bias
  return jax.ffi.ffi_call("structvpr_inverted_residual_forward", out,
                          vmap_method="sequential")(
      x, expand_kernel, expand_bias, depthwise_kernel, depthwise_bias, project_kernel,
      project_bias, stride=np.int64(stride), expand=np.int64(expand),
      residual=np.int64(bool(residual)))


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
  c, ce = expand_kernel.shape
  shapes = (_result(x, x.shape), _result(x, (c, ce)), _result(x, (3, 3, ce)),
            _result(x, (ce,)), _result(x, (ce,)))
  return jax.ffi.ffi_call("structvpr_expand_depthwise_backward", shapes,
                          vmap_method="sequential")(
      x, expand_kernel, m, depthwise_kernel, expand_bias, z, dz, stride=np.int64(stride))

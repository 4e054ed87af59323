"""Which implementation of MobileNetV2's ops runs: the one rule.

Every choice between equal implementations of a layer is made here, so that
the rest of the code only asks:

1. The 3x3 depthwise kernel, `model.depthwise` -> `resolve_depthwise(kind)`:
   - "grouped" / "shifted": as named, on any backend.
   - "native": the C++ kernels (`models/native/`); the CPU backend only, and
     an error naming the reason when their library cannot be had.
   - "auto" (the default): on GPU / TPU "grouped" (cuDNN's and the TPU's own
     kernel); on the CPU "native" where the library loads *and* was built
     for an instruction set the native path was measured faster on
     (`auto_takes_native`: AVX-512, `NATIVE_FASTER_ISAS`), else "shifted"
     (XLA's 9 shifted multiply-adds).
   The same rule picks the stem: the native 3x3 convolution where the
   depthwise kernel resolves to "native", else XLA's convolution.
2. A native call takes an op only for float32 and stride 1 or 2
   (`native_applies`); anything else (float64 in the exactness tests,
   bfloat16) takes the XLA formulation of the same op.
3. Frozen BatchNorm folded (`model.fold_bn`, outside batch-statistics
   training) with the native kernels (`folded_native`): the expand 1x1's
   bias and relu6 run inside the depthwise kernel. With `model.fused_blocks`
   and float32 too (`blocks_fuse`), each inverted-residual block's forward is
   one native pass (`fused.fused_inverted_residual`); gradients always take
   the separate layers.
4. In those layers' backward, rows at least `JOINT_EXPAND_BACKWARD_MIN_WIDTH`
   wide (with channels the kernel tiles) differentiate the expand 1x1 and
   the depthwise layer in one native pass (`joint_expand_backward_applies`).

All choices give the same parameter tree and equal values up to float
rounding (tests/test_mobilenet.py, tests/test_native_kernels.py).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from structvpr_jax.models import native

DEPTHWISE = ("auto", "native", "shifted", "grouped")


# The instruction sets (`native.status()["isa"]`, what the library was
# compiled for) on which the native kernels were measured faster than XLA's
# path: AVX-512 (Zen 4 / Zen 5, the README's performance tables). Built for
# AVX2 (-march=x86-64-v3) they ran 0.05x XLA's speed in the forward (224 and
# 480x640) and 0.35x in the frozen train step, while the AVX-512 build ran
# 1.5x / 1.7x on the same machine (paired A/B, Zen 4 VM, 2026-12-07:
# experiments/results/native_avx2.md). Nothing else was measured, so
# nothing else is in.
NATIVE_FASTER_ISAS = ("avx512",)


def auto_takes_native(status: dict) -> bool:
  """Whether "auto" takes the native kernels, from `native.status()`: they
  loaded and were built for an instruction set in `NATIVE_FASTER_ISAS`."""
  return bool(status.get("ok")) and status.get("isa") in NATIVE_FASTER_ISAS


def native_measured_faster() -> bool:
  """`auto_takes_native` of this process's native kernels (building them
  on first use)."""
  return native.load() and auto_takes_native(native.status())


def resolve_depthwise(kind: str, backend: Optional[str] = None) -> str:
  """"native", "shifted" or "grouped" for `kind` (rule 1 of the module
  docstring; `backend` defaults to `jax.default_backend()`). An explicit
  "native" that cannot be built or runs off the CPU is an error naming the
  reason."""
  if kind not in DEPTHWISE:
    raise ValueError(f"depthwise={kind!r}; expected one of {DEPTHWISE}")
  on_cpu = (backend or jax.default_backend()) == "cpu"
  if kind == "native":
    if not on_cpu:
      raise ValueError("model.depthwise='native' runs on the CPU backend only")
    if not native.load():
      raise ValueError(f"model.depthwise='native' is unavailable: {native.status()['reason']}")
    return kind
  if kind != "auto":
    return kind
  if not on_cpu:
    return "grouped"
  return "native" if native_measured_faster() else "shifted"


def native_applies(dtype, stride) -> bool:
  """The native kernels take float32 and stride 1 or 2, once built (rule 2)."""
  return dtype == jnp.float32 and int(stride) in (1, 2) and native.load()


def folded_native(fold_bn: bool, norm: str, depthwise: str, train: bool) -> bool:
  """Whether frozen BatchNorm is folded (`fold_bn`, outside training) and
  the native kernels run (`resolve_depthwise`): the expand 1x1's bias and
  relu6 then run inside the depthwise kernel (rule 3)."""
  return fold_bn and norm == "batch" and not train and resolve_depthwise(depthwise) == "native"


def blocks_fuse(fold_bn: bool, norm: str, depthwise: str, fused_blocks: bool, dtype,
                param_dtype, train: bool) -> bool:
  """Whether an inverted-residual block runs as one native pass
  (`fused.fused_inverted_residual`): `folded_native`, `fused_blocks`, float32
  (rule 3)."""
  return (fused_blocks and folded_native(fold_bn, norm, depthwise, train)
          and dtype == jnp.float32 and param_dtype == jnp.float32)


# Block inputs at least this many pixels wide differentiate the expand 1x1
# and the depthwise layer as one native backward pass
# (`fused._expand_depthwise_native`); narrower ones take the layers' own. The
# pass works row by row: in the frozen train step at 224 (in-process A/B,
# alternating calls, 30 pairs each) the step took 0.96-0.97x the time with
# it on rows of 112 and 56 pixels (blocks 1-3), 0.94-0.96x down to 28
# (blocks 1-6), 1.00x down to 14 and 1.04x down to 7 (a Zen 4 host; on a
# Zen 5, down to 28: 0.99x, interval 0.98-1.00, 2026-12-04).
JOINT_EXPAND_BACKWARD_MIN_WIDTH = 28


def joint_expand_backward_applies(x, we, be, kd, bd, stride) -> bool:
  """`fused._expand_depthwise_native` takes the block (rule 4): float32,
  native kernels, rows of at least `JOINT_EXPAND_BACKWARD_MIN_WIDTH`, Ce a
  multiple of 16 and C of 4 (every MobileNetV2 width rounds channels to
  multiples of 8)."""
  c, ce = we.shape
  return (all(a.dtype == jnp.float32 for a in (x, we, be, kd, bd))
          and x.shape[2] >= JOINT_EXPAND_BACKWARD_MIN_WIDTH and ce % 16 == 0 and c % 4 == 0
          and native_applies(jnp.float32, stride))

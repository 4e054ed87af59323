"""The fallbacks when the native (C++) kernels cannot be had: disabled by
STRUCTVPR_NATIVE=0, no compiler, a compiler that fails. The model then runs
on XLA's own kernels.

Kept apart from tests/test_native_kernels.py, which skips its whole module
where the kernels did not build: these must run exactly there. Each case
runs in a fresh interpreter (`native.load()` decides once per process), so
none needs a working compiler.
"""

import os
import subprocess
import sys
import textwrap


def run_python(code, **env):
  """Runs a code snippet in a fresh Python (its own environment variables:
  the native kernels are chosen once per process); asserts it succeeded."""
  full = {**os.environ, **env}
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                        text=True, env=full, timeout=300)
  assert proc.returncode == 0, proc.stderr
  return proc


FALLBACK = """
  import jax.numpy as jnp, numpy as np, pytest
  from structvpr_jax.models import mobilenet, native
  from structvpr_jax.models.ops import dispatch
  assert not native.load()
  print("REASON", native.status()["reason"])
  assert dispatch.resolve_depthwise("auto", "cpu") == "shifted"
  with pytest.raises(ValueError, match="model.depthwise='native' is unavailable"):
    dispatch.resolve_depthwise("native", "cpu")
  x = jnp.ones((1, 3, 3, 1)); k = jnp.ones((3, 3, 1))
  layer = mobilenet.DepthwiseConv3x3()
  y = layer.apply({"params": {"kernel": k}}, x)
  np.testing.assert_array_equal(y[0, :, :, 0], [[4, 6, 4], [6, 9, 6], [4, 6, 4]])
"""


def test_disabled_native_falls_back_to_xla_silently():
  proc = run_python(FALLBACK, STRUCTVPR_NATIVE="0")
  assert "REASON disabled by STRUCTVPR_NATIVE=0" in proc.stdout
  assert "unavailable" not in proc.stderr


def test_missing_compiler_falls_back_with_one_warning(tmp_path):
  proc = run_python(FALLBACK, CXX=str(tmp_path / "no-such-g++"), STRUCTVPR_NATIVE_CACHE=str(tmp_path),
              STRUCTVPR_NATIVE="1")       # also in .ci/run's STRUCTVPR_NATIVE=0 pass
  assert "no C++ compiler" in proc.stdout
  assert proc.stderr.count("native CPU kernels unavailable") == 1


def test_failed_build_falls_back_naming_the_compiler_error(tmp_path):
  """A compiler that rejects the source (as one would a broken kernels.cc):
  load() is False, status() carries the compiler's message (what .ci/run
  prints), one warning, and the model runs on XLA."""
  broken = tmp_path / "broken-cxx"
  # answers the version queries (part of the cache key); a build writes a
  # partial output (its last argument, after -o) before failing
  broken.write_text("#!/bin/sh\ncase \"$1\" in --version|-dumpfullversion) echo 1.0; exit 0;; esac\n"
                    "for a; do out=$a; done\necho partial > \"$out\"\n"
                    "echo 'kernels.cc:1:1: error: expected unqualified-id' >&2\nexit 1\n")
  broken.chmod(0o755)
  cache = tmp_path / "cache"
  proc = run_python(FALLBACK, CXX=str(broken), STRUCTVPR_NATIVE_CACHE=str(cache), STRUCTVPR_NATIVE="1")
  assert "expected unqualified-id" in proc.stdout, proc.stdout
  assert proc.stderr.count("native CPU kernels unavailable") == 1, proc.stderr
  # the partial library not kept; the compiler's messages in the build log beside it
  kept = list(cache.iterdir())
  assert [p.suffix for p in kept] == [".log"], kept
  assert "expected unqualified-id" in kept[0].read_text()

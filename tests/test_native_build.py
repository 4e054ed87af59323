"""How the native kernels are built (models/native/__init__.py), not what
they compute (tests/test_native_kernels.py): the cache key (CPU features on
x86 and aarch64, the compiler's version, -march), the build log, the build
timeout and compile errors reported by `load()` / `status()`. Fake
compilers and fake /proc/cpuinfo files keep these fast; two tests run the
real compiler (skipped without one)."""

import os
import platform
import shutil
import sys

import pytest

from structvpr_jax.models import native

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse2 avx avx2 avx512f avx512bw
vmx flags\t: vnmi invvpid
bugs\t\t: sysret_ss_attrs

processor\t: 1
flags\t\t: fpu vme sse2 avx avx2 avx512f avx512bw
"""
AARCH64_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics sve
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


def fake_compiler(tmp_path, name="fake-g++", version="1.0", build="exit 1"):
  """A shell script answering --version / -dumpfullversion with `version`,
  -Q --help=target with a target listing, and running `build` otherwise."""
  path = tmp_path / name
  path.write_text(f"""#!/bin/sh
case "$1" in
  --version) echo "fake-g++ (Fake) {version}"; exit 0;;
  -dumpfullversion) echo "{version}"; exit 0;;
  -march=native) echo "  -march=                     fakecpu-{version}"; exit 0;;
esac
{build}
""")
  path.chmod(0o755)
  return str(path)


def test_cpu_features_read_x86_flags_and_aarch64_features(tmp_path, monkeypatch):
  x86, arm, bare = tmp_path / "x86", tmp_path / "arm", tmp_path / "bare"
  x86.write_text(X86_CPUINFO)
  arm.write_text(AARCH64_CPUINFO)
  bare.write_text("processor\t: 0\nmodel name\t: Mystery\n")
  assert native.cpu_features(cpuinfo=x86) == "flags : fpu vme sse2 avx avx2 avx512f avx512bw"
  assert native.cpu_features(cpuinfo=arm) == (
      "Features : fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics sve")
  # neither line: what the compiler's -march=native enables; else the machine
  compiler = fake_compiler(tmp_path)
  assert "fakecpu-1.0" in native.cpu_features(compiler, cpuinfo=bare)
  assert native.cpu_features(None, cpuinfo=tmp_path / "missing") == (
      f"{platform.machine()} {platform.processor()}")
  # each CPU its own library
  keys = set()
  for info in (x86, arm, bare):
    monkeypatch.setattr(native, "_CPUINFO", info)
    keys.add(native.library_path(compiler))
  assert len(keys) == 3


def test_cache_key_follows_compiler_version_command_and_march(tmp_path, monkeypatch):
  monkeypatch.delenv(native.MARCH_ENV, raising=False)
  monkeypatch.setenv("STRUCTVPR_NATIVE_CACHE", str(tmp_path / "cache"))
  compiler = fake_compiler(tmp_path, version="12.2.0")
  first = native.library_path(compiler)
  assert first.parent == tmp_path / "cache" and first.name.startswith("kernels-")
  assert native.library_path(compiler) == first                       # stable
  assert "12.2.0" in native.compiler_version(compiler)
  fake_compiler(tmp_path, version="13.1.0")                         # upgraded in place
  assert native.library_path(compiler) != first
  assert native.library_path(fake_compiler(tmp_path, "other-g++")) != native.library_path(compiler)
  # a compiler that answers nothing still gets a key of its own
  mute = tmp_path / "mute-g++"
  mute.write_text("#!/bin/sh\nexit 1\n")
  mute.chmod(0o755)
  assert "no answer" in native.compiler_version(str(mute))
  # -march: the flags, the key, the environment variable and its check
  assert "-march=native" in native.flags() and "-w" not in native.flags()
  assert "-march=x86-64-v3" in native.flags("x86-64-v3")
  assert native.library_path(compiler, "x86-64-v3") != native.library_path(compiler)
  monkeypatch.setenv(native.MARCH_ENV, "x86-64-v3")
  assert native.march() == "x86-64-v3"
  assert native.library_path(compiler) == native.library_path(compiler, "x86-64-v3")
  monkeypatch.setenv(native.MARCH_ENV, "native -O0")
  with pytest.raises(ValueError, match="STRUCTVPR_NATIVE_MARCH"):
    native.march()


def test_build_timeout_setting(monkeypatch):
  monkeypatch.delenv(native.TIMEOUT_ENV, raising=False)
  assert native.build_timeout() == native.DEFAULT_BUILD_TIMEOUT_S == 300
  monkeypatch.setenv(native.TIMEOUT_ENV, "2.5")
  assert native.build_timeout() == 2.5
  for bad in ("soon", "0"):
    monkeypatch.setenv(native.TIMEOUT_ENV, bad)
    with pytest.raises(ValueError, match=native.TIMEOUT_ENV):
      native.build_timeout()


@pytest.fixture
def fresh_load(tmp_path, monkeypatch):
  """`native.load()` as on a first use: no recorded state, an empty cache."""
  monkeypatch.setattr(native, "_state", {})
  monkeypatch.setenv("STRUCTVPR_NATIVE_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv("STRUCTVPR_NATIVE", raising=False)
  monkeypatch.delenv(native.MARCH_ENV, raising=False)
  return monkeypatch


def test_a_build_past_the_timeout_falls_back_with_the_reason(tmp_path, fresh_load, caplog):
  pid_file = tmp_path / "pid"
  compiler = fake_compiler(tmp_path, build=f"echo $$ > {pid_file}\nexec sleep 60")
  fresh_load.setenv("CXX", compiler)
  fresh_load.setenv(native.TIMEOUT_ENV, "1")
  with caplog.at_level("WARNING"):
    assert native.load() is False
  status = native.status()
  assert not status["ok"] and status["path"] is not None
  assert "timed out after 1 s (STRUCTVPR_NATIVE_BUILD_TIMEOUT)" in status["reason"]
  assert "timed out" in status["error"]
  assert "timed out" in open(status["build_log"]).read()
  assert any("native CPU kernels unavailable" in r.getMessage() and "timed out" in r.getMessage()
             for r in caplog.records)
  with pytest.raises(ProcessLookupError):          # the compiler was ended, not left running
    os.kill(int(pid_file.read_text()), 0)
  assert not list((tmp_path / "cache").glob("*.so"))


needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ here")


@needs_gxx
def test_a_compile_error_is_reported_with_the_compilers_first_lines(tmp_path, fresh_load,
                                                                    caplog):
  broken = tmp_path / "kernels.cc"
  broken.write_text("// a kernels.cc with a syntax error\nint broken( {\n")
  fresh_load.setattr(native, "_SOURCE", broken)
  fresh_load.setenv("CXX", "g++")
  with caplog.at_level("WARNING"):
    assert native.load() is False
  status = native.status()
  assert "error" in status["error"] and "kernels.cc:2" in status["error"]
  assert status["error"] in status["reason"]
  assert status["build_log"] and "kernels.cc:2" in open(status["build_log"]).read()
  assert any("kernels.cc:2" in r.getMessage() for r in caplog.records)


@needs_gxx
def test_build_writes_atomically_logs_and_reports_compiler_errors(tmp_path):
  """The real kernels.cc builds without a warning (-Wall; the FFI headers
  are system headers), its log beside it; built for AVX2 on x86 it says so
  (`library_isa`, what "auto" consults). A failing compiler leaves only
  its log."""
  target = tmp_path / "lib" / "kernels-test.so"
  x86 = platform.machine() in ("x86_64", "AMD64")
  warnings = native.build("g++", target, march="x86-64-v3" if x86 else None)
  assert warnings == ""
  assert sorted(p.name for p in target.parent.iterdir()) == ["kernels-test.log", target.name]
  assert "exit status 0" in (tmp_path / "lib" / "kernels-test.log").read_text()
  if x86:
    assert native.library_isa(target) == "avx2"
  broken = tmp_path / "broken-cxx"
  broken.write_text("#!/bin/sh\necho 'error: no such compiler feature' >&2\nexit 3\n")
  broken.chmod(0o755)
  with pytest.raises(native.BuildError, match="no such compiler feature") as info:
    native.build(str(broken), tmp_path / "lib" / "other.so")
  assert isinstance(info.value, RuntimeError) and "no such compiler feature" in info.value.error
  assert sorted(p.name for p in target.parent.iterdir()) == [
      "kernels-test.log", target.name, "other.log"]                # no half-written library


def test_status_keys_for_a_ci_check():
  """What a CI check prints after `load()`: the keys are always there."""
  native.load()
  status = native.status()
  assert {"ok", "reason", "error", "path", "build_log", "march", "isa", "compiler"} <= set(status)
  if status["ok"]:
    assert status["error"] is None and status["isa"] in ("avx512", "avx2", "aarch64", "other")
  else:
    assert status["reason"]
  print(sys.platform, status)

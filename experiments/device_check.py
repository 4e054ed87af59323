"""The prepared accelerator check: one script a session lent a GPU runs as is.

  bash experiments/device_check.sh                  # on the GPU machine (< 8 min)
  python experiments/device_check.py --dry-run      # the plumbing on a CPU (tests)

On the GPU machine (the tree arrives as a copy, nothing installed, PyPI
assumed reachable) it runs, in order, each step in its own process with its
own timeout and all of them within one budget (--budget, 455 s by default),
so one step that fails or hangs never takes the others' time:

  nvidia_smi         the GPU, its memory and driver
  install_project    pip install -e ".[bench]"   (the project and PyTorch)
  install_jax_cuda   pip install -U "jax[cuda12]" (--jax-extra)
  jax_devices        which devices JAX sees (must be a GPU: otherwise the
                     JAX steps are skipped rather than timing the CPU)
  torch_devices      whether PyTorch sees CUDA
  smoke              python -m structvpr_jax.main --config=configs/distill.py:smoke
                     on the GPU (the whole pipeline; its test recalls)
  bench_jax          bench.py's RGB worker (--worker rgb --no-levers): forward,
                     extractor call and train step (BatchNorm batch / frozen) at
                     224 and 480x640, and JAX's peak device memory
  bench_torch        torch_reference.py --device cuda: the same figures in
                     PyTorch, and its peak allocated device memory

and writes ONE JSON object: `$OUT/device_check.json` when $OUT is set, else
experiments/results/device_check.json (or --out), rewritten after every
step, so a run cut short still leaves what it finished. Each step records
its status ("ok", "failed", "timeout", "skipped"), exit code, seconds, the
reason when not ok and the tail of its output (the whole output goes to
device_check_logs/ beside the JSON when $OUT is set, else the work folder);
"summary" gathers the paired figures (JAX / PyTorch img/s and their ratio)
and the peak device memory of both. The exit status is 1 when a step that
ran failed.

--dry-run (CPU, no install, no smoke run): the same steps and JSON with
--quick sizes at 224 only, so the script and the flags it passes to bench.py
and torch_reference.py are exercised by tests/test_device_check.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# bench.py and torch_reference.py (its neighbour) live here: if they move, change this line.
BENCH = os.path.join(HERE, "performance", "bench.py")
TORCH_REFERENCE = os.path.join(os.path.dirname(BENCH), "torch_reference.py")
SMOKE_CONFIG = "configs/distill.py:smoke"
# The figures both frameworks measure (bench.PAIRED; not imported: this
# process imports neither JAX nor PyTorch, which may not be installed yet).
PAIRED = ("forward_224", "forward_480x640", "train_step_224", "train_step_480x640",
          "train_step_224_frozen", "train_step_480x640_frozen")
TAIL = 3000          # characters of a step's output kept in the JSON
RESERVE_S = 5.0      # budget kept for writing the report
MIN_STEP_S = 10.0    # a step is not started with less left than this

JAX_PROBE = ("import json, jax; d = jax.devices(); print(json.dumps({'jax': jax.__version__, "
             "'platform': d[0].platform, 'devices': [str(x) for x in d]}))")
TORCH_PROBE = ("import json, torch; ok = torch.cuda.is_available(); print(json.dumps({"
               "'torch': torch.__version__, 'cuda': ok, 'cuda_version': torch.version.cuda, "
               "'device': torch.cuda.get_device_name(0) if ok else None}))")


def default_out() -> str:
  out = os.environ.get("OUT")
  if out:
    return os.path.join(out, "device_check.json")
  return os.path.join(HERE, "results", "device_check.json")


def last_json_line(text: str):
  """The last line of `text` that parses as a JSON object (the worker protocol)."""
  for line in reversed(text.strip().splitlines()):
    line = line.strip()
    if line.startswith("{"):
      try:
        return json.loads(line)
      except ValueError:
        continue
  raise ValueError("no JSON object in the output")


class Check:
  """Runs the steps, each with its own timeout inside one budget, and keeps
  the report (written after every step)."""

  def __init__(self, out: str, logs: str, budget_s: float, dry_run: bool):
    self.out, self.logs = out, logs
    self.deadline = time.monotonic() + budget_s
    self.report = {"dry_run": dry_run, "budget_s": budget_s, "python": sys.version.split()[0],
                   "executable": sys.executable, "machine": platform.machine(),
                   "host": platform.node(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "steps": [], "summary": {}}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.makedirs(logs, exist_ok=True)

  def step(self, name: str, cmd: list, timeout_s: float, *, env=None, skip: str = "",
           parse=None) -> dict:
    """Runs `cmd` (unless `skip` gives the reason not to) within
    min(timeout_s, what the budget has left); `parse(stdout)` -> the step's
    "result" (an exception there fails the step, naming it)."""
    record = {"name": name, "command": " ".join(cmd), "timeout_s": timeout_s}
    left = self.deadline - time.monotonic() - RESERVE_S
    if not skip and left < MIN_STEP_S:
      skip = f"budget exhausted ({max(left, 0):.0f} s left of {self.report['budget_s']:.0f} s)"
    if skip:
      record.update(status="skipped", reason=skip)
      return self._add(record)
    limit = min(timeout_s, left)
    record["timeout_s"] = round(limit, 1)
    t0 = time.monotonic()
    # its own session, so a timeout kills the step's children too (pip's builds)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
      stdout, stderr = proc.communicate(timeout=limit)
      timed_out = False
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      stdout, stderr = proc.communicate()
      timed_out = True
    record["seconds"] = round(time.monotonic() - t0, 1)
    record["rc"] = proc.returncode
    with open(os.path.join(self.logs, f"{name}.log"), "w") as f:
      f.write(f"$ {record['command']}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    output = (stdout or "") + ("\n--- stderr\n" + stderr if stderr else "")
    if timed_out:
      record.update(status="timeout", reason=f"killed after {limit:.0f} s",
                    output_tail=output[-TAIL:])
    elif proc.returncode != 0:
      lines = (stderr or stdout or "").strip().splitlines()
      record.update(status="failed", reason=f"exit {proc.returncode}: "
                    f"{lines[-1] if lines else 'no output'}", output_tail=output[-TAIL:])
    else:
      record["status"] = "ok"
      if parse is not None:
        try:
          record["result"] = parse(stdout)
        except Exception as e:     # noqa: BLE001  (any parse failure fails the step, named)
          record.update(status="failed", reason=f"output not understood: "
                        f"{type(e).__name__}: {e}", output_tail=output[-TAIL:])
    return self._add(record)

  def demote(self, record: dict, reason: str) -> None:
    """A step that ran but found what the check needs missing: failed."""
    record.update(status="failed", reason=reason)
    self.write()
    print(f"device_check: {record['name']}: failed ({reason})", flush=True)

  def fail(self, name: str, cmd: list, reason: str) -> dict:
    """A step found broken without running it."""
    return self._add({"name": name, "command": " ".join(cmd), "status": "failed",
                      "reason": reason})

  def _add(self, record: dict) -> dict:
    self.report["steps"].append(record)
    self.write()
    print(f"device_check: {record['name']}: {record['status']}"
          + (f" ({record['reason']})" if record.get("reason") else "")
          + (f" in {record['seconds']} s" if "seconds" in record else ""), flush=True)
    return record

  def write(self) -> None:
    tmp = self.out + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.report, f, indent=2, sort_keys=False)
      f.write("\n")
    os.replace(tmp, self.out)


def smoke_result(workdir: str):
  def parse(stdout: str) -> dict:
    with open(os.path.join(workdir, "eval", "summary.json")) as f:
      branches = json.load(f)["branches"]
    platform_line = next((l for l in stdout.splitlines() if "[structvpr] workdir" in l), "")
    return {"pipeline_line": platform_line.strip(),
            "test": {b: {k: r[k] for k in ("R@1", "R@5", "num_queries") if k in r}
                     for b, r in branches.items()}}
  return parse


def summarize(check: Check) -> dict:
  """The paired figures and peak device memory of both frameworks."""
  by_name = {s["name"]: s for s in check.report["steps"]}
  jax_out = by_name.get("bench_jax", {}).get("result") or {}
  torch_out = by_name.get("bench_torch", {}).get("result") or {}
  jf, tf = jax_out.get("figures", {}), torch_out.get("figures", {})
  figures = {}
  for name in PAIRED:
    row = {}
    if f"{name}_img_s" in jf:
      row["jax_img_s"] = round(jf[f"{name}_img_s"], 2)
      row["jax_compile_s"] = round(jf.get(f"{name}_compile_s", float("nan")), 2)
    if f"torch_{name}_img_s" in tf:
      row["torch_img_s"] = round(tf[f"torch_{name}_img_s"], 2)
      row["torch_first_s"] = round(tf.get(f"torch_{name}_first_s", float("nan")), 2)
    if "jax_img_s" in row and "torch_img_s" in row:
      row["ratio_jax_over_torch"] = round(row["jax_img_s"] / row["torch_img_s"], 3)
    if row:
      figures[name] = row
  jinfo, tinfo = jax_out.get("info", {}), torch_out.get("info", {})
  return {
      "figures": figures,
      "jax_devices": jinfo.get("devices"), "jax_device_kind": jinfo.get("device_kind"),
      "jax_device_memory": jinfo.get("device_memory"),
      "torch_device": tinfo.get("torch_device"),
      "torch_device_peak_bytes": tinfo.get("torch_device_peak_bytes"),
      "failed_steps": [s["name"] for s in check.report["steps"]
                       if s["status"] in ("failed", "timeout")],
      "skipped_steps": {s["name"]: s["reason"] for s in check.report["steps"]
                        if s["status"] == "skipped"},
  }


def run(args) -> int:
  out = args.out or default_out()
  work = args.workdir or tempfile.mkdtemp(prefix="device_check_")
  logs = (os.path.join(os.environ["OUT"], "device_check_logs") if os.environ.get("OUT")
          else os.path.join(work, "logs"))
  check = Check(out, logs, args.budget, args.dry_run)
  check.report.update(workdir=work, bench=os.path.relpath(BENCH, REPO),
                      torch_reference=os.path.relpath(TORCH_REFERENCE, REPO))
  py = sys.executable
  dry = "dry run" if args.dry_run else ""
  env = dict(os.environ)

  check.step("nvidia_smi", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                            "--format=csv,noheader"], 30,
             skip=dry or ("" if shutil.which("nvidia-smi") else "nvidia-smi not on PATH"),
             parse=lambda s: s.strip().splitlines())
  install = check.step("install_project", [py, "-m", "pip", "install", "-e", ".[bench]"], 240,
                       skip=dry)
  cuda = check.step("install_jax_cuda", [py, "-m", "pip", "install", "-U",
                                         f"jax[{args.jax_extra}]"], 200,
                    skip=dry or ("" if install["status"] == "ok" else "install_project failed"))
  installed = args.dry_run or install["status"] == "ok"
  probe = check.step("jax_devices", [py, "-c", JAX_PROBE], 90,
                     skip="" if installed else "install_project failed", parse=last_json_line)
  jax_platform = (probe.get("result") or {}).get("platform")
  if not args.dry_run and probe["status"] == "ok" and jax_platform != "gpu":
    check.demote(probe, f"JAX sees no GPU: platform {jax_platform!r} (jax[{args.jax_extra}] "
                        "installed? a driver?)")
  if probe["status"] != "ok":
    jax_skip = f"jax_devices {probe['status']}"
  elif not args.dry_run and cuda["status"] != "ok":
    jax_skip = f"install_jax_cuda {cuda['status']}: JAX would run on the CPU"
  else:
    jax_skip = ""
  have_torch = not args.dry_run or _importable("torch")
  tprobe = check.step("torch_devices", [py, "-c", TORCH_PROBE], 60,
                      skip=("" if installed else "install_project failed") or
                      ("" if have_torch else "torch not installed (the bench extra)"),
                      parse=last_json_line)
  if not args.dry_run and tprobe["status"] == "ok" and not tprobe["result"].get("cuda"):
    check.demote(tprobe, f"PyTorch {tprobe['result'].get('torch')} sees no CUDA device "
                         "(a CPU-only wheel, or no driver)")
  torch_skip = "" if tprobe["status"] in ("ok",) else (
      tprobe["reason"] if tprobe["status"] == "skipped" else f"torch_devices {tprobe['status']}")

  smoke_dir = os.path.join(work, "smoke")
  smoke = [py, "-m", "structvpr_jax.main", f"--config={SMOKE_CONFIG}", f"--workdir={smoke_dir}",
           f"--config.compilation_cache={os.path.join(work, 'xla')}"]
  config_file = SMOKE_CONFIG.split(":")[0]
  if args.dry_run and not os.path.isfile(os.path.join(REPO, config_file)):
    check.fail("smoke", smoke, f"{config_file} not found in {REPO}")
  else:
    check.step("smoke", smoke, 150, parse=smoke_result(smoke_dir),
               skip=jax_skip or (f"dry run ({config_file} present)" if args.dry_run else ""))
  quick = ["--quick", "--sizes", "224", "--repeats", "1"] if args.dry_run else [
      "--repeats", str(args.repeats)]
  check.step("bench_jax", [py, BENCH, "--worker", "rgb", "--no-levers", *quick], 180,
             skip=jax_skip, parse=last_json_line)
  device = "cpu" if args.dry_run else "cuda"
  check.step("bench_torch", [py, TORCH_REFERENCE, "--device", device, *quick], 120,
             skip=torch_skip, parse=last_json_line)

  check.report["summary"] = summarize(check)
  check.report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
  check.write()
  print(f"device_check: wrote {out}", flush=True)
  return 1 if check.report["summary"]["failed_steps"] else 0


def _importable(module: str) -> bool:
  import importlib.util
  return importlib.util.find_spec(module) is not None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dry-run", action="store_true",
                      help="CPU plumbing check: no install, no smoke run, --quick figures at 224")
  parser.add_argument("--out", default="", help="the JSON report (default $OUT/device_check.json, "
                                                "else experiments/results/device_check.json)")
  parser.add_argument("--workdir", default="", help="scratch folder (default a new temp folder)")
  parser.add_argument("--budget", type=float, default=455.0,
                      help="seconds for all steps together (default 455: the session's 8 "
                           "minutes less the venv and start-up)")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure")
  parser.add_argument("--jax-extra", default="cuda12", help="pip extra of jax (cuda12, cuda13)")
  args = parser.parse_args(argv)
  return run(args)


if __name__ == "__main__":
  sys.exit(main())

"""experiments/device_check.{sh,py}, the prepared GPU check, cannot rot
unseen: the shell part parses, the dry run (CPU, --quick figures at 224)
passes bench.py and torch_reference.py the flags it will pass on the GPU and
writes the one report, and a step that fails, hangs or finds no budget is
recorded with its reason while the others still run. No GPU is needed."""

import importlib.util
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import device_check  # noqa: E402

HAVE_TORCH = importlib.util.find_spec("torch") is not None
STEPS = ["nvidia_smi", "install_project", "install_jax_cuda", "jax_devices", "torch_devices",
         "smoke", "bench_jax", "bench_torch"]


def test_shell_script_parses():
  proc = subprocess.run(["bash", "-n", os.path.join(REPO, "experiments", "device_check.sh")],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


def test_dry_run_writes_one_report_with_every_step(tmp_path):
  out = tmp_path / "report" / "device_check.json"
  # plumbing only: XLA's lowest optimisation level keeps the compiles short
  env = {k: v for k, v in os.environ.items() if k != "OUT"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, "experiments/device_check.py", "--dry-run",
                         "--out", str(out), "--workdir", str(tmp_path / "work")],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads(out.read_text())
  steps = {s["name"]: s for s in report["steps"]}
  assert [s["name"] for s in report["steps"]] == STEPS
  for name in ("nvidia_smi", "install_project", "install_jax_cuda"):
    assert steps[name]["status"] == "skipped" and steps[name]["reason"] == "dry run", name
  assert 'install -e .[bench]' in steps["install_project"]["command"]
  assert "jax[cuda12]" in steps["install_jax_cuda"]["command"]
  assert steps["jax_devices"]["status"] == "ok"
  assert steps["jax_devices"]["result"]["platform"] == "cpu"
  assert steps["smoke"]["status"] == "skipped"
  assert "configs/distill.py present" in steps["smoke"]["reason"]
  assert "--config=configs/distill.py:smoke" in steps["smoke"]["command"]
  bench = steps["bench_jax"]
  assert bench["status"] == "ok", bench
  assert "--worker rgb --no-levers" in bench["command"] and "--sizes 224" in bench["command"]
  figures = bench["result"]["figures"]
  for key in ("forward_224", "extract_224", "train_step_224", "train_step_224_frozen"):
    assert figures[f"{key}_img_s"] > 0 and figures[f"{key}_compile_s"] > 0, key
  assert not any("480x640" in k or "shifted" in k or "whole" in k for k in figures), figures
  torch_step = steps["bench_torch"]
  if HAVE_TORCH:
    assert torch_step["status"] == "ok", torch_step
    assert "--device cpu" in torch_step["command"]
    assert set(torch_step["result"]["figures"]) == {
        f"torch_{name}_{unit}" for name in ("forward_224", "forward_224_chunked",
                                            "train_step_224", "train_step_224_frozen")
        for unit in ("img_s", "first_s")}
  else:
    assert torch_step["status"] == "skipped" and "torch not installed" in torch_step["reason"]
  summary = report["summary"]
  assert summary["failed_steps"] == []
  assert set(summary["figures"]) == {"forward_224", "train_step_224", "train_step_224_frozen"}
  for row in summary["figures"].values():
    assert row["jax_img_s"] > 0
    assert ("ratio_jax_over_torch" in row) == HAVE_TORCH
  assert report["bench"] == os.path.relpath(device_check.BENCH, REPO)


def test_failed_hung_and_unbudgeted_steps_are_recorded_and_the_rest_run(tmp_path):
  out = tmp_path / "r.json"
  check = device_check.Check(str(out), str(tmp_path / "logs"), budget_s=600, dry_run=True)
  py = sys.executable
  bad = check.step("bad", [py, "-c", "import sys; print('partial'); sys.exit('no GPU here')"], 60)
  assert bad["status"] == "failed" and bad["rc"] == 1 and "no GPU here" in bad["reason"]
  assert "partial" in bad["output_tail"]
  hung = check.step("hung", [py, "-c", "import time; time.sleep(600)"], 1)
  assert hung["status"] == "timeout" and "killed after" in hung["reason"]
  unparsed = check.step("unparsed", [py, "-c", "print('not json')"], 60,
                        parse=device_check.last_json_line)
  assert unparsed["status"] == "failed" and "output not understood" in unparsed["reason"]
  good = check.step("good", [py, "-c", "print('{\"x\": 1}')"], 60,
                    parse=device_check.last_json_line)
  assert good["status"] == "ok" and good["result"] == {"x": 1}
  check.deadline = 0.0       # the budget is spent: nothing more starts
  late = check.step("late", [py, "-c", "print(1)"], 60)
  assert late["status"] == "skipped" and "budget exhausted" in late["reason"]
  on_disk = json.loads(out.read_text())      # written after every step
  assert [s["name"] for s in on_disk["steps"]] == ["bad", "hung", "unparsed", "good", "late"]
  log = (tmp_path / "logs" / "bad.log").read_text()    # the whole output, both streams
  assert "--- stdout\npartial\n" in log and "--- stderr\nno GPU here" in log
  assert device_check.summarize(check)["failed_steps"] == ["bad", "hung", "unparsed"]


def test_report_goes_to_out_when_set(monkeypatch, tmp_path):
  monkeypatch.setenv("OUT", str(tmp_path))
  assert device_check.default_out() == str(tmp_path / "device_check.json")
  monkeypatch.delenv("OUT")
  assert device_check.default_out() == os.path.join(REPO, "experiments", "results",
                                                    "device_check.json")

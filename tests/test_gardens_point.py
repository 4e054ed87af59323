"""Gardens Point: the preset pipeline end to end (smoke) and the pixel baseline."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GARDENS_POINT = os.path.join(REPO, "..", "shared", "data", "gardens_point")


def experiment():
  spec = importlib.util.spec_from_file_location(
      "gp_experiment", os.path.join(REPO, "experiments", "gardens_point.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_patch_normalised_descriptor():
  """Hand case: each 8x8 patch has zero mean and unit variance, rows unit norm,
  and the descriptor ignores a global brightness/contrast change."""
  gp = experiment()
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
  d = gp.patch_normalised(img[None])
  assert d.shape == (1, 32 * 64)
  np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, rtol=1e-5)
  p = d.reshape(4, 8, 8, 8).transpose(0, 2, 1, 3).reshape(32, 64)   # [patch, pixels]
  np.testing.assert_allclose(p.mean(1), 0.0, atol=1e-6)
  np.testing.assert_allclose(p.std(1), p.std(1)[0], rtol=1e-3)
  brighter = np.clip(img.astype(np.float32) * 0.5 + 40, 0, 255).astype(np.uint8)
  assert float(d[0] @ gp.patch_normalised(brighter[None])[0]) > 0.98


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(GARDENS_POINT), reason="../shared/data/gardens_point absent")
def test_gardens_point_smoke_pipeline(tmp_path):
  work = str(tmp_path / "gp")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-m", "structvpr_jax.main",
                         "--config=configs/gardens_point.py:smoke", f"--workdir={work}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(os.path.join(work, "data", "convert.json")) as f:
    assert json.load(f)["counts"]["test"] == {"database": 100, "queries": 200}
  with open(os.path.join(work, "eval", "summary.json")) as f:
    branches = json.load(f)["branches"]
  for stage in ("rgb", "seg", "distill"):
    per = branches[stage]["per_condition"]
    assert set(per) == {"day_right", "night_right"}
    assert per["day_right"]["num_queries"] == per["night_right"]["num_queries"] == 100
    assert branches[stage]["num_database"] == 100
  assert os.path.exists(os.path.join(work, "report.md"))
  # train.eval_at_start: the starting weights are validated and checkpointed as
  # step 0 and compete in the selection (val R@5, then R@1, then the latest).
  with open(os.path.join(work, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  for stage in ("rgb", "seg", "distill"):
    vals = [r for r in records if r.get("stage") == stage and r.get("event") == "val"]
    assert vals[0]["step"] == 0, vals
    assert [r["step"] for r in vals] == sorted(r["step"] for r in vals)
    with open(os.path.join(work, stage, "done.json")) as f:
      done = json.load(f)
    expected = max(vals, key=lambda r: (r["val_R@5"], r["val_R@1"], r["step"]))["step"]
    assert done["best_step"] == expected, (stage, done, vals)

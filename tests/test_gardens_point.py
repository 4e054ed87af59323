"""Gardens Point: the preset pipeline end to end (smoke) and the pixel baseline."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from structvpr_jax import parallel, train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GARDENS_POINT = os.path.join(REPO, "..", "shared", "data", "gardens_point")


def load_script(name: str):
  """experiments/<name>.py as a module (the experiments are scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(
      f"experiment_{name}", os.path.join(REPO, "experiments", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_ceiling_recall_and_synthetic_night():
  """Hand case for the +-2-frame recall of the ceiling study, and the
  synthetic-night copies are darker, same shape, uint8."""
  c = load_script("gardens_point_ceiling")
  places = np.arange(10, 16)
  db = np.eye(6, dtype=np.float32)
  # place = 10 + row. Queries 0-2 retrieve their own place; query 3 (place 13)
  # retrieves place 15, 2 frames off: correct; query 4 (place 14) retrieves
  # place 10 (4 off), then its own; query 5 (place 15) retrieves 10, 11, 12
  # (5, 4, 3 off), then 13 (2 off).
  q = np.eye(6, dtype=np.float32)
  q[3] = db[5]
  q[4] = db[0] + 0.5 * db[4]
  q[5] = db[0] + 0.8 * db[1] + 0.6 * db[2] + 0.4 * db[3]
  r = c.recall_at(q, db, places, ns=(1, 3, 4))
  assert r == pytest.approx({"R@1": 4 / 6, "R@3": 5 / 6, "R@4": 1.0})
  rng = np.random.default_rng(0)
  img = rng.integers(60, 256, (2, 8, 12, 3), dtype=np.uint8)
  night = c.synthetic_night(img, rng)
  assert night.shape == img.shape and night.dtype == np.uint8
  assert night.astype(float).mean() < 0.6 * img.astype(float).mean()



def test_ceiling_finetune_mining_and_frozen_step():
  """The ceiling study's fine-tuning on library code: the miner's triplets keep
  positives within +-1 frame and negatives beyond +-2 frames (hand case for the
  hardest ones), and one data-parallel step with the head-only mask moves the
  projection and NetVLAD but not the MobileNet blocks."""
  c = load_script("gardens_point_ceiling")
  places = np.tile(c.TRAIN_PLACES, 2)                  # two query traverses
  miner = c.make_miner(2, 0, "random")
  pos, neg = miner.mine(miner.train_queries, 0, 0, describe=None)
  assert np.all(np.abs(c.TRAIN_PLACES[pos] - places) <= 1)
  assert np.all(np.abs(c.TRAIN_PLACES[neg] - places[:, None]) > c.TOLERANCE)
  # 1-d descriptors = the place index: the best positive is the query's own
  # place, the hardest negatives the nearest frames beyond +-2.
  line = lambda role, idx: (places[idx] if role == "queries" else c.TRAIN_PLACES[idx]
                            ).astype(np.float32)[:, None]
  hard = c.make_miner(2, 0, "hard")
  pos, neg = hard.mine(hard.train_queries, 0, 0, line)
  np.testing.assert_array_equal(c.TRAIN_PLACES[pos], places)
  assert set(c.TRAIN_PLACES[neg[20]]) == {16, 17, 23, 24}
  assert set(c.TRAIN_PLACES[neg[50 + 1]]) == {4, 5, 6, 7}       # second traverse, place 1

  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 2 + c.NUM_NEGATIVES, 4, 4, 96)).astype(np.float32)
  variables = jax.tree.map(np.asarray, c.HEAD.init(jax.random.PRNGKey(0), x[0, :1]))
  tc = {"num_steps": 10, "learning_rate": 1e-2, "warmup_steps": 0, "grad_clip": 1.0}
  mask = c.trainable_mask(variables["params"], 99)
  assert not mask["local"]["last"]["conv"]["kernel"] and mask["local"]["projection"]["kernel"]
  tx, _ = train_lib.make_optimizer(tc, trainable_mask=mask)
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = parallel.replicate(train_lib.new_state(variables, tx), mesh)
  step = parallel.data_parallel_train_step(c.make_loss_fn(0.5, mask), mesh)
  state, metrics = step(state, parallel.shard_batch({"features": x}, mesh), jax.random.PRNGKey(0))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  assert float(metrics["grad_norm"]) > 0
  after = jax.device_get(state.params)
  changed = lambda a, b: any(not np.array_equal(u, v) for u, v in
                             zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  for name in ("block13", "block16", "last"):
    assert not changed(after["local"][name], variables["params"]["local"][name]), name
  assert changed(after["local"]["projection"], variables["params"]["local"]["projection"])
  assert changed(after["netvlad"], variables["params"]["netvlad"])

def test_patch_normalised_descriptor():
  """Hand case: each 8x8 patch has zero mean and unit variance, rows unit norm,
  and the descriptor ignores a global brightness/contrast change."""
  gp = load_script("gardens_point")
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
  # step 0 and compete in the selection (val R@5, then R@1, then the earliest:
  # a tie is no improvement).
  with open(os.path.join(work, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  for stage in ("rgb", "seg", "distill"):
    vals = [r for r in records if r.get("stage") == stage and r.get("event") == "val"]
    assert vals[0]["step"] == 0, vals
    assert [r["step"] for r in vals] == sorted(r["step"] for r in vals)
    with open(os.path.join(work, stage, "done.json")) as f:
      done = json.load(f)
    expected = max(vals, key=lambda r: (r["val_R@5"], r["val_R@1"], -r["step"]))["step"]
    assert done["best_step"] == expected, (stage, done, vals)

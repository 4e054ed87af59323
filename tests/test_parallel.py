"""Data parallelism: the shard_map step on 8 simulated CPU devices equals the
single-device step on the same global batch (one subprocess, 8 devices)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from structvpr_jax import parallel

WORKER = os.path.join(os.path.dirname(__file__), "dp_worker.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp("dp") / "dp.npz"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, WORKER, str(out)], env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return dict(np.load(out))


def leaves(run, prefix):
  return {k[len(prefix):]: v for k, v in run.items() if k.startswith(prefix)}


def test_float64_eight_devices_equal_one_device_and_plain_jit(run):
  eight = leaves(run, "f64_dev8/params/")
  one = leaves(run, "f64_dev1/params/")
  plain = leaves(run, "f64_plain/params/")
  init = leaves(run, "init64/")
  assert len(eight) > 20 and eight.keys() == one.keys() == plain.keys() == init.keys()
  for k in eight:
    np.testing.assert_allclose(eight[k], one[k], atol=1e-9, rtol=1e-9, err_msg=k)
    np.testing.assert_allclose(one[k], plain[k], atol=1e-9, rtol=1e-9, err_msg=k)
  # training moved the parameters, so the comparison is not vacuous (the
  # project-BN biases feeding another BN get an exactly-zero gradient)
  moved = [k for k in eight if np.abs(eight[k] - init[k]).max() > 1e-6]
  assert len(moved) >= 0.9 * len(eight)
  for k, v in leaves(run, "f64_dev8/batch_stats/").items():
    np.testing.assert_allclose(v, run["f64_dev1/batch_stats/" + k], atol=1e-9, err_msg=k)
  np.testing.assert_allclose(run["f64_dev8/loss"], run["f64_dev1/loss"], rtol=1e-10)
  np.testing.assert_allclose(run["f64_dev8/grad_norm"], run["f64_dev1/grad_norm"], rtol=1e-10)


def test_float32_eight_devices_match_one_device(run):
  # float32: summation order differs between 8 shards and 1. The first step's
  # loss agrees to 1e-5; its gradient norm to ~1e-4 (backbone gradients are
  # small differences of large terms: the normalisations in NetVLAD and BN
  # cancel radial/constant components). Afterwards Adam's g/sqrt(v)
  # turns rounding noise in exactly-cancelling gradient entries (e.g. BN
  # biases that feed another BN) into +-lr steps, so parameters are compared
  # in float64 above, where any mismatch would be a real bug.
  np.testing.assert_allclose(run["f32_dev8/loss"][0], run["f32_dev1/loss"][0], rtol=1e-5)
  np.testing.assert_allclose(run["f32_dev8/grad_norm"][0], run["f32_dev1/grad_norm"][0],
                             rtol=1e-3)
  np.testing.assert_allclose(run["f32_dev8/loss"], run["f32_dev1/loss"], rtol=1e-4)
  eight, one = leaves(run, "f32_dev8/params/"), leaves(run, "f32_dev1/params/")
  assert np.mean([np.abs(eight[k] - one[k]).mean() for k in eight]) < 2e-4


def test_sharded_partition_and_padded_apply(run):
  np.testing.assert_allclose(run["margin_sharded"], run["margin_single"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(run["rank_sharded"], run["rank_single"])
  assert int(run["apply_padded_rows"]) == 16
  assert run["apply_sharded"].shape == run["apply_single"].shape == (13, 32)
  np.testing.assert_allclose(run["apply_sharded"], run["apply_single"], rtol=1e-5, atol=1e-6)


def test_extractor_micro_batches_bitwise_across_device_counts(run):
  eight, one, whole = run["extract8_micro2"], run["extract1_micro2"], run["extract1_whole"]
  assert eight.shape == one.shape == whole.shape == (13, 4 * 8) and eight.dtype == np.float32
  np.testing.assert_array_equal(eight, one)   # same per-device program on 8 devices and 1
  np.testing.assert_allclose(one, whole, rtol=1e-5, atol=1e-6)   # chunks = the whole batch
  assert np.abs(one - one[:1]).max() > 1e-3   # 13 distinct descriptors, not a constant


def test_micro_batch_size_auto_and_requested():
  from structvpr_jax.evaluation import MICRO_BATCH_PIXELS, micro_batch_size
  assert MICRO_BATCH_PIXELS == 1048576
  # auto on the CPU: the largest divisor of the batch within 2^20 pixels
  assert micro_batch_size(16, (224, 224), backend="cpu") == 16    # 20 would fit: whole batch
  assert micro_batch_size(32, (224, 224), backend="cpu") == 16    # 20 fit: 16 | 32
  assert micro_batch_size(16, (480, 640), backend="cpu") == 2     # 3 would fit, 3 ∤ 16
  assert micro_batch_size(16, (1024, 1280), backend="cpu") == 1   # one image is over: 1
  assert micro_batch_size(96, (96, 128), backend="cpu") == 48     # 85 fit: 48 | 96
  assert micro_batch_size(6, (16, 16), backend="cpu") == 6        # all fit: whole batch
  assert micro_batch_size(7, (480, 640), backend="cpu") == 1      # prime batch
  # auto on accelerators: the whole batch
  assert micro_batch_size(16, (224, 224), backend="gpu") == 16
  assert micro_batch_size(16, (224, 224), requested=8, backend="gpu") == 8
  with pytest.raises(ValueError, match="eval.micro_batch=3 must divide"):
    micro_batch_size(16, (224, 224), requested=3)
  with pytest.raises(ValueError, match="eval.micro_batch=-1"):
    micro_batch_size(16, (224, 224), requested=-1)


def test_apply_in_chunks_equals_whole_batch():
  from structvpr_jax.evaluation import apply_in_chunks
  x = jax.numpy.arange(24.0).reshape(6, 2, 2)
  calls = []

  def fn(xs):   # row-wise, returns a pytree; records the shapes it is traced with
    calls.append(xs.shape)
    return {"s": xs.sum(axis=(1, 2)), "m": xs * 2.0}

  for chunk in (1, 2, 3, 6, 8):
    calls.clear()
    got = apply_in_chunks(fn, x, chunk)
    assert calls == [(min(chunk, 6), 2, 2)]
    np.testing.assert_array_equal(got["s"], np.asarray(x).sum(axis=(1, 2)))
    np.testing.assert_array_equal(got["m"], np.asarray(x) * 2.0)


def test_pad_to_multiple_and_unpad():
  tree = {"a": np.arange(10).reshape(5, 2), "b": np.ones(5)}
  padded, mask = parallel.pad_to_multiple(tree, 4)
  assert padded["a"].shape == (8, 2) and padded["b"].shape == (8,)
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 1, 0, 0, 0])
  assert padded["a"][5:].sum() == 0
  np.testing.assert_array_equal(parallel.unpad(padded, 5)["a"], tree["a"])
  same, mask = parallel.pad_to_multiple(tree, 5)
  assert same["a"].shape == (5, 2) and mask.all()
  with pytest.raises(ValueError, match="disagree"):
    parallel.pad_to_multiple({"a": np.ones(3), "b": np.ones(4)}, 2)


def test_mesh_is_one_dimensional_data_axis():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data",) and mesh.size == len(jax.devices())
  sharded = parallel.shard_batch({"x": np.arange(4.0)}, parallel.make_mesh(jax.devices()[:1]))
  np.testing.assert_array_equal(sharded["x"], np.arange(4.0))

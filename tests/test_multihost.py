"""Multi-host data parallelism: 2 CPU processes on localhost (jax.distributed)
end a few train steps with identical parameters, equal to one process
driving 2 devices on the same global batch."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_end_with_identical_parameters(tmp_path):
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen([sys.executable, WORKER, str(tmp_path / f"p{i}.npz"), str(i), "2",
                             str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  ref_env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  ref = subprocess.run([sys.executable, WORKER, str(tmp_path / "ref.npz"), "0", "1", "0"],
                       env=ref_env, capture_output=True, text=True, timeout=900)
  assert ref.returncode == 0, ref.stderr[-4000:]
  p0, p1 = (dict(np.load(tmp_path / f"p{i}.npz")) for i in range(2))
  single = dict(np.load(tmp_path / "ref.npz"))
  assert int(p0["process_count"]) == 2 and int(p1["process_index"]) == 1
  keys = [k for k in p0 if k.startswith("[")]
  assert len(keys) > 20
  for k in keys:
    np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)          # replicas agree
    np.testing.assert_allclose(p0[k], single[k], rtol=1e-5, atol=1e-5, err_msg=k)
  np.testing.assert_allclose(p0["losses"], single["losses"], rtol=1e-5)


INPUT_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "input_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("data_format", ["folder", "array_record"])
def test_two_processes_read_their_share_of_every_batch(tmp_path, data_format):
  """Each process assembles only its rows of every global batch (folder or
  records): the two shares are disjoint, together they are the one-process
  batch, and over the epoch every usable query is read exactly once (the
  remainder that does not fill a global batch is dropped). Extraction reads
  each process's rows and gathers: both processes get the one-process
  descriptors."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from test_input_pipeline import write_layout
  from structvpr_jax.data import records
  root = str(tmp_path / "data")
  write_layout(root, n_db=13, n_q=10)
  extra = [records.export(root, (16, 16), progress=False)] if data_format == "array_record" else []
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen([sys.executable, INPUT_WORKER, str(tmp_path / f"p{i}.npz"), str(i),
                             "2", str(port), root, *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  ref = subprocess.run([sys.executable, INPUT_WORKER, str(tmp_path / "ref.npz"), "0", "1", "0",
                        root, *extra],
                       env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
                       capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-4000:]
  p0, p1 = (dict(np.load(tmp_path / f"p{i}.npz")) for i in range(2))
  single = dict(np.load(tmp_path / "ref.npz"))
  assert int(p0["process_count"]) == 2 and int(p1["process_index"]) == 1
  steps = int(single["steps"])
  assert p0["query_index"].shape == p1["query_index"].shape == (steps, 2)
  for key in ("query_index", "negative_index", "rgb"):
    np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]], axis=1), single[key],
                                  err_msg=key)
  read = np.concatenate([p0["query_index"].ravel(), p1["query_index"].ravel()])
  assert len(set(read.tolist())) == len(read)                        # nothing read twice
  usable = set(single["usable"].tolist())
  assert set(read.tolist()) <= usable and len(usable) - len(read) < 4  # only the remainder left
  assert p0["descriptors"].shape == (13, 32)
  np.testing.assert_array_equal(p0["descriptors"], p1["descriptors"])
  np.testing.assert_allclose(p0["descriptors"], single["descriptors"], rtol=1e-6, atol=1e-6)

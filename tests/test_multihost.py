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

"""Worker for test_multihost.py: one process of a 2-process jax.distributed run
on localhost (CPU, gloo collectives), or the single-process reference.

Usage: python multihost_worker.py OUT.npz PROCESS_ID NUM_PROCESSES PORT
(NUM_PROCESSES=1: no jax.distributed; the reference run.)
"""

import os
import sys

import numpy as np

# the checkout under test, also when it is not pip-installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(out, process_id, num_processes, port):
  import jax
  from structvpr_jax import parallel
  if num_processes > 1:
    parallel.initialize_distributed(f"localhost:{port}", num_processes, process_id)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import dp_worker as w  # tiny model, loss, fixed global batch

  mesh = parallel.make_mesh()
  assert mesh.size == 2, jax.devices()
  step = parallel.data_parallel_train_step(
      w.make_loss(w.make_model(parallel.DATA_AXIS, np.float32)), mesh)
  state = parallel.replicate(w.init_state(np.float32), mesh)
  full = w.batch(np.float32)
  n = full["images"].shape[0] // jax.process_count()
  local = {"images": full["images"][jax.process_index() * n:(jax.process_index() + 1) * n]}
  data = parallel.shard_batch(local, mesh)
  rng = parallel.replicate(jax.random.PRNGKey(1), mesh)
  losses = []
  for _ in range(w.STEPS):
    state, metrics = step(state, data, rng)
    losses.append(float(np.asarray(metrics["loss"].addressable_shards[0].data)))
  params = jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), state.params)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
  np.savez(out, losses=np.array(losses), process_index=jax.process_index(),
           process_count=jax.process_count(), **flat)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))

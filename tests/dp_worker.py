"""Worker for test_parallel.py: runs in a subprocess so XLA_FLAGS can set the
simulated device count (8) before jax is imported.

Usage: python dp_worker.py OUT.npz

Runs a few Adam train steps of a tiny branch on one fixed global batch with
the data-parallel step on an 8-device mesh and on a 1-device mesh (and, as
a third reference, a plain jitted step without shard_map), in float64 (where
any mismatch is a bug, not rounding) and in float32; plus the sharded
partition pass and the padded data-parallel apply against unsharded runs.
"""

import os
import sys
from typing import Any

# the checkout under test, also when it is not pip-installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax.training import train_state  # noqa: E402

from structvpr_jax import losses, parallel, partition  # noqa: E402
from structvpr_jax.models.branch import Branch  # noqa: E402

TINY = ((1, 8, 1, 1), (2, 16, 2, 2))
GLOBAL_TRIPLETS = 8
STEPS = 3


class TrainState(train_state.TrainState):
  batch_stats: Any


def make_model(axis, dtype):
  return Branch("mobilenet_v2", width=0.35, dim=8, num_clusters=4, blocks=TINY,
                bn_axis_name=axis, dtype=dtype, param_dtype=dtype)


def make_loss(model):
  def loss_fn(params, batch_stats, batch, rng):
    del rng
    images = batch["images"]                    # [b, 3, H, W, C]: q, p, n
    b = images.shape[0]
    desc, updates = model.apply({"params": params, "batch_stats": batch_stats},
                                images.reshape((-1,) + images.shape[2:]), train=True,
                                mutable=["batch_stats"])
    desc = desc.reshape(b, 3, -1)
    loss = losses.triplet_margin_loss(desc[:, 0], desc[:, 1], desc[:, 2:], margin=0.5)
    return loss, (updates["batch_stats"], {})
  return loss_fn


def init_state(dtype):
  model = make_model(None, dtype)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3), dtype))
  return TrainState.create(apply_fn=None, params=variables["params"],
                           batch_stats=variables["batch_stats"], tx=optax.adam(1e-3))


def batch(dtype):
  rng = np.random.default_rng(0)
  return {"images": rng.normal(size=(GLOBAL_TRIPLETS, 3, 32, 32, 3)).astype(dtype)}


def flat(tree, prefix):
  return {f"{prefix}/{jax.tree_util.keystr(k)}": np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def train_data_parallel(mesh, dtype):
  step = parallel.data_parallel_train_step(make_loss(make_model(parallel.DATA_AXIS, dtype)),
                                           mesh)
  state = parallel.replicate(init_state(dtype), mesh)
  data = parallel.shard_batch(batch(dtype), mesh)
  rng = parallel.replicate(jax.random.PRNGKey(1), mesh)
  history = []
  for _ in range(STEPS):
    state, metrics = step(state, data, rng)
    history.append(jax.device_get(metrics))
  return state, history


def train_plain(dtype):
  loss_fn = make_loss(make_model(None, dtype))

  @jax.jit
  def plain_step(state, data):
    (loss, (bs, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, data, None)
    return state.apply_gradients(grads=grads, batch_stats=bs), loss

  state = init_state(dtype)
  for _ in range(STEPS):
    state, loss = plain_step(state, batch(dtype))
  return state


def main(out_path):
  devices = jax.devices()
  assert len(devices) == 8, devices
  mesh8, mesh1 = parallel.make_mesh(devices), parallel.make_mesh(devices[:1])
  out = {"num_devices": np.array(mesh8.size),
         "init/": np.zeros(0)}
  out.update(flat(init_state(np.float64).params, "init64"))
  for name, dtype in (("f64", np.float64), ("f32", np.float32)):
    for mesh in (mesh8, mesh1):
      state, history = train_data_parallel(mesh, dtype)
      tag = f"{name}_dev{mesh.size}"
      out.update(flat(state.params, f"{tag}/params"))
      out.update(flat(state.batch_stats, f"{tag}/batch_stats"))
      out[f"{tag}/loss"] = np.array([m["loss"] for m in history])
      out[f"{tag}/grad_norm"] = np.array([m["grad_norm"] for m in history])
  out.update(flat(train_plain(np.float64).params, "f64_plain/params"))

  # partition sharded over the mesh vs unsharded
  rng_np = np.random.default_rng(3)
  q, db = rng_np.normal(size=(37, 8)), rng_np.normal(size=(50, 8))
  q = q.astype(np.float32)
  db = db.astype(np.float32)
  q_utm, db_utm = rng_np.uniform(0, 100, (37, 2)), rng_np.uniform(0, 100, (50, 2))
  sharded = partition.retrieval_margins(q, db, q_utm, db_utm, block_size=4, mesh=mesh8)
  single = partition.retrieval_margins(q, db, q_utm, db_utm, block_size=4)
  out["margin_sharded"], out["margin_single"] = np.asarray(sharded.margin), np.asarray(single.margin)
  out["rank_sharded"], out["rank_single"] = np.asarray(sharded.rank), np.asarray(single.rank)

  # padded, masked data-parallel apply (eval) vs a plain apply
  model = make_model(None, np.float32)
  variables = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(5),
                                                 jnp.zeros((1, 32, 32, 3), jnp.float32)))
  images = np.random.default_rng(4).normal(size=(13, 32, 32, 3)).astype(np.float32)
  padded, mask = parallel.pad_to_multiple({"images": images}, mesh8.size)
  apply = parallel.data_parallel_apply(lambda v, b: model.apply(v, b["images"]), mesh8)
  desc = apply(parallel.replicate(variables, mesh8), parallel.shard_batch(padded, mesh8))
  out["apply_sharded"] = parallel.unpad(np.asarray(desc), int(mask.sum()))
  out["apply_padded_rows"] = np.asarray(mask.size)
  out["apply_single"] = np.asarray(jax.jit(model.apply)(variables, images))

  # evaluation.Extractor: 13 uint8 images (a partial last batch), 4 per
  # device, run 2 at a time (micro_batch) on 8 devices and on 1, and whole
  out.update(extractor_descriptors(mesh8, mesh1))
  np.savez(out_path, **out)


EXTRACT_SPEC = {"branch": "rgb", "view": "rgb", "backbone": "mobilenet_v2", "width": 0.35,
                "dim": 8, "num_clusters": 4, "blocks": [[1, 8, 1, 1], [2, 8, 1, 2]],
                "slme": "slme", "normalization": "imagenet", "image_size": [16, 16], "init": ""}


class ArraySource:
  """The `ImageSource` interface the Extractor reads, over an array."""

  def __init__(self, images):
    self.images = images

  def __len__(self):
    return len(self.images)

  def get(self, view, idx):
    return self.images[np.asarray(idx)]


def extractor_descriptors(mesh8, mesh1) -> dict:
  from structvpr_jax.evaluation import Extractor
  from structvpr_jax.models import spec as model_spec
  variables = model_spec.init_variables(EXTRACT_SPEC, 0)
  source = ArraySource(np.random.default_rng(6).integers(0, 256, (13, 16, 16, 3), np.uint8))
  out = {}
  for name, mesh, micro_batch in (("extract8_micro2", mesh8, 2), ("extract1_micro2", mesh1, 2),
                                  ("extract1_whole", mesh1, 4)):
    extractor = Extractor(EXTRACT_SPEC, mesh, per_device_batch=4, micro_batch=micro_batch)
    assert extractor.micro_batch == micro_batch
    out[name] = extractor(parallel.replicate(variables, mesh), source)
  return out


if __name__ == "__main__":
  main(sys.argv[1])

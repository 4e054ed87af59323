"""The project's benchmark: prints one JSON object of performance figures.

  python experiments/bench.py [--quick] [--repeats N]

Keys (stable; later versions add keys, never rename):
  forward_224_img_s       RGB branch (MobileNetV2-1.0 + NetVLAD-64), 16x224x224
  forward_480x640_img_s   same, 16x480x640
  train_step_224_img_s    4 triplets (q, p, 1 negative) = 12 images at 224, Adam
  partition_s             partition.retrieval_margins, Q=1000, N=10000, D=4096
  faiss_search_s          faiss IndexFlatL2 search of the same size (k=1)
  input_pipeline_batches_s   triplet batches/s (8 triplets, M=4, 96x128 RGB+labels)
                          from JPEG/PNG on disk, cold (first epoch, decoding)
  input_pipeline_cached_batches_s   the same from the in-memory cache
  synthetic_generate_img_s  synthetic city generation (render + write), 96x128
  *_compile_s             first-call time (trace + compile + one run)
  peak_rss_mb             peak resident memory of this process
Timings take the median of `--repeats` runs after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from structvpr_jax import losses, partition, retrieval  # noqa: E402
from structvpr_jax.models.branch import Branch  # noqa: E402


class TrainState(train_state.TrainState):
  batch_stats: dict


def timed(fn, repeats):
  """(first-call seconds, median seconds of `repeats` further calls)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def bench_forward(model, variables, batch, hw, repeats):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch,) + hw + (3,)), jnp.float32)
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
  first, sec = timed(lambda: fwd(variables, x), repeats)
  return batch / sec, first


def bench_train_step(model, variables, repeats, triplets=4, hw=(224, 224)):
  state = TrainState.create(apply_fn=None, params=variables["params"],
                            batch_stats=variables["batch_stats"], tx=optax.adam(1e-4))
  images = jnp.asarray(np.random.default_rng(1).normal(size=(triplets, 3) + hw + (3,)),
                       jnp.float32)

  def loss_fn(params, batch_stats, images):
    desc, updates = model.apply({"params": params, "batch_stats": batch_stats},
                                images.reshape((-1,) + hw + (3,)), train=True,
                                mutable=["batch_stats"])
    desc = desc.reshape(triplets, 3, -1)
    return losses.triplet_margin_loss(desc[:, 0], desc[:, 1], desc[:, 2:]), updates

  @jax.jit
  def step(state, images):
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, images)
    return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"]), loss

  holder = {"state": state}

  def run():
    holder["state"], loss = step(holder["state"], images)
    return loss

  first, sec = timed(run, repeats)
  return 3 * triplets / sec, first


def bench_partition(repeats, nq=1000, ndb=10000, dim=4096):
  rng = np.random.default_rng(2)
  q = rng.normal(size=(nq, dim)).astype(np.float32)
  db = rng.normal(size=(ndb, dim)).astype(np.float32)
  q_utm = rng.uniform(0, 5000, (nq, 2))
  db_utm = rng.uniform(0, 5000, (ndb, 2))
  q_j, db_j = jnp.asarray(q), jnp.asarray(db)
  first, part_s = timed(
      lambda: partition.retrieval_margins(q_j, db_j, q_utm, db_utm).margin, repeats)
  t_faiss = []
  for _ in range(max(repeats, 1)):
    t0 = time.perf_counter()
    retrieval.search(q, db, 1)
    t_faiss.append(time.perf_counter() - t0)
  return part_s, statistics.median(t_faiss), first


def bench_input_pipeline(quick: bool):
  """Triplet batches/s of the training input (mining with a cheap describe)."""
  import tempfile
  from structvpr_jax import mining
  from structvpr_jax.data import layout, pipeline, synthetic
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, "city")
    places = {"train": 40 if quick else 200, "val": 4, "test": 4}
    t0 = time.perf_counter()
    synthetic.generate(root, seed=0, image_size=(96, 128), num_places=places,
                       queries_per_place=2, progress=False)
    gen_s = time.perf_counter() - t0
    split = layout.read_split(root, "train")
    with open(os.path.join(root, "synthetic.json")) as f:
      counts = json.load(f)["counts"]
    n_images = sum(c["database"] + c["queries"] for c in counts.values())
    rates = []
    images = pipeline.SplitImages(split, (96, 128), views=("rgb", "seg"), cache=True)
    for _ in range(2):   # cold (decode), then cached
      miner = mining.NegativeMiner(split.query_utm, split.database_utm, num_negatives=4,
                                   refresh_every=128, seed=0)
      batcher = pipeline.TripletBatcher(miner, images, batch_size=8)
      rng = np.random.default_rng(0)
      describe = lambda role, idx: rng.normal(size=(len(idx), 64)).astype(np.float32)
      t0 = time.perf_counter()
      count = sum(1 for _ in batcher.epoch(0, describe))
      rates.append(count / (time.perf_counter() - t0))
  return rates[0], rates[1], n_images / gen_s


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes: checks the script runs (figures meaningless)")
  args = parser.parse_args()

  out = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
         "cpu_count": os.cpu_count(), "machine": platform.machine()}
  width, clusters = (0.35, 8) if args.quick else (1.0, 64)
  model = Branch("mobilenet_v2", width=width, dim=None, num_clusters=clusters)
  size224 = (64, 64) if args.quick else (224, 224)
  size480 = (96, 128) if args.quick else (480, 640)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1,) + size224 + (3,)))
  out["descriptor_dim"] = model.descriptor_dim

  out["forward_224_img_s"], out["forward_224_compile_s"] = bench_forward(
      model, variables, 16, size224, args.repeats)
  out["forward_480x640_img_s"], out["forward_480x640_compile_s"] = bench_forward(
      model, variables, 16, size480, args.repeats)
  out["train_step_224_img_s"], out["train_step_224_compile_s"] = bench_train_step(
      model, variables, args.repeats, hw=size224)
  sizes = dict(nq=100, ndb=1000, dim=256) if args.quick else {}
  out["partition_s"], out["faiss_search_s"], out["partition_compile_s"] = bench_partition(
      args.repeats, **sizes)
  out["partition_vs_two_faiss"] = out["partition_s"] / (2 * out["faiss_search_s"])
  (out["input_pipeline_batches_s"], out["input_pipeline_cached_batches_s"],
   out["synthetic_generate_img_s"]) = bench_input_pipeline(args.quick)
  out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}))


if __name__ == "__main__":
  main()

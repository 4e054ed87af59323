"""The project's benchmark: prints one JSON object of performance figures.

  python experiments/bench.py [--quick] [--repeats N] [--no-torch] [--out FILE]
  python experiments/bench.py --table experiments/results/bench.json   # README table

Keys (stable; later versions add keys, never rename):
  forward_224_img_s       RGB branch (MobileNetV2-1.0 + NetVLAD-64, 81,920-d), 16x224x224
  forward_480x640_img_s   same, 16x480x640
  train_step_224_img_s    4 triplets (q, p, 1 negative) = 12 images at 224, Adam,
                          BatchNorm in training mode, donated state
  train_step_480x640_img_s  2 triplets = 6 images at 480x640
  seg_forward_224_img_s, seg_forward_480x640_img_s, seg_train_step_224_img_s,
  seg_train_step_480x640_img_s   the seg branch of the default config (light
                          MobileNet on 5 SLME channels + 1x1 to 128 + NetVLAD-32)
  torch_forward_224_img_s, torch_forward_480x640_img_s, torch_train_step_224_img_s,
  torch_train_step_480x640_img_s   the same RGB branch in PyTorch
                          (experiments/torch_reference.py, channels_last), same process
  ratio_forward_224, ratio_forward_480x640, ratio_train_step_224,
  ratio_train_step_480x640   JAX img/s / torch img/s
  partition_s             partition.retrieval_margins, Q=1000, N=10000, D=4096
  faiss_search_s          faiss IndexFlatL2 search of the same size (k=1)
  partition_vs_two_faiss  partition_s / (2 * faiss_search_s)
  eval_extract_s          evaluation: describing 1k queries + 10k database images
                          (default RGB branch, 96x128, 4096-d) with evaluate.Extractor
  eval_extract_img_s      the same as images/s
  eval_search_recall_s    evaluate.recall_report on those descriptors (faiss search
                          k=20, Recall@1/5/10/20 overall and per condition)
  eval_bare_faiss_s       a bare faiss IndexFlatL2 search of the same size (k=20)
  eval_overhead_vs_faiss  eval_search_recall_s / eval_bare_faiss_s
  input_pipeline_batches_s   triplet batches/s (8 triplets, M=4, 96x128 RGB+labels)
                          from JPEG/PNG on disk, cold (first epoch, decoding)
  input_pipeline_cached_batches_s   the same from the in-memory cache
  synthetic_generate_img_s  synthetic city generation (render + write), 96x128
  *_compile_s             first-call time (trace + compile + one run)
  peak_rss_mb             peak resident memory of this process
  glibc_tunables          GLIBC_TUNABLES of the run (huge pages: structvpr_jax/hugepages.py)
Timings take the median of `--repeats` runs after one warm-up call. The
PyTorch figures need the optional extra `bench` (torch 2.13.0, CPU); without
it they are skipped (keys absent).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":  # same allocator setting as `python -m structvpr_jax.main`
  from structvpr_jax import hugepages
  hugepages.reexec_with_hugepages()

import argparse
import functools
import json
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from structvpr_jax import losses, partition, retrieval  # noqa: E402
from structvpr_jax.models.branch import Branch  # noqa: E402


# --quick: a two-block backbone (the script's plumbing, not its figures).
QUICK_BLOCKS = ((1, 8, 1, 1), (6, 16, 1, 2))


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


def bench_forward(model, variables, batch, hw, repeats, channels=3):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch,) + hw + (channels,)),
                  jnp.float32)
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
  first, sec = timed(lambda: fwd(variables, x), repeats)
  return batch / sec, first


def bench_train_step(model, variables, repeats, triplets=4, hw=(224, 224), channels=3):
  fresh = jax.tree.map(jnp.copy, variables)   # the step donates (deletes) its input state
  state = TrainState.create(apply_fn=None, params=fresh["params"],
                            batch_stats=fresh["batch_stats"], tx=optax.adam(1e-4))
  images = jnp.asarray(
      np.random.default_rng(1).normal(size=(triplets, 3) + hw + (channels,)), jnp.float32)

  def loss_fn(params, batch_stats, images):
    desc, updates = model.apply({"params": params, "batch_stats": batch_stats},
                                images.reshape((-1,) + hw + (channels,)), train=True,
                                mutable=["batch_stats"])
    desc = desc.reshape(triplets, 3, -1)
    return losses.triplet_margin_loss(desc[:, 0], desc[:, 1], desc[:, 2:]), updates

  @functools.partial(jax.jit, donate_argnums=(0,))
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


class _RandomImages:
  """An ImageSource stand-in: deterministic random uint8 images (no disk)."""

  def __init__(self, n: int, hw, seed: int):
    self.n = n
    self.pool = np.random.default_rng(seed).integers(0, 256, (64,) + tuple(hw) + (3,), np.uint8)

  def __len__(self):
    return self.n

  def get(self, view, idx):
    return self.pool[np.asarray(idx) % len(self.pool)]


def bench_evaluation(quick: bool, repeats: int):
  """Evaluation of 1k queries against 10k database images: extraction with the
  default RGB branch (evaluate.Extractor), then search + Recall@N
  (evaluate.recall_report) against a bare faiss search of the same size."""
  from structvpr_jax import evaluate, parallel
  nq, ndb = (50, 500) if quick else (1000, 10000)
  hw = (64, 80) if quick else (96, 128)
  spec = {"branch": "rgb", "view": "rgb", "backbone": "mobilenet_v2",
          "width": 0.35 if quick else 1.0, "dim": 16 if quick else 128,
          "num_clusters": 4 if quick else 32, "blocks": QUICK_BLOCKS if quick else None,
          "slme": "slme",
          "normalization": "tflite", "image_size": list(hw)}
  mesh = parallel.make_mesh()
  model = evaluate.build_model(spec)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1,) + hw + (3,)))
  variables = parallel.replicate(variables, mesh)
  extractor = evaluate.Extractor(spec, mesh, 32)
  extractor(variables, _RandomImages(64, hw, 9))            # compile
  t0 = time.perf_counter()
  db = extractor(variables, _RandomImages(ndb, hw, 1))
  q = extractor(variables, _RandomImages(nq, hw, 2))
  extract_s = time.perf_counter() - t0
  rng = np.random.default_rng(3)
  db_utm = rng.uniform(0, 2000, (ndb, 2))
  q_utm = db_utm[rng.integers(0, ndb, nq)] + rng.normal(0, 5, (nq, 2))
  notes = np.array(["day", "night", "dusk", "fog"])[rng.integers(0, 4, nq)]
  _, report_s = timed(lambda: evaluate.recall_report(q, db, q_utm, db_utm, notes), repeats)
  _, faiss_s = timed(lambda: retrieval.search(q, db, 20), repeats)
  return {"eval_extract_s": extract_s, "eval_extract_img_s": (nq + ndb) / extract_s,
          "eval_search_recall_s": report_s, "eval_bare_faiss_s": faiss_s,
          "eval_overhead_vs_faiss": report_s / faiss_s, "eval_descriptor_dim": int(q.shape[1])}


def bench_torch(repeats: int, quick: bool):
  """The PyTorch reference (experiments/torch_reference.py) or {} without torch."""
  try:
    import torch_reference
  except ImportError as e:
    print(f"bench: PyTorch figures skipped ({e}); pip install -e '.[bench]'", file=sys.stderr)
    return {}
  return torch_reference.bench(repeats=repeats, quick=quick)


def markdown_table(b: dict) -> str:
  """The README's performance table from one bench.py JSON object."""
  def f(key, digits=1):
    return f"{b[key]:.{digits}f}" if key in b else "-"

  def target(key, bound, higher=True):
    if key not in b:
      return f"{'>=' if higher else '<='} {bound} (not measured)"
    met = b[key] >= bound if higher else b[key] <= bound
    return f"{'>=' if higher else '<='} {bound} ({'met' if met else 'missed'})"

  rows = [
      ("RGB forward 16x224x224", f"{f('forward_224_img_s')} img/s",
       f"{f('torch_forward_224_img_s')} img/s", f("ratio_forward_224", 2),
       target("ratio_forward_224", 2)),
      ("RGB forward 16x480x640", f"{f('forward_480x640_img_s')} img/s",
       f"{f('torch_forward_480x640_img_s')} img/s", f("ratio_forward_480x640", 2),
       target("ratio_forward_480x640", 2)),
      ("RGB train step, 4 triplets at 224", f"{f('train_step_224_img_s')} img/s",
       f"{f('torch_train_step_224_img_s')} img/s", f("ratio_train_step_224", 2),
       target("ratio_train_step_224", 1.5)),
      ("RGB train step, 2 triplets at 480x640", f"{f('train_step_480x640_img_s', 2)} img/s",
       f"{f('torch_train_step_480x640_img_s', 2)} img/s", f("ratio_train_step_480x640", 2), ""),
      ("seg forward 16x224x224 / 16x480x640",
       f"{f('seg_forward_224_img_s')} / {f('seg_forward_480x640_img_s')} img/s", "", "", ""),
      ("seg train step at 224 / 480x640",
       f"{f('seg_train_step_224_img_s')} / {f('seg_train_step_480x640_img_s', 2)} img/s",
       "", "", ""),
      ("partition pass (Q=1000, N=10000, D=4096)", f"{f('partition_s', 2)} s",
       f"faiss search {f('faiss_search_s', 2)} s",
       f"{f('partition_vs_two_faiss', 2)} x two searches",
       target("partition_vs_two_faiss", 1.2, higher=False)),
      ("eval: extraction 1k + 10k images at 96x128",
       f"{f('eval_extract_s')} s ({f('eval_extract_img_s')} img/s)", "", "", ""),
      ("eval: search + Recall@N (overall and per condition)",
       f"{f('eval_search_recall_s', 2)} s", f"bare faiss k=20 {f('eval_bare_faiss_s', 2)} s",
       f("eval_overhead_vs_faiss", 2), target("eval_overhead_vs_faiss", 1.2, higher=False)),
      ("compile: RGB train step at 224", f"{f('train_step_224_compile_s')} s", "", "", ""),
      ("peak RSS of the benchmark",
       f"{b['peak_rss_mb'] / 1024:.1f} GB" if "peak_rss_mb" in b else "-", "", "", ""),
  ]
  lines = ["| figure | JAX | PyTorch | JAX / PyTorch | target |", "|---|---|---|---|---|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes: checks the script runs (figures meaningless)")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  parser.add_argument("--out", default="", help="also write the JSON to this file")
  parser.add_argument("--table", default="", metavar="JSON",
                      help="print the README's markdown table of a saved result and exit")
  args = parser.parse_args()
  if args.table:
    with open(args.table) as f:
      print(markdown_table(json.load(f)))
    return
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # torch_reference

  out = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
         "cpu_count": os.cpu_count(), "machine": platform.machine(),
         "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
  width, clusters = (0.35, 8) if args.quick else (1.0, 64)
  size224 = (64, 64) if args.quick else (224, 224)
  size480 = (96, 128) if args.quick else (480, 640)
  sizes = {"224": size224, "480x640": size480}
  train_triplets = {"224": 4, "480x640": 2}

  quick_blocks = QUICK_BLOCKS if args.quick else None
  model = Branch("mobilenet_v2", width=width, dim=None, num_clusters=clusters,
                 blocks=quick_blocks)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1,) + size224 + (3,)))
  out["descriptor_dim"] = model.descriptor_dim
  for key, hw in sizes.items():
    out[f"forward_{key}_img_s"], out[f"forward_{key}_compile_s"] = bench_forward(
        model, variables, 16, hw, args.repeats)
  for key, hw in sizes.items():
    out[f"train_step_{key}_img_s"], out[f"train_step_{key}_compile_s"] = bench_train_step(
        model, variables, args.repeats, triplets=train_triplets[key], hw=hw)
  del variables

  seg_channels = 5   # SLME groups (structvpr_jax/slme.py)
  seg = Branch("mobilenet_light", width=0.35 if args.quick else 1.0,
               dim=16 if args.quick else 128, num_clusters=4 if args.quick else 32,
               blocks=quick_blocks)
  seg_vars = jax.jit(seg.init)(jax.random.PRNGKey(1),
                               jnp.zeros((1,) + size224 + (seg_channels,)))
  for key, hw in sizes.items():
    out[f"seg_forward_{key}_img_s"], out[f"seg_forward_{key}_compile_s"] = bench_forward(
        seg, seg_vars, 16, hw, args.repeats, channels=seg_channels)
    (out[f"seg_train_step_{key}_img_s"],
     out[f"seg_train_step_{key}_compile_s"]) = bench_train_step(
         seg, seg_vars, args.repeats, triplets=train_triplets[key], hw=hw,
         channels=seg_channels)
  del seg_vars

  if not args.no_torch:
    torch_out = bench_torch(args.repeats, args.quick)
    out.update(torch_out)
    for key in ("forward_224", "forward_480x640", "train_step_224", "train_step_480x640"):
      if f"torch_{key}_img_s" in out:
        out[f"ratio_{key}"] = out[f"{key}_img_s"] / out[f"torch_{key}_img_s"]

  psizes = dict(nq=100, ndb=1000, dim=256) if args.quick else {}
  out["partition_s"], out["faiss_search_s"], out["partition_compile_s"] = bench_partition(
      args.repeats, **psizes)
  out["partition_vs_two_faiss"] = out["partition_s"] / (2 * out["faiss_search_s"])
  out.update(bench_evaluation(args.quick, args.repeats))
  (out["input_pipeline_batches_s"], out["input_pipeline_cached_batches_s"],
   out["synthetic_generate_img_s"]) = bench_input_pipeline(args.quick)
  out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  text = json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()})
  if args.out:
    with open(args.out + ".tmp", "w") as f:
      f.write(text + "\n")
    os.replace(args.out + ".tmp", args.out)
  print(text)


if __name__ == "__main__":
  main()

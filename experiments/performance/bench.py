"""The project's benchmark: prints one JSON object of performance figures.

  python experiments/performance/bench.py [--quick] [--rounds R] [--repeats N] [--no-torch] [--out FILE]
  python experiments/performance/bench.py --rerank [--quick] [--out FILE]   # rerank_* keys only
  python experiments/performance/bench.py --table experiments/results/bench.json [--into docs/performance.md]

Every figure is measured in a fresh worker process (this process only
launches them and imports neither JAX nor PyTorch), so neither framework
runs beside the other's threads and memory:
  - RGB workers (`bench.py --worker rgb`) and PyTorch workers
    (`experiments/performance/torch_reference.py`), interleaved (rgb, torch, rgb, torch,
    ...): `--rounds` rounds, each running both under both allocator
    settings. A figure is the median over the rounds of each worker's median
    of `--repeats` calls after the first call and 1 s of untimed warm-up calls.
  - one worker for the JAX-only figures (`bench.py --worker other`: seg
    branch, partition, evaluation, input pipeline, synthetic generation),
    with the program's allocator settings, medians of `--repeats` calls.
Allocator settings: "huge pages", the glibc tunables structvpr_jax/hugepages.py
sets for the main program (glibc.malloc.hugetlb=1, and mmap_max=0 with a high
trim_threshold so XLA's temporaries are kept between runs; JAX workers also
dispatch synchronously, `hugepages.configure_jax`): unsuffixed keys; and
"nohuge", without any of them (keys with `_nohuge` before the unit).
The machine's speed drifts between workers that run minutes apart, so the
ratio_* keys of one run are noisy (the same code measured forward-224
ratios of 1.03 and 1.69); experiments/performance/paired_ratio.py measures the
target ratios call by call with both frameworks loaded, and is what the
verdict on them in docs/performance.md reads.

Keys (stable; later versions add keys, never rename):
  forward_224_img_s       RGB branch (MobileNetV2-1.0 + NetVLAD-64, 81,920-d;
                          spec as models/spec.py with dim 0): one batch of 16
                          uint8 host images at 224x224 to host descriptors through
                          the extractor's jitted function (what PyTorch's figure
                          times: model(normalize(x)) on a uint8 tensor). Before
                          2026-12-02 this key timed the whole evaluation.Extractor
                          call, now extract_224_img_s
  forward_480x640_img_s   same, 16x480x640
  extract_224_img_s, extract_480x640_img_s   the same batch through
                          evaluation.Extractor (the Grain read-ahead stream started
                          per call, padding, gather; JAX only)
  train_step_224_img_s    train_lib.make_train_step on a 1-device mesh: 4 triplets
                          (q, p, 1 negative) = 12 uint8 images at 224, Adam, grad
                          clip 1.0, BatchNorm in training mode ("batch"), donated state
  train_step_480x640_img_s  2 triplets = 6 images at 480x640
  train_step_224_frozen_img_s, train_step_480x640_frozen_img_s   the same with
                          frozen BatchNorm ("frozen", the mode the pipeline trains with)
  seg_forward_224_img_s, seg_forward_480x640_img_s, seg_train_step_224_img_s,
  seg_train_step_480x640_img_s, seg_train_step_224_frozen_img_s,
  seg_train_step_480x640_frozen_img_s   the seg branch of the default config
                          (light MobileNet on 5 SLME channels of uint8 label maps
                          + 1x1 to 128 + NetVLAD-32), the program's allocator settings only
  torch_forward_224_img_s, torch_forward_480x640_img_s, torch_train_step_224_img_s,
  torch_train_step_480x640_img_s, torch_train_step_224_frozen_img_s,
  torch_train_step_480x640_frozen_img_s   the same RGB branch and step in PyTorch
                          (experiments/performance/torch_reference.py, channels_last)
  ratio_forward_224, ratio_forward_480x640, ratio_train_step_224,
  ratio_train_step_480x640, ratio_train_step_224_frozen,
  ratio_train_step_480x640_frozen   JAX img/s / torch img/s, the program's
                          allocator settings
  *_nohuge                the RGB, torch and ratio keys above (and their
                          *_compile_s / *_first_s) with glibc's defaults, e.g.
                          forward_224_nohuge_img_s, ratio_forward_224_nohuge
  partition_s             partition.retrieval_margins, Q=1000, N=10000, D=4096
  faiss_search_s          faiss IndexFlatL2 search of the same size (k=1)
  partition_vs_two_faiss  partition_s / (2 * faiss_search_s)
  eval_extract_s          evaluation: describing 1k queries + 10k database images
                          (default RGB branch, 96x128, 4096-d) with evaluation.Extractor
  eval_extract_img_s      the same as images/s
  eval_search_recall_s    evaluation.recall_report on those descriptors (faiss
                          search k=20, Recall@1/5/10/20 overall and per condition)
  eval_bare_faiss_s       a bare faiss IndexFlatL2 search of the same size (k=20)
  eval_overhead_vs_faiss  eval_search_recall_s / eval_bare_faiss_s
  input_pipeline_batches_s   triplet batches/s (8 triplets, M=4, 96x128 RGB+labels)
                          from JPEG/PNG on disk, cold (first epoch, decoding)
  input_pipeline_cached_batches_s   the same from the in-memory cache
  synthetic_generate_img_s  synthetic city generation (render + write), 96x128
  input_folder_t{1,2,4}_img_s, input_array_record_t{1,2,4}_img_s   images/s of
                          the training input at 480x640 with nothing cached
                          (data.cache_gb=0): mined batches of 2 x (q, p, 4
                          negatives) through the Grain stream with 1/2/4 threads,
                          from 960x540 Gardens Point JPEGs (decode + resize) or
                          from pre-resized ArrayRecord files (data/records.py)
                          Every JAX model figure is of the model the pipeline runs
                          by default (configs/base.py: model.fold_bn=True,
                          model.depthwise="auto", i.e. the native kernels on the
                          CPU); the levers below depart from it one at a time:
  forward_224_unfolded_img_s, train_step_224_frozen_unfolded_img_s   model.fold_bn=False
                          (frozen BN as a separate affine pass)
  forward_224_shifted_img_s, train_step_224_frozen_shifted_img_s   model.depthwise=
                          "shifted" (XLA's 9 shifted multiply-adds instead of the
                          native C++ depthwise kernels)
  train_step_224_frozen_from14_img_s   the frozen-BN step with train.trainable_from=14
                          (stem and blocks 0-13 get no gradient); all also
                          *_nohuge and *_compile_s, measured in the RGB workers
                          (before 2026-12-02 the main figures were unfolded, and
                          forward_224_fold_bn_* / train_step_224_frozen_fold_bn_*
                          measured folding)
  forward_224_unfused_img_s, forward_480x640_unfused_img_s   model.fused_blocks=False
                          (evaluation runs each inverted-residual block as its
                          separate layers instead of one native pass; since
                          2026-12-03)
  forward_224_whole_img_s, forward_480x640_whole_img_s   the forward figures with
                          the whole batch of 16 in one program (eval.micro_batch=16)
                          instead of the CPU default's chunks of 2^20 pixels
                          (16 images at 224: the same program since
                          2026-12-03, before chunks of 4; 2 at 480x640), also *_nohuge
  torch_forward_224_chunked_img_s, torch_forward_480x640_chunked_img_s   PyTorch's
                          forward of the same 16 images in those chunks (the same
                          cache effect; not the reference of the ratio_* keys, which
                          time the obvious whole-batch call), also *_nohuge
  round_min_max           {key: [min, max]} over the rounds of every measured key
                          (the spread behind the median; JAX-only keys: one round)
  records_export_img_s    the one-off records export of those images at 480x640
  input_vs_train_step_480x640   the best input_* figure / train_step_480x640_frozen_img_s
                          (how many times faster the input is than the step eats)
  *_compile_s             JAX first-call time (trace + compile + one run)
  torch_*_first_s         PyTorch first-call time
  peak_rss_mb             largest peak resident memory of the JAX workers
  torch_peak_rss_mb       the same of the PyTorch workers
  glibc_tunables          GLIBC_TUNABLES of the unsuffixed keys' workers
  xla_flags               XLA_FLAGS of every JAX worker (structvpr_jax/xla_flags.py defaults)
  allocator_settings      {"hugepages", "nohuge": GLIBC_TUNABLES of the workers,
                          "thp_mode": the kernel's transparent huge page mode}
  jax, devices, descriptor_dim, eval_descriptor_dim, torch, torch_threads,
  cpu_count, machine, cpu_model, rounds, repeats   the run's description
                          (cpu_model: `cpu_model()`, /proc/cpuinfo's name, family, model)
  pytorch_reference       whether the PyTorch figures were measured
The PyTorch figures need the optional extra `bench` (torch 2.13.0, CPU);
without it (or with --no-torch) they are skipped: torch_* and ratio_* keys
absent, pytorch_reference false, and `--table` marks their cells "not run".
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))   # the repository root
sys.path.insert(0, REPO)

from structvpr_jax import hugepages, xla_flags  # noqa: E402  (stdlib only: no JAX here)

TORCH_REFERENCE = os.path.join(HERE, "torch_reference.py")

# --quick: a two-block backbone (the script's plumbing, not its figures).
QUICK_BLOCKS = [[1, 8, 1, 1], [6, 16, 1, 2]]
TRAIN_TRIPLETS = {"224": 4, "480x640": 2}
BATCHNORM_SUFFIX = {"batch": "", "frozen": "_frozen"}
# The RGB figures PyTorch also measures: ratio_<figure> = JAX / torch img/s.
PAIRED = ("forward_224", "forward_480x640", "train_step_224", "train_step_480x640",
          "train_step_224_frozen", "train_step_480x640_frozen")
# Allocator setting -> key suffix.
SETTINGS = {"hugepages": "", "nohuge": "_nohuge"}
UNITS = ("_img_s", "_compile_s", "_first_s")


# --------------------------------------------------------------------------
# Workers (fresh processes): JAX figures
# --------------------------------------------------------------------------
def image_sizes(quick: bool) -> dict:
  """{"224": (H, W), "480x640": (H, W)}: the two input sizes of the model figures."""
  return {"224": (64, 64) if quick else (224, 224),
          "480x640": (96, 128) if quick else (480, 640)}


# The model fields the pipeline runs with by default (configs/base.py's
# model.*; tests/test_bench.py checks they agree).
PIPELINE_MODEL = {"fold_bn": True, "depthwise": "auto", "fused_blocks": True}


def make_spec(branch: str, hw, quick: bool, *, dim: int, num_clusters: int) -> dict:
  """A models/spec.py spec: "rgb" (MobileNetV2 on [-1, 1] RGB) or "seg" (light
  MobileNet on SLME label maps); --quick: width 0.35 and two blocks."""
  return {"branch": branch, "view": branch,
          "backbone": "mobilenet_v2" if branch == "rgb" else "mobilenet_light",
          "width": 0.35 if quick else 1.0, "dim": dim, "num_clusters": num_clusters,
          "blocks": QUICK_BLOCKS if quick else None, "slme": "slme",
          "normalization": "tflite", "image_size": list(hw), "init": "",
          **PIPELINE_MODEL}


def random_inputs(spec: dict, shape: tuple, seed: int):
  """uint8 [*shape, H, W, 3] RGB or [*shape, H, W] label maps of the spec's view."""
  import numpy as np
  from structvpr_jax import slme
  rng = np.random.default_rng(seed)
  hw = tuple(spec["image_size"])
  if spec["view"] == "rgb":
    return rng.integers(0, 256, shape + hw + (3,), np.uint8)
  return rng.integers(0, slme.NUM_CITYSCAPES_CLASSES, shape + hw, np.uint8)


class RandomImages:
  """An `input_pipeline.ImageSource` stand-in: `n` deterministic random inputs
  of a spec's view (a pool of at most 64, repeated; no disk)."""

  def __init__(self, spec: dict, n: int, seed: int):
    self.n = n
    self.pool = random_inputs(spec, (min(n, 64),), seed)

  def __len__(self):
    return self.n

  def get(self, view, idx):
    import numpy as np
    return self.pool[np.asarray(idx) % len(self.pool)]


# Untimed warm-up after the first call, in seconds (main sets 0 for --quick).
# A fresh process's first calls run slower while the allocator's heap grows
# (a seg forward at 224: 5 calls at ~77 ms, then 29 ms), so one warm-up call
# is not enough for the first figure a worker measures.
WARMUP_S = 1.0

# Worker options (main sets them from --sizes and --no-levers; the parent's
# own runs leave them alone: every size, every lever). experiments/device_check.py
# runs the RGB worker on a GPU with the paired figures only.
ONLY_SIZES: tuple = ()     # keys of image_sizes() the model figures are measured at; () = all
WITH_LEVERS = True


def timed(fn, repeats: int) -> tuple[float, float]:
  """(first-call seconds, median seconds of `repeats` further calls, timed
  after `WARMUP_S` seconds of untimed calls); waits for fn's result (any
  pytree of arrays)."""
  import jax
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < WARMUP_S:
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def forward_call(spec: dict, variables, mesh, batch: int = 16, micro_batch: int = 0):
  """A no-argument function running the extractor's jitted function on one
  host batch of `batch` uint8 inputs at spec["image_size"] (`micro_batch`
  images at a time, 0 = auto: `evaluation.micro_batch_size`), descriptors
  fetched to the host (replicated `variables`): the model call PyTorch's
  forward figure times."""
  import numpy as np
  from structvpr_jax import evaluation, parallel
  extractor = evaluation.Extractor(spec, mesh, batch, micro_batch)
  images = parallel.shard_batch(
      RandomImages(spec, batch, seed=0).get(spec["view"], np.arange(batch)), mesh)
  return lambda: np.asarray(extractor._apply(variables, images))


def bench_forward(spec: dict, variables, mesh, repeats: int, batch: int = 16,
                  micro_batch: int = 0) -> dict:
  """{"img_s", "compile_s"} of `forward_call`."""
  first, sec = timed(forward_call(spec, variables, mesh, batch, micro_batch), repeats)
  return {"img_s": batch / sec, "compile_s": first}


def bench_extract(spec: dict, variables, mesh, repeats: int, batch: int = 16) -> dict:
  """{"img_s", "compile_s"} of a whole `evaluation.Extractor` call on one
  batch of `batch` inputs (its streaming input, padding and gathering
  included)."""
  from structvpr_jax import evaluation
  extractor = evaluation.Extractor(spec, mesh, batch)
  images = RandomImages(spec, batch, seed=0)
  first, sec = timed(lambda: extractor(variables, images), repeats)
  return {"img_s": batch / sec, "compile_s": first}


def train_step_call(spec: dict, variables: dict, mesh, batchnorm: str, triplets: int,
                    trainable_from: int = 0):
  """A no-argument function running `train_lib.make_train_step` (Adam, lr
  1e-4, grad clip 1.0, margin 0.1, BatchNorm `batchnorm`) from host
  `variables` on a batch of `triplets` x (q, p, 1 negative) inputs at
  spec["image_size"]; each call continues from the last one's state."""
  import jax
  from structvpr_jax import parallel, train_lib
  tc = {"num_steps": 1000, "learning_rate": 1e-4, "warmup_steps": 0, "margin": 0.1,
        "grad_clip": 1.0, "batchnorm": batchnorm, "trainable_from": trainable_from}
  tx, _ = train_lib.make_optimizer(tc, train_lib.frozen_below(trainable_from))
  step = train_lib.make_train_step(spec, tc, mesh)
  # uint8 [triplets, 2 + M, H, W(, 3)], M = 1
  batch = parallel.shard_batch({spec["view"]: random_inputs(spec, (triplets, 3), seed=1)}, mesh)
  rng = jax.random.PRNGKey(0)
  holder = {"state": parallel.replicate(train_lib.new_state(variables, tx), mesh)}

  def run():   # the step donates its input state
    holder["state"], metrics = step(holder["state"], batch, rng)
    return jax.block_until_ready((holder["state"], metrics))

  return run


def bench_train_step(spec: dict, variables: dict, mesh, batchnorm: str, triplets: int,
                     repeats: int, trainable_from: int = 0) -> dict:
  """{"img_s", "compile_s"} of `train_step_call`."""
  first, sec = timed(train_step_call(spec, variables, mesh, batchnorm, triplets,
                                     trainable_from), repeats)
  return {"img_s": 3 * triplets / sec, "compile_s": first}


def branch_figures(spec: dict, mesh, quick: bool, repeats: int, prefix: str = "") -> dict:
  """`{prefix}forward_<size>_{img_s,compile_s}` and
  `{prefix}train_step_<size>[_frozen]_{img_s,compile_s}` of one branch, from
  `model_spec.init_variables(spec, 0)`."""
  from structvpr_jax import parallel
  from structvpr_jax.models import spec as model_spec
  variables = model_spec.init_variables(spec, seed=0)
  replicated = parallel.replicate(variables, mesh)
  out = {}
  for key, hw in image_sizes(quick).items():
    if ONLY_SIZES and key not in ONLY_SIZES:
      continue
    sized = dict(spec, image_size=list(hw))
    for unit, value in bench_forward(sized, replicated, mesh, repeats).items():
      out[f"{prefix}forward_{key}_{unit}"] = value
    for unit, value in bench_extract(sized, replicated, mesh, repeats).items():
      out[f"{prefix}extract_{key}_{unit}"] = value
    for batchnorm, suffix in BATCHNORM_SUFFIX.items():
      figure = bench_train_step(sized, variables, mesh, batchnorm, TRAIN_TRIPLETS[key], repeats)
      for unit, value in figure.items():
        out[f"{prefix}train_step_{key}{suffix}_{unit}"] = value
  return out


# JAX-only levers of the RGB branch at 224, measured in the same
# fresh RGB workers as the paired figures, each one departure from the
# pipeline's model: key suffix -> (spec changes, trainable_from, forward
# sizes timed, whether the frozen train step is timed).
# "unfolded": frozen BatchNorm as its own affine pass (model.fold_bn=False);
# "shifted": XLA's depthwise instead of the native kernels
# (model.depthwise="shifted"); "from14": train.trainable_from=14 (blocks
# 14-16 and the head train, the usual VPR fine-tuning of the last blocks;
# --quick: from 1); "unfused": the inverted-residual blocks as separate
# layers in evaluation (model.fused_blocks=False; the train step does not
# use the fused blocks, so it is not timed).
LEVERS = {"unfolded": ({"fold_bn": False}, 0, ("224",), True),
          "shifted": ({"depthwise": "shifted"}, 0, ("224",), True),
          "from14": ({}, 14, (), True),
          "unfused": ({"fused_blocks": False}, 0, ("224", "480x640"), False)}


def lever_figures(spec: dict, mesh, quick: bool, repeats: int) -> dict:
  """`forward_<size>_whole_*` (eval.micro_batch=16), `forward_<size>_<lever>_*`
  (levers that change the model) and `train_step_224_frozen_<lever>_*`
  ({img_s, compile_s})."""
  from structvpr_jax import parallel
  from structvpr_jax.models import spec as model_spec
  variables = model_spec.init_variables(spec, seed=0)
  sizes = image_sizes(quick)
  out = {}
  replicated = parallel.replicate(variables, mesh)
  for key, hw in sizes.items():   # the whole batch of 16 at once
    whole = bench_forward(dict(spec, image_size=list(hw)), replicated, mesh, repeats,
                          micro_batch=16)
    for unit, value in whole.items():
      out[f"forward_{key}_whole_{unit}"] = value
  for name, (changes, trainable_from, forward_sizes, step) in LEVERS.items():
    if quick and trainable_from:
      trainable_from = 1
    for key in forward_sizes:
      lever = dict(spec, image_size=list(sizes[key]), **changes)
      forward = bench_forward(lever, replicated, mesh, repeats)
      for unit, value in forward.items():
        out[f"forward_{key}_{name}_{unit}"] = value
    if step:
      lever = dict(spec, image_size=list(sizes["224"]), **changes)
      figure = bench_train_step(lever, variables, mesh, "frozen", TRAIN_TRIPLETS["224"],
                                repeats, trainable_from=trainable_from)
      for unit, value in figure.items():
        out[f"train_step_224_frozen_{name}_{unit}"] = value
  return out


def rgb_worker(quick: bool, repeats: int) -> dict:
  """The RGB branch figures (those PyTorch also measures), then the JAX-only
  levers (`lever_figures`)."""
  import jax
  from structvpr_jax import parallel
  from structvpr_jax.models import spec as model_spec
  mesh = parallel.make_mesh(jax.devices()[:1])
  spec = make_spec("rgb", image_sizes(quick)["224"], quick, dim=0,
                   num_clusters=8 if quick else 64)
  figures = branch_figures(spec, mesh, quick, repeats)
  if WITH_LEVERS:
    figures.update(lever_figures(spec, mesh, quick, repeats))
  from structvpr_jax.models import native
  from structvpr_jax.models.ops import dispatch
  info = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
          "descriptor_dim": model_spec.build_model(spec).descriptor_dim,
          "depthwise_resolved": dispatch.resolve_depthwise(spec["depthwise"]),
          "native_kernels": native.status()}
  device = jax.devices()[0]
  if device.platform != "cpu":     # an accelerator: its allocator's peak over this worker
    stats = device.memory_stats() or {}
    info["device_kind"] = device.device_kind
    info["device_memory"] = {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_limit")
                             if k in stats}
  return {"figures": figures, "info": info}


def bench_partition(repeats: int, nq: int = 1000, ndb: int = 10000, dim: int = 4096) -> dict:
  """partition.retrieval_margins on random descriptors against one faiss search."""
  import jax.numpy as jnp
  import numpy as np
  from structvpr_jax import partition, retrieval
  rng = np.random.default_rng(2)
  q = rng.normal(size=(nq, dim)).astype(np.float32)
  db = rng.normal(size=(ndb, dim)).astype(np.float32)
  q_utm = rng.uniform(0, 5000, (nq, 2))
  db_utm = rng.uniform(0, 5000, (ndb, 2))
  q_j, db_j = jnp.asarray(q), jnp.asarray(db)
  first, part_s = timed(
      lambda: partition.retrieval_margins(q_j, db_j, q_utm, db_utm).margin, repeats)
  _, faiss_s = timed(lambda: retrieval.search(q, db, 1), repeats)
  return {"partition_s": part_s, "faiss_search_s": faiss_s, "partition_compile_s": first,
          "partition_vs_two_faiss": part_s / (2 * faiss_s)}


def bench_evaluation(mesh, quick: bool, repeats: int) -> dict:
  """Evaluation of 1k queries against 10k database images: extraction with the
  default RGB branch (evaluation.Extractor), then search + Recall@N
  (evaluation.recall_report) against a bare faiss search of the same size."""
  import numpy as np
  from structvpr_jax import evaluation, parallel, retrieval
  from structvpr_jax.models import spec as model_spec
  nq, ndb = (50, 500) if quick else (1000, 10000)
  spec = make_spec("rgb", (64, 80) if quick else (96, 128), quick,
                   dim=16 if quick else 128, num_clusters=4 if quick else 32)
  variables = parallel.replicate(model_spec.init_variables(spec, seed=0), mesh)
  extractor = evaluation.Extractor(spec, mesh, 32)
  extractor(variables, RandomImages(spec, 64, 9))            # compile
  t0 = time.perf_counter()
  db = extractor(variables, RandomImages(spec, ndb, 1))
  q = extractor(variables, RandomImages(spec, nq, 2))
  extract_s = time.perf_counter() - t0
  rng = np.random.default_rng(3)
  db_utm = rng.uniform(0, 2000, (ndb, 2))
  q_utm = db_utm[rng.integers(0, ndb, nq)] + rng.normal(0, 5, (nq, 2))
  notes = np.array(["day", "night", "dusk", "fog"])[rng.integers(0, 4, nq)]
  _, report_s = timed(lambda: evaluation.recall_report(q, db, q_utm, db_utm, notes), repeats)
  _, faiss_s = timed(lambda: retrieval.search(q, db, 20), repeats)
  return {"eval_extract_s": extract_s, "eval_extract_img_s": (nq + ndb) / extract_s,
          "eval_search_recall_s": report_s, "eval_bare_faiss_s": faiss_s,
          "eval_overhead_vs_faiss": report_s / faiss_s, "eval_descriptor_dim": int(q.shape[1])}


def bench_input_pipeline(quick: bool) -> dict:
  """Triplet batches/s of the training input (mining with a cheap describe),
  cold then cached, and the synthetic generator's images/s."""
  import numpy as np
  from structvpr_jax import mining
  from structvpr_jax.data import input_pipeline, layout, synthetic
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
    images = input_pipeline.SplitImages(split, (96, 128), views=("rgb", "seg"), cache=True)
    for _ in range(2):   # cold (decode), then cached
      miner = mining.NegativeMiner(split.query_utm, split.database_utm, num_negatives=4,
                                   refresh_every=128, seed=0)
      batcher = input_pipeline.TripletBatcher(miner, images, batch_size=8)
      rng = np.random.default_rng(0)
      describe = lambda role, idx: rng.normal(size=(len(idx), 64)).astype(np.float32)
      t0 = time.perf_counter()
      count = sum(1 for _ in batcher.epoch(0, describe))
      rates.append(count / (time.perf_counter() - t0))
  return {"input_pipeline_batches_s": rates[0], "input_pipeline_cached_batches_s": rates[1],
          "synthetic_generate_img_s": n_images / gen_s}


INPUT_THREADS = (1, 2, 4)


def bench_input_streaming(quick: bool) -> dict:
  """Images/s the training input delivers at 480x640 (`input_<format>_t<threads>_img_s`),
  nothing cached (`data.cache_gb=0`: every image read on every use, the
  large-dataset path), mined triplet batches of 2 x (q, p, 4 negatives) through
  the Grain stream with 1/2/4 threads; "folder" decodes and resizes the
  960x540 Gardens Point JPEGs, "array_record" reads pre-resized records
  (`records_export_img_s`: the one-off export). --quick: 96x128, fewer images."""
  import glob
  import numpy as np
  from structvpr_jax import mining
  from structvpr_jax.data import input_pipeline, layout, records
  hw = (96, 128) if quick else (480, 640)
  n_places = 24 if quick else 96
  source = os.path.join(REPO, "..", "shared", "data", "gardens_point", "images")
  frames = sorted(glob.glob(os.path.join(source, "day_left", "*.jpg")))
  out, info = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, "layout")
    rng = np.random.default_rng(0)
    for role in layout.ROLES:
      folder = os.path.join(root, "images", "train", role)
      os.makedirs(folder)
      for i in range(n_places):
        name = os.path.join(folder, layout.format_name(30.0 * i + (role == "queries"), 0.0))
        if frames:
          os.symlink(os.path.abspath(frames[(2 * i + (role == "queries")) % len(frames)]), name)
        else:   # no ../shared: smooth 960x540 frames
          from PIL import Image
          base = rng.integers(0, 255, (9, 16, 3), dtype=np.uint8)
          Image.fromarray(base).resize((960, 540), Image.BILINEAR).save(name, quality=90)
    info["input_frames"] = "gardens_point" if frames else "generated"
    split = layout.read_split(root, "train")
    t0 = time.perf_counter()
    rec_dir = records.export(root, hw, progress=False, verbose=False)
    out["records_export_img_s"] = 2 * n_places / (time.perf_counter() - t0)
    for fmt in ("folder", "array_record"):
      vs = split if fmt == "folder" else dataclasses.replace(split, records=rec_dir)
      for threads in INPUT_THREADS:
        images = input_pipeline.SplitImages(vs, hw, views=("rgb",), cache=False,
                                            num_threads=threads)
        miner = mining.NegativeMiner(split.query_utm, split.database_utm, num_negatives=4,
                                     refresh_every=n_places, seed=0, strategy="random")
        batcher = input_pipeline.TripletBatcher(miner, images, batch_size=2, prefetch=4,
                                                num_threads=threads)
        t0 = time.perf_counter()
        count = sum(b["rgb"].shape[0] * b["rgb"].shape[1] for b in batcher.epoch(0, None))
        out[f"input_{fmt}_t{threads}_img_s"] = count / (time.perf_counter() - t0)
  return {"figures": out, "info": info}


def other_worker(quick: bool, repeats: int) -> dict:
  """The JAX-only figures: seg branch, partition, evaluation, input pipeline."""
  import jax
  from structvpr_jax import parallel
  mesh = parallel.make_mesh(jax.devices()[:1])
  seg = make_spec("seg", image_sizes(quick)["224"], quick, dim=16 if quick else 128,
                  num_clusters=4 if quick else 32)
  figures = branch_figures(seg, mesh, quick, repeats, prefix="seg_")
  psizes = dict(nq=100, ndb=1000, dim=256) if quick else {}
  figures.update(bench_partition(repeats, **psizes))
  evaluation = bench_evaluation(mesh, quick, repeats)
  info = {"eval_descriptor_dim": evaluation.pop("eval_descriptor_dim")}
  figures.update(evaluation)
  figures.update(bench_input_pipeline(quick))
  streaming = bench_input_streaming(quick)
  figures.update(streaming["figures"])
  info.update(streaming["info"])
  return {"figures": figures, "info": info}


# Re-ranking (`--rerank`): the settings chosen on the Gardens Point val places
# (experiments/results/rerank_gardens_point.md), both geometric scores.
RERANK_SETTINGS = {"layer": "stride16", "patch_sizes": (2,), "strides": (1,), "topk": 100,
                   "max_features": 512}
RERANK_DATABASE = 10000          # global descriptors searched (random, 4096-d)


def rerank_worker(quick: bool, repeats: int) -> dict:
  """Per query, at 96x128 and 480x640 (the default RGB branch, random
  weights): extraction of one query with and without its local features
  (`evaluation.Extractor`, batch 1), the exact faiss search of its top 100
  among `RERANK_DATABASE` global descriptors, and re-ranking those 100
  candidates (`rerank.rerank`: candidates' float16 local features read from
  host memory, mutual nearest neighbours, then RSS (jitted) or USAC RANSAC
  per candidate); milliseconds, medians of `repeats` calls after warm-up.
  rerank_<size>_<method>_vs_extract = re-ranking / global extraction of the
  query (the target: <= 10 at 480x640)."""
  import numpy as np
  from structvpr_jax import evaluation, parallel, rerank, retrieval
  from structvpr_jax.models import spec as model_spec
  mesh = parallel.make_mesh()
  sizes = {"96x128": (96, 128), "480x640": (96, 128) if quick else (480, 640)}
  out = {}
  for name, hw in sizes.items():
    spec = make_spec("rgb", hw, quick, dim=16 if quick else 128, num_clusters=4 if quick else 32)
    layer = "final" if quick else RERANK_SETTINGS["layer"]
    settings = {m: rerank.Settings(method=m, layer=layer, topk=RERANK_SETTINGS["topk"],
                                   patch_sizes=RERANK_SETTINGS["patch_sizes"],
                                   strides=RERANK_SETTINGS["strides"],
                                   max_features=RERANK_SETTINGS["max_features"])
                for m in ("rss", "ransac")}
    variables = parallel.replicate(model_spec.init_variables(spec, seed=0), mesh)
    plain = evaluation.Extractor(spec, mesh, 1)
    both = evaluation.Extractor(spec, mesh, 1, local=settings["rss"])
    one = RandomImages(spec, 1, seed=5)
    _, t_global = timed(lambda: plain(variables, one), repeats)
    _, t_both = timed(lambda: both(variables, one), repeats)
    # a database of local features: 16 distinct random images, tiled to 100 rows
    _, feats, keep = both(variables, RandomImages(spec, 16, seed=6))
    k = RERANK_SETTINGS["topk"]
    db_local = (np.ascontiguousarray(feats[np.arange(k) % 16]),
                np.ascontiguousarray(keep[np.arange(k) % 16]))
    q_global, q_feats, q_keep = both(variables, one)
    rng = np.random.default_rng(0)
    db = rng.normal(size=(200 if quick else RERANK_DATABASE, q_global.shape[1])).astype(np.float32)
    _, t_search = timed(lambda: retrieval.search(q_global, db, k), repeats)
    preds = np.arange(k)[None]
    prefix = f"rerank_{name}"
    for method, st in settings.items():
      _, t = timed(lambda st=st: rerank.rerank(preds, (q_feats, q_keep), db_local,
                                               both.layout, st)["predictions"], repeats)
      out[f"{prefix}_{method}_ms"] = 1000 * t
      out[f"{prefix}_{method}_vs_extract"] = t / t_global
    out.update({f"{prefix}_extract_global_ms": 1000 * t_global,
                f"{prefix}_extract_with_local_ms": 1000 * t_both,
                f"{prefix}_search_top{k}_of_{len(db)}_ms": 1000 * t_search,
                f"{prefix}_local_features": int(feats.shape[1]),
                f"{prefix}_local_dim": int(feats.shape[2]),
                f"{prefix}_local_bytes_per_image": rerank.bytes_per_image(*feats.shape[1:])})
  out["rerank_settings"] = {k: (list(v) if isinstance(v, tuple) else v)
                            for k, v in RERANK_SETTINGS.items()}
  return out


WORKERS = {"rgb": rgb_worker, "other": other_worker, "rerank": rerank_worker}


# --------------------------------------------------------------------------
# The parent: launches the workers, combines their figures
# --------------------------------------------------------------------------
def allocator_environments() -> dict:
  """{setting: environment of its workers}: "hugepages" adds the glibc
  tunables of `python -m structvpr_jax.main` to GLIBC_TUNABLES (huge pages
  and temporaries kept between runs: hugepages.environ_with_hugepages),
  "nohuge" drops them; other tunables and variables are passed through.
  Both carry the XLA_FLAGS defaults of the program
  (`xla_flags.with_defaults`): the workers time what the program runs."""
  base = hugepages.environ_without_hugepages(xla_flags.with_defaults(dict(os.environ)))
  return {"hugepages": hugepages.environ_with_hugepages(base), "nohuge": base}


def with_suffix(key: str, suffix: str) -> str:
  """`forward_224_img_s`, "_nohuge" -> `forward_224_nohuge_img_s` (suffix before the unit)."""
  for unit in UNITS:
    if key.endswith(unit):
      return key[:-len(unit)] + suffix + unit
  return key + suffix


def run_worker(command: list, env: dict) -> dict:
  """Runs one worker (stderr passes through) and returns its JSON output:
  {"figures": {key: float}, "info": {...}, "peak_rss_mb": float}."""
  proc = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
  if proc.returncode:
    raise SystemExit(f"bench: worker failed (exit {proc.returncode}): {' '.join(command)}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
  """The host CPU as /proc/cpuinfo names it: "<model name> (family F model M
  stepping S; avx512f|avx2|...)", e.g. "AMD EPYC (family 25 model 17
  stepping 1; avx512f)". Figures of this project moved by 2x between VMs
  that both call themselves "AMD EPYC" (2026-12-03: a family 25 model 17
  host ran the same kernels ~2.3x slower than the host of the earlier
  runs), so results carry it and `paired_ratio --pool` refuses to mix
  hosts. platform.processor() where there is no /proc/cpuinfo."""
  try:
    text = open(cpuinfo).read()
  except OSError:
    return platform.processor() or platform.machine()
  fields = {}
  for line in text.splitlines():
    key, sep, value = line.partition(":")
    if not sep:
      if fields:
        break                       # the first processor's block is enough
      continue
    fields.setdefault(key.strip(), value.strip())
  flags = set(fields.get("flags", "").split())
  simd = next((f for f in ("avx512f", "avx2", "avx", "sse4_2", "asimd") if f in flags), "")
  ident = "; ".join(x for x in (
      " ".join(f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)
      .replace("cpu family", "family"), simd) if x)
  name = fields.get("model name") or fields.get("Model") or platform.processor() or "unknown CPU"
  return f"{name} ({ident})" if ident else name


def run_all(quick: bool, rounds: int, repeats: int, with_torch: bool) -> dict:
  """All figures as one flat dict (the printed JSON object)."""
  envs = allocator_environments()
  flags = ["--repeats", str(repeats)] + (["--quick"] if quick else [])
  # framework -> command of its worker of the paired figures
  commands = {"jax": [sys.executable, os.path.abspath(__file__), "--worker", "rgb"] + flags}
  if with_torch:
    commands["torch"] = [sys.executable, TORCH_REFERENCE] + flags
  samples = collections.defaultdict(list)     # key -> one value per round
  info, peak = {}, collections.defaultdict(float)

  def collect(framework: str, setting: str, result: dict):
    for key, value in result["figures"].items():
      samples[with_suffix(key, SETTINGS[setting])].append(value)
    info.update(result["info"])
    peak[framework] = max(peak[framework], result["peak_rss_mb"])

  for r in range(rounds):
    for setting, env in envs.items():
      for framework, command in commands.items():
        print(f"bench: round {r + 1}/{rounds}: {framework} ({setting})", file=sys.stderr,
              flush=True)
        collect(framework, setting, run_worker(command, env))
  print("bench: JAX-only figures (hugepages)", file=sys.stderr, flush=True)
  collect("jax", "hugepages", run_worker(
      [sys.executable, os.path.abspath(__file__), "--worker", "other"] + flags,
      envs["hugepages"]))

  out = {"cpu_count": os.cpu_count(), "machine": platform.machine(),
         "cpu_model": cpu_model(), "rounds": rounds,
         "repeats": repeats, "glibc_tunables": envs["hugepages"].get("GLIBC_TUNABLES", ""),
         "xla_flags": envs["hugepages"].get("XLA_FLAGS", ""),
         "allocator_settings": {
             **{s: envs[s].get("GLIBC_TUNABLES", "") for s in SETTINGS},
             "thp_mode": hugepages.thp_mode()}}
  out.update(info)
  out.update({key: statistics.median(values) for key, values in samples.items()})
  # The spread behind each median: {key: [min, max]} over the rounds.
  out["round_min_max"] = {key: [min(values), max(values)] for key, values in samples.items()}
  if with_torch:
    for figure in PAIRED:
      for suffix in SETTINGS.values():
        out[f"ratio_{figure}{suffix}"] = (out[f"{figure}{suffix}_img_s"] /
                                          out[f"torch_{figure}{suffix}_img_s"])
  inputs = [v for k, v in out.items() if k.startswith("input_") and k.endswith("_img_s")]
  out["input_vs_train_step_480x640"] = max(inputs) / out["train_step_480x640_frozen_img_s"]
  out["peak_rss_mb"] = peak["jax"]
  out["pytorch_reference"] = with_torch      # False: torch not installed or --no-torch
  if with_torch:
    out["torch_peak_rss_mb"] = peak["torch"]
  return out


TABLE_BEGIN = "<!-- bench.py --table: begin -->"
TABLE_END = "<!-- bench.py --table: end -->"


def replace_table(path: str, table: str) -> None:
  """Puts `table` between the TABLE_BEGIN and TABLE_END lines of the markdown
  file `path` (each once, in that order), replacing what was there."""
  with open(path) as f:
    text = f.read()
  lines = text.split("\n")
  if lines.count(TABLE_BEGIN) != 1 or lines.count(TABLE_END) != 1 or (
      lines.index(TABLE_BEGIN) > lines.index(TABLE_END)):
    raise SystemExit(f"bench: {path} needs one '{TABLE_BEGIN}' line and, after it, one "
                     f"'{TABLE_END}' line")
  begin, end = lines.index(TABLE_BEGIN), lines.index(TABLE_END)
  text = "\n".join(lines[:begin + 1] + table.split("\n") + lines[end:])
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def markdown_table(b: dict) -> str:
  """The performance table (docs/performance.md) from one bench.py JSON object: JAX,
  PyTorch (or the reference) and their ratio with the main program's
  allocator settings (huge pages, kept temporaries), then the same with
  glibc's defaults."""
  # Results written before the key existed ran PyTorch exactly when its peak RSS is there.
  torch_ran = b.get("pytorch_reference", "torch_peak_rss_mb" in b)

  def f(key, digits=1, unit=""):
    if key in b:
      return f"{b[key]:.{digits}f}{unit}"
    return "not run" if key.startswith(("torch_", "ratio_")) and not torch_ran else "-"

  def pair(a, c, digits=(1, 1), unit=""):
    return f"{f(a, digits[0])} / {f(c, digits[1])}{unit}"

  def verdict(key, bound, higher):
    return "met" if (b[key] >= bound if higher else b[key] <= bound) else "missed"

  def target(key, bound, higher=True, settings=("",)):
    """`>= 2 (met)`; for several settings `>= 2 (program's settings: met; glibc defaults:
    missed)`."""
    sign = ">=" if higher else "<="
    names = {"": "program's settings", "_nohuge": "glibc defaults"}
    found = [s for s in settings if key + s in b]
    if not found:
      return f"{sign} {bound} (not measured)"
    if len(settings) == 1:
      return f"{sign} {bound} ({verdict(key, bound, higher)})"
    return f"{sign} {bound} (" + "; ".join(
        f"{names[s]}: {verdict(key + s, bound, higher)}" for s in found) + ")"

  def paired(label, figure, digits=1, bound=None):
    cells = [label]
    for s in SETTINGS.values():
      cells += [f(f"{figure}{s}_img_s", digits, " img/s"),
                f(f"torch_{figure}{s}_img_s", digits, " img/s"), f(f"ratio_{figure}{s}", 2)]
    cells.append(target(f"ratio_{figure}", bound, settings=tuple(SETTINGS.values()))
                 if bound else "")
    return cells

  def levers(label, figure, torch_figure):
    """A JAX-only lever against PyTorch's figure without it (ratio computed here)."""
    cells = [label]
    for s in SETTINGS.values():
      jax_key, torch_key = f"{figure}{s}_img_s", f"torch_{torch_figure}{s}_img_s"
      ratio = (f"{b[jax_key] / b[torch_key]:.2f}" if jax_key in b and torch_key in b else "")
      cells += [f(jax_key, 1, " img/s"), f(torch_key, 1, " img/s"), ratio]
    return cells + [""]

  def single(label, jax_cell, reference="", ratio="", goal=""):
    return [label, jax_cell, reference, ratio, "", "", "", goal]

  rows = [
      # targets (forward 224 >= 1.5, forward 480x640 >= 2, frozen step >= 1.5)
      paired("RGB forward 16x224x224", "forward_224", bound=1.5),
      paired("RGB forward 16x480x640", "forward_480x640", bound=2),
      paired("RGB train step, 4 triplets at 224, BN batch statistics", "train_step_224"),
      paired("RGB train step, 4 triplets at 224, frozen BN (the pipeline's mode)",
             "train_step_224_frozen", bound=1.5),
      levers("RGB forward 16x224x224, whole batch in one program (eval.micro_batch=16)",
             "forward_224_whole", "forward_224"),
      levers("RGB forward 16x480x640, whole batch in one program (eval.micro_batch=16)",
             "forward_480x640_whole", "forward_480x640"),
      levers("RGB forward 16x224x224 (ours, auto: whole batch); PyTorch also whole",
             "forward_224", "forward_224_chunked"),
      levers("RGB forward 16x480x640 (ours, auto: chunks of 2); PyTorch also in chunks of 2",
             "forward_480x640", "forward_480x640_chunked"),
      levers("RGB forward 16x224x224, model.fused_blocks=False (blocks as separate layers)",
             "forward_224_unfused", "forward_224"),
      levers("RGB forward 16x480x640, model.fused_blocks=False (blocks as separate layers)",
             "forward_480x640_unfused", "forward_480x640"),
      levers("RGB forward 16x224x224, model.fold_bn=False", "forward_224_unfolded",
             "forward_224"),
      levers("RGB train step at 224, frozen BN, model.fold_bn=False",
             "train_step_224_frozen_unfolded", "train_step_224_frozen"),
      levers("RGB forward 16x224x224, model.depthwise=shifted (XLA)", "forward_224_shifted",
             "forward_224"),
      levers("RGB train step at 224, frozen BN, model.depthwise=shifted (XLA)",
             "train_step_224_frozen_shifted", "train_step_224_frozen"),
      levers("RGB train step at 224, frozen BN, train.trainable_from=14 (torch: all blocks)",
             "train_step_224_frozen_from14", "train_step_224_frozen"),
      paired("RGB train step, 2 triplets at 480x640, BN batch statistics",
             "train_step_480x640", digits=2),
      paired("RGB train step, 2 triplets at 480x640, frozen BN (the pipeline's mode)",
             "train_step_480x640_frozen", digits=2),
      single("RGB evaluation.Extractor call, 16 images at 224 / 480x640",
             pair("extract_224_img_s", "extract_480x640_img_s", unit=" img/s")),
      single("seg forward 16x224x224 / 16x480x640",
             pair("seg_forward_224_img_s", "seg_forward_480x640_img_s", unit=" img/s")),
      single("seg train step at 224 / 480x640, BN batch statistics",
             pair("seg_train_step_224_img_s", "seg_train_step_480x640_img_s", (1, 2),
                  " img/s")),
      single("seg train step at 224 / 480x640, frozen BN (the pipeline's mode)",
             pair("seg_train_step_224_frozen_img_s", "seg_train_step_480x640_frozen_img_s",
                  (1, 2), " img/s")),
      single("partition pass (Q=1000, N=10000, D=4096)", f("partition_s", 2, " s"),
             f"faiss search {f('faiss_search_s', 2, ' s')}",
             f"{f('partition_vs_two_faiss', 2)} x two searches",
             target("partition_vs_two_faiss", 1.2, higher=False)),
      single("eval: extraction 1k + 10k images at 96x128",
             f"{f('eval_extract_s', unit=' s')} ({f('eval_extract_img_s', unit=' img/s')})"),
      single("eval: search + Recall@N (overall and per condition)",
             f("eval_search_recall_s", 2, " s"),
             f"bare faiss k=20 {f('eval_bare_faiss_s', 2, ' s')}",
             f("eval_overhead_vs_faiss", 2),
             target("eval_overhead_vs_faiss", 1.2, higher=False)),
  ]
  compile_row = ["compile: RGB train step at 224, batch / frozen BN"]
  for s in SETTINGS.values():
    compile_row += [pair(f"train_step_224{s}_compile_s", f"train_step_224_frozen{s}_compile_s",
                         unit=" s"), "", ""]
  rows.append(compile_row + [""])
  rows.append(single(
      "peak RSS of a worker process",
      f"{b['peak_rss_mb'] / 1024:.1f} GB" if "peak_rss_mb" in b else "-",
      f"{b['torch_peak_rss_mb'] / 1024:.1f} GB" if "torch_peak_rss_mb" in b
      else "-" if torch_ran else "not run"))
  lines = ["| figure | JAX | PyTorch / reference | ratio | JAX, glibc defaults | "
           "PyTorch, glibc defaults | ratio, glibc defaults | target |",
           "|---|---|---|---|---|---|---|---|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=0,
                      help="fresh-process rounds of the RGB and PyTorch workers, per "
                           "allocator setting (default 3, 1 with --quick)")
  parser.add_argument("--repeats", type=int, default=3,
                      help="timed calls per figure in a worker, after the first call and "
                           "1 s of warm-up calls (none with --quick)")
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes: checks the script runs (figures meaningless)")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  parser.add_argument("--out", default="", help="also write the JSON to this file")
  parser.add_argument("--table", default="", metavar="JSON",
                      help="print the markdown table of a saved result and exit")
  parser.add_argument("--into", default="", metavar="MARKDOWN",
                      help="with --table: write the table into this file between its "
                           f"'{TABLE_BEGIN}' and '{TABLE_END}' lines instead of printing it "
                           "(docs/performance.md)")
  parser.add_argument("--rerank", action="store_true",
                      help="only the re-ranking figures (rerank_* keys: ms per query for "
                           "extraction, search and re-ranking the top 100, at 96x128 and "
                           "480x640), in one fresh worker")
  parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
  parser.add_argument("--sizes", default="",
                      help="with --worker: comma list of the model figures' sizes "
                           f"({','.join(image_sizes(False))}; default all)")
  parser.add_argument("--no-levers", action="store_true",
                      help="with --worker rgb: the paired figures only, not the JAX-only levers")
  args = parser.parse_args()
  if args.table:
    with open(args.table) as f:
      table = markdown_table(json.load(f))
    if args.into:
      replace_table(args.into, table)
    else:
      print(table)
    return
  if args.worker:
    global WARMUP_S, ONLY_SIZES, WITH_LEVERS
    WARMUP_S = 0.0 if args.quick else WARMUP_S
    ONLY_SIZES = tuple(k for k in args.sizes.split(",") if k)
    unknown = set(ONLY_SIZES) - set(image_sizes(False))
    if unknown:
      parser.error(f"--sizes: unknown {sorted(unknown)}; expected some of "
                   f"{list(image_sizes(False))}")
    WITH_LEVERS = not args.no_levers
    hugepages.configure_jax()      # what the main program sets (structvpr_jax/hugepages.py)
    out = WORKERS[args.worker](args.quick, args.repeats)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))
    return

  if args.rerank:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "rerank",
           "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    out = run_worker(cmd, allocator_environments()["hugepages"])
    out["cpu"] = cpu_model()
    out["date"] = time.strftime("%Y-%m-%d %H:%M")
    text = json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()})
    if args.out:
      with open(args.out + ".tmp", "w") as f:
        f.write(text + "\n")
      os.replace(args.out + ".tmp", args.out)
    print(text)
    return
  with_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
  if not args.no_torch and not with_torch:
    print("bench: PyTorch figures skipped (torch not installed); pip install -e '.[bench]'",
          file=sys.stderr)
  rounds = args.rounds or (1 if args.quick else 3)
  out = run_all(args.quick, rounds, args.repeats, with_torch)
  text = json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()})
  if args.out:
    with open(args.out + ".tmp", "w") as f:
      f.write(text + "\n")
    os.replace(args.out + ".tmp", args.out)
  print(text)


if __name__ == "__main__":
  main()

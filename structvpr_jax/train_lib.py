"""What stage 1 and stage 2 share: state, optimizer, train step, k-means, fit loop.

- `TrainState`: flax TrainState with BatchNorm statistics.
- `make_optimizer(tc)`: Adam / SGD, warmup + cosine, clipping, weight decay;
  `trainable_mask` restricts updates to some parameters (experiments).
- `make_train_step(spec, tc, mesh, teacher_spec, lambda_kd)`: the jitted
  data-parallel step: triplet margin loss, plus the per-sample weighted
  distillation term when a teacher is given (stage 2).
- `kmeans_netvlad`: NetVLAD centroids from k-means on the branch's own local
  features.
- `fit(...)`: the loop both stages run: mined triplet batches, per-N-step log
  lines and metrics.jsonl records, validation + Orbax checkpoint every
  `eval_every` steps (best val R@5 + latest), resume from the latest
  checkpoint with the same data order and mining cache, a stop on a
  non-finite loss naming the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from structvpr_jax import (augment, checkpoint, config_lib, early_stopping, files, losses, mining,
                           parallel, slme)
from structvpr_jax.data import input_pipeline, layout
from structvpr_jax.evaluation import Extractor, RecallEvaluator, extractor_from_config
from structvpr_jax.models import netvlad
from structvpr_jax.models import spec as model_spec


class TrainState(train_state.TrainState):
  batch_stats: Any


# --------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------
# checkpoint meta "opt_layout" of `make_optimizer`'s (flat) optimizer state
OPT_LAYOUT = "flat"


def make_optimizer(tc: dict, trainable_mask: Optional[Any] = None, flat: bool = True):
  """(optax transform, learning-rate schedule) from a stage's training fields.

  Adam (default) or SGD (momentum 0.9) with linear warmup, then (`lr_schedule`)
  cosine decay to `final_lr_fraction` at `num_steps` (the stage's step budget)
  or a constant rate; optional global-norm clipping and weight decay.
  `trainable_mask`: a pytree of bools shaped like the params (or a function
  of the params returning one); False leaves are frozen (zero update, no
  optimizer state), via `optax.multi_transform`.

  `flat` (default): the transform runs on the (trained) parameters raveled
  into one vector (`optax.flatten`), so its state holds one vector per
  moment instead of one array per parameter. The update of each element is
  the same (Adam, SGD and weight decay are elementwise; the clipping norm
  sums the same squares in another order); what changes is the program:
  a handful of large operations instead of ~4 per parameter tensor (~1000
  small ones for MobileNetV2's 158 tensors), which XLA:CPU dispatched one
  by one (the frozen-BN RGB train step at 224 ran ~6 % faster, in-process
  alternating calls). `flat=False` is the per-tensor layout of checkpoints
  written before it (`convert_opt_state` moves one to the other).
  """
  steps = max(int(tc["num_steps"]), 1)
  warmup = min(int(tc.get("warmup_steps", 0)), steps - 1) if steps > 1 else 0
  kind = tc.get("lr_schedule", "cosine") or "cosine"
  if kind == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
        0.0 if warmup else tc["learning_rate"], tc["learning_rate"], max(warmup, 0),
        steps, end_value=tc["learning_rate"] * tc.get("final_lr_fraction", 0.01))
  elif kind == "constant":
    schedule = (optax.join_schedules([optax.linear_schedule(0.0, tc["learning_rate"], warmup),
                                      optax.constant_schedule(tc["learning_rate"])], [warmup])
                if warmup else optax.constant_schedule(tc["learning_rate"]))
  else:
    raise ValueError(f"train.lr_schedule={kind!r}; expected one of {config_lib.LR_SCHEDULES}")
  if tc.get("optimizer", "adam") == "adam":
    opt = optax.adam(schedule)
  elif tc["optimizer"] == "sgd":
    opt = optax.sgd(schedule, momentum=0.9)
  else:
    raise ValueError(f"train.optimizer={tc['optimizer']!r}; expected 'adam' or 'sgd'")
  parts = []
  if tc.get("grad_clip"):
    parts.append(optax.clip_by_global_norm(tc["grad_clip"]))
  if tc.get("weight_decay"):
    parts.append(optax.add_decayed_weights(tc["weight_decay"]))
  tx = optax.chain(*parts, opt)
  if flat:
    tx = optax.flatten(tx)
  if trainable_mask is not None:
    labels = (lambda p: jax.tree.map(lambda m: "train" if m else "freeze", trainable_mask(p))) \
        if callable(trainable_mask) else \
        jax.tree.map(lambda m: "train" if m else "freeze", trainable_mask)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  return tx, schedule


def convert_opt_state(opt_state, abstract_opt_state):
  """An optimizer state of `make_optimizer(..., flat=False)` (one array per
  parameter in each moment) in the layout of `abstract_opt_state`, the
  same optimizer's with `flat=True` (each moment one vector): every subtree
  that is a single vector there is raveled here, in the parameters' tree
  order (`jax.flatten_util.ravel_pytree`, as `optax.flatten` ravels the
  updates). Frozen parameters (`optax.MaskedNode`) hold no state in either.

  Raises ValueError naming the mismatch when the two are not the same
  optimizer's states.
  """
  from jax.flatten_util import ravel_pytree

  def convert(target, old):
    if hasattr(old, "shape") and tuple(old.shape) == tuple(target.shape):
      return old                   # not per-parameter (a step count, a scalar)
    flat_old = ravel_pytree(old)[0]
    if flat_old.shape != tuple(target.shape):
      raise ValueError(f"optimizer state {getattr(old, 'shape', type(old).__name__)} does not "
                       f"ravel to the expected {tuple(target.shape)}")
    return flat_old.astype(target.dtype)

  try:
    return jax.tree.map(convert, abstract_opt_state, opt_state)
  except ValueError as e:
    raise ValueError(f"the checkpoint's optimizer state does not match this optimizer: {e}") \
        from None


def frozen_below(trainable_from: int):
  """`make_optimizer`'s trainable mask for `train.trainable_from`: False for
  the backbone's stem and blocks before `trainable_from`, True elsewhere
  (None when 0: everything trains)."""
  if not trainable_from:
    return None
  frozen = {"stem"} | {f"block{i}" for i in range(int(trainable_from))}

  def mask(params):
    def leaf_mask(path, _):
      keys = [getattr(k, "key", None) for k in path]
      return not (len(keys) > 1 and keys[0] == "encoder" and keys[1] in frozen)
    return jax.tree_util.tree_map_with_path(leaf_mask, params)
  return mask


def new_state(variables: dict, tx) -> TrainState:
  """A step-0 TrainState of host variables {"params", "batch_stats"}."""
  return TrainState(step=0, apply_fn=None, params=variables["params"], tx=tx,
                    opt_state=tx.init(variables["params"]),
                    batch_stats=variables["batch_stats"])


# --------------------------------------------------------------------------
# Train step
# --------------------------------------------------------------------------
BATCHNORM_MODES = ("batch", "frozen")


# Stage 2's trainable head of the "adaptor" KD form: a key of the student's
# params used only by the loss; never exported (see `fit`'s `loss_heads`).
ADAPTOR = "kd_adaptor"


def make_train_step(spec: dict, tc: dict, mesh, teacher_spec: Optional[dict] = None,
                    lambda_kd: float = 1.0, kd: str = "feature", temperature: float = 0.1,
                    teacher_temperature: float = 0.0, kd_normalize: str = "batch"):
  """The data-parallel step for stage 1 (triplet) or stage 2 (triplet + KD).

  Returns `step(state, batch, rng[, teacher_variables]) -> (state, metrics)`.
  `batch[view]`: uint8 [B, 2 + M, H, W(, 3)] (query, positive, M negatives),
  sharded over the mesh; stage 2 also `batch["seg"]` (the teacher's label
  maps) and `batch["weight"]` float32 [B] (the Eq. 3 weight of each query).
  `kd` (stage 2, `losses.KD_FORMS`): "feature" compares the L2-normalised
  descriptors of query and positive with the teacher's; "adaptor" first maps
  the student's through the linear head `state.params[ADAPTOR]`;
  "relational" matches the softmax(-distance / `temperature`) of each query
  to its positive and negatives (the teacher describes all 2 + M label maps);
  "relational_batch" the same over every candidate of the global batch, the
  teacher's softmax at `teacher_temperature` (0: `temperature`); "rkd" the
  mean-normalised query-to-candidate distances of the batch (smooth-L1).
  `kd_normalize`: "batch" (the weighted KD sum / B) or "weights" (/ sum of
  the weights: the "gate" weighting), `losses.weighted_mean`.
  `tc["dtype"]` "bfloat16" runs the student's and teacher's forward and
  backward in bfloat16 (mixed precision for accelerators); parameters,
  optimizer state, BatchNorm statistics, NetVLAD's softmax and norms and the
  losses stay float32.
  Metrics: loss, triplet (and kd, kd_weight_mean), grad_norm, param_norm;
  with `tc["log_term_grads"]` in stage 2 also triplet_desc_grad_norm and
  kd_desc_grad_norm (the norm of each term's gradient w.r.t. the descriptors).
  """
  if kd not in losses.KD_FORMS:
    raise ValueError(f"distill.kd={kd!r}; expected one of {losses.KD_FORMS}")
  dtype = tc.get("dtype", "float32") or "float32"   # compute dtype; params stay float32
  model = model_spec.build_model(spec, bn_axis_name=parallel.DATA_AXIS, dtype=dtype,
                                 trainable_from=int(tc.get("trainable_from", 0) or 0),
                                 remat=bool(tc.get("remat", False)))
  teacher = model_spec.build_model(teacher_spec, dtype=dtype) if teacher_spec else None
  margin = float(tc["margin"])
  term_grads = bool(tc.get("log_term_grads", False))
  batchnorm = tc.get("batchnorm", "batch")
  if batchnorm not in BATCHNORM_MODES:
    raise ValueError(f"train.batchnorm={batchnorm!r}; expected one of {BATCHNORM_MODES}")

  ops = augment.parse_ops(tc.get("augment", "") or "")
  crop_scale = tuple(float(v) for v in tc.get("crop_scale", (0.6, 1.0)))
  jitter = tuple(float(v) for v in tc.get("color_jitter", (0.3, 0.3, 0.3, 0.05)))

  def augmented(x, keys, view):
    """[N, ...] images of one view, augmented when train.augment asks."""
    if not ops:
      return x
    return augment.augment_images(keys, x, view, ops, crop_scale, jitter)

  def loss_fn(params, batch_stats, batch, rng, *extra):
    del rng
    x = batch[spec["view"]]
    b, k = x.shape[:2]
    keys = augment.image_keys(batch["augment_seed"], k) if ops else None
    inputs = model_spec.model_input(
        spec, augmented(x.reshape((b * k,) + x.shape[2:]), keys, spec["view"]))
    variables = {"params": params, "batch_stats": batch_stats}
    if batchnorm == "batch":   # synchronised batch statistics, running averages updated
      desc, updates = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
    else:                      # frozen: BN is a fixed affine map from its running stats
      desc, updates = model.apply(variables, inputs, train=False), {"batch_stats": batch_stats}
    desc = desc.reshape(b, k, -1)

    def triplet_of(d):
      return losses.triplet_margin_loss(d[:, 0], d[:, 1], d[:, 2:], margin)

    triplet = triplet_of(desc)
    metrics = {"triplet": triplet}
    loss = triplet
    if teacher is not None:
      (teacher_vars,) = extra
      views = k if kd in losses.WIDE_KD_FORMS else 2     # all images, or query + positive
      seg = batch["seg"][:, :views].reshape((b * views,) + batch["seg"].shape[2:])
      t_keys = None if keys is None else keys.reshape((b, k) + keys.shape[1:])[:, :views]
      t_keys = None if t_keys is None else t_keys.reshape((b * views,) + keys.shape[1:])
      # the teacher's label maps get the same crop boxes as the student's images
      t_in = model_spec.model_input(teacher_spec, augmented(seg, t_keys, "seg"))
      t_desc = teacher.apply(teacher_vars, t_in, train=False).reshape(b, views, -1)

      norm = dict(normalize=kd_normalize, axis_name=parallel.DATA_AXIS)

      def kd_of(d):
        w = batch["weight"]
        if kd == "relational":
          return losses.relational_distill_loss(d, t_desc, w, temperature, teacher_temperature,
                                                **norm)
        if kd == "relational_batch":
          return losses.batch_relational_distill_loss(d, t_desc, w, temperature,
                                                      teacher_temperature, **norm)
        if kd == "rkd":
          return losses.rkd_distance_loss(d, t_desc, w, **norm)
        student = d[:, :2].reshape(b * 2, -1)
        if kd == "adaptor":
          student = losses.adaptor_apply(params[ADAPTOR], student)
        weights = jnp.repeat(w, 2)                       # each query's weight on q and p
        return losses.distill_loss(student, t_desc.reshape(b * 2, -1), weights, **norm)

      kd_loss = kd_of(desc)
      loss = triplet + lambda_kd * kd_loss
      metrics.update(kd=kd_loss, kd_weight_mean=jnp.mean(batch["weight"]))
      if term_grads:
        # How hard each term pulls the embedding: |dL/d descriptors| of the
        # triplet term and of lambda * KD (per device, averaged; no backward
        # through the network, so cheap). Opt-in: extra ops in the step may
        # change XLA's fusion and so the last bits of a run.
        d = jax.lax.stop_gradient(desc)
        metrics.update(
            triplet_desc_grad_norm=optax.global_norm(jax.grad(triplet_of)(d)),
            kd_desc_grad_norm=lambda_kd * optax.global_norm(jax.grad(kd_of)(d)))
    return loss, (updates.get("batch_stats", batch_stats), metrics)

  return parallel.data_parallel_train_step(loss_fn, mesh,
                                           extra_args=1 if teacher is not None else 0)


# --------------------------------------------------------------------------
# NetVLAD initialisation
# --------------------------------------------------------------------------
def kmeans_netvlad(spec: dict, variables: dict, source, mesh, num_images: int,
                   per_image: int, seed: int, batch_size: int) -> dict:
  """`variables` with NetVLAD params from k-means on the branch's own local
  features: `per_image` random local features of `num_images` random images
  of `source` (an `input_pipeline.ImageSource`); `batch_size` images per device."""
  model = model_spec.build_model(spec)

  def local(v, x):
    f = model.apply(v, model_spec.model_input(spec, x), train=False, method="local_features")
    return f.reshape(f.shape[0], -1, f.shape[-1])

  apply = parallel.data_parallel_apply(local, mesh)
  rng = np.random.default_rng([seed, 11])
  count = min(num_images, len(source))
  indices = np.sort(rng.choice(len(source), count, replace=False))
  bs = max(1, batch_size) * mesh.size      # per-device batch: same program on any mesh
  replicated = parallel.replicate(variables, mesh)
  feats = []
  for start in range(0, count, bs):
    x = source.get(spec["view"], indices[start:start + bs])
    padded, mask = parallel.pad_to_multiple(x, bs)
    f = np.asarray(jax.device_get(apply(replicated, parallel.shard_batch(padded, mesh))))
    f = f[:int(mask.sum())]
    take = min(per_image, f.shape[1])
    pick = np.stack([rng.choice(f.shape[1], take, replace=False) for _ in range(len(f))])
    feats.append(np.take_along_axis(f, pick[:, :, None], axis=1).reshape(-1, f.shape[-1]))
  feats = np.concatenate(feats)
  params = netvlad.init_from_kmeans(feats, spec["num_clusters"], seed=seed)
  variables = jax.tree.map(lambda x: x, variables)
  variables["params"] = dict(variables["params"])
  variables["params"]["netvlad"] = params
  return variables


def fresh_variables(spec: dict, seed: int, source, mesh, tc: dict, batch_size: int) -> dict:
  """A branch's starting point: `model_spec.init_variables` (ImageNet backbone
  when the spec says so) with NetVLAD from k-means on `source`'s images
  (`tc["kmeans_images"]` images, `tc["kmeans_per_image"]` features each)."""
  variables = model_spec.init_variables(spec, seed)
  return kmeans_netvlad(spec, variables, source, mesh, tc["kmeans_images"],
                        tc["kmeans_per_image"], seed, batch_size)


# --------------------------------------------------------------------------
# Training input
# --------------------------------------------------------------------------
# Each stage mines with its own seed offset (config.seed + offset).
MINING_SEED_OFFSET = {"rgb": 0, "seg": 1, "distill": 2}


def make_batcher(split: layout.VprSplit, spec: dict, views, tc: dict, seed: int,
                 num_threads: int = 2, prefetch: int = 2,
                 cache_gb: Optional[float] = None) -> input_pipeline.TripletBatcher:
  """Mined triplet batches of this process's share of the global batch.

  Decoded images are kept in a cache of `cache_gb` GiB (None: unbounded, 0:
  none). When the whole split fits, every training image of `views` is
  decoded up front (bad files fail here, naming the file, before compute);
  otherwise only the headers are checked up front and images are decoded when
  used (`input_pipeline.SplitImages.prepare`).
  """
  cache_bytes = None if cache_gb is None else int(float(cache_gb) * 2 ** 30)
  images = input_pipeline.SplitImages(split, spec["image_size"], views=views,
                                      cache=cache_bytes != 0,
                                      num_classes=slme.NUM_CITYSCAPES_CLASSES,
                                      num_threads=num_threads, cache_bytes=cache_bytes)
  how = images.prepare(progress=True)
  if how == "headers":
    print(f"training images: {images.decoded_bytes() / 2 ** 30:.2f} GB decoded > "
          f"data.cache_gb={cache_gb}; headers checked, images decoded when used", flush=True)
  elif how == "records":
    print(f"training images: read from {split.records} "
          f"({images.decoded_bytes() / 2 ** 30:.2f} GB > data.cache_gb={cache_gb})", flush=True)
  miner = mining.NegativeMiner(
      split.query_utm, split.database_utm, num_negatives=tc["num_negatives"],
      num_candidates=tc["num_candidates"], refresh_every=tc["refresh_every"],
      pos_radius=layout.TRAIN_POSITIVE_RADIUS, neg_radius=layout.NEGATIVE_RADIUS,
      seed=seed, strategy=tc.get("mining", "hard"))
  if miner.num_without_positive:
    logging.warning("%d of %d training queries have no database image within %.0f m; "
                    "they are skipped", miner.num_without_positive, len(split.query_utm),
                    layout.TRAIN_POSITIVE_RADIUS)
  return input_pipeline.TripletBatcher(miner, images, tc["batch_size"], prefetch=prefetch,
                                       num_threads=num_threads,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())


# --------------------------------------------------------------------------
# The fit loop
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Teacher:
  """Stage 2's frozen teacher, its per-query weights and the KD form.

  `loss_heads`: trainable parameters the KD loss alone uses (the "adaptor"
  form's linear head, {ADAPTOR: ...}); trained with the student, saved for
  resuming with the optimizer state, never in the exported variables.
  """
  spec: dict
  variables: Any            # replicated on the mesh
  weights: np.ndarray       # float32 [num training queries] (Eq. 3)
  lambda_kd: float = 1.0
  kd: str = "feature"       # losses.KD_FORMS
  temperature: float = 0.1  # relational forms: the student's softmax temperature
  teacher_temperature: float = 0.0   # relational forms: the teacher's (0: temperature)
  normalize: str = "batch"  # losses.NORMALIZATIONS ("weights" for distill.weighting="gate")
  loss_heads: dict = dataclasses.field(default_factory=dict)


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _start_label(stage: str, spec: dict, latest) -> str:
  """Where a stage's weights start, for its first log line."""
  if latest is not None:
    return f"its checkpoint at step {latest} (resumed)"
  if stage == "distill":
    return "the stage-1 RGB branch (distill.init_from_rgb, the default) or a fresh init"
  init = spec.get("init") or ""
  return f"ImageNet ({init.partition(':')[2]})" if init else "random weights"


def augment_seeds(seed: int, step: int, query_index) -> np.ndarray:
  """uint32 [B]: one augmentation seed per query of a step, from the config
  seed, the step and the query (device-count independent; a resumed run
  draws the same)."""
  q = np.asarray(query_index, np.uint64)
  mixed = (q * np.uint64(0x9E3779B1) + np.uint64(step) * np.uint64(0x85EBCA77)
           + np.uint64(seed) * np.uint64(0xC2B2AE3D))
  return (mixed % np.uint64(2 ** 32)).astype(np.uint32)


def train_stage(config, *, stage: str, spec: dict, split: layout.VprSplit, root: str, views,
                mesh, checkpoint_dir: str, metrics_path: str,
                init_variables: Callable[[Any, dict], dict],
                teacher: Optional[Teacher] = None) -> dict:
  """One training stage as the pipeline runs it (stage 1 and stage 2 alike):
  mined batches of `split`, an extractor shared by mining and validation, the
  val split of `root` for checkpoint selection, then `fit`.

  Args:
    config: the run's config (seed, data threads, eval settings, the stage's
      training fields via `config_lib.stage_train_config`).
    stage: "rgb", "seg" or "distill".
    init_variables: (database image source, training fields) -> host
      variables of a fresh start (not called on resume).
    The others as in `fit`.

  Returns:
    `fit`'s result.
  """
  tc = config_lib.stage_train_config(config, stage)
  batcher = make_batcher(split, spec, views, tc, config.seed + MINING_SEED_OFFSET[stage],
                         num_threads=int(config.data.get("num_threads", 2)),
                         prefetch=int(config.data.get("prefetch", 2)),
                         cache_gb=config.data.get("cache_gb", None))
  extractor = extractor_from_config(config, spec, mesh)
  val = RecallEvaluator(spec, root, "val", mesh, config.eval.batch_size, tuple(config.eval.ns),
                        config.eval.radius, extractor=extractor,
                        vs=config_lib.read_split(config, root, "val", spec["view"] == "seg"))
  return fit(stage=stage, spec=spec, tc=tc, mesh=mesh, batcher=batcher, views=views,
             checkpoint_dir=checkpoint_dir,
             init_variables=lambda: init_variables(batcher.images.sources["database"], tc),
             extractor=extractor, validate=val.run,
             metrics=files.MetricsWriter(metrics_path, parallel.is_main_process(),
                                         tensorboard=bool(config.get("tensorboard", True))),
             seed=config.seed, teacher=teacher)


def fit(*, stage: str, spec: dict, tc: dict, mesh, batcher: input_pipeline.TripletBatcher,
        views, checkpoint_dir: str, init_variables: Callable[[], dict],
        extractor: Extractor, validate: Callable[[dict], dict], metrics: files.MetricsWriter,
        seed: int, teacher: Optional[Teacher] = None, meta: Optional[dict] = None) -> dict:
  """Trains one stage, resuming from the latest checkpoint.

  Two budgets (`training_plan`): `tc["num_steps"]` steps validated every
  `tc["eval_every"]` steps (`epoch_queries` 0), or epochs of
  `tc["epoch_queries"]` training queries, validated after each, until
  `tc["patience"]` epochs pass without a better val selection score
  (`tc["select_metric"]`, `early_stopping.selection_score`) or
  `tc["max_epochs"]` is reached (the VPR convention). Either way the best
  checkpoint by that score is kept with the latest.

  Args:
    stage: name in logs, metrics and checkpoint meta ("rgb", "seg", "distill").
    spec: the trained branch's spec (stored in every checkpoint).
    tc: the stage's training fields (`config_lib.stage_train_config`).
    batcher: mined triplet batches; its miner's state is checkpointed.
    views: the image views the step reads ("rgb", "seg").
    checkpoint_dir: the stage's Orbax directory.
    init_variables: () -> host variables of a fresh start (not called on resume).
    extractor: describes training images with the current parameters for the
      miner's cache refreshes (share it with `validate`: one compile).
    validate: host variables -> val recall report ("R@n" keys, percent).
    metrics: the run's metrics.jsonl writer.
    seed: the config seed (step RNG).
    teacher: stage 2's teacher; None in stage 1.
    meta: extra JSON stored in every checkpoint's meta.

  Returns:
    {"steps" (trained), "best_step", "best_val_R@5", "best_val", "select_metric",
     "checkpoint", "seconds_this_run", "stop_reason" ("patience" | "max_epochs" |
     "num_steps"), "epochs" (validations, epoch mode), "best_epoch"}.
  """
  miner = batcher.miner
  steps_per_epoch = batcher.steps_per_epoch()
  if steps_per_epoch == 0:
    raise ValueError(f"train.batch_size={tc['batch_size']} is larger than the "
                     f"{len(miner.train_queries)} usable training queries")
  plan = training_plan(tc)
  num_steps, eval_every = plan["num_steps"], plan["eval_every"]
  metric = plan["select_metric"]
  tc = dict(tc, num_steps=num_steps)       # the schedule spans the whole budget
  trainable = frozen_below(int(tc.get("trainable_from", 0) or 0))
  tx, schedule = make_optimizer(tc, trainable)
  stopper = early_stopping.EarlyStopping(plan["patience"], plan["max_epochs"])
  mngr = checkpoint.manager(checkpoint_dir)
  abstract_vars = model_spec.abstract_variables(spec)
  heads = dict(teacher.loss_heads) if teacher is not None else {}
  latest = mngr.latest_step()
  t_start = time.time()
  if latest is not None:
    abstract_heads = checkpoint.abstract_like(heads)
    abstract_params = {**abstract_vars["params"], **abstract_heads}
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    # checkpoints written before the flat optimizer state hold one array per
    # parameter in each moment: restored in that layout, then raveled
    flat = checkpoint.read_meta(mngr, latest).get("opt_layout") == OPT_LAYOUT
    abstract_opt = {"opt_state": abstract_state if flat else jax.eval_shape(
                        make_optimizer(tc, trainable, flat=False)[0].init, abstract_params),
                    "step": jax.ShapeDtypeStruct((), jnp.int32)}
    if heads:
      abstract_opt["loss_heads"] = abstract_heads
    restored = checkpoint.restore(mngr, latest, abstract_vars, abstract_opt, with_mining=True)
    variables, opt = restored["variables"], restored["opt"]
    if not flat:
      opt["opt_state"] = convert_opt_state(opt["opt_state"], abstract_state)
    if "mining" in restored:
      miner.load_state_dict(restored["mining"])
    saved_input = restored["meta"].get("input")
    if saved_input is not None and saved_input != batcher.position_of(int(latest)):
      raise ValueError(
          f"{mngr.directory}/{latest}: the checkpoint's input position {saved_input} is not "
          f"where step {latest} is on this training split ({batcher.position_of(int(latest))}): "
          "the training images or batch settings changed since it was written")
    best = restored["meta"].get("best_val_R@5", -1.0)
    if plan["epochs"] and "early_stopping" in restored["meta"]:
      stopper = early_stopping.EarlyStopping.from_state(
          restored["meta"]["early_stopping"], plan["patience"], plan["max_epochs"])
    print(f"[{stage}] resuming from step {latest} ({mngr.directory})"
          + (f"; {stopper.describe(metric)}" if plan["epochs"] else ""))
    opt_state, step = opt["opt_state"], int(latest)
    heads = opt.get("loss_heads", {})
  else:
    variables = init_variables()
    opt_state, step, best = tx.init({**variables["params"], **heads}), 0, -1.0

  state = TrainState(step=step, apply_fn=None, params={**variables["params"], **heads}, tx=tx,
                     opt_state=opt_state, batch_stats=variables["batch_stats"])
  state = parallel.replicate(state, mesh)
  train_step = make_train_step(
      spec, tc, mesh, teacher.spec if teacher else None,
      teacher.lambda_kd if teacher else 1.0, teacher.kd if teacher else "feature",
      teacher.temperature if teacher else 0.1,
      teacher.teacher_temperature if teacher else 0.0,
      teacher.normalize if teacher else "batch")
  current = {"state": state}

  images_per_step = tc["batch_size"] * (2 + tc["num_negatives"])
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  budget = (f"epochs of {plan['epoch_queries']} queries ({eval_every} steps) until val "
            f"{metric} stops improving for {plan['patience'] or 'ever'} epochs, at most "
            f"{plan['max_epochs']}" if plan["epochs"] else
            f"{num_steps} steps ({steps_per_epoch} per pass over the queries)")
  print(f"[{stage}] {spec['backbone']} x{spec['width']} + NetVLAD-{spec['num_clusters']} "
        f"({n_params / 1e6:.2f}M params, descriptor {spec['num_clusters'] * spec['dim']}-d) on "
        f"{mesh.size} device(s) [{jax.devices()[0].platform}], {budget}, global batch "
        f"{tc['batch_size']} triplets; starts from {_start_label(stage, spec, latest)}")

  def state_variables():
    """The branch's variables (the loss heads stripped: not part of the model)."""
    s = current["state"]
    return {"params": {k: v for k, v in s.params.items() if k not in heads},
            "batch_stats": s.batch_stats}

  def validate_and_checkpoint(step: int, best: float) -> float:
    """Val recalls of the current state -> metrics.jsonl + a checkpoint (and,
    in epoch mode, the early-stopping decision); returns the best val R@5."""
    rep = validate(jax.device_get(state_variables()))
    val = {f"val_{k}": rep[k] for k in rep if k.startswith("R@")}
    val[checkpoint.SELECT_SCORE] = early_stopping.selection_score(val, metric)
    best = max(best, val["val_R@5"])
    epoch = step // eval_every
    if plan["epochs"]:
      stopper.update(epoch, val[checkpoint.SELECT_SCORE])
    per_condition = {f"val_{c}_R@1": v["R@1"] for c, v in rep.get("per_condition", {}).items()
                     if c != "all"}
    metrics.write({"stage": stage, "step": step, "event": "val",
                   **({"epoch": epoch} if plan["epochs"] else {}), **val, **per_condition})
    where = f"epoch {epoch} (step {step})" if plan["epochs"] else f"step {step}"
    tail = (f"best {metric} at epoch {stopper.best_epoch}, "
            f"{stopper.epochs_without_improvement}/{plan['patience'] or '-'} without improvement"
            if plan["epochs"] else f"best R@5 {best:.1f}")
    print(f"[{stage}] {where} val R@1 {val['val_R@1']:.1f} R@5 {val['val_R@5']:.1f} "
          f"({tail})", flush=True)
    s = current["state"]
    checkpoint.save(mngr, step, state_variables(),
                    {"spec": spec, "stage": stage, "step": step, "metrics": val,
                     "best_val_R@5": best, "seed": seed, "opt_layout": OPT_LAYOUT,
                     "select_metric": metric,
                     **({"early_stopping": stopper.state_dict()} if plan["epochs"] else {}),
                     "input": batcher.state() or batcher.position_of(step), **(meta or {})},
                    opt={"opt_state": s.opt_state, "step": s.step,
                         **({"loss_heads": {k: s.params[k] for k in heads}} if heads else {})},
                    mining=miner.state_dict(), metrics=val)
    return best

  if latest is None and tc.get("eval_at_start", False):
    # The starting point (ImageNet / stage-1 weights) competes with the trained
    # steps for the best-checkpoint selection on val: on a small training set
    # fine-tuning may not beat it, and selection must then keep it.
    best = validate_and_checkpoint(0, best)

  def describe_for_mining(role, indices):
    return extractor(state_variables(), batcher.images.sources[role], indices, progress=True,
                     desc=f"[{stage}] mining {role}")

  root_rng = jax.random.PRNGKey(seed)
  inject_nan_at = int(tc.get("inject_nan_at_step", 0) or 0)
  t_log, step_log = time.time(), step
  while step < num_steps and stopper.stop_reason is None:
    epoch, start = divmod(step, steps_per_epoch)     # the data pass (mining order)
    for batch in batcher.epoch(epoch, describe_for_mining, start):
      device_batch = {v: batch[v] for v in views}
      if teacher is not None:
        device_batch["weight"] = teacher.weights[batch["query_index"]]
      if tc.get("augment"):
        device_batch["augment_seed"] = augment_seeds(seed, step, batch["query_index"])
      device_batch = parallel.shard_batch(device_batch, mesh)
      rng = jax.random.fold_in(root_rng, step)
      args = (teacher.variables,) if teacher is not None else ()
      current["state"], m_dev = train_step(current["state"], device_batch, rng, *args)
      step += 1
      if step == inject_nan_at:   # fault injection for the numerical-guard test
        current["state"] = current["state"].replace(
            params=jax.tree.map(lambda p: p * jnp.nan, current["state"].params))
      last = step >= num_steps
      log_now = step % tc["log_every"] == 0 or last
      eval_now = step % eval_every == 0 or last
      if log_now or eval_now:
        # Checked at every log and checkpoint step (one host sync there, none
        # in between): a NaN/Inf makes the parameters non-finite, so it is
        # caught at the latest here, and never written into a checkpoint.
        m = jax.device_get(m_dev)
        if not all(math.isfinite(float(m[k])) for k in ("loss", "grad_norm")):
          good = mngr.latest_step()
          raise FloatingPointError(
              f"[{stage}] non-finite loss/gradient detected at step {step} (loss {m['loss']}, "
              f"grad norm {m['grad_norm']}; checked every {tc['log_every']} steps); last good "
              f"checkpoint: "
              f"{os.path.join(str(mngr.directory), str(good)) if good is not None else 'none'}")
      if log_now:
        now = time.time()
        rate = (step - step_log) * images_per_step / max(now - t_log, 1e-9)
        # epoch mode: the ETA of the current epoch (when the run stops is not known)
        to_go = (-step % eval_every) if plan["epochs"] else num_steps - step
        eta = to_go * images_per_step / max(rate, 1e-9)
        record = {"stage": stage, "step": step, "epoch": epoch, "lr": float(schedule(step - 1)),
                  "img_s": rate, **{k: float(v) for k, v in m.items()}}
        if plan["epochs"]:
          record["val_epoch"] = -(-step // eval_every)
        metrics.write(record)
        extra = f" kd {m['kd']:.4f}" if "kd" in m else ""
        where = (f"epoch {record['val_epoch']}/{plan['max_epochs']} step "
                 f"{(step - 1) % eval_every + 1}/{eval_every}" if plan["epochs"] else
                 f"step {step}/{num_steps}")
        print(f"[{stage}] {where} loss {m['loss']:.4f}{extra} "
              f"|g| {m['grad_norm']:.3f} lr {record['lr']:.2e} {rate:.1f} img/s "
              f"ETA {format_eta(eta)}{' (epoch)' if plan['epochs'] else ''}", flush=True)
        t_log, step_log = time.time(), step
      if eval_now:
        best = validate_and_checkpoint(step, best)
        t_log, step_log = time.time(), step
      if last or stopper.stop_reason is not None:
        break
  best_step = checkpoint.best_step(mngr)
  best_meta = checkpoint.read_meta(mngr, best_step) if best_step is not None else {}
  result = {"steps": step, "best_step": best_step, "best_val_R@5": best,
            "best_val": best_meta.get("metrics", {}), "select_metric": metric,
            "seconds_this_run": time.time() - t_start,
            "stop_reason": stopper.stop_reason or "num_steps",
            "checkpoint": os.path.join(str(mngr.directory), str(best_step))}
  if plan["epochs"]:
    result.update(epochs=stopper.last_epoch, best_epoch=stopper.best_epoch,
                  epoch_steps=eval_every, early_stopping=stopper.state_dict())
    print(f"[{stage}] {stopper.describe(metric)}; best checkpoint step {best_step}", flush=True)
  return result


def finished_line(done: dict) -> str:
  """How a finished stage's done.json reads in one line (skipped stages)."""
  metric = done.get("select_metric") or "R@5"
  best = (done.get("best_val") or {}).get(f"val_{metric}", done.get("best_val_R@5"))
  text = f"best val {metric} {best}"
  if done.get("epochs") is not None:
    text += (f" at epoch {done.get('best_epoch')} of {done['epochs']} "
             f"(stopped: {done.get('stop_reason')})")
  return text


def training_plan(tc: dict) -> dict:
  """The step budget and validation rhythm of a stage's training fields.

  `epoch_queries` 0 (default): `num_steps` steps, validated every
  `eval_every`. `epoch_queries` > 0: epochs of ceil(epoch_queries /
  batch_size) steps, validated after each; at most `max_epochs` epochs,
  stopping early after `patience` epochs without improvement (0: never).

  Returns:
    {"epochs" (bool), "num_steps", "eval_every", "epoch_queries", "patience",
     "max_epochs", "select_metric"}.
  """
  metric = tc.get("select_metric", "R@5") or "R@5"
  if metric not in early_stopping.SELECT_METRICS:
    raise ValueError(f"train.select_metric={metric!r}; expected one of "
                     f"{early_stopping.SELECT_METRICS}")
  epoch_queries = int(tc.get("epoch_queries", 0) or 0)
  patience = int(tc.get("patience", 0) or 0)
  max_epochs = int(tc.get("max_epochs", 0) or 0)
  if epoch_queries < 0 or patience < 0 or max_epochs < 0:
    raise ValueError(f"train.epoch_queries={epoch_queries}, train.patience={patience} and "
                     f"train.max_epochs={max_epochs} must be >= 0")
  if not epoch_queries:
    return {"epochs": False, "num_steps": int(tc["num_steps"]),
            "eval_every": int(tc["eval_every"]), "epoch_queries": 0, "patience": 0,
            "max_epochs": 0, "select_metric": metric}
  if not max_epochs:
    raise ValueError(f"train.epoch_queries={epoch_queries} needs train.max_epochs >= 1 "
                     f"(the cap of the early-stopping run)")
  per_epoch = -(-epoch_queries // int(tc["batch_size"]))
  return {"epochs": True, "num_steps": per_epoch * max_epochs, "eval_every": per_epoch,
          "epoch_queries": epoch_queries, "patience": patience, "max_epochs": max_epochs,
          "select_metric": metric}

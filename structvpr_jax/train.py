"""Training loops: stage 1 (either branch), partition, stage 2 (distillation).

Stage directories live in the workdir (DESIGN.md section 6):
  <workdir>/{rgb,seg,distill}/checkpoints/<step>/   Orbax (best val R@5 + latest)
  <workdir>/{rgb,seg,distill}/done.json             written when a stage finishes
  <workdir>/partition/{partition.npz,summary.json,groups.png}
  <workdir>/metrics.jsonl                           one JSON line per log/eval event
A stage with `done.json` is not redone; an unfinished stage resumes from its
latest checkpoint (parameters, optimizer, mining cache, data position).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from structvpr_jax import checkpoint, evaluate, losses, mining, parallel, partition, slme
from structvpr_jax.data import layout, pipeline
from structvpr_jax.models import netvlad

STAGE_BRANCH = {"rgb": "rgb", "seg": "seg", "distill": "rgb"}


class TrainState(train_state.TrainState):
  batch_stats: Any


# --------------------------------------------------------------------------
# Config helpers
# --------------------------------------------------------------------------
def branch_spec(config, stage: str) -> dict:
  """The JSON-able model description of a stage's branch (see evaluate.py)."""
  name = STAGE_BRANCH[stage]
  b = config[name]
  blocks = b.get("blocks", None)
  init = resolve_branch_init(config, name)
  return {"branch": stage, "view": "seg" if name == "seg" else "rgb",
          "backbone": b.backbone, "width": float(b.width), "dim": int(b.dim or 0),
          "num_clusters": int(b.num_clusters),
          "blocks": [list(x) for x in blocks] if blocks else None,
          "slme": config.seg.slme, "normalization": config.data.normalization,
          "image_size": [int(s) for s in config.data.image_size], "init": init}


_WARNED_RANDOM_INIT = set()


def resolve_branch_init(config, name: str) -> str:
  """config.<name>.init with "auto" resolved (see `pretrained.resolve_init`)."""
  from structvpr_jax.models import pretrained
  b = config[name]
  raw = b.get("init", "") or ""
  init = pretrained.resolve_init(raw, b.backbone, b.width, field=f"{name}.init")
  if raw.strip().lower() == "auto" and not init and name not in _WARNED_RANDOM_INIT:
    _WARNED_RANDOM_INIT.add(name)
    logging.warning(
        "%s.init='auto': no ImageNet weights usable (need %s, width 1.0, the ai-edge-litert "
        "package and the file %s via $%s or ../shared/data/models/); the %s branch starts "
        "from random weights. On the default "
        "synthetic run a randomly initialised RGB branch stays near chance.", name,
        "mobilenet_v2", pretrained.IMAGENET_TFLITE_NAME, pretrained.IMAGENET_TFLITE_ENV, name)
  return init


def stage_train_config(config, stage: str):
  """config.train with per-stage overrides: config.{rgb,seg,distill}.{num_steps,
  learning_rate, batchnorm, mining} when set (non-zero / non-empty)."""
  tc = config.train.to_dict() if hasattr(config.train, "to_dict") else dict(config.train)
  for key in ("num_steps", "learning_rate", "batchnorm", "mining"):
    if config[stage].get(key):
      tc[key] = config[stage][key]
  return tc


def validate_config(config) -> None:
  """Fails fast, naming the config field, before any compute is spent."""
  n_dev = jax.device_count()
  tc = config.train
  if tc.batch_size % n_dev:
    raise ValueError(f"train.batch_size={tc.batch_size} must divide by the device count "
                     f"({n_dev})")
  h, w = config.data.image_size
  if h < 32 or w < 32:
    raise ValueError(f"data.image_size={tuple(config.data.image_size)} is too small for the "
                     f"backbone's output stride 32 (need >= 32x32)")
  if config.distill.weighting not in partition.WEIGHTINGS:
    raise ValueError(f"distill.weighting={config.distill.weighting!r}; expected one of "
                     f"{partition.WEIGHTINGS}")
  if config.seg.slme not in slme.GROUPINGS:
    raise ValueError(f"seg.slme={config.seg.slme!r}; expected one of {slme.GROUPINGS}")
  if config.data.normalization not in pipeline.NORMALIZATIONS:
    raise ValueError(f"data.normalization={config.data.normalization!r}; expected one of "
                     f"{pipeline.NORMALIZATIONS}")
  data_names = ("synthetic", "folder") + tuple(sorted(layout.PRESETS))
  if config.data.name not in data_names:
    raise ValueError(f"data.name={config.data.name!r}; expected one of {data_names}")
  if config.data.name in layout.PRESETS and not os.path.isdir(config.data.get("source", "")):
    raise ValueError(f"data.source={config.data.get('source', '')!r} is not a folder "
                     f"(data.name={config.data.name!r} converts it into <workdir>/data)")
  if config.data.name == "folder" and not os.path.isdir(config.data.root or ""):
    raise ValueError(f"data.root={config.data.root!r} is not a folder (data.name='folder')")
  for name in ("rgb", "seg"):
    if config[name].num_clusters < 2:
      raise ValueError(f"{name}.num_clusters must be >= 2")
  if config.rgb.dim != config.seg.dim or config.rgb.num_clusters != config.seg.num_clusters:
    raise ValueError("rgb.dim/num_clusters must equal seg.dim/num_clusters: teacher and "
                     "student descriptors are compared by the distillation loss")
  if not config.rgb.dim:
    raise ValueError("rgb.dim must be set (the common projection dim of both branches)")
  pca_dim = int(config.eval.get("pca_dim", 0) or 0)
  if pca_dim < 0 or pca_dim > config.rgb.dim * config.rgb.num_clusters:
    raise ValueError(f"eval.pca_dim={pca_dim} must be 0 (off) or in [1, descriptor dim "
                     f"{config.rgb.dim * config.rgb.num_clusters}]")
  from structvpr_jax.models import pretrained
  for name in ("rgb", "seg"):
    kind, _ = pretrained.parse_init(resolve_branch_init(config, name), field=f"{name}.init")
    if kind == "imagenet_tflite":
      if config[name].backbone != "mobilenet_v2" or float(config[name].width) != 1.0:
        raise ValueError(f"{name}.init={config[name].init!r} needs {name}.backbone="
                         f"'mobilenet_v2' and {name}.width=1.0 (the file's architecture)")
      if name == "rgb" and config.data.normalization != "tflite":
        raise ValueError(f"data.normalization={config.data.normalization!r}: the TFLite "
                         f"ImageNet weights expect 'tflite' ([-1, 1] inputs)")


def data_root(config, workdir: str) -> str:
  """The layout folder: the synthetic city generated into the workdir, a
  preset dataset (`layout.PRESETS`, e.g. "gardens_point") converted from
  data.source into the workdir, or data.root ("folder")."""
  if config.data.name == "synthetic":
    from structvpr_jax.data import synthetic
    root = os.path.join(workdir, "data")
    if jax.process_index() == 0:
      synthetic.generate(root, seed=config.seed, image_size=tuple(config.data.image_size),
                         num_places=dict(config.data.synthetic_places),
                         queries_per_place=config.data.get("queries_per_place", 1),
                         progress=sys.stderr.isatty())
    _sync("synthetic data")
    return root
  if config.data.name in layout.PRESETS:
    root = os.path.join(workdir, "data")
    if jax.process_index() == 0:
      layout.convert_preset(config.data.name, config.data.source, root,
                            max_side=int(config.data.get("max_side", 0)) or None,
                            verbose=True)
    _sync(f"{config.data.name} conversion")
    return root
  return config.data.root


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def make_optimizer(tc: dict):
  """Adam (default) or SGD with warmup + cosine decay; optional grad clipping."""
  steps = max(int(tc["num_steps"]), 1)
  warmup = min(int(tc.get("warmup_steps", 0)), steps - 1) if steps > 1 else 0
  schedule = optax.warmup_cosine_decay_schedule(
      0.0 if warmup else tc["learning_rate"], tc["learning_rate"], max(warmup, 0),
      steps, end_value=tc["learning_rate"] * tc.get("final_lr_fraction", 0.01))
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
  return optax.chain(*parts, opt), schedule


# --------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------
def init_variables(spec: dict, seed: int) -> dict:
  """Fresh variables of the branch (ImageNet backbone when spec["init"] says so)."""
  model = evaluate.build_model(spec)
  h, w = spec["image_size"]
  shape = (1, h, w, 3) if spec["view"] == "rgb" else (1, h, w)

  @jax.jit
  def init(rng):
    v = model.init(rng, evaluate.model_input(spec, jnp.zeros(shape, jnp.uint8)))
    return {"params": v["params"], "batch_stats": v["batch_stats"]}

  variables = jax.device_get(init(jax.random.PRNGKey(seed)))
  if spec.get("init"):
    from structvpr_jax.models import pretrained
    kind, path = pretrained.parse_init(spec["init"])
    if kind == "imagenet_tflite":
      variables = pretrained.init_branch_from_tflite(variables, path)
  return variables


def kmeans_netvlad(spec: dict, variables: dict, source: pipeline.ImageSource, mesh,
                   num_images: int, per_image: int, seed: int, batch_size: int) -> dict:
  """NetVLAD params from k-means on the branch's own local features."""
  model = evaluate.build_model(spec)

  def local(v, x):
    f = model.apply(v, evaluate.model_input(spec, x), train=False, method="local_features")
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


# --------------------------------------------------------------------------
# Train step
# --------------------------------------------------------------------------
def make_train_step(spec: dict, tc: dict, mesh, teacher_spec: Optional[dict] = None,
                    lambda_kd: float = 1.0):
  """The data-parallel step for stage 1 (triplet) or stage 2 (triplet + KD)."""
  model = evaluate.build_model(spec, bn_axis_name=parallel.DATA_AXIS)
  teacher = evaluate.build_model(teacher_spec) if teacher_spec else None
  margin = float(tc["margin"])
  batchnorm = tc.get("batchnorm", "batch")
  if batchnorm not in ("batch", "frozen"):
    raise ValueError(f"train.batchnorm={batchnorm!r}; expected 'batch' or 'frozen'")

  def loss_fn(params, batch_stats, batch, rng, *extra):
    del rng
    x = batch[spec["view"]]
    b, k = x.shape[:2]
    inputs = evaluate.model_input(spec, x.reshape((b * k,) + x.shape[2:]))
    variables = {"params": params, "batch_stats": batch_stats}
    if batchnorm == "batch":   # synchronised batch statistics, running averages updated
      desc, updates = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
    else:                      # frozen: BN is a fixed affine map from its running stats
      desc, updates = model.apply(variables, inputs, train=False), {"batch_stats": batch_stats}
    desc = desc.reshape(b, k, -1)
    triplet = losses.triplet_margin_loss(desc[:, 0], desc[:, 1], desc[:, 2:], margin)
    metrics = {"triplet": triplet}
    loss = triplet
    if teacher is not None:
      (teacher_vars,) = extra
      seg = batch["seg"][:, :2]                          # query, positive label maps
      t_in = evaluate.model_input(teacher_spec, seg.reshape((b * 2,) + seg.shape[2:]))
      t_desc = teacher.apply(teacher_vars, t_in, train=False)
      weights = jnp.repeat(batch["weight"], 2)           # each query's weight on q and p
      kd = losses.distill_loss(desc[:, :2].reshape(b * 2, -1), t_desc, weights)
      loss = triplet + lambda_kd * kd
      metrics.update(kd=kd, kd_weight_mean=jnp.mean(batch["weight"]))
    return loss, (updates["batch_stats"], metrics)

  return parallel.data_parallel_train_step(loss_fn, mesh,
                                           extra_args=1 if teacher is not None else 0)


# --------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------
class MetricsWriter:
  """Appends JSON lines to <workdir>/metrics.jsonl (process 0 only)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if isinstance(v, (np.floating, np.integer, jax.Array)) else v)
             for k, v in record.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps(clean, sort_keys=True) + "\n")


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# --------------------------------------------------------------------------
# Stage 1 and stage 2
# --------------------------------------------------------------------------
def best_checkpoint_variables(stage_dir: str):
  """(spec, variables, step) of a finished stage's best checkpoint."""
  spec, variables, step, _ = evaluate.restore_variables(os.path.join(stage_dir, "checkpoints"))
  return spec, variables, step


def train_stage(config, workdir: str, stage: str) -> dict:
  """Trains one stage ("rgb", "seg" or "distill"); returns its done.json content."""
  stage_dir = os.path.join(workdir, stage)
  done_path = os.path.join(stage_dir, "done.json")
  if os.path.exists(done_path):
    with open(done_path) as f:
      done = json.load(f)
    logging.info("stage %s already finished (%s); skipping", stage, done_path)
    print(f"[{stage}] already finished: best val R@5 {done.get('best_val_R@5')}")
    return done
  validate_config(config)
  tc = stage_train_config(config, stage)
  spec = branch_spec(config, stage)
  mesh = parallel.make_mesh()
  root = data_root(config, workdir)
  needs_seg = stage in ("seg", "distill")
  train_split = layout.read_split(root, "train", require_segmentations=needs_seg)
  views = {"rgb": ("rgb",), "seg": ("seg",), "distill": ("rgb", "seg")}[stage]
  images = pipeline.SplitImages(train_split, spec["image_size"], views=views, cache=True,
                                num_classes=slme.NUM_CITYSCAPES_CLASSES,
                                num_threads=int(config.data.get("num_threads", 2)))
  images.load_all(progress=True)   # bad files fail here, naming the file, before compute
  miner = mining.NegativeMiner(
      train_split.query_utm, train_split.database_utm, num_negatives=tc["num_negatives"],
      num_candidates=tc["num_candidates"], refresh_every=tc["refresh_every"],
      pos_radius=layout.TRAIN_POSITIVE_RADIUS, neg_radius=layout.NEGATIVE_RADIUS,
      seed=config.seed + {"rgb": 0, "seg": 1, "distill": 2}[stage],
      strategy=tc.get("mining", "hard"))
  if miner.num_without_positive:
    logging.warning("%d of %d training queries have no database image within %.0f m; "
                    "they are skipped", miner.num_without_positive, len(train_split.query_utm),
                    layout.TRAIN_POSITIVE_RADIUS)
  local_batch = tc["batch_size"] // jax.process_count()
  batcher = pipeline.TripletBatcher(miner, images, local_batch,
                                    prefetch=int(config.data.get("prefetch", 2)))
  steps_per_epoch = batcher.steps_per_epoch()
  if steps_per_epoch == 0:
    raise ValueError(f"train.batch_size={tc['batch_size']} is larger than the "
                     f"{len(miner.train_queries)} usable training queries")
  tx, schedule = make_optimizer(tc)

  teacher_vars, weights = None, None
  teacher_spec = None
  if stage == "distill":
    teacher_spec, teacher_host, _ = best_checkpoint_variables(os.path.join(workdir, "seg"))
    teacher_vars = parallel.replicate(teacher_host, mesh)
    part = np.load(os.path.join(workdir, "partition", "partition.npz"))
    weights = part["weights"].astype(np.float32)
    if len(weights) != len(train_split.query_paths):
      raise ValueError(f"{workdir}/partition/partition.npz has {len(weights)} weights for "
                       f"{len(train_split.query_paths)} training queries: rerun the partition")

  mngr = checkpoint.manager(os.path.join(stage_dir, "checkpoints"))
  abstract_vars = evaluate.abstract_variables(spec)
  latest = mngr.latest_step()
  t_start = time.time()
  if latest is not None:
    abstract_opt = {"opt_state": jax.eval_shape(tx.init, abstract_vars["params"]),
                    "step": jax.ShapeDtypeStruct((), jnp.int32)}
    restored = checkpoint.restore(mngr, latest, abstract_vars, abstract_opt, with_mining=True)
    variables, opt = restored["variables"], restored["opt"]
    if "mining" in restored:
      miner.load_state_dict(restored["mining"])
    best = restored["meta"].get("best_val_R@5", -1.0)
    print(f"[{stage}] resuming from step {latest} ({mngr.directory})")
    opt_state, step = opt["opt_state"], int(latest)
  else:
    if stage == "distill" and config.distill.get("init_from_rgb", True):
      _, variables, _ = best_checkpoint_variables(os.path.join(workdir, "rgb"))
    else:
      variables = init_variables(spec, config.seed)
      variables = kmeans_netvlad(spec, variables, images.sources["database"], mesh,
                                 tc["kmeans_images"], tc["kmeans_per_image"], config.seed,
                                 config.eval.batch_size)
    opt_state, step, best = tx.init(variables["params"]), 0, -1.0

  state = TrainState(step=step, apply_fn=None, params=variables["params"], tx=tx,
                     opt_state=opt_state, batch_stats=variables["batch_stats"])
  state = parallel.replicate(state, mesh)
  train_step = make_train_step(spec, tc, mesh, teacher_spec, config.distill.lambda_kd)
  extractor = evaluate.Extractor(spec, mesh, config.eval.batch_size)
  holder = {"state": state}

  def describe(role, idx):
    s = holder["state"]
    return extractor({"params": s.params, "batch_stats": s.batch_stats},
                     images.sources[role], idx)

  writer = MetricsWriter(workdir)
  root_rng = jax.random.PRNGKey(config.seed)
  num_steps = int(tc["num_steps"])
  images_per_step = tc["batch_size"] * (2 + tc["num_negatives"])
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  print(f"[{stage}] {spec['backbone']} x{spec['width']} + NetVLAD-{spec['num_clusters']} "
        f"({n_params / 1e6:.2f}M params, descriptor {spec['num_clusters'] * spec['dim']}-d) on "
        f"{mesh.size} device(s) [{jax.devices()[0].platform}], {num_steps} steps, "
        f"{steps_per_epoch} steps/epoch, global batch {tc['batch_size']} triplets")

  def evaluate_val():
    s = holder["state"]
    v = jax.device_get({"params": s.params, "batch_stats": s.batch_stats})
    rep = evaluate.evaluate_split(spec, v, root, "val", mesh, config.eval.batch_size,
                                  tuple(config.eval.ns), config.eval.radius,
                                  extractor=extractor)
    return rep

  def validate_and_checkpoint(step: int, best: float) -> float:
    """Val recalls of the current state -> metrics.jsonl + a checkpoint; new best R@5."""
    rep = evaluate_val()
    val = {f"val_{k}": rep[k] for k in rep if k.startswith("R@")}
    best = max(best, val["val_R@5"])
    writer.write({"stage": stage, "step": step, "event": "val", **val})
    print(f"[{stage}] step {step} val R@1 {val['val_R@1']:.1f} R@5 {val['val_R@5']:.1f} "
          f"(best R@5 {best:.1f})", flush=True)
    s = holder["state"]
    meta = {"spec": spec, "stage": stage, "step": step, "metrics": val,
            "best_val_R@5": best, "seed": config.seed}
    checkpoint.save(mngr, step, {"params": s.params, "batch_stats": s.batch_stats}, meta,
                    opt={"opt_state": s.opt_state, "step": s.step},
                    mining=miner.state_dict(), metrics=val)
    return best

  if latest is None and tc.get("eval_at_start", False):
    # The starting point (ImageNet / stage-1 weights) competes with the trained
    # steps for the best-checkpoint selection on val: on a small training set
    # fine-tuning may not beat it, and selection must then keep it.
    best = validate_and_checkpoint(0, best)

  inject_nan_at = int(tc.get("inject_nan_at_step", 0) or 0)
  t_log, step_log = time.time(), step
  while step < num_steps:
    epoch, start = divmod(step, steps_per_epoch)
    for batch in batcher.epoch(epoch, describe, start):
      device_batch = {v: batch[v] for v in views}
      if weights is not None:
        device_batch["weight"] = weights[batch["query_index"]]
      device_batch = parallel.shard_batch(device_batch, mesh)
      rng = jax.random.fold_in(root_rng, step)
      args = (teacher_vars,) if teacher_vars is not None else ()
      holder["state"], metrics = train_step(holder["state"], device_batch, rng, *args)
      step += 1
      if step == inject_nan_at:   # fault injection for the numerical-guard test
        holder["state"] = holder["state"].replace(
            params=jax.tree.map(lambda p: p * jnp.nan, holder["state"].params))
      last = step >= num_steps
      log_now = step % tc["log_every"] == 0 or last
      eval_now = step % tc["eval_every"] == 0 or last
      if log_now or eval_now:
        # Checked at every log and checkpoint step (one host sync there, none
        # in between): a NaN/Inf makes the parameters non-finite, so it is
        # caught at the latest here, and never written into a checkpoint.
        m = jax.device_get(metrics)
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
        eta = (num_steps - step) * images_per_step / max(rate, 1e-9)
        record = {"stage": stage, "step": step, "epoch": epoch, "lr": float(schedule(step - 1)),
                  "img_s": rate, **{k: float(v) for k, v in m.items()}}
        writer.write(record)
        extra = f" kd {m['kd']:.4f}" if "kd" in m else ""
        print(f"[{stage}] step {step}/{num_steps} loss {m['loss']:.4f}{extra} "
              f"|g| {m['grad_norm']:.3f} lr {record['lr']:.2e} {rate:.1f} img/s "
              f"ETA {_fmt_eta(eta)}", flush=True)
        t_log, step_log = time.time(), step
      if eval_now:
        best = validate_and_checkpoint(step, best)
        t_log, step_log = time.time(), step
      if last:
        break
  best_step = checkpoint.best_step(mngr)
  done = {"stage": stage, "steps": num_steps, "best_step": best_step, "best_val_R@5": best,
          "seconds_this_run": time.time() - t_start,
          "checkpoint": os.path.join(str(mngr.directory), str(best_step))}
  if jax.process_index() == 0:
    evaluate.write_json_atomic(done_path, done)
  _sync(f"{stage} done")
  return done


# --------------------------------------------------------------------------
# Partition stage
# --------------------------------------------------------------------------
def run_partition(config, workdir: str) -> dict:
  """Both frozen branches over the training set -> partition.npz, summary, plot."""
  out_dir = os.path.join(workdir, "partition")
  npz_path = os.path.join(out_dir, "partition.npz")
  summary_path = os.path.join(out_dir, "summary.json")
  if os.path.exists(npz_path) and os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    print(f"[partition] already finished ({npz_path}); skipping")
    return summary
  validate_config(config)
  t0 = time.time()
  mesh = parallel.make_mesh()
  root = data_root(config, workdir)
  split = layout.read_split(root, "train", require_segmentations=True)
  print(f"[partition] describing {split.num_queries} queries + {split.num_database} database "
        f"training images with both frozen branches on {mesh.size} device(s) "
        f"[{jax.devices()[0].platform}]; weighting {config.distill.weighting}", flush=True)
  descs = {}
  for stage in ("seg", "rgb"):
    spec, variables, _ = best_checkpoint_variables(os.path.join(workdir, stage))
    images = pipeline.SplitImages(split, spec["image_size"], views=(spec["view"],),
                                  cache=False, num_classes=slme.NUM_CITYSCAPES_CLASSES)
    extractor = evaluate.Extractor(spec, mesh, config.eval.batch_size)
    replicated = parallel.replicate(variables, mesh)
    descs[stage] = (extractor(replicated, images.sources["queries"], progress=True),
                    extractor(replicated, images.sources["database"], progress=True))
  result = partition.partition(
      descs["seg"][0], descs["seg"][1], descs["rgb"][0], descs["rgb"][1], split.query_utm,
      split.database_utm, pos_radius=layout.TRAIN_POSITIVE_RADIUS,
      neg_radius=layout.NEGATIVE_RADIUS, tau=config.distill.tau, beta=config.distill.beta,
      kind=config.distill.weighting, mesh=mesh)
  summary = partition.group_summary(result["groups"], result["weights"])
  summary["weighting"] = config.distill.weighting
  summary["num_queries"] = int(len(result["groups"]))
  summary["seconds"] = time.time() - t0
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    tmp = npz_path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, **result)
    os.replace(tmp, npz_path)
    plot_groups(result, os.path.join(out_dir, "groups.png"))
    evaluate.write_json_atomic(summary_path, summary)
  _sync("partition done")
  counts = " ".join(f"{k} {v['count']}" for k, v in summary.items()
                    if isinstance(v, dict) and "count" in v)
  print(f"[partition] {counts}")
  return summary


def plot_groups(result: dict, path: str) -> None:
  """groups.png: sample count per group and the weight histogram per group."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  groups, weights = result["groups"], result["weights"]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  names = list(partition.GROUP_NAMES)
  counts = [int(np.sum(groups == g)) for g in range(len(names))]
  colors = ["#999999", "#4c72b0", "#55a868", "#c44e52", "#8172b2"]
  axes[0].bar(names, counts, color=colors)
  axes[0].set_title("training queries per group")
  for g in range(1, 5):
    sel = groups == g
    if sel.any():
      axes[1].hist(weights[sel], bins=20, range=(0, 1), alpha=0.6, label=names[g],
                   color=colors[g])
  axes[1].set_title("distillation weight (Eq. 3, ours)")
  axes[1].set_xlabel("weight")
  axes[1].legend()
  fig.tight_layout()
  tmp = path + f".tmp{os.getpid()}.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)


# --------------------------------------------------------------------------
# Final evaluation and the whole pipeline
# --------------------------------------------------------------------------
EVAL_BRANCHES = (("rgb", "stage-1 RGB"), ("seg", "seg teacher"),
                 ("distill", "StructVPR-distilled RGB"))


def run_final_eval(config, workdir: str, stages=("rgb", "seg", "distill")) -> dict:
  """Test-split R@N per query condition for each finished stage -> eval/summary.json."""
  split = config.get("eval_split", "test")
  out_dir = os.path.join(workdir, "eval", split)
  summary_path = os.path.join(workdir, "eval", "summary.json")
  mesh = parallel.make_mesh()
  root = data_root(config, workdir)
  table = {}
  predictions = {}
  for stage, label in EVAL_BRANCHES:
    if stage not in stages:
      continue
    spec, variables, step = best_checkpoint_variables(os.path.join(workdir, stage))
    pca = evaluate.pca_from_config(config, spec, variables, root, mesh)
    rep = evaluate.evaluate_split(spec, variables, root, split, mesh, config.eval.batch_size,
                                  tuple(config.eval.ns), config.eval.radius, progress=True,
                                  pca=pca)
    predictions[stage] = (spec, rep["_predictions"])
    record = evaluate.public(rep)
    record.update(branch=stage, label=label, step=step,
                  checkpoint=os.path.join(workdir, stage, "checkpoints", str(step)))
    table[stage] = record
    if jax.process_index() == 0:
      evaluate.write_json_atomic(os.path.join(out_dir, f"recalls_{stage}.json"), record)
      if stage == "distill":  # the deliverable: the distilled RGB branch
        evaluate.write_json_atomic(os.path.join(out_dir, "recalls.json"), record)
  if jax.process_index() == 0:
    evaluate.write_json_atomic(summary_path, {"split": split, "branches": table})
    write_reports(config, workdir, root, split, predictions)
  print(format_table(table))
  return table


def write_reports(config, workdir: str, root: str, split: str, predictions: dict) -> None:
  """examples.png of the deliverable branch, the synthetic montage, report.md."""
  from structvpr_jax import report
  for stage in ("distill", "rgb"):          # the distilled RGB branch, else stage-1 RGB
    if stage in predictions:
      spec, preds = predictions[stage]
      label = dict(EVAL_BRANCHES)[stage]
      report.examples_for_split(root, split, preds, spec["image_size"], config.eval.radius,
                                os.path.join(workdir, "eval", "examples.png"),
                                title=f"{label}: {split} queries and their top-5")
      break
  if config.data.name == "synthetic":
    montage = os.path.join(root, "montage.png")
    if not os.path.exists(montage):
      from structvpr_jax.data import synthetic
      synthetic.montage(montage, seed=config.seed, image_size=tuple(config.data.image_size),
                        split="test", num_places=int(config.data.synthetic_places["test"]))
  path = report.write_report(workdir)
  print(f"report: {path}")


def format_table(table: dict) -> str:
  """Markdown table: R@1/5/10 per query condition for each branch."""
  conditions = sorted({c for r in table.values() for c in r.get("per_condition", {})})
  header = "| branch | " + " | ".join(f"{c} R@1/5/10" for c in conditions + ["all"]) + " |"
  lines = [header, "|" + "---|" * (len(conditions) + 2)]
  for stage, r in table.items():
    cells = []
    for c in conditions + ["all"]:
      rec = r if c == "all" else r.get("per_condition", {}).get(c)
      cells.append("-" if rec is None else
                   f"{rec['R@1']:.1f}/{rec['R@5']:.1f}/{rec['R@10']:.1f}")
    lines.append(f"| {r.get('label', stage)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run_structvpr(config, workdir: str) -> dict:
  """rgb -> seg -> partition -> distill -> eval, skipping finished stages."""
  validate_config(config)
  t0 = time.time()
  print(f"[structvpr] workdir {workdir}: rgb -> seg -> partition -> distill -> eval on "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es); finished stages are skipped", flush=True)
  train_stage(config, workdir, "rgb")
  train_stage(config, workdir, "seg")
  run_partition(config, workdir)
  train_stage(config, workdir, "distill")
  table = run_final_eval(config, workdir)
  print(f"pipeline finished in {time.time() - t0:.0f} s; summary in "
        f"{os.path.join(workdir, 'eval', 'summary.json')}")
  return table

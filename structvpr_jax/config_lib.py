"""Reading a run config: per-stage training fields, validation, stage records.

- `stage_train_config(config, stage)`: `config.train` with the stage's own
  overrides (`config.{rgb,seg,distill}.{num_steps, learning_rate, batchnorm,
  mining}`).
- `validate_config(config)`: fails before any compute with a ValueError
  naming the field.
- `stage_fields(config, stage)`: the flat {"field": value} a finished stage
  depends on. Each stage records it (with what it consumed from upstream
  stages) so a later command with different values stops instead of reusing
  stale results (see `workdir.Workdir.check_stage`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax

from structvpr_jax import (augment, early_stopping, evaluation, losses, partition, rerank,
                           retrieval, slme)
from structvpr_jax.data import convert, layout, records
from structvpr_jax.models import mobilenet, pretrained, spec as model_spec
from structvpr_jax.models.ops import dispatch

# Pipeline order; each stage's results depend on the ones before it (eval on all).
STAGES = ("rgb", "seg", "partition", "distill", "eval")
TRAIN_STAGES = ("rgb", "seg", "distill")
DATA_NAMES = ("synthetic", "folder") + tuple(sorted(convert.PRESETS))
DATA_FORMATS = ("folder", "array_record")

# config.train fields that change what a training stage produces (log_every,
# inject_nan_at_step and the like do not).
TRAIN_RESULT_FIELDS = ("batch_size", "num_negatives", "mining", "num_candidates",
                       "refresh_every", "num_steps", "learning_rate", "warmup_steps",
                       "final_lr_fraction", "optimizer", "grad_clip", "weight_decay", "margin",
                       "batchnorm", "eval_at_start", "eval_every", "kmeans_images",
                       "kmeans_per_image", "log_term_grads", "dtype", "augment", "crop_scale",
                       "color_jitter", "trainable_from", "remat", "epoch_queries",
                       "patience", "max_epochs", "lr_schedule", "select_metric")
# train.lr_schedule: warmup, then cosine decay over the budget, or constant
LR_SCHEDULES = ("cosine", "constant")
STAGE_OVERRIDES = ("num_steps", "learning_rate", "batchnorm", "mining", "max_epochs",
                   "patience", "eval_at_start")


def stage_train_config(config, stage: str) -> dict:
  """config.train with per-stage overrides: config.{rgb,seg,distill}.{num_steps,
  learning_rate, batchnorm, mining, max_epochs, patience, eval_at_start} when
  set (non-zero / non-empty / True)."""
  tc = config.train.to_dict() if hasattr(config.train, "to_dict") else dict(config.train)
  for key in STAGE_OVERRIDES:
    if config[stage].get(key):
      tc[key] = config[stage][key]
  return tc


def records_dir(config, root: str) -> Optional[str]:
  """The records folder this run reads (data.format="array_record"), else None."""
  if config.data.get("format", "folder") != "array_record":
    return None
  return records.default_dir(root, config.data.image_size)


def read_split(config, root: str, split: str,
               require_segmentations: bool = False) -> layout.VprSplit:
  """`layout.read_split` as this run reads it: with data.format="array_record"
  the split carries its records folder, and every `SplitImages` of it reads
  the pre-resized records instead of decoding the files (splits left out of
  the export, e.g. `--splits train`, decode their files)."""
  vs = layout.read_split(root, split, require_segmentations)
  where = records_dir(config, root)
  if where is None:
    return vs
  manifest = records.read_manifest(where)
  if f"{split}_database" not in manifest["splits"]:
    # `export-records --splits train`: the splits not exported decode their files
    return vs
  return dataclasses.replace(vs, records=where)


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
  if config.data.normalization not in model_spec.NORMALIZATIONS:
    raise ValueError(f"data.normalization={config.data.normalization!r}; expected one of "
                     f"{model_spec.NORMALIZATIONS}")
  if config.data.name not in DATA_NAMES:
    raise ValueError(f"data.name={config.data.name!r}; expected one of {DATA_NAMES}")
  if config.data.name in convert.PRESETS and not os.path.isdir(config.data.get("source", "")):
    raise ValueError(f"data.source={config.data.get('source', '')!r} is not a folder "
                     f"(data.name={config.data.name!r} converts it into <workdir>/data)")
  if config.data.name == "folder" and not os.path.isdir(config.data.root or ""):
    raise ValueError(f"data.root={config.data.root!r} is not a folder (data.name='folder')")
  for name in ("rgb", "seg"):
    if int(config[name].get("output_stride", 32)) not in (8, 16, 32):
      raise ValueError(f"{name}.output_stride={config[name].output_stride}; expected 8, 16 "
                       f"or 32")
    if config[name].get("norm", "batch") not in mobilenet.NORMS:
      raise ValueError(f"{name}.norm={config[name].norm!r}; expected one of {mobilenet.NORMS}")
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
  augment.parse_ops(config.train.get("augment", "") or "")
  scale = tuple(config.train.get("crop_scale", (0.6, 1.0)))
  if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
    raise ValueError(f"train.crop_scale={scale}: expected (min, max) area fractions in (0, 1]")
  if config.data.get("format", "folder") not in DATA_FORMATS:
    raise ValueError(f"data.format={config.data.get('format')!r}; expected one of "
                     f"{DATA_FORMATS}")
  cache_gb = config.data.get("cache_gb", None)
  if cache_gb is not None and not float(cache_gb) >= 0:
    raise ValueError(f"data.cache_gb={cache_gb} must be >= 0 (GiB of decoded training "
                     f"images kept in memory; 0 = none)")
  if (config.train.get("dtype", "float32") or "float32") not in model_spec.DTYPES:
    raise ValueError(f"train.dtype={config.train.dtype!r}; expected one of {model_spec.DTYPES}")
  if config.get("model", {}).get("depthwise", "auto") not in dispatch.DEPTHWISE:
    raise ValueError(f"model.depthwise={config.model.depthwise!r}; expected one of "
                     f"{dispatch.DEPTHWISE}")
  if (config.eval.get("index", "flat") or "flat") not in retrieval.INDEXES:
    raise ValueError(f"eval.index={config.eval.index!r}; expected one of {retrieval.INDEXES}")
  if config.eval.get("descriptors", "memory") not in evaluation.DESCRIPTOR_STORES:
    raise ValueError(f"eval.descriptors={config.eval.get('descriptors')!r}; expected one of "
                     f"{evaluation.DESCRIPTOR_STORES}")
  if config.eval.get("descriptor_dtype", "float32") not in evaluation.DESCRIPTOR_DTYPES:
    raise ValueError(f"eval.descriptor_dtype={config.eval.get('descriptor_dtype')!r}; "
                     f"expected one of {evaluation.DESCRIPTOR_DTYPES}")
  if int(config.eval.get("search_block_rows", 0) or 0) < 0:
    raise ValueError(f"eval.search_block_rows={config.eval.get('search_block_rows')} must be "
                     ">= 0 (0: the whole database at once)")
  # eval.rerank*: methods, sizes, weights (`rerank.check_settings`, naming the field)
  settings = evaluation.rerank_settings(config)
  if (config.eval.get("rerank", "none") or "none") not in rerank.METHODS:
    raise ValueError(f"eval.rerank={config.eval.rerank!r}; expected one of {rerank.METHODS}")
  if settings is not None and config.get("mode", "") in ("structvpr", "train_rgb", "train_seg",
                                                          "distill"):
    for name in ("rgb", "seg"):    # the windows fit the local feature map (shapes only)
      evaluation.local_layout(model_spec.branch_spec(config, name), settings)
  # eval.micro_batch: >= 0 and dividing eval.batch_size (the Extractor's own check, early)
  evaluation.micro_batch_size(config.eval.batch_size, config.data.image_size,
                              int(config.eval.get("micro_batch", 0) or 0), backend="cpu")
  if config.distill.get("partition", "stage1") not in partition.PARTITIONS:
    raise ValueError(f"distill.partition={config.distill.partition!r}; expected one of "
                     f"{partition.PARTITIONS}")
  if config.distill.get("kd", "feature") not in losses.KD_FORMS:
    raise ValueError(f"distill.kd={config.distill.kd!r}; expected one of {losses.KD_FORMS}")
  if float(config.distill.get("temperature", 0.1)) <= 0:
    raise ValueError(f"distill.temperature={config.distill.temperature} must be > 0")
  if float(config.distill.get("teacher_temperature", 0.0)) < 0:
    raise ValueError(f"distill.teacher_temperature={config.distill.teacher_temperature} must "
                     f"be >= 0 (0: distill.temperature)")
  if (config.train.get("lr_schedule", "cosine") or "cosine") not in LR_SCHEDULES:
    raise ValueError(f"train.lr_schedule={config.train.lr_schedule!r}; expected one of "
                     f"{LR_SCHEDULES}")
  if (config.train.get("select_metric", "R@5") or "R@5") not in early_stopping.SELECT_METRICS:
    raise ValueError(f"train.select_metric={config.train.select_metric!r}; expected one of "
                     f"{early_stopping.SELECT_METRICS}")
  for stage in TRAIN_STAGES:
    tc = stage_train_config(config, stage)
    for key in ("epoch_queries", "patience", "max_epochs"):
      if int(tc.get(key, 0) or 0) < 0:
        raise ValueError(f"train.{key}={tc[key]} must be >= 0")
    if int(tc.get("epoch_queries", 0) or 0) and not int(tc.get("max_epochs", 0) or 0):
      raise ValueError(f"train.epoch_queries={tc['epoch_queries']} needs train.max_epochs "
                       f">= 1 (or {stage}.max_epochs): the cap of the early-stopping run")
  rerun = config.get("rerun_from", "") or ""
  if rerun and rerun not in STAGES:
    raise ValueError(f"rerun_from={rerun!r}; expected '' or one of {STAGES}")
  for name in ("rgb", "seg"):
    kind, _ = pretrained.parse_init(model_spec.resolve_branch_init(config, name),
                                    field=f"{name}.init")
    if kind == "imagenet_tflite":
      if config[name].backbone != "mobilenet_v2" or float(config[name].width) != 1.0:
        raise ValueError(f"{name}.init={config[name].init!r} needs {name}.backbone="
                         f"'mobilenet_v2' and {name}.width=1.0 (the file's architecture)")
      if name == "rgb" and config.data.normalization != "tflite":
        raise ValueError(f"data.normalization={config.data.normalization!r}: the TFLite "
                         f"ImageNet weights expect 'tflite' ([-1, 1] inputs)")


def _plain(value):
  """JSON-comparable form of a config value (tuples -> lists, ConfigDicts -> dicts)."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in sorted(value.items())}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def data_fields(config) -> dict:
  """The fields that decide which images every stage sees."""
  d = config.data
  out = {"seed": config.seed, "data.name": d.name, "data.image_size": d.image_size}
  if d.name == "synthetic":
    out.update({"data.synthetic_places": d.synthetic_places,
                "data.queries_per_place": d.get("queries_per_place", 1)})
  elif d.name == "folder":
    out["data.root"] = os.path.abspath(d.root) if d.root else ""
  else:
    out.update({"data.source": os.path.abspath(d.get("source", "") or ""),
                "data.max_side": d.get("max_side", 0)})
  return out


def branch_fields(config, branch: str) -> dict:
  """The fields of one branch's architecture and starting weights."""
  b = config[branch]
  out = {f"{branch}.{k}": b.get(k, None) for k in ("backbone", "width", "dim", "num_clusters",
                                                    "blocks", "init", "norm",
                                                    "output_stride")}
  out[f"{branch}.blocks"] = out[f"{branch}.blocks"] or None   # () = the default table
  # Folding frozen BN changes the results' float rounding: a stage made one
  # way is not reused for the other. (model.depthwise is not recorded: the
  # kernels agree to rounding too, but "auto" must stay portable across
  # backends, so a GPU-trained stage resumes on a CPU.)
  out["model.fold_bn"] = bool(config.get("model", {}).get("fold_bn", False))
  # "auto" resolves to ImageNet weights or random init depending on the machine:
  # record what it resolved to (the kind, not the path), so a stage made with
  # one is not reused when the other applies.
  kind, _ = pretrained.parse_init(model_spec.resolve_branch_init(config, branch),
                                  field=f"{branch}.init")
  out[f"{branch}.init_resolved"] = kind or "random"
  out["data.normalization" if branch == "rgb" else "seg.slme"] = (
      config.data.normalization if branch == "rgb" else config.seg.slme)
  return out


def train_fields(config, stage: str) -> dict:
  """The training fields of a stage, named as the user sets them: the stage's
  override when set (e.g. "seg.learning_rate"), else "train.<field>"."""
  out = {}
  for key in TRAIN_RESULT_FIELDS:
    if key in STAGE_OVERRIDES and config[stage].get(key):
      out[f"{stage}.{key}"] = config[stage][key]
    else:
      out[f"train.{key}"] = config.train.get(key, None)
  return out


DISTILL_PARTITION_FIELDS = ("weighting", "beta", "tau", "partition")
# eval.* fields of re-ranking (results of the "+R" rows depend on them)
RERANK_FIELDS = ("rerank", "rerank_topk", "rerank_features", "rerank_layer", "rerank_patch_sizes",
                 "rerank_patch_strides", "rerank_patch_weights", "rerank_max_features",
                 "rerank_geometry", "rerank_ransac_threshold", "rerank_global_weight")


def stage_fields(config, stage: str) -> dict:
  """{"field": value} (JSON-plain) that a stage's results depend on."""
  out = data_fields(config)
  if stage in ("rgb", "seg"):
    out.update(branch_fields(config, stage))
    out.update(train_fields(config, stage))
  elif stage == "partition":
    out.update({f"distill.{k}": config.distill.get(k, None) for k in DISTILL_PARTITION_FIELDS})
  elif stage == "distill":
    out.update(branch_fields(config, "rgb"))
    out.update(train_fields(config, "distill"))
    out.update({f"distill.{k}": config.distill.get(k, None)
                for k in DISTILL_PARTITION_FIELDS + ("lambda_kd", "init_from_rgb", "kd",
                                                     "temperature", "teacher_temperature")})
  elif stage == "eval":
    out.update({f"eval.{k}": config.eval.get(k, None)
                for k in ("ns", "radius", "pca_dim", "pca_whiten", "index", "ivf_nlist",
                          "pq_m", "nprobe", "descriptor_dtype", "rerank")})
    if (config.eval.get("rerank", "none") or "none") != "none":
      out.update({f"eval.{k}": config.eval.get(k, None) for k in RERANK_FIELDS})
    out["eval_split"] = config.get("eval_split", "test")
  else:
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
  return {k: _plain(v) for k, v in out.items()}


# The early-stopping rule's fields: a stage that stopped by them may go on
# under a more patient rule (`stopping_extension`).
STOPPING_FIELDS = ("patience", "max_epochs")


def _effective(fields: dict, key: str):
  """A training field's value in a stage's fields: the stage's override
  ("rgb.patience") when recorded, else "train.<key>"."""
  for name, value in fields.items():
    if name.endswith("." + key) and not name.startswith("train."):
      return value
  return fields.get("train." + key)


def stopping_extension(recorded: dict, current: dict, record: Optional[dict]) -> Optional[str]:
  """Whether a training stage recorded with `recorded` fields may continue
  from its latest checkpoint under `current` ones, giving the run the current
  fields would have made from the start; None when not.

  That holds when the two differ only in the early-stopping rule
  (STOPPING_FIELDS), the current rule goes on at least as long (patience and
  cap no smaller; patience 0 = never stop by patience), the learning rate
  does not depend on the cap (train.lr_schedule "constant", or the cap
  unchanged: the cosine schedule spans max_epochs), the stage trains in
  epochs, and, when it finished (`record` = its done.json), it stopped by
  that rule. Returns a one-line description of the change.
  """
  if not _effective(current, "epoch_queries"):
    return None
  strip = lambda f: {k: v for k, v in f.items()
                     if k.rsplit(".", 1)[-1] not in STOPPING_FIELDS}
  if field_differences(strip(recorded), strip(current)):
    return None
  old = {k: _effective(recorded, k) for k in STOPPING_FIELDS}
  new = {k: _effective(current, k) for k in STOPPING_FIELDS}
  if old == new or None in old.values() or None in new.values():
    return None
  longer = lambda a, b: (a == 0) if b == 0 else (a == 0 or a >= b)
  if not (longer(int(new["patience"]), int(old["patience"]))
          and int(new["max_epochs"]) >= int(old["max_epochs"])):
    return None
  if new["max_epochs"] != old["max_epochs"] and _effective(current, "lr_schedule") != "constant":
    return None
  if record is not None and record.get("stop_reason") not in ("patience", "max_epochs"):
    return None
  return ", ".join(f"{k} {old[k]} -> {new[k]}" for k in STOPPING_FIELDS if old[k] != new[k])


def field_differences(recorded: dict, current: dict) -> list:
  """["field: recorded X, now Y", ...] for every field whose value differs.

  A field the record lacks (a stage recorded before the field existed) is
  not a difference: it ran with that field's behaviour of the time, which
  new fields keep as their default.
  """
  lines = []
  for key in sorted(set(recorded) | set(current)):
    if key not in recorded:
      continue
    a, b = recorded.get(key), current.get(key, "<unset>")
    if a != b:
      lines.append(f"{key}: recorded {a!r}, now {b!r}")
  return lines

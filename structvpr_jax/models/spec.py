"""A branch from its spec: the JSON-able description stored in every checkpoint.

A checkpoint's `meta` item holds the spec of the branch it trained, so a
checkpoint directory alone rebuilds its model (`build_model`), its input
transform (`model_input`) and the shapes Orbax restores into
(`abstract_variables`):

  {"branch": "rgb" | "seg" | "distill",   the stage that trained it
   "view": "rgb" | "seg",                 what it reads: RGB images or label maps
   "backbone", "width", "dim", "num_clusters",
   "blocks": [[t, c, n, s], ...] | None,  backbone stage table (None = default)
   "norm": "batch" | "group",             backbone normalisation (absent = "batch")
   "output_stride": 32 | 16 | 8,          backbone output stride (absent = 32)
   "depthwise": "auto" | "native" | ...,  3x3 depthwise kernel (model.depthwise)
   "fold_bn": bool,                       frozen BN folded (model.fold_bn)
   "fused_blocks": bool,                  evaluation's fused blocks (absent = True)
   "slme": "slme" | "onehot" | "group_onehot",   seg view: label-map encoding
   "normalization": "imagenet" | "tflite",       rgb view: pixel scaling
   "image_size": [H, W],
   "init": "" | "imagenet_tflite:<path>"}       starting weights

`branch_spec(config, stage)` builds it from a config; the stages and the
evaluation use nothing else to make a model.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from structvpr_jax import slme
from structvpr_jax.models import pretrained
from structvpr_jax.models.branch import Branch

# The branch each training stage trains: stage 2 ("distill") trains the RGB student.
STAGE_BRANCH = {"rgb": "rgb", "seg": "seg", "distill": "rgb"}

# (mean, std) applied to x / 255 (imagenet) or x / 127.5 - 1 (tflite: [-1, 1]).
NORMALIZATIONS = ("imagenet", "tflite")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def branch_spec(config, stage: str) -> dict:
  """The spec of the branch `stage` ("rgb", "seg", "distill") trains, from a config."""
  name = STAGE_BRANCH[stage]
  b = config[name]
  blocks = b.get("blocks", None)
  init = resolve_branch_init(config, name)
  return {"branch": stage, "view": "seg" if name == "seg" else "rgb",
          "backbone": b.backbone, "width": float(b.width), "dim": int(b.dim or 0),
          "num_clusters": int(b.num_clusters),
          "blocks": [list(x) for x in blocks] if blocks else None,
          "norm": b.get("norm", "batch") or "batch",
          "output_stride": int(b.get("output_stride", 32) or 32),
          "fold_bn": bool(config.get("model", {}).get("fold_bn", False)),
          "slme": config.seg.slme, "normalization": config.data.normalization,
          "image_size": [int(s) for s in config.data.image_size], "init": init,
          **runtime_fields(config)}


def runtime_fields(config) -> dict:
  """How to run a branch, not what it is: the kernels of `model.depthwise`
  and `model.fused_blocks`. They change results by float rounding only and
  are not stage fields, so a checkpoint's stored values yield to the
  config's when it is restored to run (`with_runtime`, applied by
  `checkpoint.restore_variables(config=)`)."""
  model = config.get("model", {}) or {}
  return {"depthwise": model.get("depthwise", "auto") or "auto",
          "fused_blocks": bool(model.get("fused_blocks", True))}


def with_runtime(spec: dict, config) -> dict:
  """A restored checkpoint's spec with `runtime_fields` from `config`
  (e.g. `--config.model.fused_blocks=False` on `configs/eval.py` runs the
  separate layers whatever the checkpoint was trained with)."""
  return dict(spec, **runtime_fields(config))


_WARNED_RANDOM_INIT = set()


def resolve_branch_init(config, name: str) -> str:
  """config.<name>.init with "auto" resolved (see `pretrained.resolve_init`)."""
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


DTYPES = ("float32", "bfloat16")


def build_model(spec: dict, bn_axis_name: Optional[str] = None, dtype: str = "float32",
                trainable_from: int = 0, remat: bool = False) -> Branch:
  """The flax module of a spec; `bn_axis_name` synchronises BatchNorm over a mesh axis.

  `dtype` is the compute dtype ("float32" or "bfloat16": mixed precision, with
  float32 parameters, BatchNorm statistics, NetVLAD softmax and normalisation).
  `trainable_from`: the first backbone block gradients reach (training only).
  `remat`: recompute block activations in the backward pass (training only).
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; expected one of {DTYPES}")
  blocks = spec.get("blocks")
  return Branch(backbone=spec["backbone"], width=float(spec["width"]),
                dim=int(spec.get("dim") or 0) or None, num_clusters=int(spec["num_clusters"]),
                blocks=None if not blocks else tuple(tuple(b) for b in blocks),
                norm=spec.get("norm", "batch"), output_stride=int(spec.get("output_stride", 32)),
                depthwise=spec.get("depthwise", "auto"), bn_axis_name=bn_axis_name,
                dtype=jnp.dtype(dtype), trainable_from=int(trainable_from),
                fold_bn=bool(spec.get("fold_bn", False)),
                fused_blocks=bool(spec.get("fused_blocks", True)), remat=bool(remat))


def normalize_rgb(x, kind: str = "imagenet"):
  """uint8 [..., 3] -> float32, on device (inside jit).

  "imagenet": (x/255 - mean) / std (torchvision convention);
  "tflite": x/127.5 - 1 (the TFLite MobileNetV2's input quantisation).
  """
  x = jnp.asarray(x, jnp.float32)
  if kind == "imagenet":
    return (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  if kind == "tflite":
    return x / 127.5 - 1.0
  raise ValueError(f"unknown normalization {kind!r}; expected one of {NORMALIZATIONS}")


def model_input(spec: dict, x):
  """uint8 images [..., H, W, 3] or label maps [..., H, W] -> float32 model input
  ([..., H, W, 3] normalised RGB, or [..., H, W, G] SLME channels)."""
  if spec["view"] == "rgb":
    return normalize_rgb(x, spec.get("normalization", "imagenet"))
  table, values = slme.grouping(spec.get("slme", "slme"))
  return slme.encode(x, table, values)


def raw_input_shape(spec: dict, batch: int = 1) -> tuple:
  """Shape of the uint8 input of a spec: [B, H, W, 3] (rgb) or [B, H, W] (seg)."""
  h, w = spec["image_size"]
  return (batch, h, w, 3) if spec["view"] == "rgb" else (batch, h, w)


def _init_fn(spec: dict):
  model = build_model(spec)

  def init(rng):
    v = model.init(rng, model_input(spec, jnp.zeros(raw_input_shape(spec), jnp.uint8)))
    # GroupNorm branches have no BatchNorm statistics: an empty collection
    return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}
  return init


def init_variables(spec: dict, seed: int) -> dict:
  """Fresh host variables {"params", "batch_stats"} of the branch; the backbone
  from ImageNet when spec["init"] names a TFLite file."""
  variables = jax.device_get(jax.jit(_init_fn(spec))(jax.random.PRNGKey(seed)))
  if spec.get("init"):
    kind, path = pretrained.parse_init(spec["init"])
    if kind == "imagenet_tflite":
      variables = pretrained.init_branch_from_tflite(variables, path)
  return variables


def abstract_variables(spec: dict):
  """ShapeDtypeStructs of {"params", "batch_stats"} of the model a spec builds."""
  return jax.eval_shape(_init_fn(spec), jax.random.PRNGKey(0))

"""SLME: segmentation label map encoding (pure, jittable).

StructVPR feeds the seg branch with encoded label maps rather than raw class
ids. The paper describes grouping semantic classes and weighting the groups
but does not publish the grouping; the default tables below are **ours**
(docs/design.md, "SLME"), selectable via `grouping(kind)` for ablations:

- ``"slme"`` (default, ours): Cityscapes-19 into G=5 live groups — flat
  {road, sidewalk} 0.5, construction {building, wall, fence} 1.0, object
  {pole, traffic light, traffic sign} 1.0, nature {vegetation, terrain} 0.5,
  sky 0.25; dynamic classes (person ... bicycle) dropped (all-zero vector).
- ``"onehot"``: plain one-hot over the 19 classes.
- ``"group_onehot"``: one-hot over the 5 groups (value 1 each).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle")
NUM_CITYSCAPES_CLASSES = len(CITYSCAPES_CLASSES)

SLME_GROUPS = ("flat", "construction", "object", "nature", "sky")
# class id -> group index (-1 = dropped), Cityscapes trainIds 0..18.
SLME_CLASS_TO_GROUP = np.array(
    [0, 0,        # road, sidewalk                -> flat
     1, 1, 1,     # building, wall, fence         -> construction
     2, 2, 2,     # pole, traffic light, sign     -> object
     3, 3,        # vegetation, terrain           -> nature
     4,           # sky                           -> sky
     -1, -1, -1, -1, -1, -1, -1, -1],  # person .. bicycle: dynamic, dropped
    np.int32)
SLME_GROUP_VALUES = np.array([0.5, 1.0, 1.0, 0.5, 0.25], np.float32)

GROUPINGS = ("slme", "onehot", "group_onehot")


def grouping(kind: str = "slme") -> tuple[np.ndarray, np.ndarray]:
  """The (class_to_group int32[C], group_values float32[G]) tables by name.

  Args:
    kind: "slme" (default, ours), "onehot" (19 classes) or "group_onehot".
  """
  if kind == "slme":
    return SLME_CLASS_TO_GROUP.copy(), SLME_GROUP_VALUES.copy()
  if kind == "onehot":
    return (np.arange(NUM_CITYSCAPES_CLASSES, dtype=np.int32),
            np.ones(NUM_CITYSCAPES_CLASSES, np.float32))
  if kind == "group_onehot":
    return SLME_CLASS_TO_GROUP.copy(), np.ones(len(SLME_GROUPS), np.float32)
  raise ValueError(f"unknown SLME grouping {kind!r}; expected one of {GROUPINGS}")


def num_channels(kind: str = "slme") -> int:
  """G, the channel count `encode` produces for grouping `kind`."""
  return len(grouping(kind)[1])


def encode(labels, class_to_group, group_values):
  """Encodes a label map into G weighted indicator channels.

  `out[..., g] = group_values[g] * (class_to_group[labels] == g)`; labels
  outside [0, C) and classes mapped to -1 give all-zero vectors.

  Args:
    labels: int[..., H, W] class ids (any integer dtype; uint8 is fine).
    class_to_group: int32[C], group index per class, -1 = dropped.
    group_values: float32[G], the value written into a pixel's group channel.

  Returns:
    float32[..., H, W, G].
  """
  labels = jnp.asarray(labels).astype(jnp.int32)
  class_to_group = jnp.asarray(class_to_group, jnp.int32)
  group_values = jnp.asarray(group_values, jnp.float32)
  num_classes = class_to_group.shape[0]
  in_range = (labels >= 0) & (labels < num_classes)
  group = jnp.where(in_range, class_to_group[jnp.clip(labels, 0, num_classes - 1)], -1)
  onehot = group[..., None] == jnp.arange(group_values.shape[0], dtype=jnp.int32)
  return onehot.astype(jnp.float32) * group_values

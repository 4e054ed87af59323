"""Stage 1, RGB branch only (MobileNetV2 + NetVLAD, triplet loss).

Command:
  python -m structvpr_jax.main --config=configs/rgb.py [--workdir=runs/rgb]
  python -m structvpr_jax.main --config=configs/rgb.py:smoke
"""

from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.mode = "train_rgb"
  return c

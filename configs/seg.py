"""Stage 1, seg branch only (SLME label maps -> light MobileNet + NetVLAD).

Command:
  python -m structvpr_jax.main --config=configs/seg.py [--workdir=runs/seg]
  python -m structvpr_jax.main --config=configs/seg.py:smoke
"""

from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.mode = "train_seg"
  return c

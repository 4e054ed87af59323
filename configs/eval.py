"""Evaluate an Orbax checkpoint directory on a layout folder's test split.

Command:
  python -m structvpr_jax.main --config=configs/eval.py \
      --config.checkpoint=runs/distill/distill/checkpoints --config.data.root=runs/distill/data
Writes <workdir>/eval/<split>/recalls.json (R@1/5/10/20 in percent).
"""

from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.mode = "eval"
  c.data.name = "folder"
  return c

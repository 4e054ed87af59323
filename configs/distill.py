"""The whole StructVPR pipeline on the synthetic city (default run).

Command:
  python -m structvpr_jax.main --config=configs/distill.py [--workdir=DIR]
  python -m structvpr_jax.main --config=configs/distill.py:smoke   # < 3 min

Today this generates the synthetic dataset into the workdir and reports it;
stage 1 / partition / stage 2 / evaluation land with issue 4.
"""

from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.mode = "distill"
  return c

"""The whole StructVPR pipeline on the synthetic city (default run).

Command:
  python -m structvpr_jax.main --config=configs/distill.py [--workdir=DIR]
  python -m structvpr_jax.main --config=configs/distill.py:smoke   # < 3 min

Generates the synthetic city into <workdir>/data, then stage 1 RGB, stage 1
seg, the partition, stage 2 (distillation) and the test evaluation with
report.md (structvpr_jax/pipeline.py). About 2 min and 2 GB on 2 CPU cores
(1 min 32 s - 2 min 04 s, 1.7-1.9 GB on 2026-12-03 with a warm XLA cache:
experiments/results/run_time_fused.md; README "What the default run does").
Finished stages are skipped; a command with other settings on the same
workdir stops naming the fields (--config.rerun_from=STAGE redoes them).
"""

from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.mode = "structvpr"   # the whole pipeline ("distill" is accepted too)
  return c

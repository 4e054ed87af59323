"""Export global descriptors of any image folder with a trained branch.

Command:
  python -m structvpr_jax.main --config=configs/extract.py \
      --config.checkpoint=runs/distill/distill/checkpoints \
      --config.extract.images=PHOTOS [--config.extract.out=DIR]
Writes DIR (default <workdir>/descriptors)/descriptors.npy (float32 [N, D],
unit L2 norm; rows in names.txt order), names.txt (paths relative to the
folder) and meta.json (checkpoint, step, model spec). Images are resized to
the checkpoint's input size. ~55 img/s at 96x128 on 2 CPU cores.
"""

import ml_collections

from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.mode = "extract"
  c.extract = ml_collections.ConfigDict()
  c.extract.images = ""    # folder (searched recursively for .jpg/.jpeg/.png)
  c.extract.out = ""       # "" = <workdir>/descriptors
  return c

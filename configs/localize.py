"""Localise one photo against a database folder with a trained RGB branch.

Command:
  python -m structvpr_jax.main --config=configs/localize.py \
      --config.checkpoint=runs/distill/distill/checkpoints \
      --config.localize.database=runs/distill/data \
      --config.localize.query=PHOTO.jpg [--config.localize.top_k=5] \
      [--config.localize.utm_csv=utm.csv]
The database is a layout root (its test database is used), a folder of
@east@north@...@ images, or plain images with a csv `name,east,north`.
Prints the top-k matches (UTM, descriptor distance) and saves
<workdir>/localize_<photo>.png and .json. Database descriptors and the faiss
index are cached in <database>/.structvpr_cache/ and reused while the
checkpoint and the image list are unchanged.
"""

import ml_collections

from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.mode = "localize"
  c.localize = ml_collections.ConfigDict()
  c.localize.database = ""   # layout root or image folder
  c.localize.query = ""      # one photo
  c.localize.utm_csv = ""    # optional: name,east,north (names relative to the database)
  c.localize.top_k = 5
  return c

"""Label maps for a dataset: run a TFLite segmentation model over its images.

Command:
  python -m structvpr_jax.main --config=configs/segment.py --config.segment.images=DIR
      [--config.segment.out=OUT] [--config.segment.model=MODEL.tflite]

`segment.images` is a layout folder (`DIR/images/<split>/<role>/*.jpg`; label
maps go to the mirrored `DIR/segmentations/...`) or any plain image folder
(then `segment.out` is required). Images whose label PNG already exists are
skipped, so an interrupted run resumes. Default model ("auto"): DeepLab
MobileNet-EdgeTPU on Cityscapes (19 trainIds), found or downloaded by
`structvpr_jax.models.weights` ($STRUCTVPR_SEGMENTER_TFLITE, the cache,
../shared/data/models, or the pinned URL with its SHA-256).
The optional argument (e.g. `:smoke`) is accepted for uniformity and unused.
"""

import ml_collections

from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.mode = "segment"
  c.segment = ml_collections.ConfigDict()
  c.segment.model = "auto"       # TFLite segmentation model (label map or scores output)
  c.segment.images = ""          # layout root or plain image folder (required)
  c.segment.out = ""             # output folder; "" = <layout root>/segmentations
  c.segment.num_threads = 2      # TFLite CPU threads
  c.segment.progress = True      # tqdm on a TTY, else a line with images/s every 30 s
  return c

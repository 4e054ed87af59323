"""StructVPR on a standard VPR dataset in the datasets_vg layout (Pitts30k, MSLS).

Command (README, "Pitts30k / MSLS / Tokyo 24/7", has the whole path):
  python -m structvpr_jax.main --config=configs/pitts30k.py \
      --config.data.root=datasets/pitts30k [--workdir=runs/pitts30k]
  python -m structvpr_jax.main --config=configs/pitts30k.py:smoke --config.data.root=DIR  # tests

Data: `<data.root>/images/{train,val,test}/{database,queries}/@east@north@...@.jpg`
as gmberton/VPR-datasets-downloader writes it, plus label maps in
`<data.root>/segmentations/...` (configs/segment.py). Images are read at
480x640 from pre-resized ArrayRecord files (`data.format="array_record"`),
which the data stage writes into `<data.root>/records/480x640` on first use
(or beforehand: `python -m structvpr_jax.data.convert export-records`).

Training follows the VPR benchmark conventions (deep-visual-geo-localization-
benchmark / NetVLAD: 4 triplets of 1 query, 1 positive, 10 hard negatives;
the cache refreshed every 1000 queries against 1000 random candidates; Adam
at 1e-5 fine-tuning the ImageNet backbone; epochs of 5,000 queries, each
validated, until 3 pass without a better val R@5); they were not tuned here.
One epoch (5,000 queries) is 1,250 steps at batch 4.

Not run by us at full scale: there is no Pitts30k copy on the development
machine and no accelerator. Per-image costs measured on its 2-core CPU and
the resulting estimates are in the README section.
"""

from configs import base


def get_config(arg=None):
  args = base.parse_arg(arg)
  smoke = args.get("smoke", False)
  c = base.get_config(arg)
  c.mode = "structvpr"
  c.data.name = "folder"
  c.data.root = ""                               # --config.data.root=datasets/pitts30k
  c.data.image_size = (480, 640) if not smoke else (64, 80)
  c.data.format = "array_record"
  c.data.num_threads = 8 if not smoke else 2     # decode / read threads
  c.data.prefetch = 4 if not smoke else 2

  c.rgb.init = "auto" if not smoke else ""
  c.rgb.width = 1.0 if not smoke else 0.35
  c.rgb.dim = 128 if not smoke else 16
  c.rgb.num_clusters = 32 if not smoke else 4
  c.seg.width = 1.0 if not smoke else 0.35
  c.seg.num_steps = 5000 if not smoke else 2

  c.train.batch_size = 4 if not smoke else 2
  c.train.num_negatives = 10 if not smoke else 2
  c.train.num_candidates = 1000 if not smoke else 16
  c.train.refresh_every = 1000 if not smoke else 8
  c.train.learning_rate = 1e-5
  c.train.warmup_steps = 100 if not smoke else 0
  c.train.num_steps = 5000 if not smoke else 2   # rgb and distill (smoke: step budget)
  c.train.eval_every = 500 if not smoke else 2
  # Trained until val stops improving, as the benchmark: epochs of 5,000
  # queries (mining refreshed every 1,000), validation after each, stop after
  # 3 epochs without a better val R@5, at most 1000 epochs, constant rate.
  c.train.epoch_queries = 5000 if not smoke else 0
  c.train.patience = 3 if not smoke else 0
  c.train.max_epochs = 1000 if not smoke else 0
  c.seg.max_epochs = 0
  c.train.lr_schedule = "constant"
  c.train.select_metric = "R@5"                  # the benchmark's best_model rule
  c.train.log_every = 20 if not smoke else 1
  c.train.kmeans_images = 500 if not smoke else 16

  # Test database descriptors stream to disk (memory-mapped for the search).
  c.eval.batch_size = 32 if not smoke else 8
  c.eval.descriptors = "disk"
  return c

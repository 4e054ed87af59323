"""Worker for test_multihost.py's input test: one process of a 2-process
jax.distributed run on localhost, or the single-process reference.

Reads a layout (records when RECORDS is given) with this process's rows of
every global batch, and describes the training database with a tiny model.

Usage: python input_worker.py OUT.npz PROCESS_ID NUM_PROCESSES PORT ROOT [RECORDS]
"""

import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPEC = {"branch": "rgb", "view": "rgb", "backbone": "mobilenet_v2", "width": 0.35, "dim": 8,
        "num_clusters": 4, "blocks": [[1, 8, 1, 1], [2, 8, 1, 2]], "slme": "slme",
        "normalization": "imagenet", "image_size": [16, 16], "init": ""}


def main(out, process_id, num_processes, port, root, records_dir=""):
  import jax
  from structvpr_jax import mining, parallel
  from structvpr_jax.data import input_pipeline, layout
  from structvpr_jax.evaluation import Extractor
  from structvpr_jax.models import spec as model_spec
  if num_processes > 1:
    parallel.initialize_distributed(f"localhost:{port}", num_processes, process_id)
  split = layout.read_split(root, "train")
  if records_dir:
    split = dataclasses.replace(split, records=records_dir)
  images = input_pipeline.SplitImages(split, (16, 16), views=("rgb",), cache=False)
  miner = mining.NegativeMiner(split.query_utm, split.database_utm, num_negatives=2,
                               refresh_every=4, seed=3, strategy="random")
  batcher = input_pipeline.TripletBatcher(miner, images, 4, prefetch=2, num_threads=2,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count())
  got = list(batcher.epoch(0, None))
  mesh = parallel.make_mesh()
  assert mesh.size == 2, jax.devices()
  variables = parallel.replicate(model_spec.init_variables(SPEC, 0), mesh)
  extractor = Extractor(SPEC, mesh, per_device_batch=3)   # 13 images: a partial last batch
  desc = extractor(variables, images.sources["database"])
  np.savez(out, process_index=jax.process_index(), process_count=jax.process_count(),
           query_index=np.stack([b["query_index"] for b in got]),
           negative_index=np.stack([b["negative_index"] for b in got]),
           rgb=np.stack([b["rgb"] for b in got]), descriptors=desc,
           usable=miner.train_queries, steps=batcher.steps_per_epoch())


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5],
       *sys.argv[6:])

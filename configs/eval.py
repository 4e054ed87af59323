"""Evaluate an Orbax checkpoint directory: on a layout folder, or on two folders.

Commands:
  python -m structvpr_jax.main --config=configs/eval.py \
      --config.checkpoint=runs/distill/distill/checkpoints --config.data.root=runs/distill/data
  python -m structvpr_jax.main --config=configs/eval.py --config.checkpoint=CKPT \
      --config.eval.database_folder=DB_DIR --config.eval.queries_folder=Q_DIR \
      [--config.eval.num_preds_to_save=3] [--config.eval.save_only_wrong=True] \
      [--config.eval.save_descriptors=True] [--config.eval.no_labels=True]

Two folders: plain image folders named with UTM (`@east@north@...@.jpg`, the
datasets_vg convention; `eval.no_labels` for queries without it: predictions
only). Prints `< #queries: Q; #database: N >` and `R@1: .., R@5: .., R@10: ..,
R@20: ..` (percent); writes <workdir>/eval/<split or "folders">/recalls.json
(with the counts, radius, image size and a hash of both file lists), preds/NNN.jpg
+ NNN.txt and {database,queries}_descriptors.npy when asked. The images are
resized to the checkpoint's training size unless eval.image_size says
otherwise (then a warning: not comparable).
"""

from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.mode = "eval"
  c.data.name = "folder"
  c.eval.database_folder = ""     # two-folder form (with eval.queries_folder)
  c.eval.queries_folder = ""
  c.eval.no_labels = False        # queries without UTM: predictions only, no recalls
  c.eval.ground_truth = ""        # Patch-NetVLAD .npz (utmQ, utmDb in sorted-name order)
  c.eval.num_preds_to_save = 0    # K > 0: preds/NNN.jpg (query + top-K) and NNN.txt
  c.eval.save_only_wrong = False  # preds only for queries whose top-1 is wrong
  c.eval.save_descriptors = False
  c.eval.image_size = (0, 0)      # (0, 0) = the checkpoint's training size
  return c

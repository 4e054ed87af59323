"""Gardens Point day/night benchmark: baselines + the StructVPR pipeline.

  python experiments/gardens_point.py [--workdir runs/gardens_point] [--override k=v ...]

1. Runs `python -m structvpr_jax.main --config=configs/gardens_point.py`
   (stage-1 RGB from ImageNet, seg teacher, partition, distillation, test
   evaluation; finished stages are skipped, so the experiment resumes).
2. Evaluates two baselines on the same test places (100-199; day_left
   database, day_right / night_right queries, correct = within +-2 frames):
   - `pixel`: 64x32 grayscale, patch-normalised (8x8 patches to zero mean and
     unit variance; the SeqSLAM-style baseline of ../shared/data/README.md);
   - `imagenet_netvlad`: the RGB branch exactly as training starts it (ImageNet
     MobileNetV2 from the TFLite file, random 1x1 projection, NetVLAD from
     k-means on the training database), no training.
3. Writes experiments/results/gardens_point.{md,json}; the json is
   `{"unit": "fraction", "<method>": {"<traverse>": {"R@1", "R@5", "R@10"}}}`.

Selection (checkpoint = best val R@5, places 80-99) never looks at the test places.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from structvpr_jax import evaluation, files, parallel, train_lib  # noqa: E402
from structvpr_jax.data import input_pipeline, layout  # noqa: E402
from structvpr_jax.models import spec as model_spec  # noqa: E402
from structvpr_jax.workdir import Workdir  # noqa: E402

TRAVERSES = ("day_right", "night_right")
METHODS = (("pixel", "pixel baseline (64x32 patch-normalised)"),
           ("imagenet_netvlad", "ImageNet MobileNetV2 + k-means NetVLAD, untrained"),
           ("rgb", "stage-1 RGB (triplet, from ImageNet)"),
           ("seg", "seg teacher (SLME label maps)"),
           ("structvpr", "StructVPR-distilled RGB (sigmoid weights, ours)"))
NS = (1, 5, 10)


def load_config(overrides):
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", default=None, flag_values=fv)
  fv([sys.argv[0], f"--config={os.path.join(REPO, 'configs', 'gardens_point.py')}"]
     + [f"--config.{o}" for o in overrides])
  return fv.config


def patch_normalised(images: np.ndarray, size=(32, 64), patch: int = 8) -> np.ndarray:
  """uint8 [N, H, W, 3] -> float32 [N, 32 * 64] unit-norm pixel descriptors."""
  from PIL import Image
  out = []
  for im in images:
    g = np.asarray(Image.fromarray(im).convert("L").resize(size[::-1], Image.BILINEAR),
                   np.float32)
    h, w = g.shape
    p = g.reshape(h // patch, patch, w // patch, patch)
    p = (p - p.mean((1, 3), keepdims=True)) / (p.std((1, 3), keepdims=True) + 1e-6)
    out.append(p.reshape(-1))
  d = np.stack(out)
  return d / np.linalg.norm(d, axis=1, keepdims=True).clip(1e-12)


def fractions(report: dict) -> dict:
  per = report["per_condition"]
  return {t: {f"R@{n}": per[t][f"R@{n}"] / 100.0 for n in NS} for t in TRAVERSES}


def baselines(config, workdir: str) -> dict:
  root = Workdir(workdir).data
  split = "test"
  vs = layout.read_split(root, split)
  out = {}
  # Pixel baseline at the converted resolution.
  images = input_pipeline.SplitImages(vs, tuple(config.data.image_size), views=("rgb",))
  db = images.sources["database"].get("rgb", np.arange(vs.num_database))
  q = images.sources["queries"].get("rgb", np.arange(vs.num_queries))
  rep = evaluation.recall_report(patch_normalised(q), patch_normalised(db), vs.query_utm,
                               vs.database_utm, vs.query_notes(), NS, config.eval.radius)
  out["pixel"] = fractions(rep)
  # The RGB branch as training starts it.
  spec = model_spec.branch_spec(config, "rgb")
  mesh = parallel.make_mesh()
  tr = layout.read_split(root, "train")
  tr_images = input_pipeline.SplitImages(tr, spec["image_size"], views=("rgb",))
  variables = model_spec.init_variables(spec, config.seed)
  variables = train_lib.kmeans_netvlad(spec, variables, tr_images.sources["database"], mesh,
                                       config.train.kmeans_images, config.train.kmeans_per_image,
                                       config.seed, config.eval.batch_size)
  rep = evaluation.evaluate_split(spec, variables, root, split, mesh, config.eval.batch_size,
                                NS, config.eval.radius)
  out["imagenet_netvlad"] = fractions(rep)
  out["_init"] = spec["init"]
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/gardens_point")
  parser.add_argument("--override", nargs="*", default=[],
                      help="config overrides without the --config. prefix")
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results",
                                                    "gardens_point"))
  args = parser.parse_args()
  t0 = time.time()
  cmd = [sys.executable, "-m", "structvpr_jax.main", "--config=configs/gardens_point.py",
         f"--workdir={os.path.abspath(args.workdir)}"] + [f"--config.{o}" for o in args.override]
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, cwd=REPO, check=True)
  pipeline_s = time.time() - t0
  config = load_config(args.override)
  results = baselines(config, os.path.abspath(args.workdir))
  init = results.pop("_init")
  wd = Workdir(os.path.abspath(args.workdir))
  branches = files.read_json(wd.eval_summary)["branches"]
  for method, stage in (("rgb", "rgb"), ("seg", "seg"), ("structvpr", "distill")):
    results[method] = fractions(branches[stage])
  total_s = time.time() - t0
  stage_s = {}
  for stage in ("rgb", "seg", "distill"):
    stage_s[stage] = wd.done(stage).get("seconds_this_run")
  part = files.read_json(wd.partition_summary)
  stage_s["partition"] = part.get("seconds")
  groups = ", ".join(f"{g} {part[g]['count']}" for g in ("D1", "D2", "D3", "D4"))

  command = ("python experiments/gardens_point.py"
             + (f" --override {' '.join(args.override)}" if args.override else ""))
  lines = [
      "# Gardens Point Walking: day_left database, day_right / night_right queries",
      "",
      f"Command: `{command}` (pipeline: `python -m structvpr_jax.main "
      "--config=configs/gardens_point.py`).",
      "",
      "Test places 100-199 (100 database images, 100 queries per traverse); a query is "
      "correct when a retrieved frame is within +-2 frames. Checkpoints were selected on "
      f"val places 80-99 only. Input {tuple(config.data.image_size)} (H, W); RGB init "
      f"`{init or 'random'}`. Data: Glover 2014 (doi:10.5281/zenodo.4590133), label maps "
      "by the DeepLab MobileNet-EdgeTPU Cityscapes TFLite model. The partition criterion "
      "and Eq. 3 weighting are this project's reconstruction (docs/design.md), not the "
      "paper's published constants; these are our numbers, not the paper's.",
      f"Wall time of this invocation: pipeline {pipeline_s:.0f} s (stages already finished "
      f"in the workdir are skipped), total {total_s:.0f} s on {os.cpu_count()} CPU cores. "
      "Training time per stage as recorded in each stage's done.json (the run that "
      "trained it): " + ", ".join(f"{k} {v:.0f} s" for k, v in stage_s.items() if v) + ".",
      f"Partition of the 160 training queries: {groups}.",
      "",
      "| method | " + " | ".join(f"{t} R@1 | R@5 | R@10" for t in TRAVERSES) + " |",
      "|---|" + "---|---|---|" * len(TRAVERSES),
  ]
  for method, label in METHODS:
    cells = [f"{results[method][t][f'R@{n}']:.2f}" for t in TRAVERSES for n in NS]
    lines.append(f"| {label} (`{method}`) | " + " | ".join(cells) + " |")
  files.write_text(args.out + ".md", "\n".join(lines) + "\n")
  files.write_json(args.out + ".json", {"unit": "fraction", **{m: results[m] for m, _ in METHODS}},
                   sort_keys=False)
  print("\n".join(lines))


if __name__ == "__main__":
  main()

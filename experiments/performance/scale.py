"""Memory and time of a short stage-1 run as the training set grows.

  python experiments/performance/scale.py [--sizes 1000 4000 16000] [--workdir /tmp/scale]
                              [--format folder|array_record] [--image-size 480,640]

For each size N builds a layout folder of N training images (N/2 database,
N/2 queries 3 m from their place; places 30 m apart) as symbolic links to the
600 real Gardens Point frames (`../shared/data/gardens_point`, cycled), plus a
fixed val split (50 + 50), then runs the RGB stage exactly as a user would,

  /usr/bin/time -v python -m structvpr_jax.main --config=configs/rgb.py
      --config.data.name=folder --config.data.root=<layout> --config.data.image_size=480,640
      <the short-run overrides below>

and records its peak RSS ("Maximum resident set size"), wall time and how the
training images were checked (decoded up front or headers only). The run is
the same for every N (2 steps of 2 triplets x 6 images, mining refreshes of
64 queries against 64 candidates, k-means on 32 images, validation on the
same val split), so what differs is only what grows with the data.

Writes experiments/results/scale_<format>.{json,md}.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from structvpr_jax import files  # noqa: E402
from structvpr_jax.data import layout  # noqa: E402

SOURCE = os.path.join(REPO, "..", "shared", "data", "gardens_point", "images")
SHORT_RUN = ["--config.train.num_steps=2", "--config.train.eval_every=2",
             "--config.train.log_every=1", "--config.train.batch_size=2",
             "--config.train.refresh_every=64", "--config.train.num_candidates=64",
             "--config.train.kmeans_images=32", "--config.eval.batch_size=8"]
VAL_PLACES = 50


def build_layout(root: str, num_train: int) -> str:
  """Links: train N/2 database + N/2 queries, val 50 + 50 (written once)."""
  marker = os.path.join(root, "scale.json")
  if os.path.isfile(marker) and files.read_json(marker).get("num_train") == num_train:
    return root
  if os.path.exists(root):
    shutil.rmtree(root)
  frames = {t: sorted(glob.glob(os.path.join(SOURCE, t, "*.jpg")))
            for t in ("day_left", "day_right", "night_right")}
  if not frames["day_left"]:
    raise SystemExit(f"{SOURCE}: no Gardens Point frames")
  query_frames = frames["day_right"] + frames["night_right"]
  for split, places, east0 in (("train", num_train // 2, 0.0), ("val", VAL_PLACES, 1e6)):
    for role in layout.ROLES:
      os.makedirs(os.path.join(root, "images", split, role), exist_ok=True)
    for i in range(places):
      east, north = east0 + 30.0 * (i % 300), 30.0 * (i // 300)
      db = frames["day_left"][i % len(frames["day_left"])]
      q = query_frames[i % len(query_frames)]
      os.symlink(os.path.abspath(db), os.path.join(
          root, "images", split, "database", layout.format_name(east, north, note=f"p{i}")))
      os.symlink(os.path.abspath(q), os.path.join(
          root, "images", split, "queries", layout.format_name(east + 3.0, north,
                                                               note=f"p{i}")))
  files.write_json(marker, {"num_train": num_train})
  return root


def peak_rss_gb(stderr: str) -> float:
  m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
  return int(m.group(1)) / 2 ** 20 if m else float("nan")


def run(layout_root: str, workdir: str, image_size, data_format: str) -> dict:
  if os.path.exists(workdir):
    shutil.rmtree(workdir)
  cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "structvpr_jax.main",
         "--config=configs/rgb.py", f"--workdir={workdir}", "--config.data.name=folder",
         f"--config.data.root={layout_root}",
         f"--config.data.image_size=({image_size[0]},{image_size[1]})",
         f"--config.data.format={data_format}", *SHORT_RUN]
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  wall = time.time() - t0
  if proc.returncode != 0:
    raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                     f"{proc.stderr[-3000:]}")
  checked = ("headers" if "headers checked" in proc.stdout else
             "records" if "read from" in proc.stdout else "decoded")
  rates = [float(m) for m in re.findall(r"([\d.]+) img/s", proc.stdout)]
  return {"peak_rss_gb": round(peak_rss_gb(proc.stderr), 3), "wall_s": round(wall, 1),
          "checked": checked, "train_img_s": rates[-1] if rates else None}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
  parser.add_argument("--workdir", default="/tmp/scale")
  parser.add_argument("--format", default="folder", choices=["folder", "array_record"])
  parser.add_argument("--image-size", default="480,640")
  parser.add_argument("--out", default=None,
                      help="output stem (default experiments/results/scale_<format>)")
  args = parser.parse_args(argv)
  size = tuple(int(v) for v in args.image_size.split(","))
  args.out = args.out or os.path.join(REPO, "experiments", "results", f"scale_{args.format}")
  results = {}
  for n in args.sizes:
    root = build_layout(os.path.join(args.workdir, f"layout_{n}"), n)
    res = run(root, os.path.join(args.workdir, f"run_{n}_{args.format}"), size, args.format)
    decoded_gb = n * size[0] * size[1] * 3 / 2 ** 30
    results[str(n)] = dict(res, training_images=n, decoded_training_gb=round(decoded_gb, 2))
    print(json.dumps({str(n): results[str(n)]}), flush=True)
  out = {"image_size": list(size), "format": args.format, "short_run": SHORT_RUN,
         "results": results}
  files.write_json(args.out + ".json", out)
  lines = [f"# Stage-1 memory vs training-set size ({size[0]}x{size[1]}, {args.format})", "",
           "`python experiments/performance/scale.py` (a short RGB stage; the same work for every size).", "",
           "| training images | all decoded would be (GB) | checked up front | peak RSS (GB) "
           "| wall (s) |", "|---|---|---|---|---|"]
  for n, r in results.items():
    lines.append(f"| {n} | {r['decoded_training_gb']} | {r['checked']} | {r['peak_rss_gb']} "
                 f"| {r['wall_s']} |")
  files.write_text(args.out + ".md", "\n".join(lines) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

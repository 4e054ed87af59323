"""Gardens Point: how far do ImageNet features go, and does fine-tuning add?

  python experiments/gardens_point_ceiling.py [--quick] [--out experiments/results]

Never looks at the test places (100-199). Two parts:

1. Training-free descriptors on the non-test places 0-99 (day_left database,
   day_right / night_right queries, correct = within +-2 frames):
   ImageNet MobileNetV2 (the TFLite weights in the project's Flax model) at
   three input sizes, four depths (block12: stride 16, 96 ch; block15 /
   block16: stride 32; last: the 1x1 to 1280), GAP / GeM(p=3) pooling, four
   photometric preprocessings (none, histogram equalisation of RGB or of the
   luma, autocontrast), and a descriptor of the label maps alone (sqrt of
   per-cell class histograms on a grid: the structure the seg teacher sees).
2. Fine-tuning ablation: frozen ImageNet trunk up to block12 (its outputs
   cached once: what makes the ablation affordable), blocks 13-16 + last conv
   + 1x1 projection (128) + NetVLAD-32 (k-means init) trained with the triplet
   margin loss on places 0-49 (queries: day_right and night_right, positives
   within +-1 frame in day_left, negatives beyond +-2 frames), evaluated on
   places 50-99 every 50 steps. Variants: learning rate, head only, margin,
   random negatives, night_right -> day_right pairs, synthetic-night copies of
   day_right. The training runs on library code: `train_lib.make_optimizer`
   (the frozen blocks through its `trainable_mask`), `train_lib.TrainState`,
   `parallel.data_parallel_train_step` and `mining.NegativeMiner` (one per
   database traverse, frames on the converter's synthetic UTM).

Writes <out>/gardens_point_ceiling.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from structvpr_jax import files, losses, mining, parallel, retrieval, train_lib  # noqa: E402
from structvpr_jax.data import convert, input_pipeline, layout  # noqa: E402
from structvpr_jax.models import mobilenet, netvlad, pretrained  # noqa: E402
from structvpr_jax.models import spec as model_spec  # noqa: E402

SOURCE = os.path.join(REPO, "..", "shared", "data", "gardens_point")
TFLITE = os.path.join(REPO, "..", "shared", "data", "models", "mobilenet_v2_1.0_224_quant.tflite")
TRAVERSES = ("day_left", "day_right", "night_right")
QUERIES = ("day_right", "night_right")
LAYERS = ("block12", "block15", "block16", "last")
DEV_PLACES = np.arange(0, 100)          # never the test places 100-199
TOLERANCE = 2                           # frames (25 m at 10 m spacing)
RADIUS_M = 25.0

# Fine-tuning (part 2).
TRAIN_PLACES = np.arange(0, 50)
EVAL_PLACES = np.arange(50, 100)
BLOCKS = tuple((t, c, s if r == 0 else 1) for t, c, n, s in mobilenet.MOBILENET_V2_BLOCKS
               for r in range(n))       # one (expansion, channels, stride) per block
FIRST_HEAD_BLOCK = 13                   # the cached trunk ends at block12
BATCH = 8                               # triplets per step
NUM_NEGATIVES = 4
REFRESH_STEPS = 25                      # hard-negative cache refresh
EVAL_EVERY = 50


def frame_utm(places) -> np.ndarray:
  """[P, 2] the converter's synthetic UTM of frame indices (east 0, north 10 m * frame)."""
  return np.stack([np.zeros(len(places)),
                   convert.FRAME_SPACING_M * np.asarray(places, np.float64)], 1)


def recall_at(query: np.ndarray, database: np.ndarray, places: np.ndarray,
              ns=(1, 5)) -> dict:
  """R@N (fraction) of [P, D] query vs [P, D] database descriptors of the same
  places: cosine ranking, frames on the converter's synthetic UTM (10 m apart),
  correct within the 25 m radius (= +-2 frames), by `retrieval.recall_at_n`."""
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  utm = frame_utm(places)
  rec = retrieval.recall_at_n(unit(query), unit(database), utm, utm, ns, RADIUS_M)
  return {f"R@{n}": v / 100.0 for n, v in rec.items()}


def score(descriptors: dict, places: np.ndarray = DEV_PLACES) -> dict:
  """{query traverse: recall_at vs day_left} for {traverse: [P, D]} descriptors."""
  return {t: recall_at(descriptors[t], descriptors["day_left"], places) for t in QUERIES}


def preprocess(image, how: str):
  if how == "equalize":
    return ImageOps.equalize(image)
  if how == "equalize_luma":
    y, cb, cr = image.convert("YCbCr").split()
    return Image.merge("YCbCr", (ImageOps.equalize(y), cb, cr)).convert("RGB")
  if how == "autocontrast":
    return ImageOps.autocontrast(image, cutoff=1)
  return image


def load_images(traverse: str, size, how: str = "none") -> np.ndarray:
  """uint8 [200, H, W, 3]: every frame of a traverse, resized, preprocessed."""
  paths = convert.list_frames(os.path.join(SOURCE, "images", traverse))
  return np.stack([np.asarray(preprocess(Image.fromarray(input_pipeline.read_rgb(p, size)), how))
                   for p in paths])


class Trunk:
  """ImageNet MobileNetV2 (Flax, TFLite weights): uint8 images -> block outputs."""

  def __init__(self):
    self.variables = pretrained.load_mobilenet_v2_tflite(TFLITE, num_classes=None)
    model = mobilenet.MobileNetV2(last_activation=True)

    def features(x):
      x = model_spec.normalize_rgb(x, "tflite")     # the TFLite file's input range
      _, state = model.apply(self.variables, x, False, mutable=["intermediates"],
                             capture_intermediates=lambda m, n: m.name in LAYERS
                             and n == "__call__")
      return {k: state["intermediates"][k]["__call__"][0] for k in LAYERS}

    self._features = jax.jit(features)

  def __call__(self, images: np.ndarray, batch: int = 20) -> dict:
    parts = [self._features(images[i:i + batch]) for i in range(0, len(images), batch)]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in LAYERS}


def pool(features: np.ndarray, kind: str) -> np.ndarray:
  if kind == "gap":
    return features.mean((1, 2))
  return (np.maximum(features, 1e-6) ** 3).mean((1, 2)) ** (1 / 3)   # GeM p=3


def training_free(trunk: Trunk, sizes, log) -> list:
  rows = []
  for size in sizes:
    for how in (("none", "equalize", "equalize_luma", "autocontrast")
                if size == sizes[0] else ("none",)):
      feats = {t: trunk(load_images(t, size, how)) for t in TRAVERSES}
      for layer in LAYERS:
        for kind in ("gap", "gem"):
          if how != "none" and kind != "gap":
            continue
          row = {"size": list(size), "preprocess": how, "layer": layer, "pool": kind,
                 **score({t: pool(feats[t][layer][DEV_PLACES], kind) for t in TRAVERSES})}
          rows.append(row)
          log(f"{size} {how:13s} {layer:8s} {kind}: day_right R@1 "
              f"{row['day_right']['R@1']:.2f} night_right R@1 {row['night_right']['R@1']:.2f}")
  return rows


def label_map_descriptor(traverse: str, grid) -> np.ndarray:
  """sqrt of per-cell Cityscapes class frequencies of the shipped label maps."""
  out = []
  for i in DEV_PLACES:
    labels = input_pipeline.read_labels(os.path.join(SOURCE, "segmentations", traverse,
                                                     f"Image{i:03d}.png"), (36, 64)).astype(np.int64)
    h, w = labels.shape
    cells = []
    for a in range(grid[0]):
      for b in range(grid[1]):
        c = labels[a * h // grid[0]:(a + 1) * h // grid[0], b * w // grid[1]:(b + 1) * w // grid[1]]
        cells.append(np.bincount(c[c < 19].ravel(), minlength=19) / c.size)
    out.append(np.sqrt(np.concatenate(cells)))
  return np.asarray(out, np.float32)


def label_maps(log) -> list:
  rows = []
  for grid in ((1, 1), (2, 4), (4, 8)):
    row = {"grid": list(grid), **score({t: label_map_descriptor(t, grid) for t in TRAVERSES})}
    rows.append(row)
    log(f"label-map histogram {grid}: day_right R@1 {row['day_right']['R@1']:.2f} "
        f"night_right R@1 {row['night_right']['R@1']:.2f}")
  return rows


def synthetic_night(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Darkened copies: gamma 1.5-3, gain 0.3-0.9, warm cast, sensor noise."""
  x = images.astype(np.float32) / 255.0
  n = len(x)
  gamma = rng.uniform(1.5, 3.0, (n, 1, 1, 1))
  gain = rng.uniform(0.3, 0.9, (n, 1, 1, 1))
  cast = np.stack([np.ones(n), rng.uniform(0.7, 1.0, n), rng.uniform(0.4, 0.9, n)], 1)
  x = x ** gamma * gain * cast[:, None, None, :] + rng.normal(0, 0.015, x.shape)
  return (np.clip(x, 0, 1) * 255).astype(np.uint8)


# --------------------------------------------------------------------------
# Fine-tuning on the cached block12 features
# --------------------------------------------------------------------------
class Local(nn.Module):
  """block12 features -> blocks 13-16 and the last conv (BatchNorm frozen:
  running statistics), then a 1x1 projection to 128."""

  @nn.compact
  def __call__(self, x):
    for i in range(FIRST_HEAD_BLOCK, len(BLOCKS)):
      t, c, s = BLOCKS[i]
      x = mobilenet.InvertedResidual(c, t, s, name=f"block{i}")(x, False)
    x = mobilenet.ConvBN(1280, "pointwise", activation=False, name="last")(x, False)
    return nn.Dense(128, name="projection")(x)


class Head(nn.Module):
  """block12 features -> unit-norm NetVLAD-32 descriptor."""

  @nn.compact
  def __call__(self, x):
    return netvlad.NetVLAD(32, name="netvlad")(Local(name="local")(x))


HEAD = Head()


def init_head(trunk: Trunk, features: np.ndarray, seed: int, rng: np.random.Generator) -> dict:
  """Head variables: blocks 13-16 and last from the ImageNet trunk, a fresh
  projection (PRNGKey(seed)), NetVLAD from k-means on <= 4000 local features
  of `features` (day_left, training places), sampled with `rng`."""
  init = HEAD.init(jax.random.PRNGKey(seed), jnp.asarray(features[:1]))
  params = jax.tree.map(np.asarray, init["params"])
  stats = jax.tree.map(np.asarray, init["batch_stats"])
  for name in list(params["local"]):
    if name != "projection":   # host copies: the train step donates the state's buffers
      params["local"][name] = jax.tree.map(np.array, trunk.variables["params"][name])
      stats["local"][name] = jax.tree.map(np.array, trunk.variables["batch_stats"][name])
  local = np.asarray(Local().apply({"params": params["local"], "batch_stats": stats["local"]},
                                   jnp.asarray(features)))
  local = local.reshape(-1, local.shape[-1])
  local = local[rng.choice(len(local), min(len(local), 4000), replace=False)]
  params["netvlad"] = netvlad.init_from_kmeans(local, 32, seed=seed)
  return {"params": params, "batch_stats": stats}


def trainable_mask(params: dict, first_trainable: int) -> dict:
  """Bools shaped like the head's params: projection and NetVLAD always train;
  blocks >= `first_trainable` and the last conv (if `first_trainable` <= 17) too."""
  def trainable(name: str) -> bool:
    if name == "projection":
      return True
    if name == "last":
      return first_trainable <= len(BLOCKS)
    return int(name[len("block"):]) >= first_trainable

  return {"netvlad": jax.tree.map(lambda _: True, params["netvlad"]),
          "local": {name: jax.tree.map(lambda _, t=trainable(name): t, sub)
                    for name, sub in params["local"].items()}}


def make_loss_fn(margin: float, mask: Optional[dict] = None):
  """`loss_fn(params, batch_stats, batch, rng) -> (loss, (batch_stats, metrics))`
  for `parallel.data_parallel_train_step`: batch["features"] float32
  [B, 2 + M, h, w, 96] (query, positive, M negatives) cached block12 features;
  BatchNorm frozen, so the statistics pass through unchanged. Parameters
  False in `mask` (the optimizer's `trainable_mask`) enter through
  `stop_gradient`: zero gradients, and no backward pass through frozen blocks
  (the head-only variant would otherwise differentiate blocks 13-16 for nothing)."""
  def loss_fn(params, batch_stats, batch, rng):
    del rng
    if mask is not None:
      params = jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask)
    x = batch["features"]
    b, k = x.shape[:2]
    desc = HEAD.apply({"params": params, "batch_stats": batch_stats},
                      x.reshape((b * k,) + x.shape[2:])).reshape(b, k, -1)
    triplet = losses.triplet_margin_loss(desc[:, 0], desc[:, 1], desc[:, 2:], margin)
    return triplet, (batch_stats, {"triplet": triplet})
  return loss_fn


_describe_jit = jax.jit(HEAD.apply)


def describe(variables: dict, x: np.ndarray, batch: int = 50) -> np.ndarray:
  """[N, 4096] head descriptors of [N, h, w, 96] block12 features."""
  return np.concatenate([np.asarray(_describe_jit(variables, jnp.asarray(x[i:i + batch])))
                         for i in range(0, len(x), batch)])


def make_miner(num_query_traverses: int, seed: int, strategy: str) -> mining.NegativeMiner:
  """The miner of one database traverse's training places: queries = the
  training places of `num_query_traverses` traverses, concatenated; positives
  within 10 m (+-1 frame), negatives beyond 25 m (> `TOLERANCE` frames), every
  training place a candidate."""
  places = np.tile(TRAIN_PLACES, num_query_traverses)
  miner = mining.NegativeMiner(
      frame_utm(places), frame_utm(TRAIN_PLACES), num_negatives=NUM_NEGATIVES,
      num_candidates=len(TRAIN_PLACES), refresh_every=len(places),
      pos_radius=layout.TRAIN_POSITIVE_RADIUS, neg_radius=layout.NEGATIVE_RADIUS,
      seed=seed, strategy=strategy)
  assert len(miner.train_queries) == len(places)     # every query has positives and negatives
  return miner


def finetune(trunk: Trunk, cached: dict, extra_queries: dict, variant: dict, steps: int,
             seed: int = 0) -> list:
  """Trains the head on places 0-49; [{step, day_right, night_right}] on 50-99.

  Each step draws 8 (query, database traverse) pairs at random from the
  training pairs; every `REFRESH_STEPS` steps (every step for random
  negatives) one `mining.NegativeMiner` per database traverse re-mines all its
  queries (best positive within 10 m = +-1 frame, the 4 hardest negatives
  beyond 25 m = +-2 frames among all 50 training places) with the current
  parameters.
  """
  lr = variant.get("lr", 1e-5)
  feats = dict(cached)
  feats.update(extra_queries)
  rng = np.random.default_rng(seed)
  variables = init_head(trunk, feats["day_left"][TRAIN_PLACES], seed, rng)

  # Training queries per database traverse; pair order = the sampling order.
  query_traverses = {"day_left": list(QUERIES) + list(extra_queries)}
  if variant.get("cross_pairs"):
    query_traverses["day_right"] = ["night_right"]
  miners = {db: make_miner(len(traverses), seed, variant.get("mining", "hard"))
            for db, traverses in query_traverses.items()}
  query_feats = {db: np.concatenate([feats[t][TRAIN_PLACES] for t in traverses])
                 for db, traverses in query_traverses.items()}
  pairs = [(db, j) for db in miners for j in range(len(query_feats[db]))]
  refresh = REFRESH_STEPS if variant.get("mining", "hard") == "hard" else 1

  tc = {"num_steps": steps, "learning_rate": lr, "warmup_steps": 20, "final_lr_fraction": 0.01,
        "optimizer": "adam", "grad_clip": 1.0}
  mask = trainable_mask(variables["params"],
                        variant.get("first_trainable_block", FIRST_HEAD_BLOCK))
  tx, _ = train_lib.make_optimizer(tc, trainable_mask=mask)
  mesh = parallel.make_mesh()
  state = parallel.replicate(train_lib.new_state(variables, tx), mesh)
  train_step = parallel.data_parallel_train_step(
      make_loss_fn(variant.get("margin", 0.1), mask), mesh)
  root_rng = jax.random.PRNGKey(seed)

  def current():
    return {"params": state.params, "batch_stats": state.batch_stats}

  def evaluate():
    return score({t: describe(current(), feats[t][EVAL_PLACES]) for t in TRAVERSES}, EVAL_PLACES)

  history = [{"step": 0, **evaluate()}]
  mined = {}
  for step in range(1, steps + 1):
    if (step - 1) % refresh == 0:
      for db, miner in miners.items():
        db_feats = feats[db][TRAIN_PLACES]
        describe_role = lambda role, idx, q=query_feats[db], d=db_feats: describe(
            current(), (q if role == "queries" else d)[idx])
        mined[db] = miner.mine(miner.train_queries, 0, (step - 1) // refresh, describe_role)
    triplets = []
    for j in rng.choice(len(pairs), BATCH, replace=False):
      db, q = pairs[j]
      positive, negatives = mined[db][0][q], mined[db][1][q]
      triplets.append(np.concatenate([query_feats[db][q:q + 1],
                                      feats[db][TRAIN_PLACES][[positive, *negatives]]]))
    batch = parallel.shard_batch({"features": np.stack(triplets)}, mesh)
    state, metrics = train_step(state, batch, jax.random.fold_in(root_rng, step))
    if step % EVAL_EVERY == 0:
      history.append({"step": step, "loss": float(metrics["loss"]), **evaluate()})
  return history


VARIANTS = (
    ("lr 1e-4", {"lr": 1e-4}),
    ("lr 1e-5", {"lr": 1e-5}),
    ("lr 1e-5, head only (projection + NetVLAD)", {"lr": 1e-5, "first_trainable_block": 99}),
    ("lr 1e-4, margin 0.5", {"lr": 1e-4, "margin": 0.5}),
    ("lr 1e-4, random negatives", {"lr": 1e-4, "mining": "random"}),
    ("lr 1e-5, + night_right -> day_right pairs", {"lr": 1e-5, "cross_pairs": True}),
    ("lr 1e-5, + 4 synthetic-night copies of day_right", {"lr": 1e-5, "synthetic_night": 4}),
)


def write_markdown(path: str, result: dict) -> None:
  lines = ["# Gardens Point: ImageNet-feature ceiling and fine-tuning ablation (no test places)",
           "", f"Command: `{result['command']}` ({result['seconds']:.0f} s on 2 CPU cores).", "",
           "Correct = a retrieved day_left frame within +-2 frames. Never uses the test "
           "places 100-199.", "",
           "## 1. Training-free descriptors, places 0-99 (100 queries per traverse)", "",
           "| input (H, W) | preprocess | layer | pool | day_right R@1 | R@5 | night_right R@1 | R@5 |",
           "|---|---|---|---|---|---|---|---|"]
  for r in result["training_free"]:
    lines.append(f"| {tuple(r['size'])} | {r['preprocess']} | {r['layer']} | {r['pool']} | "
                 f"{r['day_right']['R@1']:.2f} | {r['day_right']['R@5']:.2f} | "
                 f"{r['night_right']['R@1']:.2f} | {r['night_right']['R@5']:.2f} |")
  lines += ["", "Label maps alone (sqrt class histograms per grid cell, the shipped "
            "DeepLab/Cityscapes maps):", "", "| grid | day_right R@1 | R@5 | night_right R@1 | R@5 |",
            "|---|---|---|---|---|"]
  for r in result["label_maps"]:
    lines.append(f"| {r['grid'][0]}x{r['grid'][1]} | {r['day_right']['R@1']:.2f} | "
                 f"{r['day_right']['R@5']:.2f} | {r['night_right']['R@1']:.2f} | "
                 f"{r['night_right']['R@5']:.2f} |")
  lines += ["", "## 2. Fine-tuning on places 0-49, evaluated on places 50-99 (50 queries per "
            "traverse, one query = 0.02)", "",
            "Input (144, 256); frozen trunk to block12; blocks 13-16, last conv, projection "
            "128 and NetVLAD-32 trained (batch 8 triplets, 4 negatives mined by "
            "`mining.NegativeMiner` every 25 steps, Adam, warmup 20, cosine, clip 1.0: "
            "`train_lib.make_optimizer`, `parallel.data_parallel_train_step`), R@1 "
            "day_right / night_right at each step:", "",
            "| variant | " + " | ".join(f"step {h['step']}" for h in
                                       next(iter(result["finetune"].values())))
            + " | last batch loss |",
            "|---|" + "---|" * (len(next(iter(result["finetune"].values()))) + 1)]
  for name, hist in result["finetune"].items():
    lines.append(f"| {name} | " + " | ".join(
        f"{h['day_right']['R@1']:.2f} / {h['night_right']['R@1']:.2f}" for h in hist)
        + f" | {hist[-1].get('loss', float('nan')):.4f} |")
  files.write_text(path, "\n".join(lines) + "\n")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default=os.path.join(REPO, "experiments", "results"))
  ap.add_argument("--steps", type=int, default=150)
  ap.add_argument("--quick", action="store_true", help="one size, two variants, 50 steps")
  args = ap.parse_args(argv)
  for path, what in ((os.path.join(SOURCE, "images"), "Gardens Point images"),
                     (os.path.join(SOURCE, "segmentations"), "Gardens Point label maps"),
                     (TFLITE, "ImageNet MobileNetV2 TFLite file")):
    if not os.path.exists(path):
      ap.error(f"{path}: {what} not found (see ../shared/data/README.md)")
  t0 = time.time()
  log = lambda msg: print(msg, flush=True)
  trunk = Trunk()
  sizes = [(144, 256)] if args.quick else [(144, 256), (224, 400), (288, 512)]
  result = {"unit": "fraction", "places": "dev 0-99; fine-tuning train 0-49, eval 50-99",
            "command": "python experiments/gardens_point_ceiling.py"
            + (" --quick" if args.quick else "") + (f" --steps {args.steps}"
                                                    if args.steps != 150 else "")}
  result["training_free"] = training_free(trunk, sizes, log)
  result["label_maps"] = label_maps(log)
  size = (144, 256)
  images = {t: load_images(t, size) for t in TRAVERSES}
  cached = {t: trunk(images[t])["block12"] for t in TRAVERSES}
  steps = 50 if args.quick else args.steps
  variants = VARIANTS[:2] if args.quick else VARIANTS
  result["finetune"] = {}
  for name, variant in variants:
    extra = {}
    for k in range(variant.get("synthetic_night", 0)):
      rng = np.random.default_rng(100 + k)
      extra[f"synthetic_night_{k}"] = trunk(synthetic_night(images["day_right"], rng))["block12"]
    hist = finetune(trunk, cached, extra, variant, steps)
    result["finetune"][name] = hist
    log(f"{name}: " + ", ".join(f"{h['step']}: {h['day_right']['R@1']:.2f}/"
                                 f"{h['night_right']['R@1']:.2f}" for h in hist))
  result["seconds"] = time.time() - t0
  base = os.path.join(args.out, "gardens_point_ceiling" + ("_quick" if args.quick else ""))
  files.write_json(base + ".json", result, indent=1, sort_keys=False)   # keys in run order
  write_markdown(base + ".md", result)
  log(f"wrote {base}.md / .json ({result['seconds']:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())

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
   cached), blocks 13-16 + last conv + 1x1 projection (128) + NetVLAD-32
   (k-means init) trained with the triplet margin loss on places 0-49
   (queries: day_right and night_right, positives within +-1 frame in
   day_left, negatives beyond +-2 frames), evaluated on places 50-99 every 50
   steps. Variants: learning rate, head-only, margin, random negatives,
   night_right -> day_right pairs, synthetic-night copies of day_right.

Writes <out>/gardens_point_ceiling.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SOURCE = os.path.join(REPO, "..", "shared", "data", "gardens_point")
TFLITE = os.path.join(REPO, "..", "shared", "data", "models", "mobilenet_v2_1.0_224_quant.tflite")
TRAVERSES = ("day_left", "day_right", "night_right")
QUERIES = ("day_right", "night_right")
LAYERS = ("block12", "block15", "block16", "last")
DEV_PLACES = np.arange(0, 100)          # never the test places 100-199
TOLERANCE = 2                           # frames (25 m at 10 m spacing)
RADIUS_M = 25.0


def recall_at(query: np.ndarray, database: np.ndarray, places: np.ndarray,
              ns=(1, 5)) -> dict:
  """R@N (fraction) of [P, D] query vs [P, D] database descriptors of the same
  places: cosine ranking, frames on the converter's synthetic UTM (10 m apart),
  correct within the 25 m radius (= +-2 frames), by `retrieval.recall_at_n`."""
  from structvpr_jax import retrieval
  from structvpr_jax.data import layout
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  utm = np.stack([np.zeros(len(places)), layout.FRAME_SPACING_M * np.asarray(places)], 1)
  rec = retrieval.recall_at_n(unit(query), unit(database), utm, utm, ns, RADIUS_M)
  return {f"R@{n}": v / 100.0 for n, v in rec.items()}


def score(descriptors: dict, places: np.ndarray = DEV_PLACES) -> dict:
  """{query traverse: recall_at vs day_left} for {traverse: [P, D]} descriptors."""
  return {t: recall_at(descriptors[t], descriptors["day_left"], places) for t in QUERIES}


def preprocess(image, how: str):
  from PIL import Image, ImageOps
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
  from PIL import Image
  from structvpr_jax.data import layout, pipeline
  paths = layout.list_frames(os.path.join(SOURCE, "images", traverse))
  return np.stack([np.asarray(preprocess(Image.fromarray(pipeline.read_rgb(p, size)), how))
                   for p in paths])


class Trunk:
  """ImageNet MobileNetV2 (Flax, TFLite weights): uint8 images -> block outputs."""

  def __init__(self):
    import jax
    import jax.numpy as jnp
    from structvpr_jax.data import pipeline
    from structvpr_jax.models import mobilenet, pretrained
    self.variables = pretrained.load_mobilenet_v2_tflite(TFLITE, num_classes=None)
    model = mobilenet.MobileNetV2(last_activation=True)

    def features(x):
      x = pipeline.normalize_rgb(x, "tflite")     # the TFLite file's input range
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
  from structvpr_jax.data import pipeline
  out = []
  for i in DEV_PLACES:
    labels = pipeline.read_labels(os.path.join(SOURCE, "segmentations", traverse,
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


def finetune(trunk: Trunk, cached: dict, extra_queries: dict, variant: dict, steps: int,
             seed: int = 0) -> list:
  """Trains the head on places 0-49; [{step, day_right, night_right}] on 50-99."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from structvpr_jax import losses
  from structvpr_jax.models import mobilenet, netvlad

  lr = variant.get("lr", 1e-5)
  margin = variant.get("margin", 0.1)
  hard = variant.get("mining", "hard") == "hard"
  first_trainable = variant.get("first_trainable_block", 13)
  blocks = [(t, c, s if r == 0 else 1) for t, c, n, s in mobilenet.MOBILENET_V2_BLOCKS
            for r in range(n)]

  class Local(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(13, len(blocks)):
        t, c, s = blocks[i]
        x = mobilenet.InvertedResidual(c, t, s, name=f"block{i}")(x, False)
      x = mobilenet.ConvBN(1280, "pointwise", activation=False, name="last")(x, False)
      return nn.Dense(128, name="projection")(x)

  class Head(nn.Module):
    @nn.compact
    def __call__(self, x):
      return netvlad.NetVLAD(32, name="netvlad")(Local(name="local")(x))

  feats = dict(cached)
  feats.update(extra_queries)
  train_places = np.arange(0, 50)
  eval_places = np.arange(50, 100)
  head = Head()
  init = head.init(jax.random.PRNGKey(seed), jnp.asarray(feats["day_left"][:1]))
  params = jax.tree.map(np.asarray, init["params"])
  stats = jax.tree.map(np.asarray, init["batch_stats"])
  for name in list(params["local"]):
    if name != "projection":
      params["local"][name] = trunk.variables["params"][name]
      stats["local"][name] = trunk.variables["batch_stats"][name]
  local = np.asarray(Local().apply({"params": params["local"], "batch_stats": stats["local"]},
                                   jnp.asarray(feats["day_left"][train_places])))
  local = local.reshape(-1, local.shape[-1])
  rng = np.random.default_rng(seed)
  local = local[rng.choice(len(local), min(len(local), 4000), replace=False)]
  params["netvlad"] = netvlad.init_from_kmeans(local, 32, seed=seed)

  def is_trainable(name):
    if name in ("projection", "netvlad"):
      return True
    if name == "last":
      return first_trainable <= len(blocks)
    return name.startswith("block") and int(name[5:]) >= first_trainable

  def split(p):
    flat = {("netvlad",): p["netvlad"], **{("local", k): v for k, v in p["local"].items()}}
    return ({k: v for k, v in flat.items() if is_trainable(k[-1])},
            {k: v for k, v in flat.items() if not is_trainable(k[-1])})

  def join(train_p, frozen_p):
    merged = {**train_p, **frozen_p}
    return {"netvlad": merged[("netvlad",)],
            "local": {k[1]: v for k, v in merged.items() if k[0] == "local"}}

  train_p, frozen_p = split(params)
  train_p = jax.tree.map(jnp.asarray, train_p)

  def forward(tp, x):
    return head.apply({"params": join(tp, frozen_p), "batch_stats": stats}, x)

  forward_jit = jax.jit(forward)

  def describe(tp, x):
    return np.concatenate([np.asarray(forward_jit(tp, jnp.asarray(x[i:i + 50])))
                           for i in range(0, len(x), 50)])

  def evaluate(tp):
    return score({t: describe(tp, feats[t][eval_places]) for t in TRAVERSES}, eval_places)

  pairs = [(t, i, "day_left") for t in QUERIES for i in train_places]
  pairs += [(t, i, "day_left") for t in extra_queries for i in train_places]
  if variant.get("cross_pairs"):
    pairs += [("night_right", i, "day_right") for i in train_places]
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, 20, steps, lr * 0.01)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  opt_state = tx.init(train_p)

  def loss_fn(tp, q, p, n):
    b, m = n.shape[:2]
    d = forward(tp, jnp.concatenate([q, p, n.reshape((-1,) + n.shape[2:])]))
    return losses.triplet_margin_loss(d[:b], d[b:2 * b], d[2 * b:].reshape(b, m, -1), margin)

  @jax.jit
  def step_fn(tp, opt_state, q, p, n):
    loss, grads = jax.value_and_grad(loss_fn)(tp, q, p, n)
    updates, opt_state = tx.update(grads, opt_state, tp)
    return optax.apply_updates(tp, updates), opt_state, loss

  history = [{"step": 0, **evaluate(train_p)}]
  cache = None
  for step in range(1, steps + 1):
    if hard and (step - 1) % 25 == 0:
      cache = {t: describe(train_p, feats[t][train_places]) for t in feats}
    q, p, n = [], [], []
    for j in rng.choice(len(pairs), 8, replace=False):
      traverse, i, db = pairs[j]
      positives = [k for k in train_places if abs(k - i) <= 1]
      negatives = np.array([k for k in train_places if abs(k - i) > TOLERANCE])
      if hard:
        sims = cache[db] @ cache[traverse][i]
        pos = max(positives, key=lambda k: sims[k])
        neg = negatives[np.argsort(-sims[negatives])[:4]]
      else:
        pos = rng.choice(positives)
        neg = rng.choice(negatives, 4, replace=False)
      q.append(feats[traverse][i])
      p.append(feats[db][pos])
      n.append(feats[db][neg])
    train_p, opt_state, loss = step_fn(train_p, opt_state, jnp.asarray(np.stack(q)),
                                       jnp.asarray(np.stack(p)), jnp.asarray(np.stack(n)))
    if step % 50 == 0:
      history.append({"step": step, "loss": float(loss), **evaluate(train_p)})
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
            "128 and NetVLAD-32 trained (batch 8 triplets, 4 negatives, Adam, warmup 20, "
            "cosine), R@1 day_right / night_right at each step:", "",
            "| variant | " + " | ".join(f"step {h['step']}" for h in
                                       next(iter(result["finetune"].values())))
            + " | last batch loss |",
            "|---|" + "---|" * (len(next(iter(result["finetune"].values()))) + 1)]
  for name, hist in result["finetune"].items():
    lines.append(f"| {name} | " + " | ".join(
        f"{h['day_right']['R@1']:.2f} / {h['night_right']['R@1']:.2f}" for h in hist)
        + f" | {hist[-1].get('loss', float('nan')):.4f} |")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(path + ".tmp", path)


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
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, "gardens_point_ceiling" + ("_quick" if args.quick else ""))
  with open(base + ".json.tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(base + ".json.tmp", base + ".json")
  write_markdown(base + ".md", result)
  log(f"wrote {base}.md / .json ({result['seconds']:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())

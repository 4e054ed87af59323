"""Training augmentation inside the jitted step (`train.augment`).

- "crop": random resized crop (area fraction U(scale), log aspect U(log 3/4,
  log 4/3) relative to the image's, position uniform), resampled back to the
  full size: bilinear for RGB, nearest for label maps, with the **same box**
  for an image's RGB and its label map (the seg teacher of stage 2 sees what
  the student sees).
- "color": colour jitter of RGB in this order: brightness (x * U(1 ± b)),
  contrast (blend with the image's mean grey by U(1 ± c)), saturation
  (blend with its greyscale by U(1 ± s)), hue (rotation of the YIQ chroma by
  U(± h) turns); clipped to [0, 255].

Every image has its own key; keys come from per-query seeds made on the host
(`image_keys`), so the augmentation does not depend on the device count.
Evaluation never augments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

OPS = ("crop", "color")
_GREY = jnp.array([0.299, 0.587, 0.114], jnp.float32)
_RGB_TO_YIQ = jnp.array([[0.299, 0.587, 0.114],
                         [0.595716, -0.274453, -0.321263],
                         [0.211456, -0.522591, 0.311135]], jnp.float32)
_YIQ_TO_RGB = jnp.linalg.inv(_RGB_TO_YIQ)


def parse_ops(spec: str) -> tuple:
  """"crop,color" -> ("crop", "color"); "" / "none" -> (); ValueError naming
  the field for an unknown op."""
  ops = tuple(o.strip() for o in (spec or "").split(",") if o.strip() and o.strip() != "none")
  bad = [o for o in ops if o not in OPS]
  if bad:
    raise ValueError(f"train.augment={spec!r}: unknown op(s) {bad}; expected a comma list of "
                     f"{OPS} or ''")
  return ops


def image_keys(seeds: jax.Array, per_seed: int) -> jax.Array:
  """Keys [len(seeds) * per_seed]: image j of seed s gets fold_in(key(s), j)."""
  base = jax.vmap(jax.random.PRNGKey)(seeds.astype(jnp.uint32))
  return jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(
      jnp.arange(per_seed)))(base).reshape((-1,) + base.shape[1:])


def crop_box(key, height: int, width: int, scale=(0.6, 1.0)) -> jax.Array:
  """[y0, x0, crop_h, crop_w] float32 of a random resized crop."""
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1])
  log_ratio = jax.random.uniform(k_ratio, (), minval=jnp.log(3 / 4), maxval=jnp.log(4 / 3))
  ratio = jnp.exp(log_ratio)
  ch = jnp.minimum(height * jnp.sqrt(area / ratio), height)
  cw = jnp.minimum(width * jnp.sqrt(area * ratio), width)
  y0 = jax.random.uniform(k_y, ()) * (height - ch)
  x0 = jax.random.uniform(k_x, ()) * (width - cw)
  return jnp.stack([y0, x0, ch, cw]).astype(jnp.float32)


def _source_coords(box, height: int, width: int):
  """Source (y [H], x [W]) of each output pixel centre for a crop box."""
  y0, x0, ch, cw = box[0], box[1], box[2], box[3]
  ys = y0 + (jnp.arange(height, dtype=jnp.float32) + 0.5) * ch / height - 0.5
  xs = x0 + (jnp.arange(width, dtype=jnp.float32) + 0.5) * cw / width - 0.5
  return ys, xs


def crop_resize_bilinear(image: jax.Array, box: jax.Array) -> jax.Array:
  """[H, W, C] float -> the box resampled to [H, W, C] (bilinear, edge clamp)."""
  h, w = image.shape[:2]
  ys, xs = _source_coords(box, h, w)
  ys, xs = jnp.clip(ys, 0, h - 1), jnp.clip(xs, 0, w - 1)
  y_lo, x_lo = jnp.floor(ys).astype(jnp.int32), jnp.floor(xs).astype(jnp.int32)
  y_hi, x_hi = jnp.minimum(y_lo + 1, h - 1), jnp.minimum(x_lo + 1, w - 1)
  wy, wx = (ys - y_lo)[:, None, None], (xs - x_lo)[None, :, None]
  top = image[y_lo][:, x_lo] * (1 - wx) + image[y_lo][:, x_hi] * wx
  bottom = image[y_hi][:, x_lo] * (1 - wx) + image[y_hi][:, x_hi] * wx
  return top * (1 - wy) + bottom * wy


def crop_resize_nearest(labels: jax.Array, box: jax.Array) -> jax.Array:
  """[H, W] class ids -> the box resampled to [H, W] (nearest, edge clamp)."""
  h, w = labels.shape[:2]
  ys, xs = _source_coords(box, h, w)
  yi = jnp.clip(jnp.round(ys), 0, h - 1).astype(jnp.int32)
  xi = jnp.clip(jnp.round(xs), 0, w - 1).astype(jnp.int32)
  return labels[yi][:, xi]


def color_jitter(key, rgb: jax.Array, strength=(0.3, 0.3, 0.3, 0.05)) -> jax.Array:
  """[H, W, 3] float in [0, 255] -> jittered, clipped to [0, 255]."""
  b, c, s, h = strength
  kb, kc, ks, kh = jax.random.split(key, 4)
  u = lambda k, a: jax.random.uniform(k, (), minval=1 - a, maxval=1 + a)  # noqa: E731
  x = rgb * u(kb, b)
  grey = x @ _GREY
  x = (x - jnp.mean(grey)) * u(kc, c) + jnp.mean(grey)
  grey = (x @ _GREY)[..., None]
  x = grey + (x - grey) * u(ks, s)
  theta = 2 * jnp.pi * jax.random.uniform(kh, (), minval=-h, maxval=h)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  rotate = jnp.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]], jnp.float32)
  x = x @ (_YIQ_TO_RGB @ rotate @ _RGB_TO_YIQ).T
  return jnp.clip(x, 0.0, 255.0)


def augment_images(keys: jax.Array, images: jax.Array, view: str, ops: tuple,
                   scale=(0.6, 1.0), strength=(0.3, 0.3, 0.3, 0.05)) -> jax.Array:
  """Augments a batch of one view.

  Args:
    keys: [N] per-image keys (`image_keys`); the same keys give the same crop
      boxes for "rgb" and "seg".
    images: "rgb" uint8 [N, H, W, 3] or "seg" uint8 [N, H, W] class ids.
    ops: subset of `OPS` (colour applies to "rgb" only).

  Returns:
    "rgb": float32 [N, H, W, 3] in [0, 255]; "seg": uint8 [N, H, W].
  """
  if view == "rgb":
    x = images.astype(jnp.float32)
    if "crop" in ops:
      x = jax.vmap(lambda k, im: crop_resize_bilinear(
          im, crop_box(jax.random.fold_in(k, 0), im.shape[0], im.shape[1], scale)))(keys, x)
    if "color" in ops:
      x = jax.vmap(lambda k, im: color_jitter(jax.random.fold_in(k, 1), im, strength))(keys, x)
    return x
  if "crop" in ops:
    return jax.vmap(lambda k, im: crop_resize_nearest(
        im, crop_box(jax.random.fold_in(k, 0), im.shape[0], im.shape[1], scale)))(keys, images)
  return images

"""Descriptors of many images (data parallel) and Recall@N reports.

- `Extractor(spec, mesh, per_device_batch)(variables, source, indices)`:
  float32 [n, D] global descriptors, one compile for any number of images;
  `extractor_from_config` builds it from eval.batch_size / eval.micro_batch.
- `describe_split`: database and query descriptors of one layout split.
- `recall_report`: R@N overall and per query condition (percent).
- `RecallEvaluator(spec, root, split, mesh, ...).run(variables)`: the one
  evaluator used by validation during training, the final evaluation and
  eval mode (big_vision style: build once, run on any parameters).
- `pca_from_config`: PCA(-whitening) fitted on the train split when
  `eval.pca_dim` asks for it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
from absl import logging
from tqdm import tqdm

from structvpr_jax import files, parallel, rerank, retrieval, slme, whitening
from structvpr_jax.data import input_pipeline, layout
from structvpr_jax.models import mobilenet, spec as model_spec
from structvpr_jax.models.netvlad import NetVLAD


DESCRIPTOR_STORES = ("memory", "disk")          # eval.descriptors
DESCRIPTOR_DTYPES = ("float32", "float16")       # eval.descriptor_dtype
# eval.micro_batch = 0 on the CPU: chunks of at most this many pixels
# (images x H x W). With the native fused blocks
# (`ops.fused.fused_inverted_residual`) the largest activation evaluation
# writes is the stem's output (32 channels at H/2 x W/2: 32 bytes per input
# pixel), ~32 MB for a chunk of 2^20 pixels, about a server core complex's
# L3 cache. Measured (experiments/performance/bench.py's `forward_*_whole` lever and
# paired_ratio's `*_both_whole` rows, 2026-12-03): 16 images at 224 in one
# chunk 1.08-1.15x faster than in chunks of 4 (the earlier 2^18); at 480x640
# chunks of 1 and the whole batch equal on one host, the whole batch 1.10x
# faster on another (AMD EPYC family 25 model 17). Since then only the
# half-resolution layers go in chunks where the blocks are fused
# (`MobileNetV2.__call__`'s micro_batch: the stem and the blocks reading its
# output; the rest, at 1/4 resolution and below, on the whole batch): on
# that host 1.02-1.15x faster than whole-network chunks of 2 at 480x640,
# within 0.97-0.98 of the whole batch (in-process, interleaved; bitwise the
# whole batch's descriptors). Before the fused blocks the block-1 expansion
# (96 channels at H/2 x W/2) was written whole and 2^18 pixels was the
# better limit; without the native kernels it still is by ~4 % at 224 (kept
# simple: the limit depends on nothing but these numbers).
MICRO_BATCH_PIXELS = 1 << 20


def micro_batch_size(per_device_batch: int, image_size, requested: int = 0,
                     backend: Optional[str] = None) -> int:
  """Images per `lax.map` chunk inside one device's extraction batch.

  `requested` > 0: that many (it must divide `per_device_batch`). 0 (auto):
  on the CPU backend the largest divisor of `per_device_batch` whose chunk
  holds at most `MICRO_BATCH_PIXELS` pixels (at least 1 image); on GPU/TPU
  the whole batch (their parallelism wants it). Depends only on these
  arguments, never on the device count, so descriptors stay bitwise equal
  on 1 and on 8 devices.
  """
  per_device_batch, requested = int(per_device_batch), int(requested)
  if requested < 0:
    raise ValueError(f"eval.micro_batch={requested} must be 0 (auto) or positive")
  if requested:
    if per_device_batch % requested:
      raise ValueError(f"eval.micro_batch={requested} must divide the per-device extraction "
                       f"batch eval.batch_size={per_device_batch}")
    return requested
  if (backend or jax.default_backend()) != "cpu":
    return per_device_batch
  pixels = int(np.prod(image_size))
  fits = [d for d in range(1, per_device_batch + 1)
          if per_device_batch % d == 0 and d * pixels <= MICRO_BATCH_PIXELS]
  return max(fits, default=1)


def apply_in_chunks(fn: Callable, x, chunk: int):
  """`fn(x)` computed `chunk` rows at a time (`lax.map`: one compiled body,
  run len(x) / chunk times), rows concatenated; `fn` maps [n, ...] to
  [n, ...] row by row (inference: no batch statistics). `chunk` must divide
  len(x); chunk >= len(x) is `fn(x)` itself."""
  n = x.shape[0]
  if chunk >= n:
    return fn(x)
  out = jax.lax.map(fn, x.reshape((n // chunk, chunk) + x.shape[1:]))
  return jax.tree.map(lambda o: o.reshape((n,) + o.shape[2:]), out)


class Extractor:
  """Global descriptors of many images, data parallel over a mesh.

  Batches have a fixed size, `per_device_batch` images on every device (the
  last batch is padded and its padding dropped), so the function compiles
  once and each device runs the same program whatever the device count:
  descriptors are bitwise equal on 1 and on 8 devices. Each device runs its
  batch `micro_batch` images at a time (`micro_batch_size`: 0 = auto, which
  on the CPU keeps a chunk's activations cache-sized): with the native fused
  blocks (`Branch.fuses_blocks`) only the half-resolution layers, the
  rest on the whole batch (descriptors bitwise the whole batch's);
  otherwise the whole network (`apply_in_chunks`; equal to the whole
  batch's up to float rounding).
  """

  def __init__(self, spec: dict, mesh, per_device_batch: int = 32, micro_batch: int = 0,
               local: Optional[rerank.Settings] = None):
    self.spec = spec
    self.mesh = mesh
    per_device_batch = max(1, int(per_device_batch))
    self.batch_size = per_device_batch * mesh.size
    self.micro_batch = micro_batch = micro_batch_size(per_device_batch, spec["image_size"],
                                                      micro_batch)
    model = model_spec.build_model(spec)
    # With `local` (re-ranking settings) the same jitted pass also returns the
    # local features (`Branch.describe`): (global, float16 local, keep).
    self.local = local
    self.layout = None if local is None else local_layout(spec, local)

    def embed_chunk(variables, x, micro_batch=0):
      if local is not None:
        return describe_with_local(model, spec, variables, x, local, self.layout.cells,
                                   micro_batch)
      return model.apply(variables, model_spec.model_input(spec, x), train=False,
                         micro_batch=micro_batch)

    if model.fuses_blocks():
      # Native fused layers: only the half-resolution layers in chunks
      # (`mobilenet.MobileNetV2.__call__`).
      def embed(variables, x):    # micro_batch >= the batch: one plain call
        return embed_chunk(variables, x, micro_batch)
    else:
      def embed(variables, x):
        return apply_in_chunks(lambda xs: embed_chunk(variables, xs), x, micro_batch)

    self._apply = parallel.data_parallel_apply(embed, mesh)

  def __call__(self, variables, source: input_pipeline.ImageSource, indices=None,
               progress: bool = False, desc: str = "extract",
               allocate: Optional[Callable[[int, int], Any]] = None,
               allocate_local: Optional[Callable[[int, tuple, tuple], tuple]] = None):
    """float32 [n, D] for `indices` (default all) of `source`.

    `variables` should be replicated on the mesh (`parallel.replicate`).
    Images stream through a Grain iterator (`input_pipeline.stream`), two
    batches read ahead; on several hosts each process reads only its rows of
    every global batch and the descriptors are gathered to all processes.
    `allocate`: (n, D) -> an array to write into instead (e.g. a float16
    `np.lib.format.open_memmap`: descriptors stream to disk, host memory
    stays one batch), called at the first batch; that array is returned.

    With `local` settings the result is (global [n, D] as above, local
    float16 [n, P, F], keep int32 [n, P]) (`Branch.describe`);
    `allocate_local`: (n, (P, F), (P,)) -> (features, keep) arrays to write
    into instead (memmaps on disk), like `allocate`.
    """
    indices = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
    view = self.spec["view"]
    bs = self.batch_size
    rows = input_pipeline.local_rows(bs, jax.process_index(), jax.process_count())
    starts = list(range(0, len(indices), bs))
    shape = tuple(self.spec["image_size"]) + ((3,) if view == "rgb" else ())

    def load(i):
      idx = indices[starts[i]:starts[i] + bs][rows]
      x = source.get(view, idx) if len(idx) else np.zeros((0,) + shape, np.uint8)
      padded, _ = parallel.pad_to_multiple(x, rows.stop - rows.start)
      return padded, min(bs, len(indices) - starts[i])

    bar = progress_bar(len(indices), desc) if progress else None
    chunks, out = [], None
    local_chunks, local_out = [], None
    done = 0
    for padded, n in input_pipeline.stream(load, len(starts), 2):
      desc_b = self._apply(variables, parallel.shard_batch(padded, self.mesh))
      if jax.process_count() > 1:
        desc_b = multihost_utils.process_allgather(desc_b, tiled=True)
      if self.local is not None:
        desc_b, feat_b, keep_b = (np.asarray(a)[:n] for a in jax.device_get(desc_b))
        if allocate_local is not None:
          if local_out is None:
            local_out = allocate_local(len(indices), feat_b.shape[1:], keep_b.shape[1:])
          local_out[0][done:done + n] = feat_b
          local_out[1][done:done + n] = keep_b
        else:
          local_chunks.append((feat_b, keep_b))
      desc_b = np.asarray(jax.device_get(desc_b))[:n]
      if allocate is not None:
        if out is None:
          out = allocate(len(indices), desc_b.shape[1])
        out[done:done + n] = desc_b
      else:
        chunks.append(desc_b)
      done += n
      if bar is not None:
        bar.update(n)
    if bar is not None:
      bar.close()
    if out is None:
      out = (np.concatenate(chunks).astype(np.float32) if chunks
             else np.zeros((0, 0), np.float32))
    if self.local is None:
      return out
    if local_out is None:
      local_out = ((np.concatenate([c[0] for c in local_chunks]),
                    np.concatenate([c[1] for c in local_chunks])) if local_chunks else
                   (np.zeros((0, 0, 0), np.float16), np.zeros((0, 0), np.int32)))
    return out, local_out[0], local_out[1]


def extractor_from_config(config, spec: dict, mesh, local: bool = False) -> Extractor:
  """The `Extractor` of eval.batch_size images per device, run
  eval.micro_batch at a time (0 = auto); `local`: with the local features
  of `rerank_settings(config)` when re-ranking is on."""
  return Extractor(spec, mesh, config.eval.batch_size,
                   int(config.eval.get("micro_batch", 0) or 0),
                   local=rerank_settings(config) if local else None)


def rerank_settings(config) -> Optional[rerank.Settings]:
  """`rerank.Settings` from eval.rerank, eval.rerank_topk, eval.rerank_features,
  eval.rerank_patch_sizes / _patch_strides / _patch_weights,
  eval.rerank_max_features, eval.rerank_geometry, eval.rerank_ransac_threshold,
  eval.rerank_global_weight; None when eval.rerank is "none" (or absent). Checked (`rerank.check_settings`)."""
  ev = config.eval
  method = ev.get("rerank", "none") or "none"
  if method == "none":
    return None
  sizes = tuple(int(p) for p in (ev.get("rerank_patch_sizes", (1,)) or ()))
  strides = tuple(int(p) for p in (ev.get("rerank_patch_strides", ()) or ())) or (1,) * len(sizes)
  settings = rerank.Settings(
      method=method, topk=int(ev.get("rerank_topk", 100)),
      features=ev.get("rerank_features", "local") or "local",
      layer=ev.get("rerank_layer", "final") or "final", patch_sizes=sizes,
      strides=strides, weights=tuple(float(w) for w in (ev.get("rerank_patch_weights", ())
                                                         or ())),
      max_features=int(ev.get("rerank_max_features", 0) or 0),
      geometry=ev.get("rerank_geometry", "homography") or "homography",
      ransac_threshold=float(ev.get("rerank_ransac_threshold", 1.5)),
      global_weight=float(ev.get("rerank_global_weight", 0.0) or 0.0))
  rerank.check_settings(settings)
  return settings


def rerank_block(spec: dict, layer: str) -> str:
  """The backbone module whose output `eval.rerank_layer` names: "" for
  "final" (the projected local features), else "block<i>", the last block
  whose output lies at that stride (MobileNetV2: stride16 = block12, 96
  channels at width 1)."""
  if layer == "final":
    return ""
  if layer not in rerank.LAYERS:
    raise ValueError(f"eval.rerank_layer={layer!r}; expected one of {rerank.LAYERS}")
  stride = int(layer[len("stride"):])
  kwargs = {"blocks": tuple(tuple(b) for b in spec["blocks"])} if spec.get("blocks") else {}
  backbone = mobilenet.get_backbone(spec["backbone"], width=float(spec["width"]),
                                    output_stride=int(spec.get("output_stride", 32) or 32),
                                    **kwargs)
  found = [index for index, _, _, s, in_stride in backbone._block_table()
           if in_stride * s == stride]
  if not found:
    raise ValueError(f"eval.rerank_layer={layer!r}: the {spec['branch']} branch's "
                     f"{spec['backbone']} has no block at stride {stride}")
  return f"block{found[-1]}"


def describe_with_local(model, spec: dict, variables, x, settings: rerank.Settings,
                        cells, micro_batch: int = 0):
  """(global [B, K * D], local float16 [B, P, F], keep int32 [B, P]) of uint8
  images `x` in one pass of the branch (`Branch.global_and_local`; a
  backbone block's output taken on the way with flax's capture_intermediates
  for eval.rerank_layer != "final"; `rerank.describe_windows`)."""
  inp = model_spec.model_input(spec, x)
  block = rerank_block(spec, settings.layer)
  if block:
    (global_desc, _), state = model.apply(
        variables, inp, train=False, micro_batch=micro_batch, method="global_and_local",
        capture_intermediates=lambda m, _: m.name == block, mutable=["intermediates"])
    features = state["intermediates"]["encoder"][block]["__call__"][0]
  else:
    global_desc, features = model.apply(variables, inp, train=False, micro_batch=micro_batch,
                                        method="global_and_local")
  aggregate = None
  if settings.features == "patchnetvlad":
    vlad = NetVLAD(int(spec["num_clusters"]))
    aggregate = lambda w: vlad.apply({"params": variables["params"]["netvlad"]}, w)  # noqa: E731
  local, keep = rerank.describe_windows(features, cells, settings.features, aggregate,
                                        int(settings.max_features))
  return global_desc, local, keep


def local_layout(spec: dict, settings: rerank.Settings) -> rerank.Layout:
  """The windows of a branch's local feature map at its image size (the
  map's size from the model itself, `jax.eval_shape`: no compute)."""
  model = model_spec.build_model(spec)
  x = jax.ShapeDtypeStruct(model_spec.raw_input_shape(spec), np.uint8)
  block = rerank_block(spec, settings.layer)

  def shape(x):
    out, state = model.init_with_output(
        jax.random.PRNGKey(0), model_spec.model_input(spec, x), train=False,
        method="global_and_local", capture_intermediates=lambda m, _: m.name == block)
    return state["intermediates"]["encoder"][block]["__call__"][0] if block else out[1]

  out = jax.eval_shape(shape, x)
  return rerank.make_layout(spec["image_size"], out.shape[1:3], settings.patch_sizes,
                            settings.strides)


def progress_bar(total: int, desc: str):
  """A tqdm bar in images, shown only on a terminal."""
  return tqdm(total=total, desc=desc, unit="img", disable=not sys.stderr.isatty(),
              leave=False)


def recall_report(q_desc, db_desc, query_utm, db_utm, notes: Optional[Sequence[str]] = None,
                  ns=(1, 5, 10, 20), radius: float = 25.0,
                  index: Optional[dict] = None, predictions=None) -> dict:
  """{"R@n": percent, ..., "per_condition": {note: {...}}, counts, and the private
  "_predictions" int [Q, max(ns)] and "_hits" {n: bool [Q]} (a positive in the top n).

  `index`: keyword arguments of `retrieval.search` (e.g. {"index": "ivf_pq",
  "nprobe": 16}); None = exact search. Recorded in the report as "index".
  `predictions`: int [Q, >= max(ns)] rankings already made (e.g. re-ranked):
  no search, only their first max(ns) columns are scored.
  """
  index = dict(index or {})
  if predictions is None:
    _, predictions = retrieval.search(q_desc, db_desc, max(ns), **index)
  else:
    predictions = np.asarray(predictions)[:, :max(ns)]
  overall = retrieval.recall_from_predictions(predictions, query_utm, db_utm, ns, radius)
  found = np.cumsum(retrieval.correct_at_k(predictions, query_utm, db_utm, radius), axis=1) > 0
  report = {f"R@{n}": v for n, v in overall.items()}
  report.update(num_queries=int(len(predictions)), num_database=int(len(db_utm)),
                index=index.get("index", "flat"))
  if index.get("index", "flat") == "ivf_pq" and db_desc is not None:
    report["index_params"] = dict(
        retrieval.ivf_pq_params(len(db_desc), int(np.shape(db_desc)[1]),
                                int(index.get("nlist", 0)), int(index.get("pq_m", 0))),
        nprobe=int(index.get("nprobe", 16)))
  if notes is not None:
    notes = np.asarray(list(notes))
    per = {}
    for note in sorted(set(notes.tolist())):
      sel = notes == note
      rec = retrieval.recall_from_predictions(predictions[sel], np.asarray(query_utm)[sel],
                                              db_utm, ns, radius)
      per[note or "all"] = {f"R@{n}": v for n, v in rec.items()}
      per[note or "all"]["num_queries"] = int(sel.sum())
    report["per_condition"] = per
  report["_predictions"] = predictions
  report["_hits"] = {int(n): found[:, min(int(n), found.shape[1]) - 1] for n in ns}
  return report


def describe_split(spec: dict, variables, vs: layout.VprSplit, mesh, batch_size: int = 32,
                   progress: bool = False, extractor: Optional[Extractor] = None,
                   cache: bool = False, label: str = "", store: Optional[str] = None,
                   dtype: str = "float32") -> dict:
  """{"database": [N, D], "queries": [Q, D]} descriptors of one split.

  In memory (float32) by default. With `store` (a folder) each role streams
  to `<store>/<role>.npy` as `dtype` ("float32" or "float16"; written under a
  temporary name, renamed when complete) and is returned memory-mapped, so
  host memory holds one batch of descriptors, not the database's.
  """
  images = input_pipeline.SplitImages(vs, spec["image_size"], views=(spec["view"],),
                                      cache=cache, num_classes=slme.NUM_CITYSCAPES_CLASSES)
  extractor = extractor or Extractor(spec, mesh, batch_size)
  replicated = parallel.replicate(variables, mesh)
  if dtype not in DESCRIPTOR_DTYPES:
    raise ValueError(f"eval.descriptor_dtype={dtype!r}; expected one of {DESCRIPTOR_DTYPES}")
  with_local = extractor.local is not None
  out = {"local": {}} if with_local else {}
  for role in ("database", "queries"):
    desc = f"{label} {role}".strip()
    if store is None:
      res = extractor(replicated, images.sources[role], progress=progress, desc=desc)
      if with_local:
        res, feats, keep = res
        out["local"][role] = (feats, keep)
      out[role] = res
      continue
    path = os.path.join(store, f"{role}.npy")
    local_paths = local_feature_paths(store, role)

    def write(tmp, tmp_feat=None, tmp_keep=None, role=role, desc=desc):
      def allocate_local(n, feat_shape, keep_shape):
        return (np.lib.format.open_memmap(tmp_feat, "w+", np.float16, (n,) + tuple(feat_shape)),
                np.lib.format.open_memmap(tmp_keep, "w+", np.int32, (n,) + tuple(keep_shape)))
      res = extractor(replicated, images.sources[role], progress=progress, desc=desc,
                      allocate=lambda n, d: np.lib.format.open_memmap(tmp, "w+", dtype, (n, d)),
                      allocate_local=allocate_local if with_local else None)
      for arr in (res if with_local else (res,)):
        if hasattr(arr, "flush"):
          arr.flush()
      del res

    if parallel.is_main_process():
      if with_local:   # the local features first, the global descriptors last
        files.atomic_write(path, lambda tmp: files.atomic_write(
            local_paths[0], lambda tf: files.atomic_write(
                local_paths[1], lambda tk: write(tmp, tf, tk))))
        files.write_json(os.path.join(store, "local_layout.json"),
                         local_meta(extractor.layout, extractor.local))
      else:
        files.atomic_write(path, write)
    else:   # every process takes part in the extraction; process 0 writes
      extractor(replicated, images.sources[role], desc=desc)
    parallel.sync(f"descriptors {desc}")
    out[role] = np.load(path, mmap_mode="r")
    if with_local:
      out["local"][role] = load_local_features(store, role)
  return out


def local_feature_paths(store: str, role: str) -> tuple:
  """(<store>/<role>_local.npy: float16 [n, P, F], <store>/<role>_local_keep.npy:
  int32 [n, P] layout indices) of one role's local features on disk."""
  return (os.path.join(store, f"{role}_local.npy"), os.path.join(store, f"{role}_local_keep.npy"))


def load_local_features(store: str, role: str) -> tuple:
  """(features, keep) of one role as memory maps; a missing or inconsistent
  file is an error naming it."""
  feat_path, keep_path = local_feature_paths(store, role)
  for p in (feat_path, keep_path):
    if not os.path.exists(p):
      raise ValueError(f"{p}: missing (local features for re-ranking; rerun the extraction)")
  feats, keep = np.load(feat_path, mmap_mode="r"), np.load(keep_path, mmap_mode="r")
  if feats.ndim != 3 or keep.shape != feats.shape[:2]:
    raise ValueError(f"{feat_path}: local features of shape {feats.shape} do not match "
                     f"{keep_path} {keep.shape}")
  return feats, keep


def local_meta(layout: rerank.Layout, settings: rerank.Settings) -> dict:
  """What the stored local features are (local_layout.json)."""
  return {"layout": layout.to_json(), "features": settings.features,
          "max_features": int(settings.max_features), "dtype": "float16"}


class RecallEvaluator:
  """Recall@N of one layout split for any parameters of one branch.

  Built once (reads and checks the split, compiles the extractor on first
  use); `run(variables)` describes the split and returns the report dict:
  "R@n" (percent), "per_condition", counts, "extract_s", "split",
  "descriptor_dim", and the private "_predictions" int [Q, max(ns)].
  """

  def __init__(self, spec: dict, root: str, split: str, mesh, batch_size: int = 32,
               ns=(1, 5, 10, 20), radius: float = 25.0, progress: bool = False,
               extractor: Optional[Extractor] = None, cache: bool = False,
               index: Optional[dict] = None, vs: Optional[layout.VprSplit] = None,
               store: Optional[str] = None, dtype: str = "float32"):
    self.spec, self.root, self.split, self.mesh = spec, root, split, mesh
    self.store, self.dtype = store, dtype
    self.index = index
    self.batch_size, self.ns, self.radius = batch_size, tuple(ns), float(radius)
    self.progress, self.cache = progress, cache
    self.extractor = extractor or Extractor(spec, mesh, batch_size)
    self.vs = vs if vs is not None else layout.read_split(
        root, split, require_segmentations=spec["view"] == "seg")
    where = f"{root}/images/{split}" if vs is None else os.path.dirname(vs.query_paths[0])
    without = layout.queries_without_positives(self.vs, radius)
    if len(without) == len(self.vs.query_utm):
      raise ValueError(f"{where}: none of the {len(without)} queries has a "
                       f"database image within {radius} m (eval.radius); check the UTM in "
                       f"the file names")
    if len(without):
      logging.warning("%s: %d of %d queries have no database image within %.0f m; "
                      "they count as misses", where, len(without),
                      len(self.vs.query_utm), radius)
    self.num_without_positive = int(len(without))

  def run(self, variables, pca: Optional[dict] = None) -> dict:
    """The recall report of host `variables`; `pca`: a `whitening.fit` result
    applied to queries and database before the search.

    With an extractor of local features (`Extractor(local=...)`) the report
    also holds "_rerank": the same report for the re-ranked top-K
    (`rerank_report`), "_local" the split's local features and "_search"
    {"distances", "predictions"} the search as deep as the re-ranking's
    top-K (what `rerank_report` takes, for other settings of the same
    features)."""
    t0 = time.perf_counter()
    descs = describe_split(self.spec, variables, self.vs, self.mesh, self.batch_size,
                           self.progress, self.extractor, self.cache, label=self.split,
                           store=self.store, dtype=self.dtype)
    extract_s = time.perf_counter() - t0
    q, db = descs["queries"], descs["database"]
    if pca is not None:
      q, db = whitening.apply(pca, q), whitening.apply(pca, db)
    settings = self.extractor.local
    predictions = distances = None
    if settings is not None:    # one search deep enough for both rankings
      distances, predictions = retrieval.search(q, db, max(max(self.ns), settings.topk),
                                                **(self.index or {}))
    report = recall_report(q, db, self.vs.query_utm, self.vs.database_utm,
                           self.vs.query_notes(), self.ns, self.radius, self.index,
                           predictions=predictions)
    report["extract_s"] = extract_s
    report["split"] = self.split
    report["num_queries_without_positive"] = self.num_without_positive
    report["descriptor_dim"] = int(q.shape[1])
    report["_descriptors"] = {"queries": q, "database": db}
    if settings is not None:
      report["_local"] = descs["local"]
      report["_search"] = {"distances": distances, "predictions": predictions}
      report["_rerank"] = rerank_report(
          predictions, descs["local"], self.extractor.layout, settings, self.vs,
          self.ns, self.radius, self.index, global_distances=distances)
    return report


def rerank_report(predictions, local: dict, layout: rerank.Layout,
                  settings: rerank.Settings, vs: layout.VprSplit, ns=(1, 5, 10, 20),
                  radius: float = 25.0, index: Optional[dict] = None,
                  global_distances=None) -> dict:
  """`recall_report` of the re-ranked global predictions (int [Q, >= K]),
  with "rerank": {settings, "ms_per_query", "local_bytes_per_image",
  "num_local_features", "local_dim"}, and the private "_predictions" (the
  whole re-ranked list), "_global_rank" (int [Q, W]: 1-based global rank of
  each re-ranked prediction) and "_scores". `global_distances`: the search's
  distances aligned with `predictions` (settings.global_weight > 0 needs
  them). ms_per_query leaves compilation out: the first query is re-ranked
  once before the timed run (the jitted matching compiles per K and feature
  count)."""
  if len(predictions):
    rerank.rerank(np.asarray(predictions)[:1], local["queries"], local["database"], layout,
                  settings, global_distances=None if global_distances is None else
                  np.asarray(global_distances)[:1])
  res = rerank.rerank(predictions, local["queries"], local["database"], layout, settings,
                      global_distances=global_distances)
  new = res["predictions"]
  report = recall_report(None, None, vs.query_utm, vs.database_utm, vs.query_notes(), ns,
                         radius, index, predictions=new)
  feats = local["database"][0]
  report["rerank"] = dict(
      dataclasses.asdict(settings), layout=layout.to_json(),
      ms_per_query=1000.0 * res["seconds"] / max(len(new), 1),
      num_local_features=int(feats.shape[1]), local_dim=int(feats.shape[2]),
      local_bytes_per_image=rerank.bytes_per_image(feats.shape[1], feats.shape[2]))
  report["num_database"] = int(len(vs.database_utm))
  report["_predictions"] = new
  report["_global_rank"] = global_ranks(predictions, new)
  report["_scores"] = res["scores"]
  return report


def global_ranks(global_predictions, reranked) -> np.ndarray:
  """int [Q, W]: the 1-based rank each re-ranked prediction had in the
  global list (0 where it was not in it)."""
  g = np.asarray(global_predictions)
  out = np.zeros(np.shape(reranked), np.int64)
  for i, row in enumerate(np.asarray(reranked)):
    pos = {int(d): r + 1 for r, d in enumerate(g[i]) if d >= 0}
    out[i] = [pos.get(int(d), 0) for d in row]
  return out


def evaluate_split(spec: dict, variables, root: str, split: str, mesh, batch_size: int = 32,
                   ns=(1, 5, 10, 20), radius: float = 25.0, progress: bool = False,
                   extractor: Optional[Extractor] = None, cache: bool = False,
                   pca: Optional[dict] = None) -> dict:
  """One-off `RecallEvaluator(...).run(variables, pca)`."""
  return RecallEvaluator(spec, root, split, mesh, batch_size, ns, radius, progress, extractor,
                         cache).run(variables, pca)


def index_from_config(config) -> dict:
  """`retrieval.search` keywords from eval.index / eval.ivf_nlist / eval.pq_m /
  eval.nprobe (the test evaluation; validation always searches exactly)."""
  return {"index": config.eval.get("index", "flat") or "flat",
          "nlist": int(config.eval.get("ivf_nlist", 0) or 0),
          "pq_m": int(config.eval.get("pq_m", 0) or 0),
          "nprobe": int(config.eval.get("nprobe", 16) or 16),
          "block_rows": int(config.eval.get("search_block_rows", 0) or 0)}


def pca_from_config(config, spec: dict, variables, root: str, mesh,
                    progress: bool = False) -> Optional[dict]:
  """None when `eval.pca_dim` is 0, else PCA(-whitening, `eval.pca_whiten`) to
  eval.pca_dim fitted on the train split's descriptors (database and
  queries) of the model; see `whitening.fit`."""
  dim = int(config.eval.get("pca_dim", 0) or 0)
  if dim < 0:
    raise ValueError(f"eval.pca_dim={dim} must be 0 (off) or positive")
  if dim == 0:
    return None
  vs = layout.read_split(root, "train", require_segmentations=spec["view"] == "seg")
  descs = describe_split(spec, variables, vs, mesh, config.eval.batch_size, progress,
                         extractor_from_config(config, spec, mesh), label="train")
  return whitening.fit(np.concatenate([descs["database"], descs["queries"]]), dim,
                       bool(config.eval.get("pca_whiten", True)))


def public(report: dict) -> dict:
  """The report without private (underscore) entries, JSON-able."""
  return {k: v for k, v in report.items() if not k.startswith("_")}

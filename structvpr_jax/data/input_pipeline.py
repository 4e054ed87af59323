"""Training and extraction input: decoded images, triplet batches, prefetch.

Images travel to the device as uint8 (3-4x less host->device traffic than
float32); RGB normalisation (`models.spec.normalize_rgb`) and SLME encoding
(`structvpr_jax.slme.encode`) run inside the jitted step. Decoded, resized
images are cached in host memory (uint8) up to a byte budget (`LruCache`,
`data.cache_gb`; least recently used out first), so memory does not grow
with the number of images; decoding runs on a thread pool (PIL releases the
GIL) and Grain iterators (`stream`) assemble the next batches on threads
while the device trains on the current one; their state goes into the
checkpoint. With `data.format="array_record"` the pixels come from
pre-resized records (`records.py`) instead of the files: same bytes.

Multi-host: every process mines the same triplets (the extractor gathers
descriptors to all processes) and assembles only its rows of each global
batch (`local_rows`).

Triplet batches (one per step, `TripletBatcher`), all numpy:
  query_index    int64 [B]
  positive_index int64 [B]         best positive (database index)
  negative_index int64 [B, M]      hard negatives (database indices)
  rgb            uint8 [B, 2+M, H, W, 3]   (q, p, n_1..n_M) when "rgb" in views
  seg            uint8 [B, 2+M, H, W]      label maps when "seg" in views
"""

from __future__ import annotations

import collections
import concurrent.futures
import sys
import threading
from typing import Callable, Iterator, Optional, Sequence

import grain
import numpy as np
from tqdm import tqdm

from structvpr_jax.data import records
from structvpr_jax.data.decode import check_header, read_labels, read_rgb  # noqa: F401  (re-exported)

VIEWS = ("rgb", "seg")


class LruCache:
  """Decoded arrays under a byte budget, least recently used evicted first.

  Thread-safe; shared by the sources of a split. `max_bytes=None` keeps
  everything (no eviction).
  """

  def __init__(self, max_bytes: Optional[int] = None):
    if max_bytes is not None and max_bytes < 0:
      raise ValueError(f"cache budget must be >= 0 bytes, got {max_bytes}")
    self.max_bytes = max_bytes
    self.bytes = 0
    self.evictions = 0
    self._items: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._items)

  def get(self, key):
    with self._lock:
      value = self._items.get(key)
      if value is not None:
        self._items.move_to_end(key)
      return value

  def put(self, key, value: np.ndarray) -> None:
    size = int(value.nbytes)
    with self._lock:
      if key in self._items or (self.max_bytes is not None and size > self.max_bytes):
        return
      self._items[key] = value
      self.bytes += size
      while self.max_bytes is not None and self.bytes > self.max_bytes:
        _, old = self._items.popitem(last=False)
        self.bytes -= int(old.nbytes)
        self.evictions += 1


class ImageSource:
  """Resized uint8 images (and label maps) of one list of paths, cached.

  Args:
    paths: image paths.
    seg_paths: label-map paths in the same order, or None.
    image_size: (H, W).
    cache: keep decoded images in memory (uint8): True (in `lru`, or an own
      unbounded cache), False (decode on every use).
    num_classes: label ids must be < this (None: unchecked).
    pool: shared thread pool for decoding.
    lru: a shared `LruCache` (its byte budget bounds the memory).
    records: a `records.RoleRecords` holding these images pre-resized: read
      from it instead of decoding the files (same bytes).
  """

  def __init__(self, paths: Sequence[str], seg_paths: Optional[Sequence[str]], image_size,
               cache: bool = True, num_classes: Optional[int] = None,
               pool: Optional[concurrent.futures.Executor] = None,
               lru: Optional[LruCache] = None, records=None):
    self.paths = list(paths)
    self.records = records
    if records is not None and len(records) != len(self.paths):
      raise ValueError(f"{records.path}: {len(records)} records for {len(self.paths)} images")
    self.seg_paths = None if seg_paths is None else list(seg_paths)
    self.image_size = (int(image_size[0]), int(image_size[1]))
    self.cache = cache
    self.num_classes = num_classes
    self._pool = pool
    self._lru = (lru if lru is not None else LruCache()) if cache else None

  def __len__(self) -> int:
    return len(self.paths)

  def _load(self, view: str, index: int) -> np.ndarray:
    key = (id(self), view, index)
    if self._lru is not None:
      hit = self._lru.get(key)
      if hit is not None:
        return hit
    if self.records is not None:
      rgb, seg = self.records.read(index)
      if view == "seg" and seg is None:
        raise ValueError(f"{self.records.path}: the seg branch needs label maps, but these "
                         "records hold none (export them after running the segment config)")
      arr = rgb if view == "rgb" else seg
    elif view == "rgb":
      arr = read_rgb(self.paths[index], self.image_size)
    else:
      if self.seg_paths is None:
        raise ValueError(f"{self.paths[index]}: the seg branch needs label maps, but this "
                         "split has no segmentations/ tree (run the segment config)")
      arr = read_labels(self.seg_paths[index], self.image_size, self.num_classes)
    if self._lru is not None:
      self._lru.put(key, arr)
    return arr

  def check_headers(self, view: str) -> None:
    """`check_header` of every image ("rgb") or label map ("seg")."""
    if view == "seg" and self.seg_paths is None:
      raise ValueError(f"{self.paths[0] if self.paths else '?'}: the seg branch needs label "
                       "maps, but this split has no segmentations/ tree (run the segment config)")
    paths = self.paths if view == "rgb" else self.seg_paths
    if self._pool is not None:
      list(self._pool.map(lambda p: check_header(p, view == "seg"), paths))
    else:
      for p in paths:
        check_header(p, view == "seg")

  def get(self, view: str, indices) -> np.ndarray:
    """uint8 [n, H, W, 3] ("rgb") or [n, H, W] ("seg") for `indices`."""
    if view not in VIEWS:
      raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    indices = [int(i) for i in np.asarray(indices).reshape(-1)]
    if self._pool is not None and len(indices) > 1:
      arrays = list(self._pool.map(lambda i: self._load(view, i), indices))
    else:
      arrays = [self._load(view, i) for i in indices]
    if not arrays:
      shape = self.image_size + ((3,) if view == "rgb" else ())
      return np.zeros((0,) + shape, np.uint8)
    return np.stack(arrays)


class SplitImages:
  """The database and query `ImageSource`s of a `layout.VprSplit`."""

  def __init__(self, split, image_size, views: Sequence[str] = ("rgb",), cache: bool = True,
               num_classes: Optional[int] = None, num_threads: int = 2,
               cache_bytes: Optional[int] = None):
    for v in views:
      if v not in VIEWS:
        raise ValueError(f"unknown view {v!r}; expected one of {VIEWS}")
    if "seg" in views and split.database_seg_paths is None:
      raise ValueError(f"{split.root}: the seg branch needs label maps but "
                       f"segmentations/{split.split} is missing (run the segment config)")
    self.views = tuple(views)
    self.image_size = (int(image_size[0]), int(image_size[1]))
    self.pool = concurrent.futures.ThreadPoolExecutor(max(1, num_threads))
    self.cache = LruCache(cache_bytes) if cache else None
    self.format = "array_record" if split.records else "folder"
    recs = (records.open_split(split, split.records, self.image_size) if split.records
            else {"database": None, "queries": None})
    self.sources = {
        "database": ImageSource(split.database_paths, split.database_seg_paths, image_size,
                                cache, num_classes, self.pool, self.cache, recs["database"]),
        "queries": ImageSource(split.query_paths, split.query_seg_paths, image_size,
                               cache, num_classes, self.pool, self.cache, recs["queries"]),
    }

  def decoded_bytes(self) -> int:
    """Bytes of every view of every image, decoded and resized (uint8)."""
    h, w = self.image_size
    per = {"rgb": h * w * 3, "seg": h * w}
    return sum(len(src) for src in self.sources.values()) * sum(per[v] for v in self.views)

  def prepare(self, progress: bool = False) -> str:
    """Checks every file before compute: decodes them all into the cache when
    they fit its budget ("decoded", today's behaviour for small datasets, and
    every pixel is checked), else reads only their headers ("headers", time
    proportional to the file count; a file that fails to decode later stops
    the run naming it), or, reading records, nothing more (their manifest was
    checked against the file list when opened; pixels were checked at export):
    "records". Returns which it did."""
    if self.cache is not None and (self.cache.max_bytes is None
                                   or self.decoded_bytes() <= self.cache.max_bytes):
      self.load_all(progress)
      return "decoded"
    if self.format == "array_record":
      if "seg" in self.views:
        for src in self.sources.values():
          if not src.records.has_seg:
            raise ValueError(f"{src.records.path}: the seg branch needs label maps, but these "
                             "records hold none (export them after the segment config)")
      return "records"
    for src in self.sources.values():
      for v in self.views:
        src.check_headers(v)
    return "headers"

  def load_all(self, progress: bool = False) -> int:
    """Decodes every image (and label map) of every view once, up front.

    Bad input (corrupt JPEG, missing label map, label id out of range) then
    fails with its file named before any compute is spent, instead of hours
    into a run; with `cache` the decoded arrays are kept for training.
    Returns the number of arrays decoded.
    """
    total = sum(len(src) for src in self.sources.values()) * len(self.views)
    bar = None
    if progress:
      bar = tqdm(total=total, desc="decode", unit="img", leave=False,
                 disable=not sys.stderr.isatty())
    for src in self.sources.values():
      for v in self.views:
        for start in range(0, len(src), 64):
          idx = np.arange(start, min(start + 64, len(src)))
          arrays = src.get(v, idx)
          if bar is not None:
            bar.update(len(arrays))
          del arrays
    if bar is not None:
      bar.close()
    return total

  def get(self, role: str, indices, views: Optional[Sequence[str]] = None) -> dict:
    """{view: uint8 array} for images `indices` of `role`."""
    return {v: self.sources[role].get(v, indices) for v in (views or self.views)}


def triplet_arrays(images: SplitImages, query_index, positive_index, negative_index) -> dict:
  """Assembles one triplet batch dict (see module docstring)."""
  query_index = np.asarray(query_index, np.int64)
  positive_index = np.asarray(positive_index, np.int64)
  negative_index = np.asarray(negative_index, np.int64)
  b, m = negative_index.shape
  batch = {"query_index": query_index, "positive_index": positive_index,
           "negative_index": negative_index}
  q = images.get("queries", query_index)
  db = images.get("database", np.concatenate([positive_index[:, None], negative_index],
                                             axis=1).reshape(-1))
  for v in images.views:
    qv = q[v][:, None]
    dbv = db[v].reshape((b, 1 + m) + db[v].shape[1:])
    batch[v] = np.concatenate([qv, dbv], axis=1)
  return batch


def stream(make: Callable[[int], dict], count: int, depth: int, num_threads: int = 1,
           start: int = 0):
  """A Grain iterator over make(0..count-1) from index `start`, in order.

  `grain.MapDataset.range(count).map(make)`, read by `num_threads` threads
  that compute up to `depth` items ahead (depth 0: computed when asked for,
  no threads). Its `get_state()` is {"next_index": i}, the consumer's
  position (not the read-ahead), and `set_state` resumes there: this is
  the input iterator state a checkpoint stores. An exception in `make`
  (an image that fails to decode, naming the file) is raised to the consumer.
  """
  ds = grain.MapDataset.range(int(count)).map(make)
  threads = max(1, int(num_threads)) if depth > 0 else 0
  it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                 prefetch_buffer_size=max(0, int(depth)))))
  if start:
    it.set_state({"next_index": int(start)})
  return it


def local_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  """This process's contiguous rows of a global batch (multi-host input: each
  process reads only its share; `parallel.shard_batch` puts the shares
  together in process order)."""
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} does not divide by the "
                     f"{process_count} processes")
  n = global_batch // process_count
  return slice(process_index * n, (process_index + 1) * n)


class TripletBatcher:
  """Mined triplet batches for one epoch, chunk by chunk.

  For every chunk of `miner.refresh_every` queries (seeded order), the miner
  refreshes its cache with `describe` (current parameters), then the chunk's
  queries are cut into global batches of `batch_size` (remainder dropped:
  static shapes, no recompilation). This process assembles only its rows of
  each global batch (`local_rows`), through a Grain iterator (`stream`) whose
  threads read and decode ahead while the device trains.

  `state()` is the input position to store with a checkpoint: {"epoch",
  "chunk", "next_index"} (the Grain iterator's state inside the chunk);
  `epoch(epoch, describe, start_step)` continues there (the iterator is set
  to `next_index` with Grain's `set_state`).
  """

  def __init__(self, miner, images: SplitImages, batch_size: int, prefetch: int = 2,
               num_threads: int = 1, process_index: int = 0, process_count: int = 1):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if miner.refresh_every < batch_size:
      raise ValueError(f"mining refresh_every ({miner.refresh_every}) must be >= the "
                       f"batch size ({batch_size})")
    self.miner = miner
    self.images = images
    self.batch_size = int(batch_size)
    self.rows = local_rows(self.batch_size, process_index, process_count)
    self.prefetch = int(prefetch)
    self.num_threads = int(num_threads)
    self._position = None   # (epoch, chunk, grain iterator, its batches, first step)

  def steps_per_epoch(self) -> int:
    sizes = [len(c) for c in self.miner.chunks(0)]
    return int(sum(s // self.batch_size for s in sizes))

  def state(self) -> Optional[dict]:
    """{"epoch", "chunk", "next_index"} of the next batch, None before the first."""
    if self._position is None:
      return None
    epoch, chunk, it, num_batches, chunk_start = self._position
    next_index = int(it.get_state()["next_index"])
    if next_index >= num_batches:   # chunk finished: the next one's first batch
      return self.position_of(epoch * self.steps_per_epoch() + chunk_start + num_batches)
    return {"epoch": epoch, "chunk": chunk, "next_index": next_index}

  def position_of(self, step: int) -> dict:
    """The `state()` a run that has taken `step` steps is at."""
    per_epoch = self.steps_per_epoch()
    epoch, within = divmod(int(step), per_epoch)
    for chunk_index, chunk in enumerate(self.miner.chunks(epoch)):
      num_batches = len(chunk) // self.batch_size
      if within < num_batches:
        return {"epoch": epoch, "chunk": chunk_index, "next_index": within}
      within -= num_batches
    raise AssertionError("unreachable")

  def epoch(self, epoch: int, describe: Callable, start_step: int = 0) -> Iterator[dict]:
    """Yields this process's batches of `epoch` from step `start_step` (resume)."""
    step = 0
    for chunk_index, chunk in enumerate(self.miner.chunks(epoch)):
      num_batches = len(chunk) // self.batch_size
      if num_batches == 0:        # a last chunk shorter than a batch: dropped, not mined
        continue
      if step + num_batches <= start_step:
        step += num_batches
        continue
      chunk = chunk[:num_batches * self.batch_size]
      positive, negatives = self.miner.mine(chunk, epoch, chunk_index, describe)
      first = max(0, start_step - step)
      bs, rows = self.batch_size, self.rows

      def make(i, chunk=chunk, positive=positive, negatives=negatives):
        sl = slice(i * bs + rows.start, i * bs + rows.stop)
        return triplet_arrays(self.images, chunk[sl], positive[sl], negatives[sl])

      it = stream(make, num_batches, self.prefetch, self.num_threads, start=first)
      self._position = (epoch, chunk_index, it, num_batches, step)
      yield from it
      step += num_batches

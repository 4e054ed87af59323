"""Every file the project writes goes through here: write to a temporary name
in the destination folder, then `os.replace` it into place, so a reader (or a
resumed run) sees either the previous file or the complete new one, never a
half-written one. The metrics writer appends whole lines.

This is the only module with temp-then-rename code (figures go through
`atomic_write` from `report.save_figure`); it imports nothing from the
package, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from structvpr_jax import events


def _tmp_name(path: str) -> str:
  """A temporary name beside `path` keeping its extension (PIL, numpy and
  matplotlib choose the format from it)."""
  stem, ext = os.path.splitext(path)
  return f"{stem}.tmp{os.getpid()}{ext}"


def atomic_write(path: str, write: Callable[[str], Any]) -> str:
  """Calls `write(tmp_path)`, then renames the temporary file to `path`.

  The parent folder is created. On any error the temporary file is removed
  and `path` is left as it was. Returns `path`.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = _tmp_name(path)
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_text(path: str, text: str) -> str:
  def write(tmp):
    with open(tmp, "w") as f:
      f.write(text)
  return atomic_write(path, write)


def write_json(path: str, obj, indent: int = 2, sort_keys: bool = True) -> str:
  """JSON with sorted keys (stable diffs); numpy scalars become Python numbers."""
  return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys,
                                     default=_json_default))


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def save_npy(path: str, array) -> str:
  def write(tmp):
    with open(tmp, "wb") as f:   # a file object: np.save would append ".npy" to a name
      np.save(f, np.asarray(array))
  return atomic_write(path, write)


def save_npz(path: str, **arrays) -> str:
  def write(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
  return atomic_write(path, write)


def save_image(path: str, array, quality: int = 95) -> str:
  """uint8 [H, W, 3] or [H, W] as an image; the format follows the extension
  (JPEG at `quality`, PNG lossless)."""
  ext = os.path.splitext(path)[1].lower()

  def write(tmp):
    img = Image.fromarray(np.asarray(array))
    if ext in (".jpg", ".jpeg"):
      img.save(tmp, quality=quality)
    else:
      img.save(tmp)
  return atomic_write(path, write)


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
  """Builds a whole folder under a temporary name and renames it to `path`
  when the block finishes; on an error the temporary folder is removed.

      with files.atomic_dir(root) as tmp:
        ...write into tmp...

  `path` may exist only as an empty folder (it is replaced).
  """
  path = os.path.abspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  try:
    yield tmp
    if os.path.isdir(path):
      os.rmdir(path)  # must be empty: callers check before building
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


_EVENT_WRITERS: dict = {}     # logdir -> the process's events.EventWriter there


class MetricsWriter:
  """Appends one JSON object per line to a metrics.jsonl file, and (with
  `tensorboard`) the record's numbers as TensorBoard scalars "<stage>/<key>"
  at its "step", in an event file beside it (`events.EventWriter`), so that
  `tensorboard --logdir runs/` shows every run.

  Disabled (writes nothing) when `enabled` is False: pass
  `parallel.is_main_process()` so only process 0 writes.
  """

  def __init__(self, path: str, enabled: bool = True, tensorboard: bool = False):
    self.path = path
    self.enabled = enabled
    self.tensorboard = tensorboard
    self._events = None

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if _is_number_like(v) else v) for k, v in record.items()}
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    with open(self.path, "a") as f:
      f.write(json.dumps(clean, sort_keys=True) + "\n")
    if self.tensorboard and "step" in clean:
      if self._events is None:     # one event file per workdir and process
        logdir = os.path.dirname(os.path.abspath(self.path))
        if logdir not in _EVENT_WRITERS:
          _EVENT_WRITERS[logdir] = events.EventWriter(logdir)
        self._events = _EVENT_WRITERS[logdir]
      stage = clean.get("stage", "run")
      self._events.scalars(int(clean["step"]), {
          f"{stage}/{k}": v for k, v in clean.items()
          if k not in ("step", "stage") and isinstance(v, (int, float))
          and not isinstance(v, bool)})


def _is_number_like(v) -> bool:
  """numpy / jax scalars (0-d arrays) -> float; Python numbers, str, lists unchanged."""
  if isinstance(v, (np.floating, np.integer)):
    return True
  return hasattr(v, "shape") and hasattr(v, "dtype") and np.shape(v) == ()


def read_jsonl(path: str) -> list:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]

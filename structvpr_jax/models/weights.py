"""Pretrained files: found on this machine, or downloaded once, checked by SHA-256.

Two files, the ones the project was built and measured with (google-coral's
test data, pinned to one commit):

  imagenet   mobilenet_v2_1.0_224_quant.tflite   the RGB branch's ImageNet start
  segmenter  deeplab_mobilenet_edgetpu_slim_cityscapes_quant.tflite
                                                  the label maps (configs/segment.py)

`find(key)` looks, in order, at:
  1. the file's environment variable (`$STRUCTVPR_IMAGENET_TFLITE`,
     `$STRUCTVPR_SEGMENTER_TFLITE`); set to a missing path it is an error;
  2. the cache, `$XDG_CACHE_HOME/structvpr_jax/weights/` (default
     `~/.cache/structvpr_jax/weights/`), when the file there has the pinned
     SHA-256;
  3. `../shared/data/models/` (from the working directory or beside the
     checkout);
  4. a download of `<base>/<name>` into the cache, where <base> is
     `$STRUCTVPR_WEIGHTS_URL` (a mirror, an air-gapped copy) or `DEFAULT_BASE_URL`.
     The bytes are hashed while they arrive and land in the cache only when
     the SHA-256 matches (written under a temporary name, then renamed); a
     mismatch is an error naming the URL and leaves nothing behind.
When all fail it returns None and the caller decides (the RGB branch warns
once and starts from random weights).

  python -m structvpr_jax.weights fetch [imagenet segmenter]   # prefetch, print paths
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import urllib.error
import urllib.request
from typing import Optional

from absl import logging
from tqdm import tqdm

from structvpr_jax import files

DEFAULT_BASE_URL = ("https://github.com/google-coral/test_data/raw/"
                    "104342d2d3480b3e66203073dac24f4e2dbb4c41")
BASE_URL_ENV = "STRUCTVPR_WEIGHTS_URL"
DOWNLOAD_TIMEOUT_S = 30
_UNREACHABLE: set = set()     # URLs that failed in this process: not retried


@dataclasses.dataclass(frozen=True)
class WeightFile:
  name: str
  sha256: str
  env: str
  what: str


FILES = {
    "imagenet": WeightFile(
        "mobilenet_v2_1.0_224_quant.tflite",
        "7aad0c74c5e3c06e5eb3c827e13304fdd68a83da6087d92ee169c24ff9fd4776",
        "STRUCTVPR_IMAGENET_TFLITE", "ImageNet MobileNetV2 1.0 (RGB branch start)"),
    "segmenter": WeightFile(
        "deeplab_mobilenet_edgetpu_slim_cityscapes_quant.tflite",
        "322fe29945cb1693f426952f2a330ab67ea5678545ddee6f2548e0cfd0ca03e5",
        "STRUCTVPR_SEGMENTER_TFLITE", "DeepLab MobileNet-EdgeTPU Cityscapes (label maps)"),
}


def _file(key: str) -> WeightFile:
  if key not in FILES:
    raise ValueError(f"unknown pretrained file {key!r}; expected one of {sorted(FILES)}")
  return FILES[key]


def cache_dir() -> str:
  """`$XDG_CACHE_HOME/structvpr_jax/weights` (default ~/.cache/...)."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "structvpr_jax", "weights")


def base_url() -> str:
  return (os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def sha256_of(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def local_candidates(key: str) -> list:
  """Where `find` looks before downloading (environment variable excluded)."""
  wf = _file(key)
  checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))))
  return [os.path.join(cache_dir(), wf.name),
          os.path.join("..", "shared", "data", "models", wf.name),
          os.path.join(checkout, "..", "shared", "data", "models", wf.name)]


def find(key: str, download: bool = True, progress: bool = False) -> Optional[str]:
  """The absolute path of pretrained file `key` ("imagenet" | "segmenter"), or
  None when it is nowhere and cannot be downloaded (see the module docstring).

  Raises:
    ValueError: the file's environment variable names a missing file; a
      download whose SHA-256 differs from the pinned one (naming the URL).
  """
  wf = _file(key)
  env = os.environ.get(wf.env, "")
  if env:
    if not os.path.isfile(env):
      raise ValueError(f"${wf.env}={env!r} is not a file")
    return os.path.abspath(env)
  cached, *shared = local_candidates(key)
  if os.path.isfile(cached):
    if sha256_of(cached) == wf.sha256:
      return os.path.abspath(cached)
    logging.warning("%s: SHA-256 differs from the pinned %s; ignoring it", cached, wf.sha256)
  for path in shared:
    if os.path.isfile(path):
      return os.path.abspath(path)
  url = f"{base_url()}/{wf.name}"
  if not download or url in _UNREACHABLE:
    return None
  try:
    return download_file(key, progress=progress)
  except (urllib.error.URLError, OSError) as e:
    _UNREACHABLE.add(url)
    logging.warning("could not download %s (%s)", url, e)
    return None


def download_file(key: str, progress: bool = False, dest_dir: Optional[str] = None) -> str:
  """Downloads `<base_url()>/<name>` into the cache (or `dest_dir`), checking
  the SHA-256 while the bytes arrive; returns the path. Nothing is written
  under the final name unless the checksum matches.

  Raises:
    ValueError: checksum mismatch (naming the URL and both digests).
    urllib.error.URLError / OSError: the server could not be reached or
      answered with an error (e.g. 404).
  """
  wf = _file(key)
  url = f"{base_url()}/{wf.name}"
  dest = os.path.join(dest_dir or cache_dir(), wf.name)

  def write(tmp: str) -> None:
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
      total = int(response.headers.get("Content-Length") or 0) or None
      bar = tqdm(total=total, unit="B", unit_scale=True, desc=wf.name, leave=False,
                 disable=not (progress and sys.stderr.isatty()))
      with open(tmp, "wb") as f:
        for block in iter(lambda: response.read(1 << 16), b""):
          h.update(block)
          f.write(block)
          bar.update(len(block))
      bar.close()
    if h.hexdigest() != wf.sha256:
      raise ValueError(f"{url}: SHA-256 {h.hexdigest()} differs from the pinned "
                       f"{wf.sha256}; the file was not cached (a wrong or corrupt mirror? "
                       f"${BASE_URL_ENV}={os.environ.get(BASE_URL_ENV, '')!r})")

  logging.info("downloading %s", url)
  return files.atomic_write(dest, write)


def fetch(keys=None, progress: bool = True) -> dict:
  """Makes sure each file (default: all) is in the cache, downloading what is
  missing there; returns {key: cached path}. A file found under its
  environment variable or in ../shared is not downloaded again but copied
  into the cache after its checksum is checked."""
  out = {}
  for key in keys or sorted(FILES):
    wf = _file(key)
    cached = os.path.join(cache_dir(), wf.name)
    if os.path.isfile(cached) and sha256_of(cached) == wf.sha256:
      out[key] = cached
      continue
    local = find(key, download=False)
    if local is not None and sha256_of(local) == wf.sha256:
      def copy(tmp, local=local):
        with open(local, "rb") as src, open(tmp, "wb") as dst:
          dst.write(src.read())
      out[key] = files.atomic_write(cached, copy)
      continue
    out[key] = download_file(key, progress=progress)
  return out

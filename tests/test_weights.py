"""Pretrained files arrive on a fresh machine: lookup order, checked download.

A local HTTP server on 127.0.0.1 plays the mirror (good files, a corrupt
copy, a missing file); `local_candidates` is narrowed to the test's empty
cache so ../shared/data/models does not answer first.
"""

import functools
import http.server
import os
import shutil
import threading

import pytest

from structvpr_jax import weights as weights_cli
from structvpr_jax.data import segment
from structvpr_jax.models import pretrained, weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(REPO, "..", "shared", "data", "models")
HAVE_FILES = all(os.path.isfile(os.path.join(MODELS, wf.name)) for wf in weights.FILES.values())
pytestmark = pytest.mark.skipif(not HAVE_FILES, reason="needs ../shared/data/models")


class _Quiet(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
  """http://127.0.0.1:<port>/{good,corrupt,empty}/<name>."""
  root = tmp_path_factory.mktemp("mirror")
  for sub in ("good", "corrupt", "empty"):
    os.makedirs(root / sub)
  for wf in weights.FILES.values():
    shutil.copy(os.path.join(MODELS, wf.name), root / "good" / wf.name)
    data = bytearray(open(os.path.join(MODELS, wf.name), "rb").read())
    data[len(data) // 2] ^= 0xFF                     # one flipped byte
    (root / "corrupt" / wf.name).write_bytes(bytes(data))
  server = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()


@pytest.fixture()
def fresh(tmp_path, monkeypatch):
  """A machine without ../shared and with an empty cache."""
  cache = tmp_path / "cache"
  monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
  for wf in weights.FILES.values():
    monkeypatch.delenv(wf.env, raising=False)
  monkeypatch.setattr(weights, "local_candidates",
                      lambda key: [os.path.join(weights.cache_dir(), weights.FILES[key].name)])
  weights._UNREACHABLE.clear()
  return cache


def test_fetch_from_a_mirror_caches_both_files_with_their_checksums(mirror, fresh, monkeypatch,
                                                                    capsys):
  monkeypatch.setenv("STRUCTVPR_WEIGHTS_URL", mirror + "/good")
  assert weights.find("imagenet", download=False) is None
  assert weights_cli.main(["fetch"]) == 0
  out = capsys.readouterr().out
  for key, wf in weights.FILES.items():
    path = os.path.join(str(fresh), "structvpr_jax", "weights", wf.name)
    assert weights.sha256_of(path) == wf.sha256
    assert f"{key}: {path}" in out
    assert weights.find(key, download=False) == path        # now found in the cache
  assert sorted(os.listdir(os.path.join(str(fresh), "structvpr_jax", "weights"))) == \
      sorted(wf.name for wf in weights.FILES.values())       # no temporary files left
  # the default run's RGB branch now starts from ImageNet
  init = pretrained.resolve_init("auto", "mobilenet_v2", 1.0)
  if init:                                                   # "" without the TFLite runtime
    assert init == "imagenet_tflite:" + os.path.join(
        str(fresh), "structvpr_jax", "weights", weights.FILES["imagenet"].name)
  assert segment.resolve_model("auto").startswith(str(fresh))


def test_corrupt_mirror_fails_naming_the_url_and_caches_nothing(mirror, fresh, monkeypatch,
                                                              capsys):
  monkeypatch.setenv("STRUCTVPR_WEIGHTS_URL", mirror + "/corrupt/")
  url = f"{mirror}/corrupt/{weights.FILES['imagenet'].name}"
  with pytest.raises(ValueError, match="SHA-256 .* differs from the pinned") as err:
    weights.find("imagenet")
  assert url in str(err.value)
  assert weights_cli.main(["fetch", "segmenter"]) == 2
  assert capsys.readouterr().err.startswith("error: ")
  cache = os.path.join(str(fresh), "structvpr_jax", "weights")
  assert not os.path.isdir(cache) or os.listdir(cache) == []
  try:
    import ai_edge_litert  # noqa: F401  (the resolution downloads only with the runtime)
  except ImportError:
    return
  with pytest.raises(ValueError, match="rgb.init='auto': .*SHA-256"):
    pretrained.resolve_init("auto", "mobilenet_v2", 1.0)


def test_missing_file_or_no_server_means_none_and_a_clear_segment_error(mirror, fresh,
                                                                       monkeypatch):
  monkeypatch.setenv("STRUCTVPR_WEIGHTS_URL", mirror + "/empty")
  assert weights.find("imagenet") is None                    # 404: warn, random init
  with pytest.raises(Exception, match="404"):
    weights.download_file("imagenet")
  monkeypatch.setenv("STRUCTVPR_WEIGHTS_URL", "http://127.0.0.1:9/closed")
  with pytest.raises(ValueError, match="segment.model='auto'.*weights fetch"):
    segment.resolve_model("auto")
  assert segment.resolve_model("/some/model.tflite") == "/some/model.tflite"
  assert os.listdir(str(fresh)) == [] or not os.listdir(
      os.path.join(str(fresh), "structvpr_jax", "weights"))


def test_lookup_order_environment_then_cache(mirror, fresh, monkeypatch, tmp_path):
  monkeypatch.setenv("STRUCTVPR_WEIGHTS_URL", mirror + "/good")
  cached = weights.fetch(["imagenet"], progress=False)["imagenet"]
  own = tmp_path / "own.tflite"
  shutil.copy(cached, own)
  monkeypatch.setenv("STRUCTVPR_IMAGENET_TFLITE", str(own))
  assert weights.find("imagenet") == str(own)               # the variable wins
  monkeypatch.setenv("STRUCTVPR_IMAGENET_TFLITE", str(tmp_path / "nope.tflite"))
  with pytest.raises(ValueError, match=r"\$STRUCTVPR_IMAGENET_TFLITE=.*not a file"):
    weights.find("imagenet")
  monkeypatch.delenv("STRUCTVPR_IMAGENET_TFLITE")
  # a cached file with the wrong checksum is not used (and a good mirror replaces it)
  with open(cached, "r+b") as f:
    f.write(b"\0" * 16)
  assert weights.find("imagenet", download=False) is None
  assert weights.find("imagenet") == cached and weights.sha256_of(cached) == \
      weights.FILES["imagenet"].sha256
  with pytest.raises(ValueError, match="unknown pretrained file 'vgg'"):
    weights.find("vgg")

"""experiments/bench.py runs and prints every key; the PyTorch reference has
the same architecture as the JAX RGB branch (parameter count, output size)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KEYS = ["forward_224_img_s", "forward_480x640_img_s", "train_step_224_img_s",
        "train_step_480x640_img_s", "seg_forward_224_img_s", "seg_forward_480x640_img_s",
        "seg_train_step_224_img_s", "seg_train_step_480x640_img_s", "partition_s",
        "faiss_search_s", "partition_vs_two_faiss", "eval_extract_s", "eval_extract_img_s",
        "eval_search_recall_s", "eval_bare_faiss_s", "eval_overhead_vs_faiss",
        "input_pipeline_batches_s", "input_pipeline_cached_batches_s",
        "synthetic_generate_img_s", "forward_224_compile_s", "train_step_224_compile_s",
        "peak_rss_mb"]


@pytest.mark.slow
def test_quick_bench_prints_every_key(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run([sys.executable, "experiments/bench.py", "--quick", "--no-torch",
                         "--repeats", "1", "--out", str(out)], cwd=REPO, capture_output=True,
                        text=True, timeout=900, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  assert json.loads(out.read_text()) == printed
  for key in KEYS:
    assert isinstance(printed[key], (int, float)) and printed[key] > 0, key
  assert printed["eval_descriptor_dim"] == 64   # quick: 4 clusters x 16
  assert printed["descriptor_dim"] == 8 * 1280   # quick RGB: NetVLAD-8 on 1280 channels
  assert not any(k.startswith("torch_") for k in printed)


def test_torch_reference_has_the_jax_architecture():
  torch = pytest.importorskip("torch")
  sys.path.insert(0, os.path.join(REPO, "experiments"))
  import torch_reference
  from structvpr_jax.models.branch import Branch

  model = Branch("mobilenet_v2", width=1.0, dim=None, num_clusters=64)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 64, 64, 3))))
  jax_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  jax_stats = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["batch_stats"]))
  ref = torch_reference.RGBBranch(64)
  torch_params = sum(p.numel() for p in ref.parameters())
  torch_stats = sum(b.numel() for name, b in ref.named_buffers() if "running" in name)
  assert torch_params == jax_params
  assert torch_stats == jax_stats
  ref.eval()
  with torch.inference_mode():
    desc = ref(torch.randn(2, 3, 64, 64))
  assert desc.shape == (2, model.descriptor_dim) == (2, 81920)
  np.testing.assert_allclose(desc.norm(dim=1).numpy(), 1.0, rtol=1e-5)


def test_readme_performance_table_is_generated_from_the_saved_result():
  proc = subprocess.run([sys.executable, "experiments/bench.py", "--table",
                         "experiments/results/bench.json"], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, STRUCTVPR_NO_HUGEPAGES="1"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  table = proc.stdout.strip()
  assert table.count("\n") >= 10 and "(met)" in table
  with open(os.path.join(REPO, "README.md")) as f:
    assert table in f.read()

"""experiments/performance/bench.py runs and prints every key; the PyTorch reference has
the architecture of the spec bench.py times (parameter count, output size)
and its frozen-BatchNorm step trains the parameters, not the statistics."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments", "performance"))
import bench  # noqa: E402

# Figures the RGB and PyTorch workers measure under both allocator settings.
PAIRED_JAX = [f"{name}{s}_{unit}" for name in bench.PAIRED for s in ("", "_nohuge")
              for unit in ("img_s", "compile_s")]
LEVER_KEYS = [f"{name}{s}_{unit}" for name in ("forward_224_unfolded", "train_step_224_frozen_unfolded",
                                               "forward_224_shifted", "train_step_224_frozen_shifted",
                                               "train_step_224_frozen_from14",
                                               "forward_224_unfused", "forward_480x640_unfused",
                                               "forward_224_whole", "forward_480x640_whole")
              for s in ("", "_nohuge") for unit in ("img_s", "compile_s")]
EXTRACT_KEYS = [f"{prefix}extract_{size}{s}_{unit}" for prefix, settings in
                (("", ("", "_nohuge")), ("seg_", ("",))) for size in ("224", "480x640")
                for s in settings for unit in ("img_s", "compile_s")]
JAX_KEYS = PAIRED_JAX + LEVER_KEYS + EXTRACT_KEYS + [
    f"seg_{name}_{unit}" for name in bench.PAIRED for unit in ("img_s", "compile_s")] + [
    "partition_s", "faiss_search_s", "partition_compile_s", "partition_vs_two_faiss",
    "eval_extract_s", "eval_extract_img_s", "eval_search_recall_s", "eval_bare_faiss_s",
    "eval_overhead_vs_faiss", "input_pipeline_batches_s", "input_pipeline_cached_batches_s",
    "synthetic_generate_img_s", "peak_rss_mb", "records_export_img_s",
    "input_vs_train_step_480x640"] + [
    f"input_{fmt}_t{t}_img_s" for fmt in ("folder", "array_record") for t in bench.INPUT_THREADS]
TORCH_KEYS = [f"torch_{name}{s}_{unit}" for name in bench.PAIRED for s in ("", "_nohuge")
              for unit in ("img_s", "first_s")] + [
    f"ratio_{name}{s}" for name in bench.PAIRED for s in ("", "_nohuge")] + [
    f"torch_forward_{size}_chunked{s}_{unit}" for size in ("224", "480x640")
    for s in ("", "_nohuge") for unit in ("img_s", "first_s")] + ["torch_peak_rss_mb"]
HAVE_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.slow
def test_quick_bench_prints_every_key(tmp_path):
  out = tmp_path / "bench.json"
  # Plumbing only: the figures of --quick are meaningless, so compile at XLA's
  # lowest optimisation level and let the second RGB worker (no huge pages)
  # load the first one's executables from a persistent cache.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  proc = subprocess.run([sys.executable, "experiments/performance/bench.py", "--quick", "--repeats", "1",
                         "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                        timeout=900, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  assert json.loads(out.read_text()) == printed
  for key in JAX_KEYS + (TORCH_KEYS if HAVE_TORCH else []):
    assert isinstance(printed[key], (int, float)) and printed[key] > 0, key
  if not HAVE_TORCH:
    assert not any(k.startswith(("torch_", "ratio_")) for k in printed)
  assert printed["eval_descriptor_dim"] == 64   # quick: 4 clusters x 16
  assert printed["descriptor_dim"] == 8 * 1280   # quick RGB: NetVLAD-8 on 1280 channels
  settings = printed["allocator_settings"]
  assert "glibc.malloc.hugetlb=1" in settings["hugepages"].split(":")
  assert "glibc.malloc.hugetlb" not in settings["nohuge"]
  assert printed["glibc_tunables"] == settings["hugepages"]
  assert printed["rounds"] == 1 and printed["repeats"] == 1
  assert printed["cpu_model"] == bench.cpu_model()
  # the figures are of the model the pipeline runs: native kernels where they
  # build and were measured faster ("auto": ops/dispatch.py)
  from structvpr_jax.models import native
  from structvpr_jax.models.ops import dispatch
  built = native.load()
  assert printed["native_kernels"]["ok"] == built
  assert printed["depthwise_resolved"] == (
      "native" if dispatch.native_measured_faster() else "shifted")
  for key in ("forward_224_img_s", "train_step_224_frozen_shifted_img_s"):
    low, high = printed["round_min_max"][key]
    # printed rounded to 4 decimals (monotone, so the rounded bounds hold)
    assert round(low, 4) <= printed[key] <= round(high, 4), key
  assert printed["pytorch_reference"] is HAVE_TORCH
  # The performance table (docs/performance.md) of this result: every figure filled in, PyTorch's marked
  # as not run where torch is not installed (a clean CI machine).
  table = bench.markdown_table(printed)
  for row in table.splitlines()[2:]:
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert not any(re.search(r"(^|\s)-(\s|$)", c) for c in cells), row
  paired_row = table.splitlines()[2].strip("|").split("|")
  assert ("not run" in paired_row[2]) is not HAVE_TORCH, paired_row
  assert ("not run" in paired_row[3]) is not HAVE_TORCH, paired_row
  rss_row = next(r for r in table.splitlines() if "peak RSS" in r).strip("|").split("|")
  torch_rss = rss_row[2].strip()
  assert torch_rss.endswith(" GB") if HAVE_TORCH else torch_rss == "not run", rss_row


def test_nohuge_keys_put_the_suffix_before_the_unit():
  assert bench.with_suffix("forward_224_img_s", "_nohuge") == "forward_224_nohuge_img_s"
  assert (bench.with_suffix("train_step_224_frozen_compile_s", "_nohuge")
          == "train_step_224_frozen_nohuge_compile_s")
  assert (bench.with_suffix("torch_forward_224_first_s", "_nohuge")
          == "torch_forward_224_nohuge_first_s")
  assert bench.with_suffix("forward_224_img_s", "") == "forward_224_img_s"


def test_allocator_environments_differ_only_in_the_tunables(monkeypatch):
  from structvpr_jax import hugepages
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2:"
                     "glibc.malloc.mmap_max=4")
  envs = bench.allocator_environments()
  assert envs["hugepages"]["GLIBC_TUNABLES"].split(":") == [
      "glibc.malloc.arena_max=2", *hugepages.TUNABLES]
  assert envs["nohuge"]["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
  assert ({k: v for k, v in envs["hugepages"].items() if k != "GLIBC_TUNABLES"}
          == {k: v for k, v in envs["nohuge"].items() if k != "GLIBC_TUNABLES"})


def test_torch_reference_has_the_benchmarked_architecture():
  torch = pytest.importorskip("torch")
  import torch_reference
  from structvpr_jax.models import spec as model_spec

  spec = bench.make_spec("rgb", (224, 224), quick=False, dim=0, num_clusters=64)
  shapes = model_spec.abstract_variables(spec)
  jax_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  jax_stats = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["batch_stats"]))
  ref = torch_reference.RGBBranch(64)
  torch_params = sum(p.numel() for p in ref.parameters())
  torch_stats = sum(b.numel() for name, b in ref.named_buffers() if "running" in name)
  assert torch_params == jax_params
  assert torch_stats == jax_stats
  ref.eval()
  with torch.inference_mode():
    desc = ref(torch_reference.normalize(torch.randint(0, 256, (2, 64, 64, 3),
                                                       dtype=torch.uint8)))
  assert desc.shape == (2, model_spec.build_model(spec).descriptor_dim) == (2, 81920)
  np.testing.assert_allclose(desc.norm(dim=1).numpy(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("batchnorm", ["batch", "frozen"])
def test_torch_train_step_batchnorm_modes(batchnorm):
  torch = pytest.importorskip("torch")
  import torch_reference

  torch.manual_seed(0)
  model = torch_reference.RGBBranch(4)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
  params = {k: v.detach().clone() for k, v in model.named_parameters()}
  torch_reference.set_batchnorm(model, batchnorm)
  images = torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8)
  loss = torch_reference.train_step(model, optimizer, images)
  assert loss.ndim == 0 and torch.isfinite(loss)
  new = model.state_dict()
  stats_moved = any(not torch.equal(new[k], v) for k, v in stats.items())
  assert stats_moved == (batchnorm == "batch")
  bn_scale = "features.0.1.weight"   # the stem's BatchNorm: trained in both modes
  assert not torch.equal(new[bn_scale], params[bn_scale])
  assert not torch.equal(new["netvlad.centroids"], params["netvlad.centroids"])


def test_performance_table_is_generated_from_the_saved_result(tmp_path):
  """docs/performance.md holds, between its markers, exactly what
  `bench.py --table experiments/results/bench.json` prints, and `--into`
  rewrites only those lines."""
  proc = subprocess.run([sys.executable, "experiments/performance/bench.py", "--table",
                         "experiments/results/bench.json"], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  table = proc.stdout.strip()
  assert table.count("\n") >= 10 and re.search(r"\b(met|missed)\b", table)
  with open(os.path.join(REPO, "docs", "performance.md")) as f:
    doc = f.read()
  assert f"{bench.TABLE_BEGIN}\n{table}\n{bench.TABLE_END}\n" in doc
  copy = tmp_path / "performance.md"
  copy.write_text(doc.replace(table, "| stale |"))
  bench.replace_table(str(copy), table)
  assert copy.read_text() == doc
  copy.write_text("no markers\n")
  with pytest.raises(SystemExit, match="needs one"):
    bench.replace_table(str(copy), table)


def test_bench_measures_the_pipelines_default_model():
  from configs import distill
  model = distill.get_config().model
  assert bench.PIPELINE_MODEL == {"fold_bn": model.fold_bn, "depthwise": model.depthwise,
                                  "fused_blocks": model.fused_blocks}
  spec = bench.make_spec("rgb", (224, 224), False, dim=0, num_clusters=64)
  assert spec["fold_bn"] is True and spec["depthwise"] == "auto" and spec["fused_blocks"]



def test_torch_reference_chunks_like_our_extraction():
  torch_reference = pytest.importorskip("torch_reference")
  from structvpr_jax import evaluation
  assert torch_reference.MICRO_BATCH_PIXELS == evaluation.MICRO_BATCH_PIXELS
  for hw in ((224, 224), (480, 640), (64, 64), (96, 128), (7, 11)):
    assert (torch_reference.micro_batch_size(16, hw)
            == evaluation.micro_batch_size(16, hw, backend="cpu")), hw


def test_torch_reference_chunked_forward_equals_whole_batch():
  torch = pytest.importorskip("torch")
  import torch_reference
  torch.manual_seed(0)
  model = torch_reference.RGBBranch(4).eval()
  x = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
  whole = torch_reference.forward_call(model, x)()
  chunked = torch_reference.forward_call(model, x, 2)()
  assert whole.shape == (6, 4 * 1280)
  np.testing.assert_allclose(chunked.numpy(), whole.numpy(), rtol=1e-4, atol=1e-6)


def test_paired_ratio_summary_hand_cases():
  import paired_ratio
  # PyTorch twice as slow in every pair: ratio 2 exactly, a point interval
  s = paired_ratio.ratio_summary([0.1, 0.2, 0.4], [0.2, 0.4, 0.8], images=16, target=1.5)
  assert s["ratio"] == 2.0 and s["ci95"] == [2.0, 2.0] and s["verdict"] == "met"
  assert s["pairs_at_target"] == 1.0 and s["pairs"] == 3
  assert s["jax_img_s"] == pytest.approx(16 / 0.2) and s["torch_img_s"] == pytest.approx(40.0)
  assert paired_ratio.ratio_summary([1, 1], [2, 2], 1, target=3)["verdict"] == "missed"
  # the machine slowing down 4x half way through: the pairs still say 1.25
  s = paired_ratio.ratio_summary([0.1] * 10 + [0.4] * 10, [0.125] * 10 + [0.5] * 10, 16)
  assert s["ratio"] == pytest.approx(1.25) and s["ci95"] == pytest.approx([1.25, 1.25])
  assert "verdict" not in s
  # ratios straddling the target: undecided
  s = paired_ratio.ratio_summary([1.0] * 8, [1.2, 1.8, 1.3, 1.7, 1.4, 1.6, 1.2, 1.9], 1,
                                 target=1.5)
  assert s["ci95"][0] < 1.5 < s["ci95"][1] and s["verdict"] == "undecided"
  assert s["pairs_at_target"] == 0.5
  with pytest.raises(ValueError, match="same number"):
    paired_ratio.ratio_summary([1.0], [1.0, 2.0], 1)


def test_paired_ratio_cluster_bootstrap_hand_case():
  """Block A's 10 pairs at ratio 1.2, block B's 30 at 1.8: resampling pairs
  never moves the median off 1.8 (three quarters of the pairs), resampling
  the two blocks draws {A, A} a quarter of the time, median 1.2."""
  import paired_ratio
  jax_s = [1.0] * 40
  torch_s = [1.2] * 10 + [1.8] * 30
  pairs = paired_ratio.ratio_summary(jax_s, torch_s, 1, target=1.5)
  assert pairs["ci95"] == pytest.approx([1.8, 1.8]) and pairs["verdict"] == "met"
  assert pairs["bootstrap"] == "pairs" and pairs["clusters"] == 1
  blocks = paired_ratio.ratio_summary(jax_s, torch_s, 1, target=1.5,
                                      clusters=[0] * 10 + [1] * 30)
  assert blocks["ratio"] == pytest.approx(1.8)
  assert blocks["ci95"] == pytest.approx([1.2, 1.8]) and blocks["verdict"] == "undecided"
  assert blocks["bootstrap"] == "clusters" and blocks["clusters"] == 2
  # one label for all pairs: the pair bootstrap
  one = paired_ratio.ratio_summary(jax_s, torch_s, 1, clusters=[7] * 40)
  assert one["bootstrap"] == "pairs" and one["ci95"] == pairs["ci95"]
  with pytest.raises(ValueError, match="3 cluster labels for 40 pairs"):
    paired_ratio.ratio_summary(jax_s, torch_s, 1, clusters=[0, 1, 2])
  assert paired_ratio.block_sizes(40, 6) == [7, 7, 7, 7, 6, 6]
  assert paired_ratio.block_sizes(3, 6) == [1, 1, 1] and paired_ratio.block_sizes(5, 1) == [5]


def _saved_run(started, ratios, blocks=None, jax_call="forward_224", target=1.5):
  jax_s = [0.1] * len(ratios)
  comp = {"jax_s": jax_s, "torch_s": [0.1 * r for r in ratios], "ratio": float(np.median(ratios)),
          "ci95": [min(ratios), max(ratios)], "pairs": len(ratios), "target": target,
          "jax_call": jax_call, "torch_call": "forward_224", "torch_glibc_tunables": "",
          "jax_img_s": 160.0}
  if blocks is not None:
    comp["block"] = blocks
  return {"comparisons": {"forward_224": comp}, "info": {"started": started, "pairs": len(ratios)}}


def test_paired_ratio_pools_saved_runs(tmp_path):
  """Two blocked runs (2 blocks each) and one from before blocks: 5 clusters;
  per-run ratios kept; a comparison that timed other calls is refused."""
  import paired_ratio
  runs = [_saved_run("a", [1.4] * 4 + [1.6] * 4, blocks=[0] * 4 + [1] * 4),
          _saved_run("b", [1.3] * 4 + [1.5] * 4, blocks=[0] * 4 + [1] * 4),
          _saved_run("c", [1.7] * 6)]
  res = paired_ratio.pool(runs)
  r = res["comparisons"]["forward_224"]
  assert r["pairs"] == 22 and r["clusters"] == 5 and r["bootstrap"] == "clusters"
  assert r["ratio"] == pytest.approx(1.5) and r["target"] == 1.5
  assert 1.3 <= r["ci95"][0] < 1.5 < r["ci95"][1] <= 1.7 and r["verdict"] == "undecided"
  assert [p["started"] for p in r["runs"]] == ["a", "b", "c"]
  assert r["jax_img_s"] == pytest.approx(16 / 0.1)     # images from COMPARISONS
  with pytest.raises(ValueError, match="different calls"):
    paired_ratio.pool(runs + [_saved_run("d", [1.5] * 4, jax_call="forward_224_whole")])
  quick = _saved_run("q", [1.5] * 4)
  quick["info"]["quick"] = True
  with pytest.raises(ValueError, match="some runs are --quick"):
    paired_ratio.pool(runs + [quick])
  # runs of another host (or one that recorded its host beside ones that
  # did not) are not pooled; runs of one recorded host are, and say so
  other = _saved_run("e", [1.5] * 4)
  other["info"]["cpu_model"] = "AMD EPYC (family 25 model 17 stepping 1; avx512f)"
  with pytest.raises(ValueError, match="different hosts.*family 25 model 17.*not recorded"):
    paired_ratio.pool(runs + [other])
  same = [dict(r, info=dict(r["info"], cpu_model="CPU X (family 6)")) for r in runs]
  assert paired_ratio.pool(same)["info"]["cpu_model"] == "CPU X (family 6)"
  assert "Host: CPU X (family 6)." in paired_ratio.pool_markdown(paired_ratio.pool(same), "cmd")
  # the command line: files in, a table out; a file that is no run is named
  paths = []
  for i, run in enumerate(runs):
    paths.append(str(tmp_path / f"run{i}.json"))
    with open(paths[-1], "w") as f:
      json.dump(run, f)
  assert paired_ratio.main(["--pool", *paths, "--out", str(tmp_path / "pooled")]) == 0
  md = (tmp_path / "pooled.md").read_text()
  assert "| forward_224 | 1.50 |" in md and "run c" in md
  assert json.loads((tmp_path / "pooled.json").read_text())["comparisons"]["forward_224"][
      "clusters"] == 5
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(SystemExit, match="bad.json is not a saved paired_ratio run"):
    paired_ratio.main(["--pool", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x")])


def test_cpu_model_names_the_host(tmp_path):
  """The first processor's model name, family/model/stepping and widest SIMD
  flag from /proc/cpuinfo; without the file, platform's answer."""
  (tmp_path / "cpuinfo").write_text(
      "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
      "model name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu sse4_2 avx avx2 avx512f fma\n\n"
      "processor\t: 1\nmodel name\t: Other CPU\n")
  assert bench.cpu_model(str(tmp_path / "cpuinfo")) == (
      "AMD EPYC (family 25 model 17 stepping 1; avx512f)")
  (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd\nCPU part\t: 0xd0c\n")
  assert bench.cpu_model(str(tmp_path / "arm"))           # no model name: still a string
  assert bench.cpu_model(str(tmp_path / "missing")) != ""


def test_paired_ratio_order_effect_hand_case():
  """Pairs alternate (jax, torch), (torch, jax), ...: JAX's odd-pair calls and
  PyTorch's even-pair calls follow the other framework's call."""
  import paired_ratio
  jax_s = [1.0, 1.2, 1.0, 1.2, 1.0, 1.2]          # 20 % slower after PyTorch
  torch_s = [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
  assert paired_ratio.order_effect(jax_s, "jax") == pytest.approx(1.2)
  assert paired_ratio.order_effect(torch_s, "torch") == pytest.approx(1.0)
  assert paired_ratio.order_effect([3.0, 1.0, 3.0, 1.0], "torch") == pytest.approx(3.0)
  assert np.isnan(paired_ratio.order_effect([1.0], "jax"))


@pytest.mark.skipif(not HAVE_TORCH, reason="needs the bench extra (PyTorch)")
def test_quick_paired_ratio_runs_both_workers(tmp_path):
  out = tmp_path / "paired"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, "experiments/performance/paired_ratio.py", "--quick", "--pairs", "3",
                         "--blocks", "2", "--only", "forward_224", "train_step_224_frozen",
                         "forward_480x640_both_chunked", "forward_224_torch_default_env",
                         "--out", str(out)],
                        cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / "paired.json").read_text())
  comps = res["comparisons"]
  assert sorted(comps) == ["forward_224", "forward_224_torch_default_env",
                           "forward_480x640_both_chunked", "train_step_224_frozen"]
  for name, r in comps.items():
    assert len(r["jax_s"]) == len(r["torch_s"]) == 3 and min(r["jax_s"] + r["torch_s"]) > 0
    assert r["ci95"][0] <= r["ratio"] <= r["ci95"][1] and r["jax_img_s"] > 0
    assert r["block"] == [0, 0, 1] and r["bootstrap"] == "clusters" and r["clusters"] == 2
  assert comps["forward_224"]["verdict"] in ("met", "missed", "undecided")
  assert res["info"]["gap_s"] == 0.0 and set(comps["forward_224"]["order_effect"]) == {
      "jax", "torch"}
  assert comps["forward_480x640_both_chunked"]["torch_call"] == "forward_480x640_chunked"
  assert "verdict" not in comps["forward_480x640_both_chunked"]
  assert res["info"]["blocks"] == 2
  from structvpr_jax import hugepages
  assert res["info"]["glibc_tunables"].split(":")[-3:] == list(hugepages.TUNABLES)
  # the same settings for PyTorch, except in the default-environment row
  assert comps["forward_224"]["torch_glibc_tunables"] == res["info"]["glibc_tunables"]
  default = comps["forward_224_torch_default_env"]["torch_glibc_tunables"]
  assert not set(default.split(":")) & set(hugepages.TUNABLES)
  md = (tmp_path / "paired.md").read_text()
  assert "| forward_224 |" in md and "--quick" in md

"""The synthetic ablation writes the per-query schema others can recompute from."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def n_train(tmp_path) -> int:
  """Training queries of the smoke city of the run under tmp_path (seed 0)."""
  import glob
  return len(glob.glob(os.path.join(tmp_path, "runs", "seed0", "base", "data", "images",
                                    "train", "queries", "*.jpg")))


def test_synthetic_structure_smoke_writes_per_query_hits(tmp_path):
  out = str(tmp_path / "result")
  cmd = [sys.executable, "experiments/synthetic_structure.py",
         "--config=configs/ablation.py:smoke", "--seeds", "0", "--variants", "triplet_only",
         "sigmoid", "gate",
         "--workdir", str(tmp_path / "runs"), "--out", out, "--resamples", "200",
         "--select-kd", "feature", "relational_batch"]
  # plumbing, not figures: XLA's lowest optimisation level compiles the six
  # training runs' steps in a fraction of the time
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500,
                        env=dict(os.environ, JAX_PLATFORMS="cpu",
                                 XLA_FLAGS="--xla_backend_optimization_level=0"))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out + ".json") as f:
    res = json.load(f)
  trained = {"rgb", "seg", "triplet_only", "sigmoid", "gate"}
  # configs/ablation.py re-ranks every branch's top 100 too: a "+R" row each
  methods = trained | {f"{m}+R" for m in trained}
  assert set(res["per_query"]) == methods
  assert "sigmoid+R vs sigmoid" in res["paired"] and "rgb+R vs rgb" in res["paired"]
  n = len(res["conditions"]["0"])
  assert n == 12 and len(res["regimes"]["0"]) == n
  assert set(res["conditions"]["0"]) <= {"dusk", "fog", "night", "repaint"}
  for m in methods:
    hits = res["per_query"][m]["0"]
    assert len(hits) == n and set(hits) <= {0, 1}
    # the table is recomputable from the per-query hits
    assert res["table"][m]["all R@1"][0] == pytest.approx(100 * np.mean(hits))
  # and agrees with what the pipeline's own evaluation reported
  with open(os.path.join(tmp_path, "runs", "seed0", "sigmoid", "eval", "summary.json")) as f:
    summary = json.load(f)["branches"]
  assert summary["distill"]["R@1"] == pytest.approx(100 * np.mean(res["per_query"]["sigmoid"]["0"]))
  # the KD form was chosen on val among the two (the relational run went through the CLI)
  assert set(res["selection"]) == {"feature lambda 1", "relational_batch lambda 1"}
  assert res["kd"] in ("feature", "relational_batch")
  best = max(res["selection"].values())
  assert res["selection"][f"{res['kd']} lambda 1"] == best
  pair = res["paired"]["sigmoid vs triplet_only"]["all"]
  assert pair["ci_low"] <= pair["diff"] <= pair["ci_high"] and pair["num_queries"] == n
  # the partition is reported (the cross-fitted one: tests/test_end_to_end.py)
  part = res["partition"]["0"]
  assert set(part) == {"stage1"} and 0 < sum(part["stage1"].values()) <= n_train(tmp_path)
  assert "gate vs triplet_only" in res["paired"] and "gate vs uniform" not in res["paired"]
  md = open(out + ".md").read()
  assert "Paired differences" in md and "| StructVPR sigmoid (Eq. 3, ours) |" in md
  assert "seed 0, stage1: D1" in md
  # the selection runs were evaluated on val, never on test
  for kd in ("feature", "relational_batch"):
    sel = os.path.join(tmp_path, "runs", "seed0", f"select_{kd}_lambda1", "eval")
    assert os.path.isdir(os.path.join(sel, "val")) and not os.path.isdir(os.path.join(sel, "test"))
  # every stage stopped by the epoch rule, and the record says why
  stages = res["stages"]["0"]
  for m in trained:
    assert stages[m]["stop_reason"] in ("patience", "max_epochs"), (m, stages[m])
    # stage 2 validates its start as epoch 0 (distill.eval_at_start), which it may keep
    first = 1 if m in ("rgb", "seg") else 0
    assert 1 <= stages[m]["epochs"] <= 3 and first <= stages[m]["best_epoch"] <= stages[m]["epochs"]
    if m not in ("rgb", "seg"):
      curve = stages[m]["val_curve"]
      assert [e for e, _ in curve] == list(range(stages[m]["epochs"] + 1)), (m, curve)
      assert curve[stages[m]["best_epoch"]][1] == stages[m]["best_val"]["val_R@1"]
  assert set(res["teacher_vs_student"]["0"]["teacher"]) >= {"all"}
  assert "How each stage stopped" in md and "teacher vs student on val" in md
  assert "## Stage 2 on val" in md and "## Targets" in md
  assert {t["target"].split(":")[0] for t in res["targets"]} >= {"converged", "stable"}
  # the finished seed is a file of its own: a second run reads it and trains nothing
  seed_file = out + "_seeds/seed0.json"
  assert os.path.exists(seed_file)
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "[seed 0] finished earlier" in proc.stdout and "structvpr_jax.main" not in proc.stdout
  with open(out + ".json") as f:
    assert json.load(f)["per_query"] == res["per_query"]
  # without the seed file the finished variants are read, not evaluated again
  os.remove(seed_file)
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert proc.stdout.count("evaluated with these settings already; read as is") == 3
  with open(out + ".json") as f:
    assert json.load(f)["per_query"] == res["per_query"]
  # a robustness table against another run of the same seed (here: its hits
  # with the first query of every method flipped), from the seed files alone
  other = str(tmp_path / "other")
  os.makedirs(other + "_seeds")
  with open(out + "_seeds/seed0.json") as f:
    rec = json.load(f)
  for m in rec["per_query"]:
    rec["per_query"][m][0] = 1 - rec["per_query"][m][0]
  rec["native"] = "0"
  with open(other + "_seeds/seed0.json", "w") as f:
    json.dump(rec, f)
  proc = subprocess.run(cmd + ["--aggregate-only", "--compare-to", other], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out + ".json") as f:
    rob = json.load(f)["robustness"]
  assert set(rob) == methods
  for m in methods:
    flipped = 1 - 2 * res["per_query"][m]["0"][0]          # +1 if the flip made a hit
    assert rob[m]["diff"] == pytest.approx(100 * flipped / n)
  assert "Robustness: the same seeds with other kernels (STRUCTVPR_NATIVE=0" in open(out + ".md").read()
  # experiments/paired.py recomputes a comparison from the saved hits alone
  proc = subprocess.run([sys.executable, "experiments/paired.py", out + ".json:triplet_only",
                         out + ".json:sigmoid", "--resamples", "200"], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  again = json.loads(proc.stdout)
  assert again["diff"] == pytest.approx(pair["diff"]) and again["num_queries"] == n


def test_kernel_val_variants_and_pairs():
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "experiments"))
  import kernel_val
  assert kernel_val.parse_other("shifted=--config.model.depthwise=shifted --config.x=1") == (
      "shifted", ["--config.model.depthwise=shifted", "--config.x=1"])
  for bad in ("noflags", "=--a", "kernels=--a", "baseline=--a"):
    with pytest.raises(SystemExit, match="NAME=FLAGS"):
      kernel_val.parse_other(bad)
  assert kernel_val.pairs([]) == [("baseline", "kernels")]
  assert kernel_val.pairs(["a", "b"]) == [("baseline", "kernels"), ("kernels", "a"),
                                          ("baseline", "a"), ("kernels", "b"), ("baseline", "b")]


def test_kernel_val_baseline_must_share_the_data(tmp_path):
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "experiments"))
  import kernel_val
  (tmp_path / "shared" / "data").mkdir(parents=True)
  (tmp_path / "repo").mkdir()
  (tmp_path / "beside").mkdir()
  (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
  kernel_val.check_beside_shared(str(tmp_path / "beside"), str(tmp_path / "repo"))
  with pytest.raises(SystemExit, match="does not sit beside"):
    kernel_val.check_beside_shared(str(tmp_path / "elsewhere" / "deep"), str(tmp_path / "repo"))
  # a checkout without ../shared/data itself has nothing to compare
  kernel_val.check_beside_shared(str(tmp_path / "elsewhere" / "deep"),
                                 str(tmp_path / "elsewhere" / "deep"))


def test_step_faults_settings_and_arguments():
  sys.path.insert(0, os.path.join(REPO, "experiments", "performance"))
  import step_faults
  from structvpr_jax import hugepages
  # "program" is what the main program runs; the others each drop one part
  assert step_faults.SETTINGS["program"] == (":".join(hugepages.TUNABLES), True)
  assert step_faults.SETTINGS["tunables_async"] == (":".join(hugepages.TUNABLES), False)
  assert step_faults.SETTINGS["glibc_defaults"] == ("", False)
  assert step_faults.SETTINGS["sync_huge_pages"] == (hugepages.HUGE_PAGES, True)
  with pytest.raises(SystemExit):
    step_faults.main(["--steps", "0"])


def test_ab_forward_parses_changes_and_runs_quick():
  sys.path.insert(0, os.path.join(REPO, "experiments", "performance"))
  import ab_forward
  assert ab_forward.parse_change("fused_blocks=False") == ("fused_blocks", False)
  assert ab_forward.parse_change("depthwise=shifted") == ("depthwise", "shifted")
  assert ab_forward.parse_change("width=0.5") == ("width", 0.5)
  with pytest.raises(SystemExit, match="FIELD=VALUE"):
    ab_forward.parse_change("fused_blocks")
  with pytest.raises(SystemExit):                  # B would equal A
    ab_forward.main(["--pairs", "4"])
  with pytest.raises(SystemExit):                  # the same change on both sides
    ab_forward.main(["--pairs", "4", "--a", "depthwise=native", "--b", "depthwise=native"])
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "experiments/performance/ab_forward.py", "--quick", "--pairs", "2",
                         "--b", "fused_blocks=False", "--b", "no_such_field=1"],
                        cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode != 0 and "no_such_field" in proc.stderr
  proc = subprocess.run([sys.executable, "experiments/performance/ab_forward.py", "--quick", "--pairs", "2",
                         "--b", "fused_blocks=maybe"],
                        cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode != 0 and "fused_blocks='maybe': expected a bool" in proc.stderr
  proc = subprocess.run([sys.executable, "experiments/performance/ab_forward.py", "--quick", "--pairs", "2",
                         "--b", "fused_blocks=False", "--b-micro-batch", "4"],
                        cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["b_changes"] == {"fused_blocks": False} and out["micro_batch"] == {"a": 0, "b": 4}
  assert len(out["a_s"]) == len(out["b_s"]) == 2 and min(out["a_s"] + out["b_s"]) > 0
  assert out["ci95"][0] <= out["speedup_a_over_b"] <= out["ci95"][1]
  assert out["blocks"] == 2                       # 2 pairs: a block each


def test_run_time_alternates_fresh_workdirs_and_names_a_failed_run(tmp_path):
  """experiments/performance/run_time.py with a stand-in for the program: one untimed run
  per variant, then pairs in alternating order, each in its own fresh
  workdir (removed after), B's flags added; B's stand-in holds ~200 MB more
  and sleeps longer, which the peak RSS and the ratio show."""
  sys.path.insert(0, os.path.join(REPO, "experiments", "performance"))
  import run_time
  log = tmp_path / "log.txt"
  code = ("import os, sys, time; b = '--big' in sys.argv; wd = sys.argv[1]; "
          "assert not os.path.exists(wd); os.makedirs(wd); "
          f"open({str(log)!r}, 'a').write(('B' if b else 'A') + ' ' + wd + '\\n'); "
          "x = bytearray(200 << 20) if b else b''; time.sleep(0.4 if b else 0.2)")

  def command(config, workdir, flags):
    assert config == "configs/distill.py"
    return [sys.executable, "-c", code, workdir, *flags]

  scratch = tmp_path / "scratch"
  scratch.mkdir()
  res = run_time.run("configs/distill.py", ["--big"], 2, str(scratch), command=command)
  order = [line.split()[0] for line in log.read_text().splitlines()]
  assert order == ["A", "B", "A", "B", "B", "A"]     # warm-ups, then A B, B A
  workdirs = [line.split()[1] for line in log.read_text().splitlines()]
  assert len(set(workdirs)) == 6 and not os.listdir(scratch)
  assert len(res["a"]) == len(res["b"]) == 2 and set(res["warm_up"]) == {"a", "b"}
  assert res["b_peak_rss_mb"] - res["a_peak_rss_mb"] > 150
  assert res["b_over_a"] > 1.2 and res["ci95"][0] <= res["b_over_a"] <= res["ci95"][1]
  md = run_time.markdown(res, "cmd")
  assert "| A |" in md and "| B |" in md and "`--big`" in md

  def failing(config, workdir, flags):
    return [sys.executable, "-c", "import sys; print('bad config field'); sys.exit(2)"]
  with pytest.raises(SystemExit, match="exited 2:\n.*bad config field"):
    run_time.run("configs/distill.py", ["--big"], 1, str(scratch), command=failing)
  with pytest.raises(SystemExit):
    run_time.main(["--runs", "1"])                          # no variant B
  with pytest.raises(SystemExit):
    run_time.main(["--runs", "1", "--b", "config.x=1"])     # not a flag


def test_ab_forward_variant_kernels_are_the_ones_b_runs(tmp_path):
  """--b-kernels: B's native calls are traced to the variant's own targets
  (so a kernel change is timed against the current kernels in one process),
  named by the source's content (a changed source never reuses the targets
  of an earlier one)."""
  sys.path.insert(0, os.path.join(REPO, "experiments", "performance"))
  import ab_forward
  import jax
  import jax.numpy as jnp
  from structvpr_jax.models import native
  if not native.load():
    pytest.skip("native kernels unavailable")
  source = os.path.join(REPO, "structvpr_jax", "models", "native", "kernels.cc")
  suffix = ab_forward.load_variant_kernels(source)
  x = jnp.ones((1, 8, 8, 16), jnp.float32)
  k, b = jnp.ones((3, 3, 16), jnp.float32), jnp.zeros((16,), jnp.float32)
  f = lambda x: native.depthwise_forward(x, k, b, 1, True)
  plain = jax.jit(f).lower(x).as_text()
  with ab_forward.variant_targets(suffix):   # a new function: jit caches traces per function
    variant_lowered = jax.jit(lambda x: native.depthwise_forward(x, k, b, 1, True)).lower(x)
  variant = variant_lowered.as_text()
  assert "structvpr_depthwise_forward" + suffix in variant
  assert suffix not in plain
  assert jax.ffi.ffi_call is not None and "renamed" not in jax.ffi.ffi_call.__name__
  # the same source: the variant computes what the current kernels do
  np.testing.assert_array_equal(np.asarray(variant_lowered.compile()(x)), np.asarray(jax.jit(f)(x)))
  # the same content gives the same names; a changed one its own
  assert ab_forward.load_variant_kernels(source) == suffix
  changed = tmp_path / "kernels.cc"
  changed.write_text(open(source).read() + "// changed\n")
  assert ab_forward.load_variant_kernels(str(changed)) != suffix
  assert not list(tmp_path.glob("*.so"))
  with pytest.raises(SystemExit):
    ab_forward.main(["--pairs", "2", "--b-kernels", str(tmp_path / "missing.cc")])
  broken = tmp_path / "broken.cc"
  broken.write_text("this is not C++\n")
  with pytest.raises(SystemExit, match="broken.cc"):
    ab_forward.load_variant_kernels(str(broken))


def _fake_ablation_seed(runs, seed: int, variants=(), data_from=None):
  """<runs>/seed<k>/base (the smoke city, a stage-1 RGB checkpoint) and each
  variant's distill/checkpoints, as experiments/synthetic_structure.py leaves
  them. The branches are untrained (fresh variables, one per method: what
  rerank_synthetic.py reads is the layout, not the training), each stage
  marked finished with a done.json."""
  from configs import ablation
  from structvpr_jax import checkpoint, files
  from structvpr_jax.data import synthetic
  from structvpr_jax.models import spec as model_spec
  config = ablation.get_config("smoke")
  root = os.path.join(runs, f"seed{seed}")
  data = os.path.join(root, "base", "data")
  if data_from:
    os.makedirs(os.path.dirname(data), exist_ok=True)
    os.symlink(data_from, data)
  else:
    synthetic.generate(data, seed=seed, image_size=tuple(config.data.image_size),
                       num_places=dict(config.data.synthetic_places),
                       queries_per_place=config.data.queries_per_place, progress=False)
  spec = model_spec.branch_spec(config, "rgb")
  for k, (wd, stage) in enumerate([("base", "rgb")] + [(v, "distill") for v in variants]):
    ckpt = os.path.join(root, wd, stage, "checkpoints")
    variables = model_spec.init_variables(spec, 10 * seed + k)
    checkpoint.save(checkpoint.manager(ckpt), 0, variables, {"spec": spec, "step": 0})
    files.write_json(os.path.join(root, wd, stage, "done.json"), {"stage": stage})
  return data


def _load_script(name: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(REPO, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_rerank_synthetic_smoke_selects_on_val_and_resumes_by_seed(tmp_path, capsys,
                                                                     monkeypatch):
  """experiments/rerank_synthetic.py end to end on a tiny ablation tree: the
  selection on val of seed 0 (no test image read), test read once per
  checkpoint, a seed finished later added by a rerun, the schema of the
  results."""
  from structvpr_jax import checkpoint, evaluation
  script = _load_script("rerank_synthetic")
  runs, out = str(tmp_path / "runs"), str(tmp_path / "result")
  data = _fake_ablation_seed(runs, 0, variants=("triplet_only",))
  _fake_ablation_seed(runs, 1, data_from=data)           # its variant not finished yet
  # every checkpoint restored and every split described, in order
  log = []
  restore, describe = checkpoint.restore_variables, evaluation.describe_split

  def logged_restore(checkpoint_dir, *a, **kw):
    log.append(("restore", os.path.relpath(checkpoint_dir, runs)))
    return restore(checkpoint_dir, *a, **kw)

  def logged_describe(*a, **kw):
    log.append(("describe", kw.get("label")))
    return describe(*a, **kw)
  monkeypatch.setattr(checkpoint, "restore_variables", logged_restore)
  monkeypatch.setattr(evaluation, "describe_split", logged_describe)
  argv = ["--config", "configs/ablation.py:smoke", "--workdir", runs, "--seeds", "0", "1",
          "--variants", "triplet_only", "--grid", "quick", "--resamples", "200", "--out", out]
  script.main(argv)
  printed = capsys.readouterr().out
  # the quick grid is one extraction of val; then each finished checkpoint's test, once
  rgb0, rgb1 = os.path.join("seed0", "base", "rgb"), os.path.join("seed1", "base", "rgb")
  kd0 = os.path.join("seed0", "triplet_only", "distill")
  assert log == [("restore", os.path.join(rgb0, "checkpoints")), ("describe", "val"),
                 ("restore", os.path.join(rgb0, "checkpoints")), ("describe", "test"),
                 ("restore", os.path.join(kd0, "checkpoints")), ("describe", "test"),
                 ("restore", os.path.join(rgb1, "checkpoints")), ("describe", "test")]
  with open(out + ".json") as f:
    res = json.load(f)
  grid = [list(map(lambda x: list(x) if isinstance(x, tuple) else x, s))
          for s in script.GRIDS["quick"]]
  sel = res["selection"]
  assert sel["seed"] == 0 and sel["split"] == "val" and res["grid"] == grid
  assert [r["setting"] for r in sel["rows"]] == grid and sel["chosen"] in grid
  best = max(sel["rows"], key=lambda r: (r["rerank"]["R@1"], r["rerank"]["R@5"],
                                         -r["rerank"]["rerank"]["ms_per_query"]))
  assert sel["chosen"] == best["setting"]
  for r in sel["rows"]:               # the selection read val: 12 places, 1 query each
    assert r["global"]["split"] == "val" and r["global"]["num_queries"] == 12
    assert r["rerank"]["rerank"]["global_weight"] == r["setting"][4]
  assert res["seeds"] == {"rgb": [0, 1], "triplet_only": [0]}
  assert res["incomplete"] == {"1": ["triplet_only"]}
  assert sorted(res["per_query"]) == ["rgb", "rgb+R", "triplet_only", "triplet_only+R"]
  for m, seeds in res["seeds"].items():
    rec = res["methods"][m]
    for i, s in enumerate(seeds):
      n = len(res["conditions"][str(s)])
      assert n == 12 and set(res["conditions"][str(s)]) <= {"dusk", "fog", "night", "repaint"}
      for kind, key in (("global", m), ("rerank", m + "+R")):
        hits = res["per_query"][key][str(s)]
        assert len(hits) == n and set(hits) <= {0, 1}
        # the table is recomputable from the per-query hits
        assert rec[kind]["R@1"][i] == pytest.approx(100 * np.mean(hits))
    d = rec["paired"]["R@1"]
    assert d["num_seeds"] == len(seeds) and d["ci_low"] <= d["diff"] <= d["ci_high"]
    diff = np.mean([100 * (np.mean(res["per_query"][m + "+R"][str(s)])
                           - np.mean(res["per_query"][m][str(s)])) for s in seeds])
    assert d["diff"] == pytest.approx(diff)
    assert set(rec["paired"]["per_condition"]) <= {"dusk", "fog", "night", "repaint"}
  # experiments/paired.py reads the hits as it reads synthetic_structure.json's
  paired = _load_script("paired")
  loaded = paired.load(out + ".json:rgb+R", None, "")
  assert {s: h.tolist() for s, h in loaded.items()} == res["per_query"]["rgb+R"]
  md = open(out + ".md").read()
  assert "## Test: + R vs global per method" in md and "## Selection on val" in md
  assert "**(chosen)**" in md and "seed 1: triplet_only" in md
  assert "24 train / 12 val / 12 test places, 1 queries per place" in md   # the config's
  seed0 = json.load(open(out + "_seeds/seed0.json"))
  assert seed0["setting"] == sel["chosen"] and seed0["missing"] == []
  assert seed0["methods"]["rgb"]["global"]["split"] == "test"
  assert all(".tmp" not in f for f in os.listdir(out + "_seeds"))     # written atomically
  # a rerun: the selection and seed 0 are read; seed 1's variant, finished since, is added
  _fake_ablation_seed(str(tmp_path / "later"), 1, variants=("triplet_only",), data_from=data)
  os.rename(str(tmp_path / "later" / "seed1" / "triplet_only"),
            os.path.join(runs, "seed1", "triplet_only"))
  rgb1 = json.load(open(out + "_seeds/seed1.json"))["methods"]["rgb"]
  del log[:]
  script.main(argv)
  printed = capsys.readouterr().out
  # the selection is reused (no val read), only the new checkpoint's test is read
  assert log == [("restore", os.path.join("seed1", "triplet_only", "distill", "checkpoints")),
                 ("describe", "test")]
  assert "[selection] read" in printed and "[seed 0] finished earlier" in printed
  assert "[seed 1] rgb:" not in printed and "[seed 1] triplet_only:" in printed
  res2 = json.load(open(out + ".json"))
  assert res2["seeds"] == {"rgb": [0, 1], "triplet_only": [0, 1]} and res2["incomplete"] == {}
  assert json.load(open(out + "_seeds/seed1.json"))["methods"]["rgb"] == rgb1
  assert res2["per_query"]["rgb"] == res["per_query"]["rgb"]
  assert res2["per_query"]["rgb+R"] == res["per_query"]["rgb+R"]
  # seed 0's variant trained again since (another run id in its done.json):
  # its test is read again, nothing else; the old figures are not kept
  done0 = os.path.join(runs, "seed0", "triplet_only", "distill", "done.json")
  with open(done0) as f:
    rec0 = json.load(f)
  with open(done0, "w") as f:
    json.dump(dict(rec0, run_id="retrained"), f)
  del log[:]
  script.main(argv)
  printed = capsys.readouterr().out
  assert log == [("restore", os.path.join(kd0, "checkpoints")), ("describe", "test")]
  assert "[seed 0] triplet_only: its checkpoint changed" in printed
  assert json.load(open(out + "_seeds/seed0.json"))["methods"]["triplet_only"]["run_id"] == (
      "retrained")

"""Train-step options on a tiny branch: BatchNorm modes, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from structvpr_jax import config_lib, parallel, train_lib
from structvpr_jax.models import spec as model_spec

SPEC = {"branch": "seg", "view": "seg", "backbone": "mobilenet_light", "width": 0.35,
        "dim": 8, "num_clusters": 4, "blocks": [[1, 8, 1, 1], [2, 8, 1, 2]], "slme": "slme",
        "normalization": "imagenet", "image_size": [32, 32], "init": ""}
TC = {"num_steps": 5, "learning_rate": 1e-2, "warmup_steps": 0, "margin": 0.5,
      "grad_clip": 1.0}


@pytest.mark.parametrize("mode", ["batch", "frozen"])
def test_batchnorm_modes(mode):
  mesh = parallel.make_mesh(jax.devices()[:1])
  variables = model_spec.init_variables(SPEC, 0)
  tx, _ = train_lib.make_optimizer(TC)
  state = parallel.replicate(train_lib.TrainState(
      step=0, apply_fn=None, params=variables["params"], tx=tx,
      opt_state=tx.init(variables["params"]), batch_stats=variables["batch_stats"]), mesh)
  step = train_lib.make_train_step(SPEC, dict(TC, batchnorm=mode), mesh)
  labels = np.random.default_rng(0).integers(0, 19, (2, 3, 32, 32)).astype(np.uint8)
  new, metrics = step(state, parallel.shard_batch({"seg": labels}, mesh),
                      jax.random.PRNGKey(0))
  new = jax.device_get(new)
  assert np.isfinite(float(metrics["loss"]))
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                       new.params, variables["params"]))
  assert max(moved) > 0
  stats_moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                                 new.batch_stats, variables["batch_stats"])))
  assert (stats_moved > 0) == (mode == "batch")
  with pytest.raises(ValueError, match="train.batchnorm"):
    train_lib.make_train_step(SPEC, dict(TC, batchnorm="group"), mesh)


def test_validate_config_names_the_field():
  import sys, os
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import distill
  c = distill.get_config("smoke")
  c.train.batch_size = 3
  if jax.device_count() > 1:
    with pytest.raises(ValueError, match="train.batch_size"):
      config_lib.validate_config(c)
  c = distill.get_config("smoke")
  c.data.image_size = (16, 16)
  with pytest.raises(ValueError, match="data.image_size"):
    config_lib.validate_config(c)
  c = distill.get_config("smoke")
  c.distill.weighting = "nope"
  with pytest.raises(ValueError, match="distill.weighting"):
    config_lib.validate_config(c)
  c = distill.get_config("smoke")
  c.seg.slme = "bogus"
  with pytest.raises(ValueError, match="seg.slme"):
    config_lib.validate_config(c)
  for field, value in (("train.dtype", "float16"), ("model.depthwise", "fast"),
                       ("data.cache_gb", -1.0), ("eval.index", "hnsw"),
                       ("distill.partition", "halves"), ("eval.micro_batch", 3),
                       ("eval.micro_batch", -1)):
    c = distill.get_config("smoke")
    section, key = field.split(".")
    c[section][key] = value
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
      config_lib.validate_config(c)
  c = distill.get_config("smoke")
  c.data.name = "folder"
  c.data.root = "/nonexistent/layout"
  with pytest.raises(ValueError, match="data.root"):
    config_lib.validate_config(c)


def test_stage_overrides_and_auto_init(monkeypatch, tmp_path):
  import sys, os
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import distill
  from structvpr_jax.models import pretrained
  c = distill.get_config()
  c.seg.mining = "random"
  c.seg.learning_rate = 3e-4
  tc = config_lib.stage_train_config(c, "seg")
  assert tc["mining"] == "random" and tc["learning_rate"] == 3e-4
  assert config_lib.stage_train_config(c, "rgb")["mining"] == "hard"
  assert config_lib.stage_train_config(c, "distill")["learning_rate"] == c.train.learning_rate
  # stage 2 alone validates its start (the stage-1 RGB weights) as epoch 0:
  # recorded in the distill stage's fields only, so stage 1 is not retrained
  assert config_lib.stage_train_config(c, "distill")["eval_at_start"] is False
  c.distill.eval_at_start = True
  assert config_lib.stage_train_config(c, "distill")["eval_at_start"] is True
  assert config_lib.stage_train_config(c, "rgb")["eval_at_start"] is False
  assert config_lib.stage_fields(c, "distill")["distill.eval_at_start"] is True
  assert config_lib.stage_fields(c, "rgb")["train.eval_at_start"] is False
  # model.* reaches the spec and the built model (evaluation's fused blocks).
  assert model_spec.branch_spec(c, "rgb")["fused_blocks"] is True
  c.model.fused_blocks = False
  spec = model_spec.branch_spec(c, "seg")
  assert spec["fused_blocks"] is False and model_spec.build_model(spec).fused_blocks is False
  del spec["fused_blocks"]                # a spec written before the field: fused
  assert model_spec.build_model(spec).fused_blocks is True
  # A restored checkpoint's spec takes how-to-run fields from the config
  # (evaluation, partition, localize), and keeps everything else.
  stored = dict(spec, fused_blocks=True, depthwise="native", width=0.25)
  c.model.depthwise = "shifted"
  run = model_spec.with_runtime(stored, c)
  assert run["fused_blocks"] is False and run["depthwise"] == "shifted"
  assert {k: v for k, v in run.items() if k not in ("fused_blocks", "depthwise")} == {
      k: v for k, v in stored.items() if k not in ("fused_blocks", "depthwise")}
  # rgb.init="auto": the file from $STRUCTVPR_IMAGENET_TFLITE when the branch can take it.
  fake = tmp_path / "m.tflite"
  fake.write_bytes(b"x")
  monkeypatch.setenv(pretrained.IMAGENET_TFLITE_ENV, str(fake))
  assert model_spec.branch_spec(c, "rgb")["init"] == f"imagenet_tflite:{fake}"
  assert model_spec.branch_spec(c, "seg")["init"] == ""
  c.rgb.width = 0.5                      # not the file's architecture: random init
  assert model_spec.branch_spec(c, "rgb")["init"] == ""
  monkeypatch.setenv(pretrained.IMAGENET_TFLITE_ENV, str(tmp_path / "missing.tflite"))
  with pytest.raises(ValueError, match="STRUCTVPR_IMAGENET_TFLITE"):
    model_spec.branch_spec(c, "rgb")
  c = distill.get_config()
  c.data.normalization = "imagenet"
  monkeypatch.setenv(pretrained.IMAGENET_TFLITE_ENV, str(fake))
  with pytest.raises(ValueError, match="data.normalization"):
    config_lib.validate_config(c)


TEACHER = dict(SPEC, branch="seg")
STUDENT = dict(SPEC, branch="distill", view="rgb", backbone="mobilenet_v2")


@pytest.mark.parametrize("kd", ["feature", "adaptor", "relational", "relational_batch", "rkd"])
def test_stage2_step_for_each_kd_form(kd):
  """One stage-2 step per KD form: finite loss, KD term present; the adaptor's
  head trains with the student; zero weights -> the KD term is exactly 0."""
  from structvpr_jax import losses
  mesh = parallel.make_mesh(jax.devices()[:1])
  student = model_spec.init_variables(STUDENT, 0)
  teacher = model_spec.init_variables(TEACHER, 1)
  params = dict(student["params"])
  if kd == "adaptor":
    params[train_lib.ADAPTOR] = losses.adaptor_init(STUDENT["num_clusters"] * STUDENT["dim"])
  tx, _ = train_lib.make_optimizer(TC)
  state = parallel.replicate(train_lib.new_state({"params": params,
                                                  "batch_stats": student["batch_stats"]}, tx),
                             mesh)
  step = train_lib.make_train_step(STUDENT, dict(TC, batchnorm="frozen", log_term_grads=True),
                                   mesh, TEACHER, lambda_kd=1.0, kd=kd, temperature=0.5)
  rng = np.random.default_rng(0)
  batch = {"rgb": rng.integers(0, 255, (2, 4, 32, 32, 3)).astype(np.uint8),
           "seg": rng.integers(0, 19, (2, 4, 32, 32)).astype(np.uint8)}
  rep_teacher = parallel.replicate(teacher, mesh)
  new, metrics = step(state, parallel.shard_batch(dict(batch, weight=np.ones(2, np.float32)),
                                                  mesh), jax.random.PRNGKey(0), rep_teacher)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["kd"]) > 0
  assert float(metrics["kd_desc_grad_norm"]) > 0 and float(metrics["triplet_desc_grad_norm"]) >= 0
  np.testing.assert_allclose(float(metrics["loss"]),
                             float(metrics["triplet"]) + float(metrics["kd"]), rtol=1e-5)
  new = jax.device_get(new)
  if kd == "adaptor":
    moved = np.abs(np.asarray(new.params[train_lib.ADAPTOR]["kernel"])
                   - np.eye(STUDENT["num_clusters"] * STUDENT["dim"])).max()
    assert moved > 0
  state = parallel.replicate(train_lib.new_state({"params": params,
                                                  "batch_stats": student["batch_stats"]}, tx),
                             mesh)
  _, zero = step(state, parallel.shard_batch(dict(batch, weight=np.zeros(2, np.float32)), mesh),
                 jax.random.PRNGKey(0), rep_teacher)
  assert float(zero["kd"]) == 0.0 and float(zero["kd_desc_grad_norm"]) == 0.0
  with pytest.raises(ValueError, match="distill.kd"):
    train_lib.make_train_step(STUDENT, TC, mesh, TEACHER, kd="cosine")


def test_groupnorm_branch_trains_saves_and_restores(tmp_path):
  """seg.norm="group": no BatchNorm statistics at all (train = eval), each image
  normalised by itself (a descriptor does not depend on its batch), one step
  trains, and a checkpoint round-trips through Orbax with the empty collection."""
  from structvpr_jax import checkpoint
  spec = dict(SPEC, norm="group")
  mesh = parallel.make_mesh(jax.devices()[:1])
  variables = model_spec.init_variables(spec, 0)
  assert variables["batch_stats"] == {}
  assert any("gn" in str(path) for path, _ in
             jax.tree_util.tree_flatten_with_path(variables["params"])[0])
  model = model_spec.build_model(spec)
  labels = np.random.default_rng(0).integers(0, 19, (3, 32, 32)).astype(np.uint8)
  x = model_spec.model_input(spec, labels)
  together = model.apply(variables, x)
  alone = model.apply(variables, x[:1])
  np.testing.assert_allclose(together[:1], alone, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.apply(variables, x, train=True), together, rtol=1e-5,
                             atol=1e-6)
  tx, _ = train_lib.make_optimizer(TC)
  state = parallel.replicate(train_lib.new_state(variables, tx), mesh)
  step = train_lib.make_train_step(spec, dict(TC, batchnorm="batch"), mesh)
  batch = np.random.default_rng(1).integers(0, 19, (2, 3, 32, 32)).astype(np.uint8)
  new, metrics = step(state, parallel.shard_batch({"seg": batch}, mesh), jax.random.PRNGKey(0))
  assert np.isfinite(float(metrics["loss"]))
  new = jax.device_get(new)
  mngr = checkpoint.manager(str(tmp_path / "ckpt"))
  checkpoint.save(mngr, 1, {"params": new.params, "batch_stats": new.batch_stats},
                  {"spec": spec}, metrics={"val_R@5": 1.0})
  got_spec, restored, _, _ = checkpoint.restore_variables(str(tmp_path / "ckpt"))
  assert got_spec["norm"] == "group" and restored["batch_stats"] == {}
  assert got_spec == spec                 # as stored: no depthwise / fused_blocks fields
  # restored to run under a config: its how-to-run fields, the rest as stored
  import ml_collections
  run = ml_collections.ConfigDict({"model": {"depthwise": "shifted", "fused_blocks": False}})
  run_spec, _, _, meta = checkpoint.restore_variables(str(tmp_path / "ckpt"), config=run)
  assert run_spec == dict(spec, depthwise="shifted", fused_blocks=False)
  assert meta["spec"] == spec
  np.testing.assert_array_equal(
      jax.tree.leaves(restored["params"])[0], jax.tree.leaves(new.params)[0])


def test_bfloat16_step_keeps_float32_state_and_follows_float32():
  """train.dtype=bfloat16: the step computes in bfloat16 but parameters, BN
  statistics and optimizer state stay float32, and loss and update follow the
  float32 step's to bfloat16 precision."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  variables = model_spec.init_variables(SPEC, 0)
  tx, _ = train_lib.make_optimizer(TC)
  labels = np.random.default_rng(0).integers(0, 19, (2, 3, 32, 32)).astype(np.uint8)
  out = {}
  for dtype in ("float32", "bfloat16"):
    state = parallel.replicate(train_lib.new_state(variables, tx), mesh)
    step = train_lib.make_train_step(SPEC, dict(TC, batchnorm="batch", dtype=dtype), mesh)
    new, metrics = step(state, parallel.shard_batch({"seg": labels}, mesh), jax.random.PRNGKey(0))
    out[dtype] = (jax.device_get(new), jax.device_get(metrics))
  new16, m16 = out["bfloat16"]
  new32, m32 = out["float32"]
  for tree in (new16.params, new16.batch_stats, new16.opt_state):
    for leaf in jax.tree.leaves(tree):
      if hasattr(leaf, "dtype") and np.issubdtype(leaf.dtype, np.floating):
        assert leaf.dtype == np.float32
  assert np.isfinite(float(m16["loss"]))
  assert float(m16["loss"]) != float(m32["loss"])       # it did compute in bfloat16
  np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=0.05, atol=2e-3)
  # the same direction of update: Adam's first step moves each parameter by
  # about lr * sign(gradient), so most signs agree
  d16 = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(new16.params),
                                                      jax.tree.leaves(variables["params"]))])
  d32 = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(new32.params),
                                                      jax.tree.leaves(variables["params"]))])
  big = np.abs(d32) > 0.5 * TC["learning_rate"]
  assert big.sum() > 100 and np.mean(np.sign(d16[big]) == np.sign(d32[big])) > 0.8
  with pytest.raises(ValueError, match="dtype='float16'"):
    model_spec.build_model(SPEC, dtype="float16")


@pytest.mark.parametrize("trainable_from", [1, 2])
def test_trainable_from_leaves_the_frozen_blocks_bitwise_unchanged(trainable_from):
  mesh = parallel.make_mesh(jax.devices()[:1])
  variables = model_spec.init_variables(SPEC, 0)
  tc = dict(TC, batchnorm="frozen", trainable_from=trainable_from)
  tx, _ = train_lib.make_optimizer(tc, train_lib.frozen_below(trainable_from))
  state = parallel.replicate(train_lib.new_state(variables, tx), mesh)
  step = train_lib.make_train_step(SPEC, tc, mesh)
  rng = np.random.default_rng(0)
  for i in range(2):
    labels = rng.integers(0, 19, (2, 3, 32, 32)).astype(np.uint8)
    state, metrics = step(state, parallel.shard_batch({"seg": labels}, mesh),
                          jax.random.PRNGKey(i))
  new = jax.device_get(state.params)
  frozen = {"stem"} | {f"block{i}" for i in range(trainable_from)}
  for name, sub in variables["params"]["encoder"].items():
    same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                        sub, new["encoder"][name]))
    assert all(same) == (name in frozen), name
  for head in ("netvlad", "projection"):
    assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                                variables["params"][head], new[head])))
  assert train_lib.frozen_below(0) is None


@pytest.mark.parametrize("train", [True, False])
def test_remat_gives_the_plain_values_and_gradients(train):
  """train.remat recomputes block activations in the backward pass: the same
  parameter tree, outputs, BatchNorm statistics and gradients as the plain
  model (BatchNorm with batch statistics, and frozen), and the step runs."""
  variables = model_spec.init_variables(SPEC, 0)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 5)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32)), jnp.float32)

  def loss(params, model):
    out = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                      train=train, mutable=["batch_stats"] if train else False)
    desc, stats = out if train else (out, {})
    return jnp.sum(desc * w), stats

  res = {}
  for remat in (False, True):
    model = model_spec.build_model(SPEC, remat=remat)
    (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"], model)
    res[remat] = jax.device_get((value, stats, grads))
  assert jax.tree.structure(res[False]) == jax.tree.structure(res[True])
  for a, b in zip(jax.tree.leaves(res[False]), jax.tree.leaves(res[True])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  text = jax.jit(jax.grad(lambda p: loss(p, model_spec.build_model(SPEC, remat=True))[0])
                 ).lower(variables["params"]).as_text()
  plain = jax.jit(jax.grad(lambda p: loss(p, model_spec.build_model(SPEC))[0])
                  ).lower(variables["params"]).as_text()
  # it does recompute: remat's fences come on top of the 1x1 kernel
  # gradients' own barriers (models/ops/pointwise.pointwise)
  assert text.count("optimization_barrier") > plain.count("optimization_barrier")
  mesh = parallel.make_mesh(jax.devices()[:1])
  tx, _ = train_lib.make_optimizer(TC)
  state = parallel.replicate(train_lib.new_state(variables, tx), mesh)
  step = train_lib.make_train_step(SPEC, dict(TC, batchnorm="batch" if train else "frozen",
                                              remat=True), mesh)
  labels = np.random.default_rng(1).integers(0, 19, (2, 3, 32, 32)).astype(np.uint8)
  _, metrics = step(state, parallel.shard_batch({"seg": labels}, mesh), jax.random.PRNGKey(0))
  assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("trainable_from", [0, 2])
@pytest.mark.parametrize("tc", [dict(TC, grad_clip=1e-3),                       # clipping active
                                dict(TC, optimizer="sgd", weight_decay=1e-2, grad_clip=0)])
def test_flat_optimizer_matches_per_tensor_and_converts(tc, trainable_from):
  """make_optimizer's flat state (optax.flatten) updates every parameter as
  the per-tensor optimizer does, and convert_opt_state turns a per-tensor
  state (pre-flat checkpoints) into the flat one: both continue equal."""
  params = model_spec.init_variables(SPEC, 0)["params"]
  mask = train_lib.frozen_below(trainable_from)
  flat_tx, _ = train_lib.make_optimizer(tc, mask)
  tensor_tx, _ = train_lib.make_optimizer(tc, mask, flat=False)
  rng = np.random.default_rng(5)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
           for _ in range(4)]

  def run(tx, state, p, gs):
    for g in gs:
      updates, state = jax.jit(tx.update)(g, state, p)
      p = optax.apply_updates(p, updates)
    return p, state

  p_flat, s_flat = run(flat_tx, flat_tx.init(params), params, grads[:2])
  p_tensor, s_tensor = run(tensor_tx, tensor_tx.init(params), params, grads[:2])
  leaves = jax.tree.leaves(s_flat)
  assert max(np.ndim(a) for a in leaves) == 1      # moments are vectors, not tensors
  for a, b in zip(jax.tree.leaves(p_flat), jax.tree.leaves(p_tensor)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  converted = train_lib.convert_opt_state(s_tensor, jax.eval_shape(flat_tx.init, params))
  assert jax.tree.structure(converted) == jax.tree.structure(s_flat)
  for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(s_flat)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # the converted state continues as the flat one does
  p_a, _ = run(flat_tx, converted, p_tensor, grads[2:])
  p_b, _ = run(flat_tx, s_flat, p_flat, grads[2:])
  for a, b in zip(jax.tree.leaves(p_a), jax.tree.leaves(p_b)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # frozen parameters stay bitwise unchanged in the flat layout too
  if trainable_from:
    for name in ("stem", "block0", "block1"):
      for a, b in zip(jax.tree.leaves(params["encoder"][name]),
                      jax.tree.leaves(p_flat["encoder"][name])):
        np.testing.assert_array_equal(a, b)


def test_convert_opt_state_rejects_another_optimizer():
  params = model_spec.init_variables(SPEC, 0)["params"]
  adam_flat = train_lib.make_optimizer(TC)[0]
  sgd_tensor = train_lib.make_optimizer(dict(TC, optimizer="sgd"), flat=False)[0]
  with pytest.raises(ValueError, match="optimizer state does not match"):
    train_lib.convert_opt_state(sgd_tensor.init(params), jax.eval_shape(adam_flat.init, params))


def test_training_plan_epochs_and_steps():
  """Step budget (epoch_queries 0) vs epochs: steps per epoch round up, the
  budget is the cap, and the fields are checked."""
  plan = train_lib.training_plan(dict(TC, num_steps=100, eval_every=40))
  assert plan == {"epochs": False, "num_steps": 100, "eval_every": 40, "epoch_queries": 0,
                  "patience": 0, "max_epochs": 0, "select_metric": "R@5"}
  plan = train_lib.training_plan(dict(TC, batch_size=8, epoch_queries=1000, patience=3,
                                      max_epochs=30, select_metric="R@1"))
  assert plan["epochs"] and plan["eval_every"] == 125 and plan["num_steps"] == 125 * 30
  assert plan["patience"] == 3 and plan["select_metric"] == "R@1"
  assert train_lib.training_plan(dict(TC, batch_size=8, epoch_queries=20,
                                      max_epochs=2))["eval_every"] == 3     # ceil(20 / 8)
  with pytest.raises(ValueError, match="needs train.max_epochs"):
    train_lib.training_plan(dict(TC, epoch_queries=8))
  with pytest.raises(ValueError, match="select_metric"):
    train_lib.training_plan(dict(TC, select_metric="R@20"))
  with pytest.raises(ValueError, match=">= 0"):
    train_lib.training_plan(dict(TC, epoch_queries=8, max_epochs=2, patience=-1))


def test_constant_and_cosine_schedules():
  tc = dict(TC, learning_rate=1e-3, warmup_steps=10, num_steps=100, final_lr_fraction=0.01)
  _, constant = train_lib.make_optimizer(dict(tc, lr_schedule="constant"))
  _, cosine = train_lib.make_optimizer(dict(tc, lr_schedule="cosine"))
  assert float(constant(0)) == 0.0 and float(constant(5)) == pytest.approx(5e-4)
  assert all(float(constant(s)) == pytest.approx(1e-3) for s in (10, 50, 99, 1000))
  assert float(cosine(10)) == pytest.approx(1e-3) and float(cosine(100)) == pytest.approx(1e-5)
  _, no_warmup = train_lib.make_optimizer(dict(tc, lr_schedule="constant", warmup_steps=0))
  assert float(no_warmup(0)) == pytest.approx(1e-3)
  with pytest.raises(ValueError, match="train.lr_schedule"):
    train_lib.make_optimizer(dict(tc, lr_schedule="step"))


def test_finished_line_names_the_selection_and_the_stop():
  assert train_lib.finished_line({"best_val_R@5": 96.0}) == "best val R@5 96.0"
  done = {"select_metric": "R@1", "best_val": {"val_R@1": 88.0, "val_R@5": 96.8},
          "best_val_R@5": 96.8, "epochs": 18, "best_epoch": 15, "stop_reason": "patience"}
  assert train_lib.finished_line(done) == \
      "best val R@1 88.0 at epoch 15 of 18 (stopped: patience)"

"""The trainer: sharded steps, resume, non-finite loss, SIGTERM, teachers, metrics."""
import json
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from configs import common
from fgjax import methods as fgmethods
from fgjax import teachers
import data_fixtures as fx
from fgjax.train import evaluation, logs, optim, setup, sharding, trainer


def tiny_config(**over):
  c = common.base_config("trs_deit")
  c.model.name = "trs_deit_tiny_patch16"
  c.model.img_size = 32
  c.model.kwargs = dict(patch_size=8, depth=3, width=48, num_heads=3, drop_path_rate=0.1)
  c.data.name = "synthetic"
  c.data.resize_size = 36
  c.data.source_kwargs = dict(num_classes=4, num_examples=48, image_size=40)
  c.batch_size = 8
  c.eval_batch_size = 16
  c.total_steps = 4
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.optim.warmup_steps = 1
  c.optim.lr = 1e-3
  return fx.set_keys(c, over)


def _params(workdir, prefer="last"):
  _, _, _, variables, info = setup.restore_model(str(workdir), prefer=prefer)
  return variables, info


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_train_writes_metrics_checkpoints_and_reports(tmp_path):
  cfg = tiny_config(**{"data.val_fraction": 0.25, "eval_every_steps": 2})
  result = trainer.train_and_evaluate(cfg, str(tmp_path))
  assert set(result["test"]) >= {"top1", "top5", "mean_per_class", "num_examples"}
  assert result["val"] is not None and result["selected"] == "best"
  rows = logs.read_metrics(str(tmp_path))
  splits = {r["split"] for r in rows}
  assert {"train", "val", "test"} <= splits
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [2, 4]
  assert all(np.isfinite(r["loss"]) and r["img_per_s"] > 0 for r in train_rows)
  assert os.path.isdir(tmp_path / "checkpoints" / "4")
  assert os.listdir(tmp_path / "tensorboard")
  assert json.load(open(tmp_path / "final_metrics.json"))["test"]["num_examples"] > 0


def test_best_test_over_training_is_reported_beside_the_honest_numbers(tmp_path):
  """The references' protocol (the best test top-1 of every evaluation) in each test row of
  the log and in final_metrics.json, labelled; `test` stays the final evaluation."""
  cfg = tiny_config(**{"eval_every_steps": 1, "optim.lr": 3e-3})
  result = trainer.train_and_evaluate(cfg, str(tmp_path))
  rows = [r for r in logs.read_metrics(str(tmp_path)) if r["split"] == "test"]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  running = np.maximum.accumulate([r["top1"] for r in rows])
  np.testing.assert_allclose([r[trainer.BEST_KEY] for r in rows], running)
  best = json.load(open(tmp_path / "final_metrics.json"))["test_best_over_training"]
  first = int(np.argmax([r["top1"] for r in rows]))
  assert best["top1"] == pytest.approx(running[-1]) and best["step"] == rows[first]["step"]
  assert "peeks at the test split" in best["protocol"]
  assert trainer.BEST_KEY not in result["test"]
  assert result["test"]["top1"] == pytest.approx(rows[-1]["top1"])


def test_best_test_before_a_resume_reads_only_evaluations_up_to_its_step(tmp_path):
  lines = [dict(split="test", step=2, top1=0.5), dict(split="val", step=2, top1=0.9),
           dict(split="test", step=4, top1=0.7), dict(split="test", step=6, top1=0.8),
           dict(split="test", step=5, top1=0.7)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  # step 6 is redone; the tie at 0.7 keeps step 4
  assert trainer._best_test_before(str(tmp_path), 5) == {"top1": (0.7, 4)}
  assert trainer._best_test_before(str(tmp_path), 1) == {}
  assert trainer._best_test_before(str(tmp_path / "nowhere"), 5) == {}
  (tmp_path / "metrics.jsonl").write_text("{not json\n")
  assert trainer._best_test_before(str(tmp_path), 5) == {}  # warned, counts this run only


def test_resume_after_sigterm_equals_uninterrupted(tmp_path, monkeypatch):
  cfg = lambda: tiny_config(ema_decay=0.9, total_steps=6, checkpoint_every_steps=4)
  trainer.train_and_evaluate(cfg(), str(tmp_path / "a"))
  fx.interrupted_run(cfg(), tmp_path / "b", monkeypatch, at_step=3)
  va, ia = _params(tmp_path / "a")
  vb, ib = _params(tmp_path / "b")
  assert ia["step"] == ib["step"] == 6
  assert _max_diff(va, vb) <= 1e-6


def test_step_on_8_devices_equals_single_device():
  assert jax.device_count() == 8
  cfg = tiny_config()
  from fgjax import models
  model = models.create(cfg.model.name, 4, 32, **cfg.model.kwargs)
  method = fgmethods.get_method(cfg, model, 4)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 4, 8).astype(np.int32),
           "id": np.arange(8, dtype=np.int32)}
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(cfg, devices=devices)
    state, step_fn, _ = fx.state_and_step(cfg, method, mesh)
    from jax.sharding import NamedSharding, PartitionSpec as P
    step = jax.jit(step_fn,
                   out_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P())))
    gbatch = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("data"))), batch)
    for _ in range(2):
      state, metrics = step(state, gbatch, None)
    assert len(gbatch["image"].sharding.device_set) == len(devices)
    results.append((jax.device_get(state["params"]), float(metrics["loss"])))
  assert abs(results[0][1] - results[1][1]) < 1e-5
  assert _max_diff(results[0][0], results[1][0]) < 1e-5


def test_non_finite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  cfg = tiny_config(total_steps=6, log_every_steps=1, checkpoint_every_steps=1)
  # A learning rate so large that the parameters overflow after the first update.
  cfg.optim.lr = 1e38
  cfg.optim.name = "sgd"
  cfg.optim.momentum = 0.0
  with pytest.raises(trainer.TrainingError, match=r"non-finite at step (\d+)"):
    trainer.train_and_evaluate(cfg, str(tmp_path))
  # Every checkpoint on disk holds finite parameters.
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert steps, "the last good checkpoint must be kept"
  variables, info = _params(tmp_path)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(variables))


def test_teacher_options(tmp_path, caplog, monkeypatch):
  # 1) a teacher run (plain classifier, CNN)
  tcfg = tiny_config(method="classifier", total_steps=2)
  tcfg.model.name = "cnn_small"
  tcfg.model.kwargs = dict(widths=(8, 16))
  trainer.train_and_evaluate(tcfg, str(tmp_path / "teacher"))
  # 2) export its predictions
  from fgjax.train import modes
  pred_path = modes.export_teacher(str(tmp_path / "teacher"))
  ids, logits, meta = teachers.load_predictions(pred_path)
  assert logits.shape == (48, 4) and len(np.unique(ids)) == 48 and meta["model"] == "cnn_small"
  # 3) student with the online teacher, with the prediction file, and without a teacher
  for name, over in [("online", {"teacher.checkpoint": str(tmp_path / "teacher")}),
                     ("offline", {"teacher.predictions": pred_path}),
                     ("none", {})]:
    caplog.clear()
    with caplog.at_level("INFO", logger="fgjax"):
      res = trainer.train_and_evaluate(tiny_config(total_steps=1, **over), str(tmp_path / name))
    assert res["test"]["num_examples"] > 0
    text = caplog.text
    if name == "none":
      assert "ground-truth" in text or "ground truth" in text
    else:
      assert "teacher: " in text and "none" not in text.split("teacher: ")[1][:10]
  # A student distilling from the file, stopped mid-epoch (step 3 of 6 per epoch) and resumed,
  # ends with the parameters of an uninterrupted run: the teacher labels follow the example ids.
  cfg = lambda: tiny_config(**{"teacher.predictions": pred_path}, total_steps=5,
                            checkpoint_every_steps=5)
  trainer.train_and_evaluate(cfg(), str(tmp_path / "whole"))
  fx.interrupted_run(cfg(), tmp_path / "resumed", monkeypatch, at_step=3)
  va, ia = _params(tmp_path / "whole")
  vb, ib = _params(tmp_path / "resumed")
  assert ia["step"] == ib["step"] == 5 and _max_diff(va, vb) <= 1e-6
  # A prediction file that lacks training ids is refused, naming the file.
  np.savez(tmp_path / "bad.npz", ids=ids[:10], logits=logits[:10])
  with pytest.raises(teachers.TeacherError, match="bad.npz lacks 38"):
    trainer.train_and_evaluate(tiny_config(**{"teacher.predictions": str(tmp_path / "bad.npz")}),
                               str(tmp_path / "bad"))


def test_summarize_eval_exact():
  # Fixed predictions (scenic-style fake model): 6 examples, 3 classes, 1 padded row.
  res = {"mask": np.array([1, 1, 1, 1, 1, 1, 0], bool),
         "label": np.array([0, 0, 1, 1, 2, 2, 0]),
         "pred": np.array([0, 1, 1, 1, 0, 2, 0]),
         "correct5": np.array([1, 1, 1, 1, 0, 1, 1], bool)}
  out = evaluation.summarize_eval(res, 3)
  assert out["num_examples"] == 6
  assert out["top1"] == pytest.approx(4 / 6)
  assert out["top5"] == pytest.approx(5 / 6)
  assert out["mean_per_class"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)


def test_part_hits():
  # 4x4 grid of 8-px patches; part box covers patch (row 1, col 2) only.
  sel = jnp.array([[6, 0], [6, 6]])
  boxes = jnp.array([[[16, 8, 24, 16], [-1, -1, -1, -1]]] * 2, jnp.float32)
  hit, has = fgmethods.part_hits(sel, boxes, (4, 4), 8, 8)
  np.testing.assert_allclose(np.asarray(hit), [0.5, 1.0])
  assert bool(has.all())
  every = jnp.broadcast_to(jnp.arange(16), (2, 16))  # chance: 1 of 16 patches is on the part
  np.testing.assert_allclose(np.asarray(fgmethods.part_hits(every, boxes, (4, 4), 8, 8)[0]),
                             [1 / 16] * 2)
  res = {"mask": np.array([1, 1, 0]), "label": np.array([0, 1, 1]), "pred": np.array([0, 1, 0]),
         "correct5": np.ones(3, bool),
         "values": {"part_hit": np.array([0.5, 1.0, 1.0]), "has_parts": np.array([1, 1, 1]),
                    "part_hit_chance": np.array([0.1, 0.2, 0.9])}}
  from fgjax import models
  cfg = tiny_config()
  method = fgmethods.get_method(cfg, models.create(cfg.model.name, 4, 32, **cfg.model.kwargs), 4)
  out = evaluation.summarize_eval(res, 2, method)
  assert out["part_hit_rate"] == pytest.approx(0.75)  # the padded third example is left out
  assert out["part_hit_chance"] == pytest.approx(0.15)


def test_best_over_training_per_head(tmp_path):
  """Each top-1 head (top1, combined_top1, ...) keeps its own best and step; ties keep the
  earlier step."""
  rows = [{"split": "test", "step": 1, "top1": 0.5, "combined_top1": 0.7, "top5": 0.9},
          {"split": "train", "step": 2, "top1": 0.99},
          {"split": "test", "step": 2, "top1": 0.6, "combined_top1": 0.7},
          {"split": "test", "step": 3, "top1": 0.8, "combined_top1": 0.6}]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  assert trainer._best_test_before(str(tmp_path), 2) == {"top1": (0.6, 2),
                                                         "combined_top1": (0.7, 1)}
  assert trainer._best_test_before(str(tmp_path), 3)["top1"] == (0.8, 3)
  assert trainer._best_test_before(str(tmp_path / "none"), 3) == {}


def test_point_hits_count_a_patch_that_contains_a_visible_part():
  """CUB part locations: a patch [c*s, c*s+p) x [r*s, r*s+p) hits when it contains a visible
  point; invisible rows and padding (-1, -1, 0) never hit. Overlapping patches (TransFG's
  stride 12 < patch 16) each count."""
  locs = jnp.array([[[20.0, 10.0, 1.0], [3.0, 3.0, 0.0]],  # visible in patch (1, 2); hidden
                    [[-1.0, -1.0, 0.0], [-1.0, -1.0, 0.0]]], jnp.float32)  # no parts at all
  sel = jnp.array([[6, 0], [6, 0]])
  hit, has = fgmethods.point_hits(sel, locs, (4, 4), 8, 8)
  np.testing.assert_allclose(np.asarray(hit), [0.5, 0.0])
  assert has.tolist() == [True, False]
  every = jnp.broadcast_to(jnp.arange(16), (2, 16))
  np.testing.assert_allclose(np.asarray(fgmethods.point_hits(every, locs, (4, 4), 8, 8)[0]),
                             [1 / 16, 0.0])
  # stride 12, patch 16 on a 3 x 3 grid: (20, 10) lies in columns 12..28 and 0..16 of rows
  # 0..16 -> patches (0, 1) only; (13, 13) would lie in (0, 0), (0, 1), (1, 0), (1, 1).
  locs = jnp.array([[[20.0, 10.0, 1.0], [13.0, 13.0, 1.0]]], jnp.float32)
  every = jnp.arange(9)[None]
  hit, _ = fgmethods.point_hits(every, locs, (3, 3), 16, 12)
  np.testing.assert_allclose(np.asarray(hit), [4 / 9])
  # Regions prefers part locations to part boxes when a batch has both
  from fgjax import models
  from fgjax.methods.regions import Regions
  cfg = tiny_config()
  model = models.create(cfg.model.name, 4, 32, **cfg.model.kwargs)
  regions = Regions.of(model)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  g, p = model.grid, model.patch_size
  batch = {"image": jnp.zeros((1, 32, 32, 3)),
           "part_boxes": jnp.array([[[0.0, 0.0, 32.0, 32.0]]]),  # every patch centre inside
           "part_locs": jnp.array([[[1.0, 1.0, 1.0]]])}  # only patch 0 holds the point
  _, values = regions.eval_outputs(variables, batch)
  assert float(values["part_hit_chance"][0]) == pytest.approx(1 / (g[0] * g[1]))
  assert p * g[1] <= 32 and bool(values["has_parts"][0])


def test_get_steps():
  c = common.base_config()
  c.total_epochs = 2.5
  assert setup.get_steps(c, "total", 10) == 25
  c.total_steps = 3
  with pytest.raises(ValueError, match="only one of total_steps"):
    setup.get_steps(c, "total", 10)


def test_optimizer_groups_and_schedules():
  import ml_collections
  params = {"blocks_0": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, "head": {"kernel": jnp.ones((2, 3))}}
  cfg = ml_collections.ConfigDict(dict(name="sgd", lr=1.0, backbone_lr_mult=0.1, momentum=0.0,
                                       weight_decay=0.0, schedule="step", warmup_steps=2,
                                       decay_every_steps=4, decay_rate=0.5,
                                       new_layers=("head/.*",)))
  tx, sched = optim.make_optimizer(cfg, params, total_steps=20)
  assert float(sched["new"](1)) == pytest.approx(0.5)      # warm-up
  assert float(sched["new"](2)) == pytest.approx(1.0)
  assert float(sched["new"](2 + 4)) == pytest.approx(0.5)  # one decay
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # At step 0 the warm-up factor is 0; use step 2's rates via a fresh chain at count 2.
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
  assert float(updates["head"]["kernel"][0, 0]) == pytest.approx(-1.0)
  assert float(updates["blocks_0"]["w"][0, 0]) == pytest.approx(-0.1)


def test_weight_decay_mask_and_decay_1d():
  """The default decays only matrices and kernels; `optim.decay_1d` decays biases and norm
  scales too (torch.optim's weight_decay over net.parameters(), the PMG and CAL recipes)."""
  import ml_collections
  one = lambda *shape: np.ones(shape, np.float32)
  params = {"conv": {"kernel": one(3, 3, 2, 4), "bias": one(4)}, "pos_embed": one(1, 5, 4),
            "bn": {"scale": one(4)}}
  flat = lambda t: {"/".join(str(getattr(k, "key", k)) for k in p): v
                    for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  assert flat(optim.decay_mask(("pos_embed",))(params)) == {
      "bn/scale": False, "conv/bias": False, "conv/kernel": True, "pos_embed": False}
  assert flat(optim.decay_mask(("pos_embed",), decay_1d=True)(params)) == {
      "bn/scale": True, "conv/bias": True, "conv/kernel": True, "pos_embed": False}
  cfg = ml_collections.ConfigDict(dict(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.5,
                                       schedule="constant", no_decay=(), decay_1d=True))
  tx, _ = optim.make_optimizer(cfg, params, 10)
  zero = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  for v in jax.tree.leaves(updates):  # -lr * wd * p on every parameter
    np.testing.assert_allclose(np.asarray(v), -0.05)


def test_lr_base_batch_scales_the_rate_by_the_global_batch(caplog):
  """DeiT's rule: lr x global batch / lr_base_batch, on every group's schedule (the backbone's
  with its multiplier), logged; off (None or 0) leaves optim.lr; a bad value names the key."""
  import logging
  cfg = tiny_config(**{"optim.lr": 3e-3, "optim.schedule": "constant", "optim.warmup_steps": 0,
                       "optim.backbone_lr_mult": 0.1, "batch_size": 8})
  _, method = setup.build(cfg, 4)
  shapes = setup.params_shape(method, setup.config_example(cfg))
  for base, want in ((None, 3e-3), (0, 3e-3), (512, 3e-3 * 8 / 512)):
    cfg.optim.lr_base_batch = base
    with caplog.at_level(logging.INFO, logger="fgjax"):
      caplog.clear()
      opts = setup.build_optimizers(cfg, method, shapes, 10, 20)
    assert float(opts["default"].schedule(5)) == pytest.approx(want)
    assert ("lr_base_batch 512 = 4.69e-05" in caplog.text) == (base == 512), caplog.text
  _, sched = optim.make_optimizer(
      setup.ml_collections.ConfigDict(dict(cfg.optim, lr=3e-3 * 8 / 512)), shapes, 20)
  assert float(sched["backbone"](5)) == pytest.approx(3e-3 * 8 / 512 * 0.1)
  assert setup.scaled_lr(cfg.optim, 16) == pytest.approx(3e-3 * 16 / 512)
  cfg.optim.lr_base_batch = -4
  with pytest.raises(ValueError, match="config.optim.lr_base_batch"):
    setup.build_optimizers(cfg, method, shapes, 10, 20)
  # The TRS-DeiT recipes: the paper's rates under the rule, on 4 images per GPU x 2 GPUs.
  from configs import trs_deit_cars, trs_deit_cub, trs_deit_dogs
  for module, want in ((trs_deit_cub, 3e-3 * 8 / 512), (trs_deit_cars, 3e-3 * 8 / 512),
                       (trs_deit_dogs, 5e-4 * 8 / 512)):
    c = module.get_config()
    assert (c.batch_size, c.optim.lr_base_batch) == (8, 512)
    assert setup.scaled_lr(c.optim, c.batch_size) == pytest.approx(want)


def test_fsdp_2x4_step_equals_8x1_and_shards_the_state(tmp_path):
  assert jax.device_count() == 8
  from fgjax import models
  from jax.sharding import NamedSharding, PartitionSpec as P
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 4, 8).astype(np.int32),
           "id": np.arange(8, dtype=np.int32)}
  results = []
  for fsdp in (1, 4):
    cfg = tiny_config(**{"mesh.fsdp": fsdp})
    model = models.create(cfg.model.name, 4, 32, **cfg.model.kwargs)
    method = fgmethods.get_method(cfg, model, 4)
    mesh = sharding.make_mesh(cfg)
    assert dict(mesh.shape) == ({"data": 8} if fsdp == 1 else {"data": 2, "fsdp": 4})
    state, step_fn, _ = fx.state_and_step(cfg, method, mesh)
    shardings = sharding.state_shardings(state, mesh)
    step = jax.jit(step_fn,
                   out_shardings=(shardings, NamedSharding(mesh, P())))
    from fgjax import data as fgdata
    gbatch = fgdata.to_global_batch(batch, mesh)
    for _ in range(2):
      state, metrics = step(state, gbatch, None)
    qkv = state["params"]["blocks_0"]["attn"]["qkv"]["kernel"]  # (48, 144)
    opt_qkv = [x for x in jax.tree.leaves(state["opt"]) if x.shape == (48, 144)]
    assert len(opt_qkv) >= 2  # at least AdamW's mu and nu for that kernel
    if fsdp == 4:
      assert qkv.sharding.spec == P(None, "fsdp")
      assert qkv.addressable_shards[0].data.shape == (48, 36)  # a quarter per device
      assert all(x.sharding.spec == P(None, "fsdp") for x in opt_qkv)
      assert state["step"].sharding.spec == P()
      assert gbatch["image"].sharding.spec == P(("data", "fsdp"))
    else:
      assert qkv.sharding.spec == P()
    results.append((jax.device_get(state["params"]), float(metrics["loss"])))
  assert abs(results[0][1] - results[1][1]) < 1e-5
  assert _max_diff(results[0][0], results[1][0]) < 1e-5
  # The whole trainer with fsdp: train, checkpoint, restore.
  cfg = tiny_config(**{"mesh.fsdp": 2, "total_steps": 2})
  trainer.train_and_evaluate(cfg, str(tmp_path / "w"))
  variables, info = _params(tmp_path / "w")
  assert info["step"] == 2
  with pytest.raises(ValueError, match="config.mesh.fsdp=3"):
    sharding.make_mesh(tiny_config(**{"mesh.fsdp": 3}))

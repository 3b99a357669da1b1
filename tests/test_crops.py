"""Attention-region random crops (fgjax.toolkit.crops): the best random box against a brute
force count, SCDA's largest component, the maps, the pipeline's crop by box, and a tiny
training run that refreshes the crops at the due epochs, trains on batches cut by them and
resumes with the same boxes."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_fixtures as fx
from configs import common
from fgjax import data as fgdata
from fgjax import models
from fgjax.data import pipeline, transforms
from fgjax.toolkit import crops
from fgjax.train import checkpoint as ckpt_lib
from fgjax.train import logs, setup, sharding, trainer


# ----------------------------------------------------------------------------- boxes


def _brute_best(mask, bh, bw, ys, xs):
  counts = [int(mask[y:y + bh, x:x + bw].sum()) for y, x in zip(ys, xs)]
  k = int(np.argmax(counts))
  return (int(ys[k]), int(xs[k]), int(ys[k]) + bh, int(xs[k]) + bw), counts[k]


def test_best_random_box_agrees_with_a_brute_force_count_and_finds_the_dense_region():
  rng = np.random.default_rng(0)
  mask = rng.random((40, 50)) < 0.15  # sparse noise ...
  mask[22:34, 5:19] = True            # ... and one dense 12 x 14 region
  for seed in range(5):
    for bh, bw, n in ((12, 14, 64), (7, 20, 9), (1, 1, 3), (40, 3, 17)):
      box = crops.best_random_box(mask, bh, bw, n, seed)
      g = np.random.default_rng(seed)  # the documented draws: ys, then xs
      ys = g.integers(0, 40 - bh + 1, n)
      xs = g.integers(0, 50 - bw + 1, n)
      want, count = _brute_best(mask, bh, bw, ys, xs)
      assert box == want
      y0, x0, y1, x1 = box
      assert (y1 - y0, x1 - x0) == (bh, bw) and int(mask[y0:y1, x0:x1].sum()) == count
  # with many draws the box lands on the dense region
  y0, x0, y1, x1 = crops.best_random_box(mask, 12, 14, 3000, np.random.default_rng(1))
  assert abs(y0 - 22) <= 1 and abs(x0 - 5) <= 1
  # a Generator and its int seed draw the same boxes; 0/1 ints count like bools
  assert crops.best_random_box(mask.astype(np.uint8), 9, 9, 20, 7) == \
      crops.best_random_box(mask, 9, 9, 20, np.random.default_rng(7))


def test_best_random_box_ties_oversized_boxes_and_bad_input():
  empty = np.zeros((10, 12), bool)
  g = np.random.default_rng(3)
  ys, xs = g.integers(0, 7, 5), g.integers(0, 9, 5)
  assert crops.best_random_box(empty, 4, 4, 5, 3) == (ys[0], xs[0], ys[0] + 4, xs[0] + 4)
  assert crops.best_random_box(empty, 50, 60, 4, 0) == (0, 0, 10, 12)  # clipped: whole mask
  y0, x0, y1, x1 = crops.best_random_box(np.ones((10, 12)), 30, 5, 4, 0)
  assert (y0, y1, x1 - x0) == (0, 10, 5)
  with pytest.raises(ValueError, match="2-D"):
    crops.best_random_box(np.zeros((4, 4, 1)), 2, 2, 1, 0)
  with pytest.raises(ValueError, match="box_w"):
    crops.best_random_box(empty, 2, 0, 1, 0)
  with pytest.raises(ValueError, match="num_boxes"):
    crops.best_random_box(empty, 2, 2, 0, 0)
  with pytest.raises(TypeError, match="Generator or an int"):
    crops.best_random_box(empty, 2, 2, 1, "seed")


def test_scda_box_is_the_largest_connected_component_above_the_mean():
  mask = np.zeros((20, 20), bool)
  mask[2:5, 2:5] = True                       # 9 pixels
  for i in range(10):                         # a diagonal of 10: one 8-connected component
    mask[8 + i, 6 + i] = True                 # (10 single pixels 4-connected)
  assert crops.largest_component_box(mask) == (8, 6, 18, 16)
  assert crops.largest_component_box(np.zeros((3, 4))) == (0, 0, 3, 4)
  # SCDA: channel sum; the mask keeps what is above the mean
  fmap = np.zeros((20, 20, 3), np.float32)
  fmap[..., 0] = mask * 2.0
  fmap[2:5, 2:5, 1] = 1.0                     # the small blob is dimmer but still above mean
  fmap[15:19, 0:2, 2] = 0.01                  # faint noise below the mean
  assert crops.scda_box(fmap) == (8, 6, 18, 16)
  np.testing.assert_allclose(crops.normalized((8, 6, 18, 16), 20, 20),
                             [6 / 20, 8 / 20, 16 / 20, 18 / 20])


def _random_variables(model, x):
  """Random variables of the model's layout (numpy draws: no initialiser to compile)."""
  g = np.random.default_rng(0)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  return jax.tree.map(lambda s: (0.2 * g.normal(size=s.shape)).astype(s.dtype), shapes)


def test_threshold_masks_and_the_cnn_and_vit_maps():
  maps = np.array([[[1.0, 2.0], [3.0, 5.0]]])
  np.testing.assert_array_equal(crops.threshold_masks(maps, 0.5, "max"), [[[0, 0], [1, 1]]])
  np.testing.assert_array_equal(crops.threshold_masks(maps, 1.0, "mean"), [[[0, 0], [1, 1]]])
  np.testing.assert_array_equal(crops.threshold_masks(jnp.asarray(maps), 0.3, "max"),
                                [[[0, 0], [1, 1]]])
  model = models.create("cnn_small", 5, 32, widths=(8, 16), head_zeroinit=False)
  x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  v = _random_variables(model, x)
  logits, fmap = jax.jit(lambda v, x: (lambda o: (o[0], o[1]["stages"][-1]))(
      model.apply(v, x)))(v, x)
  cam, mean = jax.jit(lambda v, x: [crops.attention_maps(model, v, (x,), k)
                                    for k in ("cam", "mean")])(v, x)
  w = np.asarray(v["params"]["head"]["kernel"])[:, np.argmax(np.asarray(logits), -1)]
  np.testing.assert_allclose(cam, np.einsum("bhwc,cb->bhw", fmap, w), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mean, np.asarray(fmap).mean(-1), rtol=1e-6)
  assert crops.resolve_map(model, "auto") == "cam"
  with pytest.raises(ValueError, match="crop.map='rollout' needs a ViT"):
    crops.resolve_map(model, "rollout")
  deit = models.create("deit_tiny_patch16", 3, 32, patch_size=8, depth=2, width=24,
                       num_heads=2)
  dv = _random_variables(deit, x)
  rollout = jax.jit(lambda v, x: deit.apply(v, x, return_rollout=True)[1]["rollout"])(dv, x)
  assert crops.resolve_map(deit, "auto") == "rollout"
  maps = jax.jit(lambda v, x: crops.attention_maps(deit, v, (x,), "rollout"))(dv, x)
  np.testing.assert_allclose(maps, np.asarray(rollout).mean(1).reshape(3, 4, 4), rtol=1e-6)


def test_settings_and_plan():
  c = common.base_config("classifier")
  assert crops.CropPlan.of(c, 3, 12) is None  # off by default
  c.crop.enabled, c.crop.start_epoch, c.crop.every_epochs = True, 1, 2
  plan = crops.CropPlan.of(c, 3, 12)
  assert [s for s in range(13) if plan.due(s)] == [3, 9]
  assert [plan.latest(s) for s in (0, 2, 3, 8, 9, 12)] == [None, None, 3, 3, 9, 9]
  c.crop.start_epoch = 0
  assert [s for s in range(13) if crops.CropPlan.of(c, 3, 12).due(s)] == [0, 6]
  for key, bad, msg in (("kind", "box", "crop.kind"), ("box_size", (0.5, 1.5), "box_size"),
                        ("threshold_of", "median", "threshold_of"),
                        ("every_epochs", 0, "every_epochs")):
    c2 = common.base_config("classifier")
    c2.crop[key] = bad
    with pytest.raises(ValueError, match=msg):
      crops.settings(c2)


def test_a_map_that_does_not_fit_the_model_fails_before_training(tmp_path):
  with pytest.raises(ValueError, match="crop.map='rollout' needs a ViT"):
    trainer.train_and_evaluate(crop_config(**{"crop.map": "rollout"}), str(tmp_path / "a"))
  assert not (tmp_path / "a").exists()
  cfg = crop_config(**{"model.kwargs": dict(widths=(8, 8, 8), feature_size=8, stage_features=8)})
  cfg.model.name = "pmg_cnn_small"  # PMG heads: no single classifier over one map
  with pytest.raises(ValueError, match="crop.map="):
    trainer.train_and_evaluate(cfg, str(tmp_path / "b"))
  assert not (tmp_path / "b" / "checkpoints").exists()


# ----------------------------------------------------------------------------- pipeline


def test_crop_to_box_moves_annotations_and_the_loader_crops_by_the_boxes():
  img = np.arange(40 * 50 * 3, dtype=np.uint8).reshape(40, 50, 3)
  ann = {"object_box": np.array([5, 5, 30, 30], np.float32),
         "part_locs": np.array([[12, 22, 1], [2, 2, 1], [20, 30, 0]], np.float32)}
  win, out = transforms.crop_to_box(img, (0.2, 0.5, 0.6, 1.0), ann)  # x 10:30, y 20:40
  np.testing.assert_array_equal(win, img[20:40, 10:30])
  np.testing.assert_array_equal(out["object_box"], [0, 0, 20, 10])
  np.testing.assert_array_equal(out["part_locs"], [[2, 2, 1], [-1, -1, 0], [-1, -1, 0]])
  from PIL import Image
  pwin, _ = transforms.crop_to_box(Image.fromarray(img), (0.2, 0.5, 0.6, 1.0))
  np.testing.assert_array_equal(np.asarray(pwin), img[20:40, 10:30])

  src = fgdata.get_source("synthetic", "train", None, num_classes=3, num_examples=8,
                          image_size=40)
  boxes = np.tile(np.array([0.0, 0.0, 1.0, 1.0], np.float32), (8, 1))
  boxes[3] = (0.25, 0.1, 0.85, 0.6)
  kw = dict(global_batch_size=8, image_size=24, resize_size=28, seed=5, prefetch=1)
  batch = next(fgdata.make_train_loader(src, crop_boxes=boxes, **kw))
  plain = next(fgdata.make_train_loader(src, **kw))
  k = int(np.flatnonzero(batch["id"] == 3)[0])
  img3, rec = src.get(3)
  win, ann = transforms.crop_to_box(img3, boxes[3], {"object_box": rec["object_box"]})
  want, want_boxes = transforms.train_crop(
      win, np.random.default_rng((5, pipeline._AUGMENT_STREAM, k)), image_size=24,
      resize_size=28, boxes=ann)
  np.testing.assert_array_equal(batch["image"][k], want)
  np.testing.assert_allclose(batch["object_box"][k], want_boxes["object_box"])
  assert not np.array_equal(batch["image"][k], plain["image"][k])
  full = batch["id"] != 3  # a whole-image box leaves the example as it was
  np.testing.assert_array_equal(batch["image"][full], plain["image"][full])
  with pytest.raises(ValueError, match=r"crop_boxes\[2\]"):
    bad = boxes.copy()
    bad[2] = (0.5, 0.5, 0.4, 0.9)
    fgdata.make_train_loader(src, crop_boxes=bad, **kw)
  with pytest.raises(ValueError, match=r"must be \(8, 4\)"):
    fgdata.make_train_loader(src, crop_boxes=boxes[:5], **kw)


def test_checkpointer_keeps_crops_beside_the_kept_steps_only(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2, async_save=False)
  state = {"params": {"w": jnp.ones((2,))}, "step": jnp.zeros((), jnp.int32)}
  for step in (1, 2, 3):
    ckpt.save(step, state, {"pos": step}, crops={"boxes": np.full((2, 4), step, np.float32)})
  ckpt.wait()
  assert ckpt.load_crops(1) is None  # pruned with its checkpoint
  np.testing.assert_array_equal(ckpt.load_crops(3)["boxes"], np.full((2, 4), 3))
  with open(ckpt._crops_path(2), "wb") as f:
    f.write(b"not a zip")
  assert ckpt.load_crops(2) is None  # unreadable: warned, computed again by the trainer
  ckpt.close()


def test_refresh_boxes_equal_the_maps_boxes_computed_by_hand():
  """`refresh` over a source on the 8 devices: random_box = best_random_box of the thresholded
  CAM upsampled to the input size, seeded by (seed, step, position); scda = scda_box of the
  channel-mean map; both normalised x0, y0, x1, y1."""
  cfg = crop_config(**{"data.source_kwargs.num_examples": 11})  # a padded last batch
  src, _, _ = setup.get_sources(cfg)
  model, method = setup.build(cfg, 3)
  mesh = sharding.make_mesh(cfg)
  x = np.zeros((1, 32, 32, 3), np.float32)
  v = _random_variables(model, x)
  kw = setup.pipeline_kwargs(cfg, train=False)
  kw.update(image_size=32, resize_size=32, resize_mode="square")
  images = np.concatenate([b["image"] for b in fgdata.make_eval_loader(
      src, global_batch_size=8, **kw)])[:11]
  norm = fgdata.normalize_images(jnp.asarray(images))
  cam, mean = jax.jit(lambda v, x: [crops.attention_maps(model, v, (x,), k)
                                    for k in ("cam", "mean")])(v, norm)
  up = jax.image.resize(cam, (11, 32, 32), "linear")
  masks = np.asarray(crops.threshold_masks(up, 0.5, "max"))
  table = crops.refresh(cfg, method, v, src, mesh, step=6)
  assert table.step == 6 and table.fits(src) and table.boxes.shape == (11, 4)
  for pos in range(11):
    rng = np.random.default_rng((0, crops._BOX_STREAM, 6, pos))
    box = crops.best_random_box(masks[pos], 16, 19, 16, rng)  # box_size (0.5, 0.6) of 32
    np.testing.assert_allclose(table.boxes[pos], crops.normalized(box, 32, 32))
  cfg.crop.kind = "scda"
  scda = crops.refresh(cfg, method, v, src, mesh, step=6)
  h, w = mean.shape[1:]
  for pos in range(11):
    np.testing.assert_allclose(scda.boxes[pos],
                               crops.normalized(crops.scda_box(np.asarray(mean[pos])), h, w))
  assert not np.array_equal(scda.boxes, table.boxes)


# ----------------------------------------------------------------------------- training


def crop_config(**over):
  c = common.base_config("classifier")
  c.model.name, c.model.img_size = "cnn_small", 32
  c.model.kwargs = dict(widths=(8, 16), head_zeroinit=False)
  c.data.resize_size = 36
  c.data.source_kwargs = dict(num_classes=3, num_examples=24, image_size=40)
  c.data.split_kwargs = {"test": dict(num_examples=8)}
  c.batch_size = c.eval_batch_size = 8  # 3 steps per epoch
  c.total_steps = 12
  c.log_every_steps = 3
  c.checkpoint_every_steps = 3
  c.keep_checkpoints = 2
  c.optim.lr = 3e-3
  c.crop.enabled = True
  c.crop.start_epoch, c.crop.every_epochs = 1, 2  # refreshed after steps 3 and 9
  c.crop.box_size = (0.5, 0.6)
  c.crop.num_boxes = 16
  return fx.set_keys(c, over)


def _record_train_batches(monkeypatch):
  """The numpy batches the trainer takes from its train loader, in order (eval batches and the
  crop pass carry a `mask`)."""
  seen = []
  orig = fgdata.to_global_batch

  def spy(batch, *a, **kw):
    if "mask" not in batch:
      seen.append({k: np.array(batch[k]) for k in ("image", "id")})
    return orig(batch, *a, **kw)

  monkeypatch.setattr(fgdata, "to_global_batch", spy)
  return seen


def test_training_refreshes_crops_crops_the_batches_and_resumes_with_the_same_boxes(
    tmp_path, monkeypatch):
  """3 steps per epoch, 12 steps, refreshes after steps 3 and 9; stopped by SIGTERM at step 5
  and resumed: the resumed run crops by the step-3 boxes saved with its checkpoint."""
  cfg = crop_config()
  seen = _record_train_batches(monkeypatch)
  tables = []
  orig_call = crops.Refresher.__call__
  monkeypatch.setattr(crops.Refresher, "__call__", lambda *a, **kw: tables.append(
      orig_call(*a, **kw)) or tables[-1])
  fx.interrupted_run(cfg, tmp_path, monkeypatch, at_step=5)
  assert len(seen) == 12  # 5 steps, then 7 after the resume
  assert [t.step for t in tables] == [3, 9]  # not computed again on resume
  rows = [r for r in logs.read_metrics(str(tmp_path)) if r["split"] == "crops"]
  assert [(r["step"], r["epoch"]) for r in rows] == [(3, 1), (9, 3)]
  assert all(r["num_images"] == 24 and 0 < r["mean_coverage"] <= 1 for r in rows)
  assert rows[0]["mean_box_area"] == pytest.approx(0.5 * 0.6, rel=0.05)
  t3, t9 = tables
  assert np.any(t3.boxes[:, 2] - t3.boxes[:, 0] < 0.99)  # real crops, not the whole image
  assert not np.array_equal(t3.boxes, t9.boxes)

  # Each kept checkpoint has the table in use at its step beside it; pruned ones lost theirs.
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), read_only=True)
  assert sorted(os.listdir(tmp_path / "data_state")) == ["12", "9"]
  for step in (9, 12):
    saved = crops.CropTable.from_arrays(ckpt.load_crops(step))
    assert saved.step == 9 and saved.fits(setup.get_sources(cfg)[0])
    np.testing.assert_array_equal(saved.boxes, t9.boxes)
  ckpt.close()

  # The batches, rebuilt by hand: steps 0-2 plain, 3-8 (5-8 after the resume) cut by the
  # step-3 boxes, 9-11 by the step-9 boxes.
  src, _, _ = setup.get_sources(cfg)

  def expected(step, k, table):
    i = int(seen[step]["id"][k])
    img, _ = src.get(i)
    rng = np.random.default_rng((cfg.seed, pipeline._AUGMENT_STREAM, step * 8 + k))
    return transforms.train_crop(img, rng, image_size=32, resize_size=36,
                                 crop_box=None if table is None else table.boxes[i])[0]

  for step, k, table in ((0, 1, None), (2, 6, None), (4, 2, t3), (5, 0, t3), (8, 7, t3),
                         (9, 0, t9), (11, 5, t9)):
    np.testing.assert_array_equal(seen[step]["image"][k], expected(step, k, table),
                                  err_msg=f"step {step}")
  assert any(not np.array_equal(seen[5]["image"][k], expected(5, k, None)) for k in range(8))

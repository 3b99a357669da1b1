"""CAL: shapes, bilinear attention pooling, the augmentation boxes against the reference
algorithm (torch), the four loss terms and the centre update, quick configs, resume."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_fixtures as fx
from configs import (cal_resnet50_cub, cal_resnet101_aircraft, cal_resnet101_cars,
                     cal_resnet101_cub, cal_resnet101_dogs)
from fgjax import losses, methods, models
from fgjax.models import cal as cal_lib
from fgjax.train import logs, trainer

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _small(num_classes=5, img=64, m=4, **kw):
  return models.create("cal_resnet18", num_classes, img_size=img, num_attentions=m,
                       widths=(8, 16, 32, 64), **kw)


def _init(model, img=64, batch=2, seed=0):
  x = jax.random.normal(jax.random.key(seed), (batch, img, img, 3))
  v = model.init({"params": jax.random.key(seed), "dropout": jax.random.key(1)}, x)
  return x, dict(v)


def test_shapes_and_test_views():
  model = _small(test_views="two")
  x, v = _init(model)
  assert v["centers"]["feature_center"].shape == (5, 4 * 64)
  assert set(v["params"]) == {"backbone", "attention_conv", "attention_bn", "fc"}
  assert "bias" not in v["params"]["fc"]
  logits, aux = model.apply(v, x)
  assert logits.shape == (2, 5)
  # Output stride 16 (layer4 at stride 1, as the reference): 4 x 4 maps at 64 px.
  assert aux["attention_maps"].shape == (2, 4, 4, 4)
  assert aux["features"].shape == (2, 256)
  np.testing.assert_allclose(np.linalg.norm(aux["features"], axis=-1), 1.0, atol=1e-5)
  assert aux["view_logits"].shape == (2, 2, 5)
  np.testing.assert_allclose(logits, aux["view_logits"].mean(0), atol=1e-6)
  np.testing.assert_allclose(aux["view_logits"][0], aux["raw_logits"], atol=1e-6)
  single, aux1 = _small(test_views="raw").apply(v, x)
  np.testing.assert_allclose(single, aux["raw_logits"], atol=1e-6)
  # output_stride=32 gives torchvision's layer4 (2 x 2 here) with the same parameters.
  _, aux32 = _small(test_views="raw", output_stride=32).apply(v, x)
  assert aux32["attention_maps"].shape == (2, 2, 2, 4)
  with pytest.raises(ValueError, match="test_views"):
    _small(test_views="nine").apply(v, x)
  # Inference needs no centres (e.g. a converted checkpoint); ResNet-101 has 2048 channels.
  model.apply({"params": v["params"], "batch_stats": v["batch_stats"]}, x)
  big = models.create("cal_resnet101", 200, img_size=64)
  shapes = jax.eval_shape(lambda: big.init({"params": jax.random.key(0)},
                                           jnp.zeros((1, 64, 64, 3))))
  assert shapes["centers"]["feature_center"].shape == (200, 32 * 2048)
  assert shapes["params"]["fc"]["kernel"].shape == (32 * 2048, 200)


def test_eight_view_test_is_the_references_infer():
  """The default test: raoyongming/CAL `infer.py`'s eight views, rebuilt here from single-view
  applications and the reference's own crop algorithm (torch)."""
  model = _small()
  assert model.test_views == "eight"
  x, v = _init(model, batch=3, seed=2)
  logits, aux = model.apply(v, x)
  raw = _small(test_views="raw")
  want, want_effect, views = 0.0, 0.0, []
  for img in (np.asarray(x), np.asarray(x)[:, :, ::-1].copy()):
    y_raw, a = raw.apply(v, img)
    mean_map = np.asarray(a["attention_maps"]).mean(-1)
    per = [(y_raw, a["effect_logits"])]
    for theta, pad in ((0.3, 0.1), (0.2, 0.1), (0.1, 0.05)):
      crops, _ = _reference_augment(img, mean_map, "crop", [theta] * 3, pad)
      y_c, a_c = raw.apply(v, crops)
      per.append((y_c, a_c["effect_logits"]))
    views += [p[0] for p in per]
    want = want + sum(p[0] for p in per) / 4 / 2
    want_effect = want_effect + sum(p[1] for p in per) / 4 / 2
  np.testing.assert_allclose(aux["view_logits"], np.stack(views), atol=2e-4)
  np.testing.assert_allclose(logits, want, atol=2e-4)
  np.testing.assert_allclose(aux["effect_logits"], want_effect, atol=2e-4)
  # The training pass sees the raw view only.
  (y_train, _), _ = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)},
                                mutable=["batch_stats"])
  assert y_train.shape == (3, 5)


def test_bilinear_attention_pooling_and_counterfactual_features():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
  att = np.abs(rng.normal(size=(2, 3, 4, 5))).astype(np.float32)
  f = np.einsum("bhwm,bhwc->bmc", att, feats).reshape(2, -1) / 12.0
  f = np.sign(f) * np.sqrt(np.abs(f) + 1e-6)
  f /= np.linalg.norm(f, axis=-1, keepdims=True)
  np.testing.assert_allclose(cal_lib.bilinear_attention_pooling(feats, att), f, atol=1e-6)
  # Effect logits = fc(100 f) - fc(100 f'), f' pooled with all-ones maps at test time.
  model = _small()
  x, v = _init(model)
  _, aux = _small(test_views="raw").apply(v, x)
  w = np.asarray(v["params"]["fc"]["kernel"])
  f_cf = np.asarray(aux["counterfactual_features"])
  feats = np.asarray(aux["stages"][-1])
  ones = np.ones(feats.shape[:3] + (4,), np.float32)
  np.testing.assert_allclose(f_cf, cal_lib.bilinear_attention_pooling(feats, ones), atol=1e-6)
  np.testing.assert_allclose(aux["effect_logits"],
                             aux["raw_logits"] - (100 * f_cf) @ w, atol=1e-4)


def _reference_augment(images, maps, mode, theta, padding_ratio=0.1):
  """raoyongming/CAL `batch_augment` with a fixed per-image theta (NCHW torch)."""
  x = torch.tensor(np.asarray(images)).permute(0, 3, 1, 2)
  a = torch.tensor(np.asarray(maps))[:, None]
  B, _, H, W = x.shape
  out, boxes = [], []
  for i in range(B):
    m = a[i:i + 1]
    up = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=True)
    if mode == "crop":
      mask = up >= theta[i] * m.max()
      nz = torch.nonzero(mask[0, 0])
      y0 = max(int(nz[:, 0].min().item() - padding_ratio * H), 0)
      y1 = min(int(nz[:, 0].max().item() + padding_ratio * H), H)
      x0 = max(int(nz[:, 1].min().item() - padding_ratio * W), 0)
      x1 = min(int(nz[:, 1].max().item() + padding_ratio * W), W)
      boxes.append((y0, x0, y1, x1))
      out.append(F.interpolate(x[i:i + 1, :, y0:y1, x0:x1], size=(H, W), mode="bilinear",
                               align_corners=True))
    else:
      out.append(x[i:i + 1] * (up < theta[i] * m.max()).float())
  return torch.cat(out).permute(0, 2, 3, 1).numpy(), np.array(boxes)


def test_crop_and_drop_match_the_reference_algorithm():
  rng = np.random.default_rng(1)
  images = rng.uniform(size=(3, 40, 48, 3)).astype(np.float32)
  maps = np.zeros((3, 5, 6), np.float32)
  maps[0, 1, 2] = 1.0            # one peak
  maps[1, 1:4, 3:5] = [[0.2, 0.5], [0.9, 1.0], [0.3, 0.1]]
  maps[2] = rng.uniform(size=(5, 6))
  theta = np.array([0.5, 0.45, 0.6], np.float32)
  crops, boxes = cal_lib.attention_crop(jnp.asarray(images), jnp.asarray(maps), theta, 0.1)
  ref_crops, ref_boxes = _reference_augment(images, maps, "crop", theta)
  np.testing.assert_array_equal(np.asarray(boxes), ref_boxes)
  np.testing.assert_allclose(np.asarray(crops), ref_crops, atol=1e-5)
  # The single peak at map cell (1, 2): its box lies around pixel (1 * 39/4, 2 * 47/5).
  y0, x0, y1, x1 = np.asarray(boxes[0])
  assert y0 < 9.75 < y1 and x0 < 18.8 < x1 and (y1 - y0) < 40 and (x1 - x0) < 48
  drops, keep = cal_lib.attention_drop(jnp.asarray(images), jnp.asarray(maps), theta)
  ref_drops, _ = _reference_augment(images, maps, "drop", theta)
  np.testing.assert_allclose(np.asarray(drops), ref_drops, atol=1e-6)
  assert 0 < np.asarray(keep[0]).mean() < 1
  # A box covering the whole image leaves it unchanged; a degenerate map crops nothing.
  same = cal_lib.crop_and_resize(jnp.asarray(images), jnp.array([[0, 0, 40, 48]] * 3))
  np.testing.assert_allclose(np.asarray(same), images, atol=1e-5)
  zero_boxes = cal_lib.attention_crop_boxes(jnp.zeros((1, 5, 6)), (40, 48), 0.5, 0.1)
  np.testing.assert_array_equal(np.asarray(zero_boxes), [[0, 0, 40, 48]])


def _cal_config(num_classes=5):
  c = cal_resnet101_cub.get_config("runlocal")
  c.model.kwargs = dict(num_attentions=4, widths=(8, 16, 32, 64))
  return c


def test_loss_terms_centre_update_and_map_sampling():
  cfg = _cal_config()
  model = _small()
  method = methods.get_method(cfg, model, 5)
  x, v = _init(model, batch=4)
  y = jnp.array([0, 1, 1, 3])
  params = v.pop("params")
  rng = jax.random.key(7)
  ctx = methods.Context(step=0, rng=rng, batch={"image": x, "label": y}, helpers={})
  loss, (m, new) = method.loss(params, v, ctx)
  # First step: zero centres, so the centre loss is sum ||f||^2 / B = 1 (f is L2-normalised).
  np.testing.assert_allclose(m["center"], 1.0, atol=1e-5)
  np.testing.assert_allclose(
      loss, m["ce_raw"] / 3 + m["ce_effect"] + 2 / 3 * m["ce_aug"] + m["center"], rtol=1e-6)
  # Recompute the terms from the model's outputs with the method's own random draws.
  r_raw, r_aug, r_views = jax.random.split(rng, 3)
  (logits, aux), bs = model.apply({"params": params, **v}, x, train=True,
                                  rngs={"dropout": r_raw}, mutable=["batch_stats"])
  np.testing.assert_allclose(m["ce_raw"], losses.cross_entropy(logits, y), rtol=1e-5)
  crops, drops, _, _ = method.augment(x, aux["attention_maps"], r_views)
  (la, aa), _ = model.apply({"params": params, **v, **bs}, jnp.concatenate([crops, drops]),
                            train=True, rngs={"dropout": r_aug}, mutable=["batch_stats"])
  y2 = jnp.concatenate([y, y])
  np.testing.assert_allclose(m["ce_aug"], losses.cross_entropy(la, y2), rtol=1e-5)
  np.testing.assert_allclose(
      m["ce_effect"], losses.cross_entropy(jnp.concatenate([aux["effect_logits"],
                                                            aa["effect_logits"]]),
                                           jnp.concatenate([y, y2])), rtol=1e-5)
  # Centres: classes in the batch move by beta * f, the others stay 0. Class 1 has two images:
  # one write lands (the reference's indexed assignment), the last image's.
  c = np.asarray(new["centers"]["feature_center"])
  f = np.asarray(aux["features"])
  np.testing.assert_allclose(c[0], 0.05 * f[0], atol=1e-6)
  np.testing.assert_allclose(c[1], 0.05 * f[2], atol=1e-6)
  assert not c[2].any() and not c[4].any()
  ref = torch.zeros(5, f.shape[1])  # the reference's own update, in torch
  yt = torch.tensor(np.asarray(y))
  ref[yt] += 0.05 * (torch.tensor(f) - F.normalize(ref[yt], dim=-1))
  np.testing.assert_allclose(c, ref.numpy(), atol=1e-6)
  cfg.cal.center_update = "sum"  # fgjax's other choice: every image adds its step
  _, (_, summed) = methods.get_method(cfg, model, 5).loss(params, v, ctx)
  np.testing.assert_allclose(summed["centers"]["feature_center"][1], 0.05 * (f[1] + f[2]),
                             atol=1e-6)
  # Both passes update the BatchNorm statistics.
  assert not np.allclose(new["batch_stats"]["attention_bn"]["mean"],
                         v["batch_stats"]["attention_bn"]["mean"])
  # Map sampling follows sqrt(map sum): only map 2 carries attention (in its top-left cell), so
  # both views of every image come from it: a top-left crop box, a partly kept image (a zero
  # map would give the whole image as the box and drop every pixel).
  att = jnp.zeros((4, 2, 2, 4)).at[:, 0, 0, 2].set(1.0)
  _, _, boxes, keep = method.augment(x, att, jax.random.key(3))
  boxes, keep = np.asarray(boxes), np.asarray(keep)
  assert (boxes[:, :2] == 0).all() and (boxes[:, 2:] < 64).all()
  assert (keep.mean(axis=(1, 2)) > 0.2).all() and not keep[:, 0, 0].any()


def test_config_errors():
  cfg = _cal_config()
  with pytest.raises(ValueError, match="config.method='cal' needs a CAL model"):
    methods.get_method(cfg, models.create("resnet18", 5, img_size=64), 5)
  cfg.cal.crop_theta = (0.7, 0.2)
  with pytest.raises(ValueError, match="config.cal.crop_theta"):
    methods.get_method(cfg, _small(), 5)
  cfg = _cal_config()
  cfg.cal.center_update = "mean"
  with pytest.raises(ValueError, match="config.cal.center_update"):
    methods.get_method(cfg, _small(), 5)


def test_dataset_configs_differ_from_cub_only_in_the_data():
  """Dogs, Cars and Aircraft run CUB's recipe (the reference's one train script); only the
  data keys differ, so the CUB quick run below covers their model and step."""
  fx.check_only_data_differs(cal_resnet101_cub, cal_resnet101_dogs, cal_resnet101_cars,
                             cal_resnet101_aircraft)


@pytest.mark.parametrize("module,maker,source", [
    (cal_resnet101_dogs, fx.make_fake_dogs, "stanford_dogs"),
    (cal_resnet101_cars, fx.make_fake_cars, "stanford_cars"),
    (cal_resnet101_aircraft, fx.make_fake_aircraft, "fgvc_aircraft")])
def test_dataset_configs_read_their_layouts(tmp_path, module, maker, source):
  fx.check_config_reads_its_layout(module, maker, tmp_path, source)


def test_quick_config_trains_one_step_on_fake_data(tmp_path):
  # (cal_resnet50_cub's quick run is cal_resnet101_cub's; its recipe is checked below.)
  fake, result = fx.train_quick_config(cal_resnet101_cub, fx.make_fake_cub, tmp_path)
  test = result["test"]
  assert test["num_examples"] == len(fake.splits["test"])
  assert {"top1", "raw_top1", "effect_top1"} <= set(test)
  # The trained CAL as the frozen online teacher of TRS-DeiT (restored with its centres and
  # BatchNorm statistics, multi-view logits inside the student's jitted step).
  from configs import trs_deit_cub
  s = trs_deit_cub.get_config("runlocal")
  s.data.data_dir = fake.data_dir
  s.teacher.checkpoint = str(tmp_path / "w")
  s.total_steps = 1
  s.eval_every_steps = 1
  out = trainer.train_and_evaluate(s, str(tmp_path / "student"))
  assert np.isfinite(out["test"]["top1"])
  row = logs.read_metrics(str(tmp_path / "student"))
  assert "teacher_agreement" in [r for r in row if r["split"] == "train"][-1]


def test_recipes_follow_the_reference():
  """The recipe elements raoyongming/CAL fixes (docs/fidelity.md)."""
  for module, model in ((cal_resnet101_cub, "cal_resnet101"), (cal_resnet50_cub, "cal_resnet50"),
                        (cal_resnet101_dogs, "cal_resnet101")):
    c = module.get_config()
    assert c.model.name == model and c.model.img_size == 448
    assert (c.batch_size, c.optim.lr, c.optim.weight_decay, c.optim.no_decay) == \
        (16, 1e-3, 1e-5, ())
    assert c.optim.decay_1d  # SGD(net.parameters(), weight_decay=1e-5): BatchNorm too
    assert c.cal.center_update == "last" and c.get("model").kwargs.get("test_views") is None
  assert cal_resnet101_dogs.get_config().data.name == "stanford_dogs"
  m = models.create("cal_resnet101", 200, img_size=448)
  assert m.test_views == "eight" and m.backbone.output_stride == 16
  shapes = jax.eval_shape(lambda: m.init({"params": jax.random.key(0)},
                                         jnp.zeros((1, 448, 448, 3))))
  assert shapes["batch_stats"]["attention_bn"]["mean"].shape == (32,)
  out = jax.eval_shape(lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats"],
                                            rngs={"dropout": jax.random.key(0)}),
                       shapes, jax.ShapeDtypeStruct((1, 448, 448, 3), jnp.float32))
  assert out[0][1]["attention_maps"].shape == (1, 28, 28, 32)  # the reference's 28 x 28


def test_exponential_schedule():
  from fgjax.train import optim
  cfg = _cal_config().optim
  cfg.decay_every_steps = 10
  sched = optim.make_schedule(cfg, 1e-3, 100)
  np.testing.assert_allclose(sched(5), 1e-3 * 0.9 ** 0.5, rtol=1e-5)
  np.testing.assert_allclose(sched(20), 1e-3 * 0.81, rtol=1e-5)


def test_demo_with_a_cal_teacher_runs(tmp_path):
  """configs/demo.py:teacher=cal: CAL on cnn_small trained first, then the TRS-DeiT student
  distils from it (2 steps each)."""
  from configs import demo
  result = trainer.train_and_evaluate(demo.get_config("runlocal,teacher=cal"),
                                      str(tmp_path / "demo"))
  assert np.isfinite(result["test"]["top1"])
  teacher_rows = logs.read_metrics(str(tmp_path / "demo" / "teacher"))
  assert any("ce_effect" in r for r in teacher_rows if r["split"] == "train")
  with pytest.raises(ValueError, match="teacher must be cnn, cal or none"):
    demo.get_config("teacher=vit")

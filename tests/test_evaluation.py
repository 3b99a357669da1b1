"""Evaluation and prediction entry points on all (8 simulated) devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import common
from fgjax import data as fgdata
from fgjax.train import evaluation, setup, sharding


def _classifier(**over):
  c = common.base_config("classifier")
  c.model.name, c.model.img_size = "cnn_small", 32
  c.model.kwargs = dict(widths=(8, 16), head_zeroinit=False)
  c.data.resize_size = 36
  c.data.source_kwargs = dict(num_classes=4, num_examples=13, image_size=40)
  c.batch_size = c.eval_batch_size = 8
  for k, v in over.items():
    c[k] = v
  model, method = setup.build(c, 4)
  variables = method.init_variables(jax.random.key(0), setup.config_example(c))
  return c, model, method, variables


def test_predict_images_pads_to_the_devices_and_equals_the_model(tmp_path):
  cfg, model, method, variables = _classifier(eval_batch_size=4)
  rng = np.random.default_rng(0)
  paths = []
  for i in range(5):  # 5 images in batches of 8 (4 rounded up to the 8 devices): one padded
    p = tmp_path / f"im{i}.jpg"
    Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), np.uint8)).save(p)
    paths.append(str(p))
  mesh = sharding.make_mesh(cfg)
  assert mesh.devices.size == 8
  logits = evaluation.predict_images(cfg, method, variables, paths, mesh)
  kw = setup.pipeline_kwargs(cfg, train=False)
  x = np.stack([fgdata.eval_transform(fgdata.load_image(p), image_size=32, resize_size=36,
                                      resize_mode=kw["resize_mode"],
                                      normalize=kw["normalize"]) for p in paths])
  want, _ = model.apply(variables, jnp.asarray(x), train=False)
  assert logits.shape == (5, 4)
  np.testing.assert_allclose(logits, np.asarray(want), rtol=1e-5, atol=1e-6)


def test_predict_source_sees_every_example_once_and_evaluate_agrees():
  cfg, _, method, variables = _classifier()
  mesh = sharding.make_mesh(cfg)
  source = setup.get_source(cfg, "test")
  out = evaluation.predict_source(cfg, method, variables, source, mesh)
  assert sorted(out["id"].tolist()) == sorted(np.asarray(source.ids).tolist())  # 13 of 16 rows
  step = jax.jit(evaluation.make_eval_step(method))
  metrics = evaluation.evaluate(step, variables, iter(setup.make_eval_iter(cfg, source)), mesh,
                                4, method)
  labels = dict(zip(np.asarray(source.ids).tolist(), np.asarray(source.labels).tolist()))
  top1 = np.mean([labels[int(i)] == int(p) for i, p in zip(out["id"], out["logits"].argmax(-1))])
  assert metrics["num_examples"] == 13 and metrics["top1"] == pytest.approx(top1)


def test_loader_element_spec_is_what_batches_hold():
  cfg, *_ = _classifier()
  source = setup.get_source(cfg, "train")
  loader = setup.make_train_iter(cfg, source)
  batch = next(iter(loader))
  spec = loader.element_spec
  assert set(spec) == set(batch)
  for k, s in spec.items():
    assert (s.shape, s.dtype) == (batch[k].shape, batch[k].dtype), k
  eval_spec = setup.make_eval_iter(cfg, source).element_spec
  assert eval_spec["mask"].dtype == np.bool_ and set(eval_spec) == set(spec) | {"mask"}

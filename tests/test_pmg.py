"""PMG: heads against the reference's parameter count, the progressive step, quick configs,
resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_fixtures as fx
from configs import (pmg_deit_cub, pmg_resnet50_aircraft, pmg_resnet50_cars,
                     pmg_resnet50_cub)
from fgjax import methods, models
from fgjax.train import setup, sharding, trainer

torch = pytest.importorskip("torch")


def _reference_pmg_head_params(num_classes, num_ftrs=2048, feature_size=512):
  """Parameter count of PRIS-CV PMG's heads (conv_block1-3, classifier1-3, classifier_concat),
  rebuilt from the paper's description in torch."""
  nn = torch.nn

  def basic_conv(cin, cout, k):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         nn.BatchNorm2d(cout, eps=1e-5, momentum=0.01), nn.ReLU())

  def classifier(cin):
    return nn.Sequential(nn.BatchNorm1d(cin), nn.Linear(cin, feature_size),
                         nn.BatchNorm1d(feature_size), nn.ELU(),
                         nn.Linear(feature_size, num_classes))

  heads = nn.ModuleList(
      [nn.Sequential(basic_conv(c, feature_size, 1), basic_conv(feature_size, num_ftrs // 2, 3))
       for c in (num_ftrs // 4, num_ftrs // 2, num_ftrs)]
      + [classifier(num_ftrs // 2) for _ in range(3)] + [classifier(num_ftrs // 2 * 3)])
  return sum(p.numel() for p in heads.parameters())


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_head_parameter_count_equals_the_reference_on_resnet50():
  model = models.create("pmg_resnet50", 200, 448)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 448, 448, 3))))
  params = dict(shapes["params"])
  backbone = params.pop("backbone")
  assert _count(params) == _reference_pmg_head_params(200)
  timm = pytest.importorskip("timm")
  ref = timm.create_model("resnet50", pretrained=False, num_classes=0)
  assert _count(backbone) == sum(p.numel() for p in ref.parameters())


def _pmg_method(img=64, name="pmg_resnet18"):
  cfg = pmg_resnet50_cub.get_config("runlocal")
  cfg.model.name, cfg.model.img_size = name, img
  model = models.create(name, 3, img, **cfg.model.kwargs)
  return cfg, model, methods.get_method(cfg, model, 3)


def test_progressive_step_makes_four_updates_and_updates_batch_stats():
  cfg, model, method = _pmg_method()
  mesh = sharding.make_mesh(cfg)
  state, step_fn, _ = fx.state_and_step(cfg, method, mesh, total_steps=25)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(8, 64, 64, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 3, 8), jnp.int32)}
  step = jax.jit(step_fn)
  new, metrics = step(jax.tree.map(jnp.copy, state), batch, None)
  counts = {int(x) for x in jax.tree.leaves(new["opt"]) if x.shape == () and
            x.dtype == jnp.int32}
  assert counts == {4}  # four optimizer updates for one batch
  assert {"loss_jigsaw8", "loss_jigsaw4", "loss_jigsaw2", "loss_concat"} <= set(metrics)
  np.testing.assert_allclose(
      float(metrics["loss"]), sum(float(metrics[k]) for k in
                                  ("loss_jigsaw8", "loss_jigsaw4", "loss_jigsaw2",
                                   "loss_concat")), rtol=1e-5)
  before = state["batch_stats"]["backbone"]["bn1"]["mean"]
  after = new["batch_stats"]["backbone"]["bn1"]["mean"]
  assert not np.allclose(np.asarray(before), np.asarray(after))
  # Evaluation outputs both the concat head and the sum of the four heads.
  heads, values = method.eval_outputs({"params": new["params"],
                                       "batch_stats": new["batch_stats"]}, batch)
  assert set(heads) == {"logits", "combined"} and values == {}


def test_bad_image_size_for_the_jigsaw_is_a_config_error():
  cfg = pmg_resnet50_cub.get_config("runlocal")
  cfg.model.img_size = 60
  model = models.create(cfg.model.name, 3, 60, **cfg.model.kwargs)
  with pytest.raises(ValueError, match="config.model.img_size=60"):
    methods.get_method(cfg, model, 3)


def test_recipes_follow_the_reference():
  """The recipe elements of PRIS-CV PMG's train.py (docs/fidelity.md)."""
  c = pmg_resnet50_cub.get_config()
  assert (c.model.name, c.model.img_size, c.data.resize_size, c.data.resize_mode) == \
      ("pmg_resnet50", 448, 550, "square")
  assert c.data.augment.crop_padding == 8 and c.data.augment.flip and c.data.normalize == "half"
  assert (c.optim.name, c.optim.lr, c.optim.backbone_lr_mult, c.optim.momentum) == \
      ("sgd", 2e-3, 0.1, 0.9)
  assert (c.optim.weight_decay, c.optim.no_decay, c.optim.decay_1d) == (5e-4, (), True)
  assert (c.batch_size, c.total_epochs, c.optim.schedule) == (16, 200, "cosine")
  model = models.create("pmg_resnet18", 3, 64, feature_size=64, stage_features=128)
  method = methods.get_method(c, model, 3)
  assert (method.granularities, method.permutation, method.per_image) == \
      ((8, 4, 2), "cycle", False)


def test_dataset_configs_differ_from_cub_only_in_the_data():
  """Cars and Aircraft run CUB's recipe (the reference's one train.py); only the data keys
  differ, so the CUB quick run below covers their model and step."""
  fx.check_only_data_differs(pmg_resnet50_cub, pmg_resnet50_cars, pmg_resnet50_aircraft)


@pytest.mark.parametrize("module,maker,source", [
    (pmg_resnet50_cub, fx.make_fake_cub, "cub"),
    (pmg_resnet50_cars, fx.make_fake_cars, "stanford_cars"),
    (pmg_resnet50_aircraft, fx.make_fake_aircraft, "fgvc_aircraft")])
def test_dataset_configs_read_their_layouts(tmp_path, module, maker, source):
  fx.check_config_reads_its_layout(module, maker, tmp_path, source)


@pytest.mark.parametrize("module,maker", [
    (pmg_resnet50_cub, fx.make_fake_cub), (pmg_deit_cub, fx.make_fake_cub)])
def test_quick_configs_train_one_step_on_fake_data(tmp_path, module, maker):
  fake, result = fx.train_quick_config(module, maker, tmp_path)
  test = result["test"]
  assert test["num_examples"] == len(fake.splits["test"])
  assert "combined_top1" in test and np.isfinite(test["top1"])
  # the references' protocol per head: PMG's reference logs the combined head too
  best = result["test_best_over_training"]
  assert best["combined_top1"] == {"top1": pytest.approx(test["combined_top1"]), "step": 1}


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
  def cfg():
    c = pmg_resnet50_cub.get_config("runlocal")
    c.model.name = "pmg_cnn_small"  # resume is backbone-agnostic; heads keep batch_stats
    c.data.name, c.data.data_dir = "synthetic", None
    c.data.source_kwargs = dict(num_classes=3, num_examples=24, image_size=72)
    c.total_steps, c.checkpoint_every_steps, c.eval_every_steps = 3, 3, 3
    return c

  trainer.train_and_evaluate(cfg(), str(tmp_path / "a"))
  fx.interrupted_run(cfg(), tmp_path / "b", monkeypatch, at_step=2)
  _, _, _, va, ia = setup.restore_model(str(tmp_path / "a"), prefer="last")
  _, _, _, vb, ib = setup.restore_model(str(tmp_path / "b"), prefer="last")
  assert ia["step"] == ib["step"] == 3
  for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb)):  # params and batch_stats
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_init_from_loads_a_timm_resnet_into_the_backbone(tmp_path):
  timm = pytest.importorskip("timm")
  from safetensors.numpy import save_file
  torch.manual_seed(0)
  ref = timm.create_model("resnet18", pretrained=False, num_classes=1000)
  sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  sd["bn1.running_var"] = sd["bn1.running_var"] + 0.5  # recognisable statistics
  save_file(sd, str(tmp_path / "r18.safetensors"))
  cfg, model, method = _pmg_method()
  cfg.init_from = str(tmp_path / "r18.safetensors")
  state, _, _ = fx.state_and_step(cfg, method, sharding.make_mesh(cfg))
  np.testing.assert_allclose(
      np.asarray(state["params"]["backbone"]["layer3_1"]["conv2"]["kernel"]),
      sd["layer3.1.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_allclose(np.asarray(state["batch_stats"]["backbone"]["bn1"]["var"]),
                             sd["bn1.running_var"])


def test_synthetic_evidence_config_trains_pmg_on_the_small_cnn(tmp_path):
  """configs/pmg_synthetic.py (docs/demo.md, PMG): PMG heads on cnn_small's last three
  stages, and the plain cnn_small baseline, one step each on a few synthetic images."""
  from configs import pmg_synthetic
  for arg, key in (("steps=1", "combined_top1"), ("ce=True,pool=max,steps=1", "top1")):
    cfg = pmg_synthetic.get_config(arg)
    cfg.data.split_kwargs = {"train": dict(num_examples=16), "test": dict(num_examples=8)}
    cfg.batch_size = cfg.eval_batch_size = 8
    result = trainer.train_and_evaluate(cfg, str(tmp_path / arg))
    assert result["test"]["num_examples"] == 8 and key in result["test"]
  model = models.create("pmg_cnn_small", 20, 96, feature_size=64, stage_features=128)
  v = model.init(jax.random.key(0), jnp.zeros((1, 96, 96, 3)))
  assert "head" not in v["params"]["backbone"]  # a feature extractor
  _, aux = model.apply(v, jnp.zeros((2, 96, 96, 3)))
  assert [y.shape for y in aux["stage_logits"]] == [(2, 20)] * 3

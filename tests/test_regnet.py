"""RegNetY: widths as timm's, logits parity with timm through .safetensors and .pth files
(random weights and BatchNorm statistics, eval mode), train mode and BatchNorm updates, remat,
bf16, checkpoint errors and bad model kwargs."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import traverse_util

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
timm_regnet = pytest.importorskip("timm.models.regnet")

import data_fixtures as fx  # noqa: E402
from fgjax import convert, models  # noqa: E402
from fgjax.models import regnet  # noqa: E402

# A 4-stage design of 6 blocks (stages of 1, 2, 2, 1 blocks; widths 8, 16, 24, 40).
TINY = dict(w0=8, wa=6, wm=1.5, depth=6, group_size=8, se_ratio=0.25, stem_width=8)


def _randomise(ref):
  """Non-trivial BatchNorm statistics and affine terms, and a head of unit-scale logits."""
  g = torch.Generator().manual_seed(1)
  fx.randomise_batchnorm(ref, g)
  with torch.no_grad():
    fc = ref.head.fc
    if isinstance(fc, torch.nn.Linear):
      fc.weight.copy_(torch.randn(fc.weight.shape, generator=g) / fc.in_features ** 0.5)
  return ref.eval()


def _timm(name, num_classes, **kw):
  torch.manual_seed(0)
  return _randomise(timm.create_model(name, pretrained=False, num_classes=num_classes, **kw))


def _save(ref, path):
  sd = {k: v.detach().contiguous() for k, v in ref.state_dict().items()}
  if str(path).endswith(".safetensors"):
    from safetensors.torch import save_file
    save_file(sd, str(path))
  else:
    torch.save({"state_dict": sd}, str(path))
  return path


def _nchw(seed, size, batch=2):
  return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def _assert_maps_close(got, want):
  """Feature maps (values up to ~100 here): float32 rounding relative to the largest value."""
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max(), rtol=1e-4)


def _shapes(tree):
  return jax.tree.map(lambda a: tuple(np.shape(a)), dict(tree))


def test_stage_widths_equal_timms_for_every_timm_design():
  """The width/depth/group quantisation equals timm's for the 33 RegNet designs in timm (X, Y,
  V, Z) that use timm's rounding (not torchvision's `group_min_ratio`)."""
  checked = 0
  for name, cfg in timm_regnet.model_cfgs.items():
    if cfg.group_min_ratio:
      continue
    stage_args, _ = timm_regnet.RegNet._get_stage_args(None, cfg)
    want = [(a["out_chs"], a["depth"], a["group_size"]) for a in stage_args]
    assert regnet.stage_specs(cfg.w0, cfg.wa, cfg.wm, cfg.depth, cfg.group_size,
                              cfg.bottle_ratio) == want, name
    checked += 1
  assert checked >= 30
  assert models.create("regnety_016", 10).stages() == [(48, 2, 24), (120, 6, 24),
                                                        (336, 17, 24), (888, 2, 24)]


@pytest.mark.parametrize("name,fmt", [("regnety_016", "safetensors"), ("regnety_032", "pth")])
def test_logits_parity_with_timm_through_a_file(name, fmt, tmp_path):
  ref = _timm(name, 5)
  path = _save(ref, tmp_path / f"{name}.{fmt}")
  variables = convert.load_checkpoint(path, name, 64, 5, with_collections=True)
  model = models.create(name, 5, 64)
  fresh = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  assert _shapes(fresh) == _shapes(variables)  # every leaf mapped, nothing left over
  x = _nchw(0, 64)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
    feats = ref.forward_intermediates(torch.from_numpy(x), intermediates_only=True)
  logits, aux = jax.jit(lambda v, x: model.apply(v, x))(variables, x.transpose(0, 2, 3, 1))
  assert np.abs(want).max() > 1  # logits of unit scale, not the tiny ones of timm's head init
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=1e-4)
  stages = [f.numpy().transpose(0, 2, 3, 1) for f in feats[1:]]  # [stem, s1, .., s4]
  assert [a.shape for a in aux["stages"]] == [s.shape for s in stages]
  _assert_maps_close(aux["stages"][-1], stages[-1])
  _assert_maps_close(aux["pre_logits"], stages[-1].mean(axis=(1, 2)))


def test_regnety_160_tree_and_logits_equal_timms(tmp_path):
  """RegNetY-16GF (84M parameters): the converted tree has the model's shapes (abstract init),
  and the logits at 32 px equal timm's."""
  ref = _timm("regnety_160", 4)
  sd = {k: v.numpy().copy() for k, v in ref.state_dict().items()}
  variables, unexpected = convert.timm_regnet_to_variables(sd)
  assert unexpected == []
  model = models.create("regnety_160", 4, 32)
  fresh = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert _shapes(fresh) == _shapes(variables)
  n_params = sum(np.size(a) for a in jax.tree.leaves(variables["params"]))
  assert n_params == sum(p.numel() for p in ref.parameters())
  assert fresh["params"]["s4"]["b1"]["conv2"]["conv"]["kernel"].shape == (3, 3, 112, 3024)
  x = _nchw(2, 32, batch=1)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  logits, _ = jax.jit(lambda v, x: model.apply(v, x))(variables, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=1e-4)


def test_dilated_output_stride_16_equals_timm():
  ref = _timm("regnety_016", 0, output_stride=16)
  variables, unexpected = convert.timm_regnet_to_variables(
      {k: v.numpy().copy() for k, v in ref.state_dict().items()})
  assert unexpected == []
  model = regnet.create("regnety_016", 0, 64, output_stride=16)  # no head: features
  x = _nchw(3, 64)
  with torch.no_grad():
    want = ref.forward_features(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  feat, aux = jax.jit(lambda v, x: model.apply(v, x))(variables, x.transpose(0, 2, 3, 1))
  assert aux["stages"][-1].shape == (2, 4, 4, 888) and feat.shape == (2, 888)
  _assert_maps_close(aux["stages"][-1], want)


def _tiny_timm(num_classes=3):
  torch.manual_seed(0)
  cfg = timm_regnet.RegNetCfg(**TINY)
  return _randomise(timm_regnet.RegNet(cfg, num_classes=num_classes))


def test_train_mode_and_batchnorm_updates_equal_timm():
  """train=True: batch statistics in every BatchNorm (logits equal timm's in train mode), the
  running means updated with torch's momentum 0.1."""
  ref = _tiny_timm()
  variables, _ = convert.timm_regnet_to_variables(
      {k: v.numpy().copy() for k, v in ref.state_dict().items()})
  model = regnet.RegNet(num_classes=3, img_size=32, **TINY)
  x = _nchw(4, 32, batch=4)
  with torch.no_grad():
    want = ref.train()(torch.from_numpy(x)).numpy()
  (logits, _), new = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                                      mutable=["batch_stats"]))(
      variables, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=1e-4)
  got = traverse_util.flatten_dict(jax.device_get(new["batch_stats"]), sep=".")
  for key in ("stem.bn.mean", "s2.b2.conv2.bn.mean", "s4.b1.downsample.bn.mean"):
    torch_key = key.replace(".mean", ".running_mean")
    np.testing.assert_allclose(got[key], ref.state_dict()[torch_key].numpy(), atol=1e-5,
                               rtol=1e-4)


def _tiny_variables():
  """The tiny design's variables from timm (converting is cheaper than compiling an init)."""
  variables, unexpected = convert.timm_regnet_to_variables(
      {k: v.numpy().copy() for k, v in _tiny_timm().state_dict().items()})
  assert unexpected == []
  return jax.tree.map(jnp.asarray, variables)


def test_jitted_train_step_with_remat_and_dropout():
  """One SGD step: finite gradients, equal with and without remat, batch_stats updated;
  dropout before the head acts in training only."""
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  y = jnp.array([0, 1, 2, 0])
  plain = regnet.RegNet(num_classes=3, img_size=32, drop_rate=0.5, **TINY)
  variables = _tiny_variables()
  assert variables["params"]["head"]["fc"]["kernel"].shape == (40, 3)

  def make_step(model):
    @jax.jit
    def step(params, stats, x, y, rng):
      def loss_fn(p):
        (logits, _), new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                       mutable=["batch_stats"], rngs={"dropout": rng})
        onehot = jax.nn.one_hot(y, 3)
        return -(onehot * jax.nn.log_softmax(logits)).sum(-1).mean(), new["batch_stats"]
      (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
      return params, new_stats, loss, grads
    return step

  args = (variables["params"], variables["batch_stats"], x, y)
  step = make_step(plain)
  _, new_stats, loss, grads = step(*args, jax.random.key(2))
  _, _, loss_remat, grads_remat = make_step(plain.clone(remat=True))(*args, jax.random.key(2))
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["s1"]["b1"]["conv2"]["conv"]["kernel"]).sum()) > 0
  np.testing.assert_allclose(float(loss_remat), float(loss), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
  old = variables["batch_stats"]["s3"]["b2"]["conv1"]["bn"]
  new = new_stats["s3"]["b2"]["conv1"]["bn"]
  assert not np.allclose(old["mean"], new["mean"]) and not np.allclose(old["var"], new["var"])
  # Dropout: another rng gives another loss; eval ignores it (and needs no rng).
  assert float(step(*args, jax.random.key(3))[2]) != float(loss)
  evaluate = lambda m: jax.jit(lambda v, x: m.apply(v, x)[0])(variables, x)
  np.testing.assert_array_equal(evaluate(plain), evaluate(plain.clone(drop_rate=0.0)))


def test_bfloat16_forward_is_close_to_float32():
  model = regnet.RegNet(num_classes=3, img_size=32, **TINY)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = _tiny_variables()
  want, _ = jax.jit(model.apply)(variables, x)
  logits, aux = jax.jit(model.clone(dtype=jnp.bfloat16).apply)(variables, x)
  assert logits.dtype == jnp.float32 and aux["stages"][0].dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(logits)).all()
  scale = float(jnp.abs(want).max())
  assert scale > 0.2
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=0.05 * scale)


def test_checkpoint_head_reinit_parts_and_mismatches(tmp_path, monkeypatch):
  ref = _tiny_timm(num_classes=3)
  sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
  path = _save(ref, tmp_path / "tiny.pth")
  model = regnet.RegNet(num_classes=7, img_size=32, **TINY)
  # 7 classes, 3 in the file: head/fc comes from `init_params` (stubbed: compiling a real init
  # takes long on a shared CPU), everything else from the file.
  fresh = lambda m, rng: jax.tree.map(lambda s: np.full(s.shape, 7.0, s.dtype), jax.eval_shape(
      lambda: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"])
  monkeypatch.setattr(convert, "init_params", fresh)
  parts = convert.load_parts(model, path)  # the model's checkpoint_parts(): {"": model}
  assert list(parts) == [""]
  loaded = parts[""]
  assert loaded["params"]["head"]["fc"]["kernel"].shape == (40, 7)
  assert (loaded["params"]["head"]["fc"]["kernel"] == 7).all()
  np.testing.assert_array_equal(loaded["params"]["s2"]["b2"]["se"]["fc1"]["kernel"][:, 0],
                                sd["s2.b2.se.fc1.weight"].numpy()[0, :, 0, 0])
  np.testing.assert_array_equal(loaded["batch_stats"]["stem"]["bn"]["var"],
                                sd["stem.bn.running_var"].numpy())
  # A RegNetY-1.6GF file in a RegNetY-3.2GF model, and a stray or missing key, fail loudly.
  small = _save(_timm("regnety_016", 3), tmp_path / "r016.safetensors")
  with pytest.raises(convert.CheckpointMismatchError, match="shape mismatches"):
    convert.load_checkpoint(small, "regnety_032", 32, 3, with_collections=True)
  from safetensors.torch import save_file
  save_file({**sd, "s1.b1.extra.weight": torch.zeros(3)}, str(tmp_path / "stray.safetensors"))
  with pytest.raises(convert.CheckpointMismatchError, match=r"s1\.b1\.extra\.weight"):
    convert.load_parts(model, tmp_path / "stray.safetensors")
  del sd["s1.b1.se.fc2.bias"]
  save_file(sd, str(tmp_path / "short.safetensors"))
  with pytest.raises(convert.CheckpointMismatchError, match="s1/b1/se/fc2/bias"):
    convert.load_parts(model, tmp_path / "short.safetensors")


@pytest.mark.parametrize("kwargs,match", [
    ({"output_stride": 4}, r"model\.kwargs\.output_stride must be 8, 16 or 32"),
    ({"drop_rate": 1.0}, r"model\.kwargs\.drop_rate must be in \[0, 1\)"),
    ({"w0": 12}, r"model\.kwargs\.w0 must be a positive multiple of 8"),
    ({"wm": 1.0}, r"model\.kwargs\.wm must be > 1"),
    ({"depth": 3}, r"model\.kwargs\..*give \d stages; a RegNet needs 4"),
    ({"attn": "se"}, r"model\.kwargs: unknown RegNet option\(s\) attn; known: w0, wa"),
])
def test_bad_model_kwargs(kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.create("regnety_016", 10, 224, **kwargs)


def test_fgvc9_recipe_config(tmp_path):
  """configs/fgvc9_regnety160_folder.py: the seed's choices at both resolutions (remat at 960,
  SE RegNetY-16GF, AutoAugment, dropout, attention crops, TTA), an unknown resolution refused,
  and the quick variant's pipelines reading a folder dataset."""
  from configs import fgvc9_regnety160_folder as recipe
  c512, c960 = recipe.get_config("res=512"), recipe.get_config("res=960")
  assert (c512.model.name, c512.model.img_size, c960.model.img_size) == ("regnety_160", 512, 960)
  assert not c512.model.kwargs.remat and c960.model.kwargs.remat
  assert c512.model.kwargs.drop_rate > 0 and c512.data.augment.autoaugment
  assert c512.crop.enabled and c512.crop.map == "cam" and c512.eval.tta == "flip"
  assert (c512.data.name, c512.optim.lr_base_batch) == ("folder", 64)
  with pytest.raises(ValueError, match="res must be one of"):
    recipe.get_config("res=640")
  fx.check_config_reads_its_layout(recipe, lambda root, num_classes, per_class: fx.make_fake_folder(
      root, classes=[f"c{i}" for i in range(num_classes)], per_class=per_class,
      eval_dirs=("test",)), tmp_path, "folder")
  quick = recipe.get_config("runlocal")
  model = models.create(quick.model.name, 3, quick.model.img_size, **dict(quick.model.kwargs))
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, quick.model.img_size, quick.model.img_size, 3)))
  assert shapes["params"]["head"]["fc"]["kernel"].shape[-1] == 3

"""Attention modules in ResNets (`fgjax.models.channel_attention`, ResNet `attn=`): logits
parity with timm's seresnet50, resnet50 + CBAM, skresnet18 and a ResNet-18 with Gather-Excite,
each saved with random weights and BatchNorm statistics to a file and read by `load_checkpoint`
(float32, eval mode); each module alone against timm's; a train step and bf16 for every kind;
the errors."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import data_fixtures as fx  # noqa: E402
from fgjax import convert, models  # noqa: E402
from fgjax.models import channel_attention as ca, resnet  # noqa: E402

ATOL = RTOL = 1e-4  # as tests/test_resnet.py


def _random_stats(ref):
  """`ref` in eval mode with non-trivial BatchNorm statistics and affine terms."""
  g = torch.Generator().manual_seed(1)
  fx.randomise_batchnorm(ref, g)
  return ref.eval()


def _timm_gather_excite(channels, **kw):
  """timm's `GatherExcite(channels, **kw)`. timm 1.0.31's constructor raises a TypeError when
  use_mlp=True (the default): it hands `*dd` instead of `**dd` to `ConvMlp`. Then the module is
  built with use_mlp=False and given the `ConvMlp` that the constructor means to build; the
  forward pass is timm's."""
  from timm.layers import ConvMlp, GatherExcite
  try:
    return GatherExcite(channels, **kw)
  except TypeError:
    if not kw.get("use_mlp", True):
      raise
    m = GatherExcite(channels, **{**kw, "use_mlp": False})
    rd = kw.get("rd_channels") or ca.make_divisible(
        channels * kw.get("rd_ratio", 1 / 16), kw.get("rd_divisor", 1), round_limit=0.)
    m.mlp = ConvMlp(channels, rd, act_layer=torch.nn.ReLU)
    return m


def _save(ref, path):
  sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  if str(path).endswith(".safetensors"):
    from safetensors.numpy import save_file
    save_file(sd, str(path))
  else:
    torch.save(ref.state_dict(), str(path))
  return str(path)


def _assert_logits_equal(ref, model, variables, size=64):
  x = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  logits, _ = jax.jit(lambda v, x: model.apply(v, x))(variables, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(logits), want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("timm_name,timm_kw,name,attn,fmt", [
    ("seresnet50", {}, "resnet50", "se", "safetensors"),
    ("resnet50", {"block_args": {"attn_layer": "cbam"}}, "resnet50", "cbam", "pth"),
    ("skresnet18", {}, "resnet18", "sk", "safetensors"),
    ("resnet18", {"block_args": {"attn_layer": lambda ch, **_: _timm_gather_excite(ch)}},
     "resnet18", "ge", "pth"),
], ids=["seresnet50", "resnet50_cbam", "skresnet18", "resnet18_ge"])
def test_resnet_logits_parity_with_timm(tmp_path, timm_name, timm_kw, name, attn, fmt):
  torch.manual_seed(0)
  ref = _random_stats(timm.create_model(timm_name, pretrained=False, num_classes=7, **timm_kw))
  path = _save(ref, tmp_path / f"{timm_name}.{fmt}")
  variables = convert.load_checkpoint(path, name, 64, num_classes=7,
                                      model_kwargs={"attn": attn}, with_collections=True)
  _assert_logits_equal(ref, models.create(name, 7, 64, attn=attn), variables)


def test_timm_named_aliases():
  assert models.create("seresnet50", 3, 64).attn == "se"
  assert models.create("skresnet18.ra_in1k", 3, 64).attn == "sk"
  assert models.create("skresnet50", 3, 64).depth == 50


def _module_parity(ref, module, shape, train=False):
  ref = _random_stats(ref).train(train)
  variables, unexpected = convert.timm_attn_to_variables(
      {k: v.detach().numpy() for k, v in ref.state_dict().items()})
  assert unexpected == []
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  xh = x.transpose(0, 2, 3, 1)
  fresh = jax.eval_shape(lambda: module.init(jax.random.key(0), xh))
  assert jax.tree.structure(jax.tree.map(np.shape, dict(fresh))) == \
      jax.tree.structure(jax.tree.map(np.shape, {k: v for k, v in variables.items() if v}))
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  variables = {k: v for k, v in variables.items() if v}
  if train:
    got, _ = module.apply(variables, xh, train=True, mutable=["batch_stats"])
  else:
    got = module.apply(variables, xh)
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("extent,kw,hw", [
    (0, {}, (8, 8)),  # timm's default constructor: global extent, MLP
    (2, {}, (9, 11)),
    (4, {"add_maxpool": True, "rd_ratio": 1 / 8}, (9, 11)),
    (0, {"add_maxpool": True}, (5, 7)),
])
def test_gather_excite_equals_timm(extent, kw, hw):
  torch.manual_seed(0)
  ref = _timm_gather_excite(64, extent=extent, **kw) if extent else _timm_gather_excite(64, **kw)
  _module_parity(ref, ca.GatherExcite(extent=extent, **kw), (2, 64) + hw)


@pytest.mark.parametrize("kind,train", [("se", False), ("cbam", False), ("cbam", True),
                                        ("sk", False), ("sk", True), ("sk_plain", False)])
def test_modules_alone_equal_timm(kind, train):
  """SE, CBAM and SK alone (train=True: BatchNorm on the batch's statistics on both sides)."""
  from timm.layers import SEModule, SelectiveKernel
  from timm.layers.cbam import CbamModule
  torch.manual_seed(0)
  if kind == "se":
    ref, mod, shape = SEModule(48), ca.SqueezeExcite(), (2, 48, 6, 6)
  elif kind == "cbam":
    ref, mod, shape = CbamModule(48), ca.CBAM(), (2, 48, 6, 7)
  elif kind == "sk":  # skresnet18's settings, strided
    ref = SelectiveKernel(32, 64, stride=2, rd_ratio=1 / 8, rd_divisor=16, split_input=True)
    mod, shape = ca.SelectiveKernel(64, stride=2, rd_ratio=1 / 8, rd_divisor=16), (2, 32, 9, 9)
  else:  # true 5x5 and 7x7 kernels, the whole input to each path
    ref = SelectiveKernel(24, 32, kernel_size=[3, 5, 7], keep_3x3=False, split_input=False)
    mod = ca.SelectiveKernel(32, kernel_sizes=(3, 5, 7), keep_3x3=False, split_input=False)
    shape = (2, 24, 8, 8)
  _module_parity(ref, mod, shape, train)


@pytest.mark.parametrize("attn", ["se", "cbam", "sk", "ge"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_train_step_and_bf16(kind, attn):
  """A jitted train step of a strided ResNet block (the blocks the models are made of; a whole
  ResNet costs seconds of compilation per case on CPU): batch statistics updated, the
  attention's own BatchNorm included, and gradients reaching the attention parameters. Then a
  bf16 forward pass of the block and float32 parameters of the whole bf16 model."""
  block = resnet.Block(kind, 16, stride=2, attn=attn)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 32))
  variables = jax.jit(block.init)(jax.random.key(1), x)

  def loss_fn(params, stats):
    y, new = block.apply({"params": params, "batch_stats": stats}, x, train=True,
                         mutable=["batch_stats"])
    return jnp.mean(y ** 2), new["batch_stats"]

  (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      variables["params"], variables["batch_stats"])
  assert np.isfinite(float(loss))
  attn_mod = {"sk": "conv1" if kind == "basic" else "conv2"}.get(attn, "se")
  assert any(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(grads[attn_mod]))
  bn_of_attn = {"cbam": ("spatial", "conv", "bn"), "sk": ("attn", "bn")}.get(attn)
  if bn_of_attn:
    before, after = variables["batch_stats"][attn_mod], stats[attn_mod]
    for k in bn_of_attn:
      before, after = before[k], after[k]
    assert not np.allclose(np.asarray(before["mean"]), np.asarray(after["mean"]))

  y16 = jax.jit(lambda v, x: resnet.Block(kind, 16, stride=2, attn=attn, dtype=jnp.bfloat16)
                .apply(v, x))(variables, x)
  y32 = jax.jit(block.apply)(variables, x)  # the same parameters in float32
  assert y16.dtype == jnp.bfloat16 and np.isfinite(np.asarray(y16, np.float32)).all()
  # bf16 keeps 8 bits of mantissa: a few percent of the output's scale.
  scale = float(jnp.abs(y32).max())
  assert float(jnp.abs(y16.astype(jnp.float32) - y32).max()) <= 0.05 * scale
  model16 = models.create("resnet18", 5, 32, attn=attn, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model16.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert {a.dtype for a in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}


def test_bad_attn_and_mismatched_checkpoints_fail_loudly(tmp_path):
  with pytest.raises(ValueError, match=r"model\.kwargs\.attn.*'se', 'cbam', 'sk', 'ge'"):
    models.create("resnet50", 3, 64, attn="eca")
  torch.manual_seed(0)
  se = _save(timm.create_model("seresnet18", num_classes=3), tmp_path / "se18.safetensors")
  plain = _save(timm.create_model("resnet18", num_classes=3), tmp_path / "r18.safetensors")
  with pytest.raises(convert.CheckpointMismatchError, match=r"unexpected.*layer1_0/se/fc1"):
    convert.load_checkpoint(se, "resnet18", 64, 3, with_collections=True)
  with pytest.raises(convert.CheckpointMismatchError, match=r"missing.*layer1_0/se/channel"):
    convert.load_checkpoint(plain, "resnet18", 64, 3, model_kwargs={"attn": "cbam"})
  with pytest.raises(convert.CheckpointMismatchError, match="missing"):
    convert.load_checkpoint(se, "resnet18", 64, 3, model_kwargs={"attn": "sk"})
  # The right kind loads, with the attention's parameters from the file.
  v = convert.load_checkpoint(se, "seresnet18", 64, 3, with_collections=True)
  assert v["params"]["layer4_1"]["se"]["fc1"]["kernel"].shape == (512, 32)


@pytest.mark.parametrize("config", ["cal_resnet50_cub.py", "pmg_resnet50_cub.py"])
def test_recipes_take_attn_from_the_command_line(config):
  """`--config.model.kwargs.attn=...` as absl parses it for run.py (a key must exist in the
  config to be set), None by default, and the recipe's model built with it."""
  from absl import flags
  from ml_collections import config_flags
  from fgjax.train import setup

  def parse(*overrides):
    argv = ["run.py", f"--config=configs/{config}:runlocal", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config

  assert parse().model.kwargs.attn is None
  c = parse("--config.model.kwargs.attn=se")
  assert dict(c.model.kwargs)["attn"] == "se"
  model = setup.build_model(c, num_classes=5)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, c.model.img_size, c.model.img_size, 3)))
  assert "se" in shapes["params"]["backbone"]["layer1_0"]

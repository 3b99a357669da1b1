"""ResNet: logits parity with timm (random weights, eval mode), stage maps, BatchNorm updates."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from fgjax import convert, models  # noqa: E402
from fgjax.models import resnet  # noqa: E402


def _timm_with_random_stats(name, num_classes):
  torch.manual_seed(0)
  ref = timm.create_model(name, pretrained=False, num_classes=num_classes).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics and affine terms
        m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
        m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
        m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
  return ref


@pytest.mark.parametrize("depth", [18, 50])
def test_logits_parity_with_timm(depth):
  ref = _timm_with_random_stats(f"resnet{depth}", 7)
  variables, unexpected = convert.timm_resnet_to_variables(
      {k: v.numpy() for k, v in ref.state_dict().items()})
  assert unexpected == []
  model = models.create(f"resnet{depth}", 7, 64)
  fresh = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  assert jax.tree.structure(jax.tree.map(np.shape, dict(fresh))) == \
      jax.tree.structure(jax.tree.map(np.shape, variables))  # every name maps, nothing left
  x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  logits, aux = jax.jit(lambda v, x: model.apply(v, x))(variables, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=1e-4)
  widths = (64, 128, 256, 512) if depth == 18 else (256, 512, 1024, 2048)
  assert [a.shape for a in aux["stages"]] == [(2, 16, 16, widths[0]), (2, 8, 8, widths[1]),
                                              (2, 4, 4, widths[2]), (2, 2, 2, widths[3])]


@pytest.mark.parametrize("depth,output_stride", [(18, 8), (50, 16)])
def test_dilated_output_stride_parity_with_timm(depth, output_stride):
  """`output_stride` < 32 with dilation: timm's `output_stride` (stride moved into dilation)."""
  torch.manual_seed(0)
  ref = timm.create_model(f"resnet{depth}", pretrained=False, num_classes=0,
                          output_stride=output_stride).eval()
  variables, _ = convert.timm_resnet_to_variables(
      {k: v.numpy() for k, v in ref.state_dict().items()})
  model = resnet.ResNet(num_classes=0, depth=depth, img_size=64, output_stride=output_stride)
  x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    want = ref.forward_features(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  _, aux = jax.jit(lambda v, x: model.apply(v, x))(variables, x.transpose(0, 2, 3, 1))
  assert aux["stages"][-1].shape[1:3] == (64 // output_stride,) * 2
  np.testing.assert_allclose(np.asarray(aux["stages"][-1]), want, atol=1e-4, rtol=1e-4)


def test_undilated_output_stride_16_is_the_cal_references_resnet():
  """`dilate=False`: layer4 at stride 1 without dilation, as raoyongming/CAL's
  `ResNet(stride=1)` (here torchvision's ResNet-50 with layer4's strides set to 1)."""
  tv = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  ref = tv.models.resnet50().eval()
  ref.layer4[0].conv2.stride = (1, 1)
  ref.layer4[0].downsample[0].stride = (1, 1)
  variables, _ = convert.timm_resnet_to_variables(
      {k: v.numpy() for k, v in ref.state_dict().items()})
  model = models.create("resnet50", 1000, 64, output_stride=16, dilate=False)
  x = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  logits, aux = jax.jit(lambda v, x: model.apply(v, x))(variables, x.transpose(0, 2, 3, 1))
  assert aux["stages"][-1].shape == (2, 4, 4, 2048)
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=1e-4)
  # The cal_* models take this backbone by default (28 x 28 maps at 448).
  cal = models.create("cal_resnet50", 10, img_size=448)
  assert (cal.backbone.output_stride, cal.backbone.dilate) == (16, False)
  with pytest.raises(ValueError, match="output_stride"):
    models.create("resnet18", 3, 32, output_stride=4).init(jax.random.key(0),
                                                          jnp.zeros((1, 32, 32, 3)))


def test_train_mode_updates_batch_stats():
  model = models.create("resnet18", 3, 32)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  variables = model.init(jax.random.key(1), x)
  (_, _), new = model.apply(variables, x, train=True, mutable=["batch_stats"])
  before = variables["batch_stats"]["bn1"]["mean"]
  after = new["batch_stats"]["bn1"]["mean"]
  assert not np.allclose(np.asarray(before), np.asarray(after))
  with pytest.raises(ValueError, match="depth"):
    resnet.ResNet(num_classes=3, depth=42).init(jax.random.key(0), x)


def test_load_checkpoint_and_convert_cli_carry_batch_stats(tmp_path):
  from safetensors.numpy import save_file
  ref = _timm_with_random_stats("resnet18", 1000)
  sd = {k: v.numpy().copy() for k, v in ref.state_dict().items()}
  path = tmp_path / "resnet18.safetensors"
  save_file(sd, str(path))
  variables = convert.load_checkpoint(str(path), "resnet18", 64, num_classes=5,
                                      with_collections=True)
  assert variables["params"]["fc"]["kernel"].shape == (512, 5)  # re-initialised head
  np.testing.assert_allclose(variables["batch_stats"]["layer2_0"]["downsample_bn"]["var"],
                             sd["layer2.0.downsample.1.running_var"])
  params_only = convert.load_checkpoint(str(path), "resnet18", 64, num_classes=5)
  assert set(params_only) == set(variables["params"])
  # The CLI writes both collections; loading its file gives the same variables.
  from fgjax.tools import convert as cli
  out = tmp_path / "r18.npz"
  assert cli.main([str(path), str(out), "--model", "resnet18", "--img-size", "64",
                   "--num-classes", "5"]) == 0
  again = convert.load_checkpoint(str(out), "resnet18", 64, num_classes=5, with_collections=True)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_batchnorm_step_on_8_devices_equals_one_device():
  """Under jit over the data mesh BatchNorm uses the global batch's statistics."""
  from configs import common
  from fgjax import methods
  import data_fixtures as fx
  from fgjax.train import sharding
  assert jax.device_count() == 8
  cfg = common.base_config()
  cfg.model.name, cfg.model.img_size = "resnet18", 32
  cfg.optim.warmup_steps = 1
  cfg.optim.name, cfg.optim.lr = "sgd", 0.1  # Adam would amplify round-off of ~0 gradients
  model = models.create("resnet18", 4, 32)
  method = methods.get_method(cfg, model, 4)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 4, 8).astype(np.int32)}
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(cfg, devices=devices)
    state, step_fn, _ = fx.state_and_step(cfg, method, mesh)
    step = jax.jit(step_fn)
    from fgjax import data as fgdata
    gbatch = fgdata.to_global_batch(batch, mesh)
    for _ in range(2):
      state, _ = step(state, gbatch, None)
    results.append(jax.device_get({"p": state["params"], "b": state["batch_stats"]}))
  for x, y in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4)

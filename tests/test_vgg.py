"""VGG: logits parity with torchvision (random weights, eval mode), timm's layout, checkpoint
import (heads, BatchNorm statistics, the "gap" head of RA-CNN), stage maps."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from fgjax import convert, models  # noqa: E402
from fgjax.models import vgg  # noqa: E402


def _torchvision(name, num_classes):
  torch.manual_seed(0)
  ref = getattr(torchvision.models, name)(weights=None, num_classes=num_classes).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics and affine terms
        m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
        m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
        m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
      if isinstance(m, torch.nn.Linear):  # torchvision's N(0, 0.01) would make tiny logits
        m.weight.normal_(0, 0.05, generator=g)
        m.bias.normal_(0, 0.05, generator=g)
  return ref


def _sd(ref):
  return {k: v.numpy().copy() for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("name,img", [("vgg11", 80), ("vgg19_bn", 112), ("vgg16", 224)])
def test_logits_parity_with_torchvision(name, img):
  """80 px: conv5 is 5x5 before pool5 and 2x2 after, so the adaptive 7x7 pool repeats and
  overlaps bins; 112 px: 3x3 -> uneven bins; 224 px: ImageNet's size, 7x7 (the pool is the
  identity)."""
  ref = _torchvision(name, 7)
  variables, unexpected = convert.timm_vgg_to_variables(_sd(ref))
  assert unexpected == []
  variables = {k: v for k, v in variables.items() if v}  # no batch_stats without BatchNorm
  model = models.create(name, 7, img)
  fresh = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, img, img, 3))))
  assert jax.tree.structure(jax.tree.map(np.shape, dict(fresh))) == \
      jax.tree.structure(jax.tree.map(np.shape, variables))  # every name maps, nothing left
  x = np.random.default_rng(0).normal(size=(2, 3, img, img)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
    conv5 = ref.features[:-1](torch.from_numpy(x)).numpy()  # before pool5
  logits, aux = jax.jit(lambda v, x: model.apply(v, x))(variables, x.transpose(0, 2, 3, 1))
  assert np.abs(want).max() > 0.05  # not a vanishing comparison
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=1e-4)
  s = img
  assert [a.shape[1] for a in aux["stages"]] == [s, s // 2, s // 4, s // 8, s // 16]
  np.testing.assert_allclose(np.asarray(aux["stages"][-1]), conv5.transpose(0, 2, 3, 1),
                             atol=1e-4, rtol=1e-4)


def test_adaptive_pool_bins_equal_torch():
  x = np.random.default_rng(1).normal(size=(2, 10, 13, 3)).astype(np.float32)
  want = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), 7)
  got = vgg.adaptive_avg_pool(jnp.asarray(x), 7)
  np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), atol=1e-6)


def test_timm_layout_converts_to_the_same_parameters():
  """timm's vgg keeps torchvision's features and holds the classifier as pre_logits.fc1 (a
  7x7 conv), fc2 (1x1) and head.fc: the same weights give the same fgjax parameters."""
  tv = _torchvision("vgg11_bn", 5)
  sd = _sd(tv)
  timm_sd = {k: v for k, v in sd.items() if k.startswith("features.")}
  timm_sd["pre_logits.fc1.weight"] = sd["classifier.0.weight"].reshape(-1, 512, 7, 7)
  timm_sd["pre_logits.fc1.bias"] = sd["classifier.0.bias"]
  timm_sd["pre_logits.fc2.weight"] = sd["classifier.3.weight"][:, :, None, None]
  timm_sd["pre_logits.fc2.bias"] = sd["classifier.3.bias"]
  timm_sd["head.fc.weight"] = sd["classifier.6.weight"]
  timm_sd["head.fc.bias"] = sd["classifier.6.bias"]
  timm = pytest.importorskip("timm")
  keys = set(timm.create_model("vgg11_bn", pretrained=False, num_classes=5).state_dict())
  assert keys == set(timm_sd)  # the layout written above is timm's
  a, ua = convert.timm_vgg_to_variables(sd)
  b, ub = convert.timm_vgg_to_variables(timm_sd)
  assert ua == ub == []
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_load_checkpoint_heads_statistics_and_the_gap_head(tmp_path):
  ref = _torchvision("vgg11_bn", 1000)
  sd = _sd(ref)
  path = tmp_path / "vgg11_bn.pth"
  torch.save(ref.state_dict(), str(path))
  v = convert.load_checkpoint(str(path), "vgg11_bn", 64, num_classes=4, with_collections=True)
  assert v["params"]["classifier_6"]["kernel"].shape == (4096, 4)  # re-initialised
  np.testing.assert_allclose(v["params"]["classifier_3"]["kernel"],
                             sd["classifier.3.weight"].T)
  np.testing.assert_allclose(v["batch_stats"]["features_5"]["var"],
                             sd["features.5.running_var"])
  # RA-CNN's scale network: conv5 average-pooled + a new `head`; the classifier is dropped.
  g = convert.load_checkpoint(str(path), "vgg11_bn", 64, num_classes=4, with_collections=True,
                              model_kwargs=dict(classifier="gap"))
  assert "classifier_0" not in g["params"] and g["params"]["head"]["kernel"].shape == (512, 4)
  np.testing.assert_allclose(g["params"]["features_4"]["kernel"],
                             sd["features.4.weight"].transpose(2, 3, 1, 0))
  # A torchvision checkpoint into every scale network of RA-CNN (its classifier, which the
  # "gap" head drops as shown above, left out of the file to keep the test small).
  model = models.create("racnn_vgg16", 4, 64, crop_size=32, apn_hidden=8)
  ref16 = _torchvision("vgg16", 1000)
  torch.save({k: v for k, v in ref16.state_dict().items() if k.startswith("features.")},
             str(tmp_path / "vgg16.pth"))
  parts = convert.load_parts(model, str(tmp_path / "vgg16.pth"))
  assert sorted(parts) == ["scale1", "scale2", "scale3"]
  for part in parts.values():
    np.testing.assert_allclose(part["params"]["features_28"]["kernel"],
                               ref16.features[28].weight.detach().numpy().transpose(2, 3, 1, 0))
  with pytest.raises(convert.CheckpointMismatchError, match="features_"):
    convert.load_checkpoint(str(path), "vgg16_bn", 64, num_classes=4)


def test_train_mode_updates_batch_stats():
  model = models.create("vgg11_bn", 3, 32, classifier="gap")
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  v = model.init(jax.random.key(1), x)
  (_, _), new = model.apply(v, x, train=True, mutable=["batch_stats"])
  assert not np.allclose(np.asarray(v["batch_stats"]["features_1"]["mean"]),
                         np.asarray(new["batch_stats"]["features_1"]["mean"]))
  with pytest.raises(ValueError, match="depth"):
    vgg.VGG(num_classes=3, depth=42).init(jax.random.key(0), x)

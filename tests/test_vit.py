"""ViT/DeiT backbone and weight import: parity with timm (random weights), names, dtypes.

Each parity test writes a random-weight timm model to disk in one of the supported formats
(.pth, .safetensors, Google .npz), loads it with `fgjax.convert.load_checkpoint` and compares
logits with timm's own forward pass (at 448 timm loads the same file through its own
`checkpoint_filter_fn`, which resamples the position embedding).
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from fgjax import convert, models  # noqa: E402
from fgjax.convert import resample  # noqa: E402

NUM_CLASSES = 10


def _randomize(model, seed=0):
  """Random weights everywhere (timm zero-inits some tensors, which would hide bugs)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 0.2 if "norm" in name and name.endswith("weight") else 0.05
      base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
      p.copy_(base + scale * torch.randn(p.shape, generator=g))
  return model.eval()


def _timm_model(name, img_size=224, seed=0):
  m = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, img_size=img_size)
  return _randomize(m, seed)


def write_google_npz(sd, path, num_heads):
  """Writes a timm ViT state dict in the Google (vision_transformer repo) .npz layout."""
  a = {k: v.detach().float().numpy() for k, v in sd.items()}
  d = a["cls_token"].shape[-1]
  hd = d // num_heads
  out = {
      "embedding/kernel": a["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
      "embedding/bias": a["patch_embed.proj.bias"],
      "cls": a["cls_token"],
      "Transformer/posembed_input/pos_embedding": a["pos_embed"],
      "Transformer/encoder_norm/scale": a["norm.weight"],
      "Transformer/encoder_norm/bias": a["norm.bias"],
      "head/kernel": a["head.weight"].T,
      "head/bias": a["head.bias"],
  }
  i = 0
  while f"blocks.{i}.norm1.weight" in a:
    b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    out[p + "LayerNorm_0/scale"] = a[b + "norm1.weight"]
    out[p + "LayerNorm_0/bias"] = a[b + "norm1.bias"]
    out[p + "LayerNorm_2/scale"] = a[b + "norm2.weight"]
    out[p + "LayerNorm_2/bias"] = a[b + "norm2.bias"]
    w, bias = a[b + "attn.qkv.weight"], a[b + "attn.qkv.bias"]
    for j, n in enumerate(("query", "key", "value")):
      out[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = (
          w[j * d:(j + 1) * d].T.reshape(d, num_heads, hd))
      out[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = (
          bias[j * d:(j + 1) * d].reshape(num_heads, hd))
    out[p + "MultiHeadDotProductAttention_1/out/kernel"] = (
        a[b + "attn.proj.weight"].T.reshape(num_heads, hd, d))
    out[p + "MultiHeadDotProductAttention_1/out/bias"] = a[b + "attn.proj.bias"]
    out[p + "MlpBlock_3/Dense_0/kernel"] = a[b + "mlp.fc1.weight"].T
    out[p + "MlpBlock_3/Dense_0/bias"] = a[b + "mlp.fc1.bias"]
    out[p + "MlpBlock_3/Dense_1/kernel"] = a[b + "mlp.fc2.weight"].T
    out[p + "MlpBlock_3/Dense_1/bias"] = a[b + "mlp.fc2.bias"]
    i += 1
  np.savez(path, **out)


def write_checkpoint(model, fmt, tmp_path, name):
  sd = model.state_dict()
  if fmt == "pth":
    path = tmp_path / f"{name}.pth"
    torch.save({"model": sd, "epoch": 3}, path)  # DeiT release layout
  elif fmt == "pth_bare":
    path = tmp_path / f"{name}_bare.pth"
    torch.save(sd, path)
  elif fmt == "safetensors":
    from safetensors.torch import save_file
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
  elif fmt == "npz":
    path = tmp_path / f"{name}.npz"
    write_google_npz(sd, path, model.blocks[0].attn.num_heads)
  else:
    raise ValueError(fmt)
  return path


def _images(size, batch=2, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def _assert_close_to_scale(actual, desired, atol, err_msg=""):
  """|actual - desired| <= atol * max|desired| elementwise (gradients of mixed magnitude)."""
  scale = float(np.abs(np.asarray(desired)).max()) + 1e-12
  np.testing.assert_allclose(np.asarray(actual) / scale, np.asarray(desired) / scale, atol=atol,
                             err_msg=err_msg)


def _timm_logits(model, images):
  with torch.no_grad():
    return model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


def _timm_at_size(name, ckpt_model, img_size):
  """timm's own path to a new resolution: its checkpoint filter resamples pos_embed."""
  if img_size == 224:
    return ckpt_model
  m = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, img_size=img_size)
  if "deit" in name:
    from timm.models.deit import checkpoint_filter_fn
  else:
    from timm.models.vision_transformer import checkpoint_filter_fn
  m.load_state_dict(checkpoint_filter_fn(ckpt_model.state_dict(), m))
  return m.eval()


CASES = [
    ("deit_tiny_distilled_patch16_224", "deit_tiny_distilled_patch16", ["pth", "pth_bare",
                                                                         "safetensors"]),
    ("vit_tiny_patch16_224", "vit_tiny_patch16", ["pth", "safetensors", "npz"]),
]


@pytest.mark.parametrize("img_size", [224, 448])
@pytest.mark.parametrize("timm_name,fg_name,formats", CASES)
def test_logits_parity_with_timm(tmp_path, timm_name, fg_name, formats, img_size):
  ref = _timm_model(timm_name)
  ref_sized = _timm_at_size(timm_name, ref, img_size)
  images = _images(img_size)
  expected = _timm_logits(ref_sized, images)
  model = models.create(fg_name, NUM_CLASSES, img_size)
  for fmt in formats:
    path = write_checkpoint(ref, fmt, tmp_path, timm_name)
    params = convert.load_checkpoint(path, fg_name, img_size=img_size, num_classes=NUM_CLASSES)
    logits, aux = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(
        params, images)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=1e-4,
                               err_msg=f"{fmt} @ {img_size}")
  if "distilled" in fg_name:
    np.testing.assert_allclose(
        np.asarray(logits), (np.asarray(aux["cls_logits"]) + np.asarray(aux["dist_logits"])) / 2,
        atol=1e-6)
    with torch.no_grad():
      ref_sized.set_distilled_training(True)
      ref_sized.train()
      # timm's training forward returns (cls, dist) separately; dropout rates are 0.
      cls_t, dist_t = ref_sized(torch.from_numpy(images).permute(0, 3, 1, 2))
    np.testing.assert_allclose(np.asarray(aux["cls_logits"]), cls_t.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(aux["dist_logits"]), dist_t.numpy(), atol=1e-4)


def test_google_npz_layout_is_what_timm_reads(tmp_path):
  """The test's .npz writer produces the genuine Google layout: timm's loader accepts it."""
  from timm.models.vision_transformer import _load_weights
  ref = _timm_model("vit_tiny_patch16_224", seed=3)
  path = write_checkpoint(ref, "npz", tmp_path, "vit")
  other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES)
  _load_weights(other, str(path))
  images = _images(224)
  np.testing.assert_allclose(_timm_logits(other.eval(), images), _timm_logits(ref, images),
                             atol=1e-5)


@pytest.mark.parametrize("old,new,prefix", [(14, 28, 2), (14, 28, 1), (14, 37, 1), (24, 14, 2),
                                            (14, 10, 1), (14, (12, 20), 2)])
def test_pos_embed_resampling_equals_timm(old, new, prefix):
  from timm.layers import resample_abs_pos_embed
  new_hw = (new, new) if isinstance(new, int) else new
  rng = np.random.default_rng(0)
  pe = rng.normal(size=(1, prefix + old * old, 32)).astype(np.float32)
  ref = resample_abs_pos_embed(torch.from_numpy(pe), new_size=list(new_hw),
                               num_prefix_tokens=prefix).numpy()
  out = resample.resample_pos_embed(pe, new_hw, prefix)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_array_equal(out[:, :prefix], pe[:, :prefix])


def test_heads_reinitialised_when_class_count_differs(tmp_path):
  ref = _timm_model("deit_tiny_distilled_patch16_224")
  path = write_checkpoint(ref, "pth", tmp_path, "deit")
  params = convert.load_checkpoint(path, "deit_tiny_distilled_patch16", img_size=224,
                                   num_classes=7)
  assert params["head"]["kernel"].shape == (192, 7)
  assert params["head_dist"]["kernel"].shape == (192, 7)
  np.testing.assert_array_equal(params["head"]["kernel"], 0)  # fresh zero-init head
  np.testing.assert_allclose(params["blocks_3"]["attn"]["qkv"]["kernel"],
                             ref.blocks[3].attn.qkv.weight.detach().numpy().T)
  # Same class count: heads are loaded, not re-initialised.
  same = convert.load_checkpoint(path, "deit_tiny_distilled_patch16", img_size=224,
                                 num_classes=NUM_CLASSES)
  np.testing.assert_allclose(same["head"]["kernel"], ref.head.weight.detach().numpy().T)
  # dont_load forces a fresh value.
  fresh = convert.load_checkpoint(path, "deit_tiny_distilled_patch16", img_size=224,
                                  num_classes=NUM_CLASSES, dont_load=["head.*"])
  np.testing.assert_array_equal(fresh["head"]["kernel"], 0)


def test_mismatched_checkpoint_lists_missing_and_unexpected_keys(tmp_path):
  ref = _timm_model("vit_tiny_patch16_224")
  path = write_checkpoint(ref, "pth", tmp_path, "vit")
  # ViT checkpoint into a distilled model: dist_token missing.
  with pytest.raises(convert.CheckpointMismatchError, match="missing keys.*dist_token"):
    convert.load_checkpoint(path, "deit_tiny_distilled_patch16", img_size=224,
                            num_classes=NUM_CLASSES)
  # Tiny checkpoint into a small model: shape mismatches, named.
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"shape mismatches.*blocks_0/attn/qkv/kernel: checkpoint "
                           r"\(192, 576\) vs model \(384, 1152\)"):
    convert.load_checkpoint(path, "vit_small_patch16", img_size=224, num_classes=NUM_CLASSES)
  # Extra tensors are reported as unexpected keys.
  sd = dict(ref.state_dict())
  sd["blocks.0.attn.extra.weight"] = torch.zeros(3)
  torch.save(sd, tmp_path / "extra.pth")
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"unexpected keys.*blocks.0.attn.extra.weight"):
    convert.load_checkpoint(tmp_path / "extra.pth", "vit_tiny_patch16", img_size=224,
                            num_classes=NUM_CLASSES)
  # Depth mismatch: a 12-block checkpoint into a 6-block model names the extra blocks.
  with pytest.raises(convert.CheckpointMismatchError, match="unexpected keys.*blocks_11"):
    convert.load_checkpoint(path, "vit_tiny_patch16", img_size=224, num_classes=NUM_CLASSES,
                            model_kwargs={"depth": 6})


def test_bad_files_give_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    convert.load_checkpoint(tmp_path / "nope.pth", "vit_tiny_patch16")
  bad = tmp_path / "garbage.safetensors"
  bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(convert.CheckpointError, match="garbage.safetensors"):
    convert.load_checkpoint(bad, "vit_tiny_patch16")
  np.savez(tmp_path / "other.npz", foo=np.zeros(3))
  with pytest.raises(convert.CheckpointError, match="not a ViT/DeiT/ResNet/VGG checkpoint"):
    convert.load_checkpoint(tmp_path / "other.npz", "vit_tiny_patch16")


def test_convert_cli_writes_params_that_load(tmp_path):
  from fgjax.tools import convert as cli
  ref = _timm_model("deit_tiny_distilled_patch16_224")
  src = write_checkpoint(ref, "safetensors", tmp_path, "deit")
  out = tmp_path / "deit_448_cub.npz"
  rc = cli.main([str(src), str(out), "--model", "deit_tiny_distilled_patch16",
                 "--img-size", "448", "--num-classes", "200"])
  assert rc == 0
  meta = convert.read_meta(out)
  assert meta["model"] == "deit_tiny_distilled_patch16" and meta["img_size"] == 448
  params = convert.load_checkpoint(out, "deit_tiny_distilled_patch16", img_size=448,
                                   num_classes=200)
  direct = convert.load_checkpoint(src, "deit_tiny_distilled_patch16", img_size=448,
                                   num_classes=200)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(a, b)
  assert params["pos_embed"].shape == (1, 2 + 28 * 28, 192)
  assert cli.main([str(src), str(out), "--model", "vit_small_patch16"]) == 2


# Parameter names that checkpoints (ours and the converters') depend on. If this test fails,
# a rename broke every saved checkpoint: add a migration instead of editing this list.
EXPECTED_TOP = {
    "patch_embed/kernel": (16, 16, 3, 192), "patch_embed/bias": (192,),
    "cls_token": (1, 1, 192), "dist_token": (1, 1, 192), "pos_embed": (1, 198, 192),
    "norm/scale": (192,), "norm/bias": (192,),
    "head/kernel": (192, 5), "head/bias": (5,),
    "head_dist/kernel": (192, 5), "head_dist/bias": (5,),
}
EXPECTED_BLOCK = {
    "norm1/scale": (192,), "norm1/bias": (192,),
    "attn/qkv/kernel": (192, 576), "attn/qkv/bias": (576,),
    "attn/proj/kernel": (192, 192), "attn/proj/bias": (192,),
    "norm2/scale": (192,), "norm2/bias": (192,),
    "mlp/fc1/kernel": (192, 768), "mlp/fc1/bias": (768,),
    "mlp/fc2/kernel": (768, 192), "mlp/fc2/bias": (192,),
}


def test_parameter_names_are_stable():
  from flax import traverse_util
  model = models.create("deit_tiny_distilled_patch16", 5, 224)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  flat = {k: v.shape for k, v in
          traverse_util.flatten_dict(shapes["params"], sep="/").items()}
  expected = dict(EXPECTED_TOP)
  for i in range(12):
    expected.update({f"blocks_{i}/{k}": v for k, v in EXPECTED_BLOCK.items()})
  assert flat == expected
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(shapes["params"]))


def test_bf16_forward_runs_and_is_close_to_f32():
  x = jnp.asarray(_images(224))
  f32 = models.create("deit_tiny_distilled_patch16", NUM_CLASSES, 224, head_zeroinit=False)
  bf16 = models.create("deit_tiny_distilled_patch16", NUM_CLASSES, 224, head_zeroinit=False,
                       dtype=jnp.bfloat16)
  params = f32.init(jax.random.key(1), x)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(
      bf16.init(jax.random.key(1), x)["params"]))
  l32, _ = f32.apply({"params": params}, x)
  l16, aux = bf16.apply({"params": params}, x, return_attention=True)
  assert l16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(l16)))
  assert aux["tokens"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(l16), np.asarray(l32), atol=0.1, rtol=0.1)
  # Gradients flow in bf16 too.
  g = jax.grad(lambda p: bf16.apply({"params": p}, x)[0].sum())(params)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g))


def test_attention_output_and_train_mode():
  model = models.create("deit_tiny_distilled_patch16", NUM_CLASSES, 32, patch_size=8, depth=3,
                        drop_path_rate=0.5, drop_rate=0.1, head_zeroinit=False)
  x = jnp.asarray(_images(32))
  variables = model.init(jax.random.key(0), x)
  logits, aux = model.apply(variables, x)
  logits_a, aux_a = model.apply(variables, x, return_attention=True)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(logits_a), atol=1e-5)
  assert len(aux_a["attention"]) == 3 and "attention" not in aux
  t = 2 + 16
  for a in aux_a["attention"]:
    assert a.shape == (2, 3, t, t)
    np.testing.assert_allclose(np.asarray(a.sum(-1)), 1.0, atol=1e-5)
  assert aux["pre_logits"].shape == (2, 192)
  # train=True: dropout/drop-path active and driven by the 'dropout' rng.
  tr = lambda s: model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(s)})[0]
  assert not np.allclose(np.asarray(tr(0)), np.asarray(tr(1)))
  np.testing.assert_array_equal(np.asarray(tr(2)), np.asarray(tr(2)))


def test_overlapping_patches_and_bad_sizes():
  model = models.create("vit_tiny_patch16", NUM_CLASSES, 448, patch_stride=12)
  assert model.grid == (37, 37)  # TransFG's overlapping split
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 448, 448, 3)))
  assert shapes["params"]["pos_embed"].shape == (1, 1 + 37 * 37, 192)
  with pytest.raises(ValueError, match="does not divide into patches"):
    models.create("vit_tiny_patch16", NUM_CLASSES, 230).grid
  model = models.create("vit_tiny_patch16", NUM_CLASSES, 224)
  with pytest.raises(ValueError, match="img_size=224"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 448, 448, 3)))
  with pytest.raises(ValueError, match="unknown model"):
    models.create("resnet9000", 3)


def test_create_names():
  for name in ["vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16",
               "deit_tiny_distilled_patch16", "deit_small_distilled_patch16",
               "deit_base_distilled_patch16", "deit_base_distilled_patch16_224"]:
    m = models.create(name, 3, 224)
    assert m.distilled == ("distilled" in name)
  assert models.create("vit_large_patch16", 3).width == 1024


def test_remat_same_parameters_loss_and_gradients():
  kw = dict(depth=3, drop_path_rate=0.1, head_zeroinit=False)
  plain = models.create("trs_deit_tiny_patch16", 5, 64, **kw)
  remat = models.create("trs_deit_tiny_patch16", 5, 64, remat=True, **kw)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  variables = plain.init(jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(remat.init(jax.random.key(0), x))

  def loss(model, params):
    logits, aux = model.apply({"params": params}, x, train=True,
                              rngs={"dropout": jax.random.key(3)})
    return jnp.sum(logits ** 2) + jnp.sum(aux["dist_logits"])

  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(variables["params"])
  l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(variables["params"])
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  _, aux = remat.apply(variables, x, return_attention=True)
  assert len(aux["attention"]) == 3 and aux["selected"].shape == (2, 3)


def test_batch_chains_same_function_outputs_and_gradients(monkeypatch):
  """The blocks as 2 or 4 independent chains over the batch: the same logits, aux entries
  (rollout selection, attention, block tokens) and gradients as one chain."""
  from fgjax.models import vit
  kw = dict(depth=3, head_zeroinit=False, feature_blocks=(0, 1))
  x = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
  one = models.create("trs_deit_tiny_patch16", 5, 64, batch_chains=1, **kw)
  variables = one.init(jax.random.key(0), x)

  def loss(model, params):
    logits, aux = model.apply({"params": params}, x, train=True)
    return jnp.sum(logits ** 2) + jnp.sum(aux["dist_logits"]) + jnp.sum(aux["block_tokens"][0])

  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(one, p)))(variables["params"])
  ref_logits, ref_aux = one.apply(variables, x, return_attention=True)
  count_dots = lambda m, im=x: str(jax.make_jaxpr(lambda v: m.apply(v, im))(variables)).count(
      "dot_general")
  for n in (2, 4):
    chained = one.clone(batch_chains=n)
    assert count_dots(chained) > count_dots(one)  # really split: more (smaller) products
    logits, aux = chained.apply(variables, x, return_attention=True)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)
    assert jax.tree.structure(aux) == jax.tree.structure(ref_aux)
    np.testing.assert_array_equal(np.asarray(aux["selected"]), np.asarray(ref_aux["selected"]))
    for a, b in zip(jax.tree.leaves(aux), jax.tree.leaves(ref_aux)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(chained, p)))(variables["params"])
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):  # float summation order only
      _assert_close_to_scale(a, b, atol=1e-5)
  # A batch the chain count does not divide (init on one example, 3 here) runs as one chain.
  assert count_dots(one.clone(batch_chains=2), x[:3]) == count_dots(one, x[:3])
  assert vit.batch_chains_for(4, 3) == 1 and vit.batch_chains_for(2, 1) == 1
  # Auto: 2 on the CPU with a single device and 2+ cores, 1 with several devices (this test
  # process has 8) or one core.
  assert jax.device_count() > 1 and vit.batch_chains_for(None, 4) == 1
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  monkeypatch.setattr(vit, "_usable_cpus", lambda: 2)
  assert vit.batch_chains_for(None, 4) == 2 and vit.batch_chains_for(None, 3) == 1
  monkeypatch.setattr(vit, "_usable_cpus", lambda: 1)
  assert vit.batch_chains_for(None, 4) == 1
  assert vit.batch_chains_for(np.int64(2), 4) == 2
  for bad in (0, -1, 2.0, "auto", True):
    with pytest.raises(ValueError, match="batch_chains"):
      vit.batch_chains_for(bad, 4)
  # PMG on a DeiT passes the ViT options to its backbone.
  pmg = models.create("pmg_deit_tiny", 5, 64, depth=3, batch_chains=1, remat=True)
  assert pmg.backbone.batch_chains == 1 and pmg.backbone.remat


def test_batch_chains_draw_their_own_dropout_masks_and_remat_agrees():
  """In training each chain draws its own dropout/drop-path masks (two identical images in
  different chains come out different), deterministically per rng, and remat (which replays
  the masks in the backward pass) gives the same loss and gradients as no remat."""
  kw = dict(depth=3, head_zeroinit=False, drop_rate=0.1, drop_path_rate=0.2, batch_chains=2)
  plain = models.create("trs_deit_tiny_patch16", 5, 64, **kw)
  remat = models.create("trs_deit_tiny_patch16", 5, 64, remat=True, **kw)
  x = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
  x = x.at[1].set(x[0])  # examples 0 and 1 land in chains 0 and 1
  variables = plain.init(jax.random.key(0), x)

  def loss(model, params, seed):
    logits, aux = model.apply({"params": params}, x, train=True,
                              rngs={"dropout": jax.random.key(seed)})
    return jnp.sum(logits ** 2) + jnp.sum(aux["dist_logits"]), logits

  (l1, logits), g1 = jax.jit(jax.value_and_grad(lambda p: loss(plain, p, 3), has_aux=True))(
      variables["params"])
  assert not np.allclose(np.asarray(logits[0]), np.asarray(logits[1]))
  (l2, _), g2 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p, 3), has_aux=True))(
      variables["params"])
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
    _assert_close_to_scale(a, b, atol=1e-5)
  again = loss(plain, variables["params"], 3)[0]
  np.testing.assert_allclose(float(again), float(l1), rtol=1e-6)
  assert abs(float(loss(plain, variables["params"], 4)[0]) - float(l1)) > 1e-6


def test_batch_chains_on_a_batch_sharded_over_devices():
  """With the batch sharded over 8 devices the interleaved chains stay on their devices; the
  result equals one chain."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  model = models.create("deit_tiny_distilled_patch16", 5, 32, patch_size=8, depth=2,
                        head_zeroinit=False, batch_chains=1)
  x = jax.random.normal(jax.random.key(2), (16, 32, 32, 3))
  variables = model.init(jax.random.key(0), x[:1])
  mesh = Mesh(np.array(jax.devices()), ("data",))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  out1 = jax.jit(lambda v, im: model.apply(v, im)[0])(variables, xs)
  chained = jax.jit(lambda v, im: model.clone(batch_chains=2).apply(v, im)[0])
  out2 = chained(variables, xs)
  assert out2.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
  hlo = chained.lower(variables, xs).compile().as_text()
  for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert collective not in hlo, collective  # no data moves between devices
  np.testing.assert_allclose(np.asarray(out2), np.asarray(out1), atol=1e-5)


def test_gelu_gradient_equals_autodiff_of_erf_formula():
  from fgjax.models.vit import gelu_exact
  x = jnp.linspace(-8.0, 8.0, 4001)
  np.testing.assert_allclose(np.asarray(gelu_exact(x)),
                             np.asarray(jax.nn.gelu(x, approximate=False)), atol=1e-6)
  g = jax.grad(lambda v: jnp.sum(gelu_exact(v) * jnp.cos(v)))(x)
  ref = jax.grad(lambda v: jnp.sum(jax.nn.gelu(v, approximate=False) * jnp.cos(v)))(x)
  np.testing.assert_allclose(np.asarray(g), np.asarray(ref), atol=1e-6)
  xb = x.astype(jnp.bfloat16)
  assert jax.grad(lambda v: jnp.sum(gelu_exact(v)).astype(jnp.float32))(xb).dtype == jnp.bfloat16


def test_gradients_match_timm():
  """The backward pass, not just the logits: parameter gradients of a cross-entropy loss equal
  timm's (same random weights, train mode without dropout) within float32 tolerance."""
  tm = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False,
                         num_classes=NUM_CLASSES, img_size=64, depth=2).train()
  for p in tm.parameters():  # non-zero heads so that every gradient is non-trivial
    torch.nn.init.normal_(p, std=0.05)
  params, unexpected = convert.timm_to_fgjax({k: v.detach().numpy()
                                              for k, v in tm.state_dict().items()})
  assert not unexpected
  from flax import traverse_util
  params = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                         for k, v in params.items()})
  model = models.create("deit_tiny_distilled_patch16", NUM_CLASSES, 64, depth=2)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((3, 64, 64, 3)).astype(np.float32)
  labels = np.array([1, 4, 2])

  def loss(p):
    logits, _ = model.apply({"params": p}, jnp.asarray(images), train=True)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), labels])

  grads = jax.grad(loss)(params)
  out = tm(torch.from_numpy(images).permute(0, 3, 1, 2))  # (cls + dist) / 2
  torch.nn.functional.cross_entropy(out, torch.from_numpy(labels)).backward()
  ref, _ = convert.timm_to_fgjax({k: p.grad.numpy() for k, p in tm.named_parameters()})
  flat = traverse_util.flatten_dict(grads, sep="/")
  assert set(flat) == set(ref)
  for k, g in flat.items():
    _assert_close_to_scale(g, ref[k], atol=2e-5, err_msg=k)

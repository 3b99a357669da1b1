"""PMA model (fgjax/models/pma.py): shapes of every mode, the progressive masks (vision and
text), the masked softmax, f_l against the backbone map, the LSTM's sequence lengths, the
VGG-16 / ResNet-50 block grids at 448, gradients and bf16."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax import models
from fgjax.models import pma

VOCAB, B, K = 20, 2, 3
P = 6
# (B, P, W=3) word ids; phrase 2 of example 0 is masked, phrase 3 of example 1 is empty: five
# valid phrases each, so the default text mask (top 3 above 0.1) leaves some for the global SAM.
PHRASES = np.array([[[3, 4, 0], [5, 0, 0], [6, 7, 0], [7, 8, 9], [10, 0, 0], [12, 13, 0]],
                    [[2, 0, 0], [9, 9, 1], [4, 0, 0], [0, 0, 0], [14, 15, 16], [17, 0, 0]]],
                   np.int32)
PHRASE_MASK = np.array([[True, True, False, True, True, True], [True] * P])


def _model(img=64, **kw):
  kw.setdefault("vocab_size", VOCAB)
  return models.create("pma_cnn_small", 5, img_size=img, **kw)


def _image(img=64, seed=0):
  return jax.random.normal(jax.random.key(seed), (B, img, img, 3))


def _text(image=None):
  out = {"phrases": jnp.asarray(PHRASES), "phrase_mask": jnp.asarray(PHRASE_MASK)}
  if image is not None:
    out["image"] = image
  return out


@pytest.fixture(scope="module")
def bimodal():
  model = _model()
  x = _image()
  variables = model.init(jax.random.key(0), x)  # image-only init creates the text parameters
  logits, aux = model.apply(variables, _text(x))
  return model, variables, x, logits, aux


def test_bimodal_shapes_and_parameters(bimodal):
  model, variables, x, logits, aux = bimodal
  assert logits.shape == (B, 5) and logits.dtype == jnp.float32
  C, N, Hd = 128, 4, 64  # cnn_small's last map at 64 px: 4 x 4 -> 2 x 2 blocks
  assert model.block_grid() == (2, 2)
  expect = {"located": ((B, K), jnp.int32), "located_boxes": ((B, K, 4), jnp.float32),
            "attention": ((B, K, N), jnp.float32), "part_features": ((B, K, C), jnp.float32),
            "phrase_weights": ((B, K, P), jnp.float32),
            "text_attention": ((B, K, P), jnp.float32), "text_masked": ((B, K, P), jnp.bool_),
            "phrase_embeddings": ((B, P, Hd), jnp.float32),
            "pre_logits": ((B, C + K * 64), jnp.float32)}
  for name, (shape, dtype) in expect.items():
    assert aux[name].shape == shape and aux[name].dtype == dtype, name
  assert aux["stages"][-1].shape == (B, 4, 4, C)
  params = variables["params"]
  names = {"backbone", "word_embed", "phrase_lstm", "stage_fc", "head"}
  names |= {f"{m}_{k}" for m in ("vision_sam", "qrm", "text_sam") for k in range(K)}
  assert set(params) == names
  assert params["stage_fc"]["kernel"].shape == (2 * C + 2 * Hd, 64)
  assert params["vision_sam_0"]["proj"]["kernel"].shape == (C, C // 8)
  assert params["word_embed"]["embedding"].shape == (VOCAB, 32)
  assert model.checkpoint_parts() == {"backbone": model.backbone}
  np.testing.assert_allclose(aux["attention"].sum(-1), 1.0, rtol=1e-5)
  # The default text mask (top 3 above 0.1) after the first stage's QRM.
  valid = PHRASE_MASK & (PHRASES != 0).any(-1)
  np.testing.assert_array_equal(
      aux["text_masked"][:, 0],
      _numpy_mask_update(np.asarray(aux["phrase_weights"][:, 0]), valid, 3, 0.1))
  assert np.asarray(aux["text_attention"][:, 0]).sum(-1) == pytest.approx([1.0, 1.0])


def test_image_only_paths_equal_all_masked(bimodal):
  model, variables, x, _, _ = bimodal
  from_array = model.apply(variables, x)
  from_dict = model.apply(variables, {"image": x})
  masked = dict(_text(x), phrase_mask=jnp.zeros((B, P), bool))
  from_masked = model.apply(variables, masked)
  for other in (from_dict, from_masked):
    np.testing.assert_array_equal(from_array[0], other[0])
    np.testing.assert_array_equal(from_array[1]["pre_logits"], other[1]["pre_logits"])
    np.testing.assert_array_equal(from_array[1]["located"], other[1]["located"])
  aux = from_array[1]
  assert aux["phrase_weights"].shape == (B, K, 0) and aux["text_masked"].shape == (B, K, 0)
  assert aux["phrase_embeddings"].shape == (B, 0, 64)
  # All phrases masked: zero weights, nothing ever joins the text mask.
  assert not np.asarray(from_masked[1]["phrase_weights"]).any()
  assert not np.asarray(from_masked[1]["text_attention"]).any()
  assert not np.asarray(from_masked[1]["text_masked"]).any()


def test_vocab_zero_has_no_text_branch():
  model = _model(vocab_size=0)
  x = _image()
  variables = model.init(jax.random.key(0), x)
  params = variables["params"]
  assert not {"word_embed", "phrase_lstm", "qrm_0", "text_sam_0"} & set(params)
  assert params["stage_fc"]["kernel"].shape == (2 * 128, 64)
  logits, aux = model.apply(variables, _text(x))  # the text is ignored
  np.testing.assert_array_equal(logits, model.apply(variables, x)[0])
  assert "phrase_weights" not in aux and aux["located"].shape == (B, K)


def test_text_modality():
  model = _model(modality="text")
  variables = model.init(jax.random.key(0), _text())
  params = variables["params"]
  assert "backbone" not in params and not any(n.startswith("vision_sam") for n in params)
  assert params["query_0"].shape == (64,)
  assert params["stage_fc"]["kernel"].shape == (2 * 64, 64)
  logits, aux = model.apply(variables, _text())
  assert logits.shape == (B, 5)
  assert aux["pre_logits"].shape == (B, K * 64)
  assert aux["phrase_weights"].shape == (B, K, P)
  assert not {"located", "located_boxes", "attention", "stages"} & set(aux)
  # The image is ignored.
  with_image, _ = model.apply(variables, _text(_image()))
  np.testing.assert_array_equal(logits, with_image)
  assert model.checkpoint_parts() == {}
  with pytest.raises(ValueError, match="phrases"):
    model.apply(variables, {"image": _image()})


def test_input_errors(bimodal):
  model, variables, *_ = bimodal
  with pytest.raises(ValueError, match="image"):
    model.apply(variables, _text())
  with pytest.raises(ValueError, match="go together"):
    model.apply(variables, {"image": _image(), "phrases": jnp.asarray(PHRASES)})
  with pytest.raises(ValueError, match="vocab_size"):
    _model(vocab_size=0, modality="text").init(jax.random.key(0), _text())
  with pytest.raises(ValueError, match="modality"):
    _model(modality="audio").init(jax.random.key(0), _image())
  # Too few blocks for the stages: the error names img_size.
  with pytest.raises(ValueError, match="img_size=32"):
    _model(img=32).init(jax.random.key(0), _image(32))
  with pytest.raises(ValueError, match="num_stages=5"):
    _model(num_stages=5).init(jax.random.key(0), _image())


def _assert_distinct(located):
  located = np.asarray(located)
  for row in located:
    assert len(set(row.tolist())) == len(row), located


def test_located_blocks_never_repeat(bimodal):
  model, variables, x, _, aux = bimodal
  _assert_distinct(aux["located"])
  att = np.asarray(aux["attention"])
  loc = np.asarray(aux["located"])
  for b in range(B):
    for k in range(K):
      assert att[b, k, loc[b, k]] == att[b, k].max()
      for j in range(k):  # earlier stages' blocks have exactly zero weight
        assert att[b, k, loc[b, j]] == 0.0
  # Constant (tied) attention: zero parameters give uniform weights over the open blocks;
  # the ties go to the lowest open index, still never a block located before.
  zeros = jax.tree.map(jnp.zeros_like, variables)
  _, aux0 = model.apply(zeros, _text(x))
  np.testing.assert_array_equal(aux0["located"], [[0, 1, 2]] * B)
  np.testing.assert_allclose(aux0["attention"][:, 2], [[0, 0, 0.5, 0.5]] * B)
  # As many stages as blocks: every block exactly once, random and zero parameters alike.
  model4 = _model(num_stages=4)
  v4 = model4.init(jax.random.key(3), x)
  for v in (v4, jax.tree.map(jnp.zeros_like, v4)):
    _, a4 = model4.apply(v, _text(x))
    assert sorted(np.asarray(a4["located"][0]).tolist()) == [0, 1, 2, 3]
    _assert_distinct(a4["located"])


def _reference_boxes(located, grid, map_hw, img):
  h, w = grid
  sy, sx = img / map_hw[0], img / map_hw[1]
  r, c = np.divmod(np.asarray(located), w)
  assert (r < h).all()
  return np.stack([2 * c * sx, 2 * r * sy, np.minimum(2 * c + 2, map_hw[1]) * sx,
                   np.minimum(2 * r + 2, map_hw[0]) * sy], -1)


@pytest.mark.parametrize("img", [64, 48])  # 48 px: an odd 3 x 3 map, padded to 2 x 2 blocks
def test_boxes_and_part_features_from_the_map(img):
  model = _model(img=img)
  x = _image(img, seed=1)
  variables = model.init(jax.random.key(1), x)
  _, aux = model.apply(variables, _text(x))
  fmap = np.asarray(aux["stages"][-1])
  H, W = fmap.shape[1:3]
  grid = model.block_grid()
  assert grid == ((H + 1) // 2, (W + 1) // 2) == (2, 2)
  assert aux["attention"].shape[-1] == grid[0] * grid[1]
  boxes = np.asarray(aux["located_boxes"])
  assert (boxes >= 0).all() and (boxes <= img).all()
  assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
  np.testing.assert_allclose(boxes, _reference_boxes(aux["located"], grid, (H, W), img))
  loc = np.asarray(aux["located"])
  for b in range(B):
    for k in range(K):
      r, c = divmod(int(loc[b, k]), grid[1])
      block = fmap[b, 2 * r:2 * r + 2, 2 * c:2 * c + 2]  # 1, 2 or 4 positions on an odd edge
      np.testing.assert_allclose(aux["part_features"][b, k], block.mean(axis=(0, 1)),
                                 rtol=1e-5, atol=1e-6)


def test_pool_blocks_odd_map():
  fmap = np.random.default_rng(0).normal(size=(2, 3, 5, 4)).astype(np.float32)
  desc, means, (h, w) = pma.pool_blocks(jnp.asarray(fmap))
  assert (h, w) == (2, 3) and desc.shape == means.shape == (2, 6, 4)
  for i in range(h):
    for j in range(w):
      block = fmap[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
      np.testing.assert_allclose(desc[:, i * w + j], block.max(axis=(1, 2)), rtol=1e-6)
      np.testing.assert_allclose(means[:, i * w + j], block.mean(axis=(1, 2)), rtol=1e-6)


def test_masked_softmax_rules():
  logits = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, -1.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
  valid = jnp.array([[True, False, True, False], [False] * 4, [True] * 4])
  out = np.asarray(pma.masked_softmax(logits, valid))
  assert out[0, 1] == 0.0 and out[0, 3] == 0.0
  np.testing.assert_allclose(out[0, [0, 2]], jax.nn.softmax(jnp.array([1.0, 3.0])), rtol=1e-6)
  assert (out[1] == 0.0).all()  # empty set: all zeros, no NaN
  np.testing.assert_allclose(out[2], 0.25)
  big = pma.masked_softmax(jnp.array([[1e30, -1e30, jnp.inf]]), jnp.array([[True, True, False]]))
  np.testing.assert_array_equal(big, [[1.0, 0.0, 0.0]])

  def loss(z):
    return (pma.masked_softmax(z, valid) * jnp.arange(4.0)).sum()
  g = np.asarray(jax.grad(loss)(logits))
  assert np.isfinite(g).all() and (g[1] == 0).all() and g[0, 1] == 0 and g[0, 3] == 0


def test_empty_text_has_finite_gradients(bimodal):
  model, variables, x, _, _ = bimodal
  inputs = dict(_text(x), phrase_mask=jnp.zeros((B, P), bool))

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, inputs)
    return jax.nn.logsumexp(logits, axis=-1).mean()
  grads = jax.grad(loss)(variables["params"])
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def _numpy_mask_update(weights, valid, top, threshold):
  out = np.zeros(weights.shape, bool)
  for b in range(weights.shape[0]):
    idx = [j for j in np.argsort(-weights[b], kind="stable") if valid[b, j]][:top]
    for j in idx:
      out[b, j] = weights[b, j] > threshold
  return out


def test_text_mask_update_against_numpy():
  # Hand-made: the top 3 of the valid phrases, and only those above 0.1.
  w = np.array([[0.05, 0.4, 0.3, 0.15, 0.1, 0.0]], np.float32)
  v = np.array([[True, True, False, True, True, True]])
  got = np.asarray(pma.text_mask_update(jnp.asarray(w), jnp.asarray(v), 3, 0.1))
  np.testing.assert_array_equal(got, [[False, True, False, True, False, False]])
  np.testing.assert_array_equal(got, _numpy_mask_update(w, v, 3, 0.1))
  rng = np.random.default_rng(0)
  for top, thr, p in ((3, 0.1, 7), (1, 0.0, 4), (5, 0.2, 3), (2, 0.05, 6)):
    w = rng.dirichlet(np.ones(p), size=8).astype(np.float32)
    w[0, :2] = w[0, 2]  # ties
    v = rng.random((8, p)) < 0.7
    got = pma.text_mask_update(jnp.asarray(w), jnp.asarray(v), top, thr)
    np.testing.assert_array_equal(got, _numpy_mask_update(w, v, top, thr))


def test_text_mask_in_the_model():
  model = _model(text_mask_top=1, text_mask_threshold=0.0)  # one phrase per stage
  x = _image()
  variables = model.init(jax.random.key(2), _text(x))
  _, aux = model.apply(variables, _text(x))
  b, c, masked = (np.asarray(aux[n]) for n in ("phrase_weights", "text_attention",
                                                "text_masked"))
  valid = PHRASE_MASK & (PHRASES != 0).any(-1)
  before = np.zeros_like(valid)
  for k in range(K):
    open_ = valid & ~before
    np.testing.assert_array_equal(b[:, k] > 0, open_)  # QRM over the open phrases only
    np.testing.assert_allclose(b[:, k].sum(-1), np.where(open_.any(-1), 1.0, 0.0), rtol=1e-5)
    update = _numpy_mask_update(b[:, k], open_, 1, 0.0)
    np.testing.assert_array_equal(masked[:, k], before | update)
    np.testing.assert_array_equal(c[:, k] > 0, valid & ~masked[:, k])  # global SAM: the rest
    before = masked[:, k]
  assert (masked.sum(-1) == np.minimum(np.arange(1, K + 1), valid.sum(-1)[:, None])).all()


def test_lstm_honours_sequence_lengths(bimodal):
  model, variables, x, _, aux = bimodal
  q = np.asarray(aux["phrase_embeddings"])
  padded = np.zeros((B, P, 7), np.int32)
  padded[:, :, :3] = PHRASES
  _, aux_p = model.apply(variables, {"image": x, "phrases": jnp.asarray(padded),
                                     "phrase_mask": jnp.asarray(PHRASE_MASK)})
  np.testing.assert_allclose(aux_p["phrase_embeddings"], q, rtol=1e-5, atol=1e-6)
  # Masked and empty phrases embed as zeros; a word change changes its phrase only.
  assert not q[0, 2].any() and not q[1, 3].any() and np.abs(q[0, 0]).max() > 0
  changed = PHRASES.copy()
  changed[0, 0, 1] = 11
  _, aux_c = model.apply(variables, {"image": x, "phrases": jnp.asarray(changed),
                                     "phrase_mask": jnp.asarray(PHRASE_MASK)})
  qc = np.asarray(aux_c["phrase_embeddings"])
  assert np.abs(qc[0, 0] - q[0, 0]).max() > 1e-4
  np.testing.assert_allclose(qc[:, 1:], q[:, 1:], rtol=1e-6)


@pytest.mark.parametrize("name, grid, channels", [("pma_vgg16", (14, 14), 512),
                                                  ("pma_resnet50", (7, 7), 2048)])
def test_paper_backbones_at_448(name, grid, channels):
  model = models.create(name, 200, img_size=448, vocab_size=1000)
  assert model.block_grid() == grid
  assert "backbone" in model.checkpoint_parts()
  inputs = {"image": jax.ShapeDtypeStruct((1, 448, 448, 3), jnp.float32),
            "phrases": jax.ShapeDtypeStruct((1, 6, 5), jnp.int32),
            "phrase_mask": jax.ShapeDtypeStruct((1, 6), jnp.bool_)}
  out, variables = jax.eval_shape(
      lambda i: model.init_with_output(jax.random.key(0), i), inputs)
  logits, aux = out
  assert logits.shape == (1, 200)
  assert aux["attention"].shape == (1, 3, grid[0] * grid[1])
  assert aux["part_features"].shape == (1, 3, channels)
  assert aux["pre_logits"].shape == (1, channels + 3 * 512)
  assert variables["params"]["stage_fc"]["kernel"].shape == (2 * channels + 2 * 512, 512)
  assert variables["params"]["word_embed"]["embedding"].shape == (1000, 300)


def test_gradients_reach_every_branch(bimodal):
  model, variables, x, _, _ = bimodal
  inputs = _text(x)

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, inputs)
    return -jax.nn.log_softmax(logits)[:, 1].mean()
  grads = jax.grad(loss)(variables["params"])
  for name in ("word_embed", "phrase_lstm", "vision_sam_0", "qrm_0", "text_sam_0", "backbone",
               "stage_fc", "head"):
    leaves = [np.asarray(g) for g in jax.tree.leaves(grads[name])]
    assert all(np.isfinite(g).all() for g in leaves), name
    assert max(np.abs(g).max() for g in leaves) > 0, name


def test_bfloat16_and_dropout():
  model = _model(dtype=jnp.bfloat16, drop_rate=0.5)
  x = _image()
  variables = model.init(jax.random.key(0), _text(x))
  leaves = jax.tree.leaves(variables["params"])
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)
  logits, aux = model.apply(variables, _text(x))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  _assert_distinct(aux["located"])
  np.testing.assert_allclose(aux["attention"].sum(-1), 1.0, rtol=1e-5)
  train_logits, _ = model.apply(variables, _text(x), train=True,
                                rngs={"dropout": jax.random.key(1)})
  assert np.abs(np.asarray(train_logits) - np.asarray(logits)).max() > 0

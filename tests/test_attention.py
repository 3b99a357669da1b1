"""Memory-efficient attention (fgjax.models.attention) and the rollout streamed from q and k.

The chunked attention equals the materialised softmax(q k^T) v in value and gradient, keeps no
T x T residual, and needs far less memory in a compiled train step; the streamed rollout gives
the materialised sweeps' scores and the same selected patches, in float32 and bf16, with one
block of query rows and with several (padded) blocks.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from fgjax import models
from fgjax.models import attention, rollout


def _qkv(key, h=3, b=2, t=11, d=8, dtype=jnp.float32, spread=3.0):
  kq, kk, kv = jax.random.split(key, 3)
  q = spread * jax.random.normal(kq, (h, b, t, d))
  k = jax.random.normal(kk, (h, b, t, d))
  v = jax.random.normal(kv, (h, b, t, d))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _reference(q, k, v, scale):
  """The materialised attention in float64 (NumPy)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  s = np.einsum("hbqd,hbkd->hbqk", q * scale, k)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("hbqk,hbkd->hbqd", p, v)


def _materialized(q, k, v, scale):
  p = attention.probs_block(q * jnp.asarray(scale, q.dtype), k)
  return jnp.einsum("hbqk,hbkd->hbqd", p.astype(v.dtype), v)


@pytest.mark.parametrize("t,chunk", [(11, None), (11, 4), (11, 11), (13, 5), (600, None)])
def test_chunked_attention_equals_materialised_values_and_gradients(t, chunk):
  q, k, v = _qkv(jax.random.key(t), t=t)
  scale = 8 ** -0.5
  rows = attention.block_rows(t, chunk)
  assert rows == {(11, None): 11, (11, 4): 4, (11, 11): 11, (13, 5): 5, (600, None): 200}[
      (t, chunk)]
  out = attention.attend(q, k, v, scale, implementation="chunked", chunk=chunk)
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, scale), rtol=2e-5, atol=2e-6)
  if rows == t:  # one block: the materialised path's arithmetic, op for op
    np.testing.assert_array_equal(np.asarray(out), np.asarray(_materialized(q, k, v, scale)))
  w = jax.random.normal(jax.random.key(1), out.shape)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.tanh(f(q, k, v)) * w)
  chunked = lambda q, k, v: attention.attend(q, k, v, scale, implementation="chunked",
                                             chunk=chunk)
  g1 = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2)))(q, k, v)
  g2 = jax.jit(jax.grad(loss(lambda q, k, v: _materialized(q, k, v, scale)),
                        argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6)


def test_chunked_attention_bf16_close_to_float32():
  q, k, v = _qkv(jax.random.key(2), t=37)
  scale = 8 ** -0.5
  ref = _reference(q, k, v, scale)
  for chunk in (None, 8):
    qb, kb, vb = (a.astype(jnp.bfloat16) for a in (q, k, v))
    out = attention.attend(qb, kb, vb, scale, implementation="chunked", chunk=chunk)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.06)
    w = jax.random.normal(jax.random.key(4), ref.shape)
    grads = jax.grad(lambda q, k, v: jnp.sum(
        attention.attend(q, k, v, scale, chunk=chunk).astype(jnp.float32) * w),
        argnums=(0, 1, 2))(qb, kb, vb)
    refs = jax.grad(lambda q, k, v: jnp.sum(_materialized(q, k, v, scale) * w),
                    argnums=(0, 1, 2))(q, k, v)
    for g, g_ref in zip(grads, refs):  # dk, dv: accumulated in float32 over several blocks
      assert g.dtype == jnp.bfloat16
      bound = 0.03 * float(jnp.abs(g_ref).max())  # bf16 inputs: ~3 significant digits
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref), atol=bound)


def _saved_shapes(fn, *args):
  """Shapes of the residuals that autodiff of `fn` keeps for the backward pass."""
  from jax._src import ad_checkpoint  # print_saved_residuals' data (no public list form)
  return [tuple(r[0].shape) for r in ad_checkpoint.saved_residuals(fn, *args)]


def test_no_token_by_token_residual_in_a_vit_train_loss():
  """Across a whole TRS-DeiT loss (selection included), no (., T, T) array is kept for the
  backward pass on the default path; the materialised path keeps one per block."""
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  kw = dict(depth=3, head_zeroinit=False, batch_chains=1)
  t = 2 + 16

  def saved(impl):
    model = models.create("trs_deit_tiny_patch16", 5, 64, attention_impl=impl, **kw)
    params = model.init(jax.random.key(0), x)["params"]
    loss = lambda p: jnp.sum(model.apply({"params": p}, x, train=True)[0] ** 2)
    return [s for s in _saved_shapes(loss, params) if len(s) >= 2 and s[-2:] == (t, t)]

  assert saved("auto") == []
  assert len(saved("materialized")) >= 2  # the blocks before the last (the check can fail)


def _step_temp_bytes(model, x):
  one = jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)
  params = jax.eval_shape(model.init, jax.random.key(0), one)["params"]
  loss = lambda p, x: jnp.sum(model.apply({"params": p}, x, train=True)[0] ** 2)
  compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_train_step_needs_far_less_memory():
  """Many heads and tokens, a narrow width: the probabilities dominate the materialised step.
  The chunked path with several query blocks needs under half of its memory."""
  x = jax.ShapeDtypeStruct((4, 64, 64, 3), jnp.float32)
  kw = dict(patch_size=4, width=96, num_heads=12, depth=3, batch_chains=1)
  old = _step_temp_bytes(models.create("trs_deit_tiny_patch16", 5, 64,
                                       attention_impl="materialized", **kw), x)
  new = _step_temp_bytes(models.create("trs_deit_tiny_patch16", 5, 64, attention_chunk=64,
                                       **kw), x)
  assert new < 0.5 * old, (new, old)


def _random_qks(key, layers=4, h=3, b=2, t=23, d=8, dtype=jnp.float32):
  """Per-block (scaled q, k) with peaked attention (distinct rollout scores)."""
  out = []
  for kk in jax.random.split(key, layers):
    q, k, _ = _qkv(kk, h, b, t, d, dtype)
    out.append((q, k))
  return out


def _probs_list(qks):
  """The materialised per-block attention (B, K, T, T) the reference sweeps take."""
  return [jnp.transpose(attention.probs_block(q, k), (1, 0, 2, 3)) for q, k in qks]


@pytest.mark.parametrize("t,chunk", [(23, None), (23, 5), (23, 23), (30, 7)])
@pytest.mark.parametrize("num_prefix", [1, 2])
def test_streamed_rollout_equals_materialised_sweeps(t, chunk, num_prefix):
  qks = _random_qks(jax.random.key(t + num_prefix), t=t)
  probs = _probs_list(qks)
  r = np.asarray(rollout.full_rollout([np.asarray(p, np.float64) for p in probs]))
  tokens = list(range(num_prefix))
  rows = np.asarray(rollout.streamed_rows(qks, tokens, chunk))
  cols = np.asarray(rollout.streamed_cols(qks, tokens, chunk))
  np.testing.assert_allclose(rows, r[:, :, tokens, :], rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(cols, r[:, :, :, tokens], rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(rows, np.asarray(rollout.rollout_rows(probs, tokens)),
                             rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(cols, np.asarray(rollout.rollout_cols(probs, tokens)),
                             rtol=1e-5, atol=1e-9)
  trs = rollout.trs_scores_from_qk(qks, num_prefix, chunk)
  np.testing.assert_allclose(np.asarray(trs), np.asarray(rollout.trs_scores(probs, num_prefix)),
                             rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(rollout.select_per_head(trs)),
                                np.asarray(rollout.select_per_head(
                                    rollout.trs_scores(probs, num_prefix))))
  cls_row = rollout.cls_row_scores_from_qk(qks, num_prefix, chunk)
  np.testing.assert_allclose(np.asarray(cls_row), r[:, :, 0, num_prefix:], rtol=1e-5, atol=1e-9)


def _brute_force_select(attn, kind, num_prefix):
  """Spec sections 2 and 3 literally: the full product R in float64, argmax per head."""
  a = [np.asarray(x, np.float64) for x in attn]
  r = a[0]
  for x in a[1:]:
    r = x @ r
  if kind == "cls_row":
    return r[:, :, 0, num_prefix:].argmax(-1)
  score = np.ones(r.shape[:2] + (r.shape[-1] - num_prefix,))
  for t in range(num_prefix):
    score = score * r[:, :, t, num_prefix:] * r[:, :, num_prefix:, t]
  return score.argmax(-1)


def _peaked(variables, factor=6.0):
  """Scales the qkv kernels so that attention is peaked and rollout scores are far from ties
  (random-init attention is near uniform, where the argmax is decided by rounding)."""
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p * factor if "qkv" in jax.tree_util.keystr(path) and
      "kernel" in jax.tree_util.keystr(path) else p, variables["params"])
  return {**variables, "params": params}


@pytest.mark.parametrize("name,img,chunk", [
    ("trs_deit_tiny_patch16", 64, None), ("trs_deit_tiny_patch16", 96, 7),
    ("transfg_tiny_patch16", 52, None), ("transfg_tiny_patch16", 76, 9)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_model_selection_unchanged_by_the_attention_path(name, img, chunk, dtype):
  """The selected patches equal the materialised path's and the float64 brute force, on one
  block of query rows and on several; float32 and bf16 compute."""
  kw = dict(depth=4, head_zeroinit=False, dtype=dtype)
  new = models.create(name, 5, img, attention_chunk=chunk, **kw)
  old = models.create(name, 5, img, attention_impl="materialized", **kw)
  x = jax.random.normal(jax.random.key(3), (4, img, img, 3))
  variables = _peaked(new.init(jax.random.key(0), x))
  l_new, a_new = jax.jit(lambda v, x: new.apply(v, x))(variables, x)
  l_old, a_old = jax.jit(lambda v, x: old.apply(v, x, return_attention=True))(variables, x)
  kind, prefix = new.region_selection, new.num_prefix_tokens
  np.testing.assert_array_equal(np.asarray(a_new["selected"]), np.asarray(a_old["selected"]))
  # The selection of earlier fgjax versions: the sweeps over the stored probabilities.
  stored = a_old["attention"][:-1]
  scores = (rollout.trs_scores(stored, prefix) if kind == "trs"
            else rollout.cls_row_scores(stored, prefix))
  np.testing.assert_array_equal(np.asarray(a_new["selected"]),
                                np.asarray(rollout.select_per_head(scores)))
  np.testing.assert_array_equal(np.asarray(a_new["selected"]),
                                _brute_force_select(a_old["attention"][:-1], kind, prefix))
  tol = 1e-4 if dtype == jnp.float32 else 0.05
  np.testing.assert_allclose(np.asarray(l_new), np.asarray(l_old), atol=tol, rtol=tol)


def test_whole_step_gradients_equal_the_materialised_path():
  """The TRS-DeiT method's loss and gradients, default path (several query blocks) against
  the materialised one, with batch chains and with remat."""
  from configs import common as cfgs
  from fgjax import methods

  x = jax.random.normal(jax.random.key(1), (4, 96, 96, 3))
  batch = {"image": x, "label": jnp.arange(4) % 5}
  kw = dict(depth=3, head_zeroinit=False)
  ref_model = models.create("trs_deit_tiny_patch16", 5, 96, attention_impl="materialized",
                            batch_chains=1, **kw)
  params = _peaked(ref_model.init(jax.random.key(0), x[:1]))["params"]

  def value_and_grad(model):
    cfg = cfgs.base_config("trs_deit")
    cfg.model.name, cfg.model.img_size = "trs_deit_tiny_patch16", 96
    update = methods.get_method(cfg, model, 5).phases()[0].updates[0]
    ctx = methods.Context(step=jnp.zeros((), jnp.int32), rng=jax.random.key(2), batch=batch,
                          helpers={})
    return jax.jit(jax.value_and_grad(lambda p: update.loss(p, {}, ctx)[0]))(params)

  l_ref, g_ref = value_and_grad(ref_model)
  for extra in (dict(attention_chunk=16, batch_chains=1), dict(batch_chains=2),
                dict(attention_chunk=16, batch_chains=1, remat=True)):
    loss, grads = value_and_grad(ref_model.clone(attention_impl="auto", **extra))
    np.testing.assert_allclose(float(loss), float(l_ref), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_ref)):
      scale = float(jnp.abs(b).max()) + 1e-12
      np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=1e-4)


def test_return_rollout_on_a_plain_deit():
  """A plain DeiT reports the TRS score streamed over its blocks before the last, equal to the
  score of its materialised attention; the forward pass is unchanged."""
  model = models.create("deit_tiny_distilled_patch16", 5, 64, depth=3, head_zeroinit=False)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  variables = _peaked(model.init(jax.random.key(0), x))
  logits, aux = model.apply(variables, x, return_rollout=True)
  ref_logits, ref = model.apply(variables, x, return_attention=True)
  assert "selected" not in ref
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref_logits))
  score = rollout.trs_scores(ref["attention"][:-1], 2)
  np.testing.assert_allclose(np.asarray(aux["rollout"]), np.asarray(score), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(aux["selected"]),
                                np.asarray(rollout.select_per_head(score)))


def test_fused_kernel_wrappers_keep_the_layout_and_mask_the_padding():
  """The cuDNN path's layout (through jax.nn.dot_product_attention's XLA implementation, which
  runs on the CPU) and the TPU path's padding to 128-row tiles with segment ids (through a
  reference kernel that applies the segment mask as the Pallas kernel does)."""
  q, k, v = _qkv(jax.random.key(5), t=37)
  scale = 8 ** -0.5
  ref = _reference(q, k, v, scale)
  out = attention._cudnn(q, k, v, scale, implementation="xla")
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)

  seen = {}

  def kernel(q, k, v, segment_ids, *, sm_scale):  # (B, H, T', hd), T' a multiple of 128
    seen["shape"] = q.shape
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * sm_scale
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    p = jax.nn.softmax(jnp.where(same, s, -1e30), axis=-1)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v)

  out = attention._tpu_flash(q, k, v, scale, kernel)
  assert seen["shape"] == (2, 3, 128, 8)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
  # The real Pallas kernel's call (SegmentIds, sm_scale) traces, forward and backward, on any
  # backend (running it needs a TPU).
  qkv = [jax.ShapeDtypeStruct((12, 2, 786, 64), jnp.bfloat16)] * 3
  assert jax.eval_shape(lambda q, k, v: attention._tpu_flash(q, k, v, 0.125),
                        *qkv).shape == (12, 2, 786, 64)
  grads = jax.eval_shape(jax.grad(lambda q, k, v: jnp.sum(
      attention._tpu_flash(q, k, v, 0.125).astype(jnp.float32)), argnums=(0, 1, 2)), *qkv)
  assert [g.shape for g in grads] == [(12, 2, 786, 64)] * 3


def test_implementation_choice_and_bad_names():
  assert attention.resolve("auto", jnp.float32) == "chunked"  # the CPU test backend
  assert attention.resolve("materialized", jnp.bfloat16) == "materialized"
  with pytest.raises(ValueError, match="attention_impl"):
    attention.check_implementation("flash")
  model = models.create("deit_tiny_distilled_patch16", 5, 32, patch_size=8, depth=2,
                        attention_impl="flash")
  with pytest.raises(ValueError, match="attention_impl"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="attention_chunk"):
    attention.block_rows(10, 0)
  assert attention.block_rows(786, None) == 197 and attention.block_rows(1370, None) == 229


def test_a_run_saved_before_the_attention_keys_resumes(tmp_path):
  """A TRS-DeiT config.json written before `model.kwargs.attention_impl` existed resumes with
  today's recipe (the path is the same function); switching the path resumes too; another
  model key still blocks."""
  import json
  from configs import trs_deit_cub
  from fgjax.train import workdir as workdir_lib
  cfg = trs_deit_cub.get_config("runlocal")
  assert cfg.model.kwargs.attention_impl == "auto"
  saved = workdir_lib.as_json(cfg)
  del saved["model"]["kwargs"]["attention_impl"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  assert workdir_lib.check(cfg, str(tmp_path)).kind == "changed"
  with cfg.unlocked():
    cfg.model.kwargs.attention_impl = "materialized"
  assert workdir_lib.check(cfg, str(tmp_path)).kind == "changed"
  with cfg.unlocked():
    cfg.model.kwargs.remat = True
  with pytest.raises(workdir_lib.WorkdirError, match="remat"):
    workdir_lib.check(cfg, str(tmp_path))


def test_pmg_on_a_deit_passes_the_attention_options_to_its_backbone():
  m = models.create("pmg_deit_tiny", 5, 64, depth=3, attention_impl="materialized",
                    attention_chunk=8)
  assert (m.backbone.attention_impl, m.backbone.attention_chunk) == ("materialized", 8)

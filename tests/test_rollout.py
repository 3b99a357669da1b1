"""Region selection: vector-sweep rollout equals the brute-force full matrix product."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from fgjax import models
from fgjax.models import rollout


def _random_attention(key, layers=5, b=2, k=3, t=11):
  keys = jax.random.split(key, layers)
  return [jax.nn.softmax(3 * jax.random.normal(kk, (b, k, t, t)), axis=-1) for kk in keys]


def _brute_force_trs(attn, num_prefix):
  """Spec section 2 literally: form R = A_{L-1} ... A_1 by full products, take rows/cols."""
  a = [np.asarray(x, np.float64) for x in attn]
  r = a[0]
  for x in a[1:]:
    r = x @ r
  score = np.ones(r.shape[:2] + (r.shape[-1] - num_prefix,))
  for t in range(num_prefix):
    score = score * r[:, :, t, num_prefix:] * r[:, :, num_prefix:, t]
  return score, r


@pytest.mark.parametrize("num_prefix", [1, 2])
def test_sweeps_equal_full_product(num_prefix):
  attn = _random_attention(jax.random.key(0))
  score_ref, r = _brute_force_trs(attn, num_prefix)
  np.testing.assert_allclose(np.asarray(rollout.full_rollout(attn)), r, rtol=1e-5, atol=1e-7)
  rows = np.asarray(rollout.rollout_rows(attn, [0, 1]))
  cols = np.asarray(rollout.rollout_cols(attn, [0, 1]))
  np.testing.assert_allclose(rows, r[:, :, [0, 1], :], rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(cols, r[:, :, :, [0, 1]], rtol=1e-5, atol=1e-8)
  score = np.asarray(rollout.trs_scores(attn, num_prefix))
  np.testing.assert_allclose(score, score_ref, rtol=1e-4, atol=0)
  np.testing.assert_array_equal(np.asarray(rollout.select_per_head(score)),
                                score_ref.argmax(-1))
  cls_row = np.asarray(rollout.cls_row_scores(attn, num_prefix))
  np.testing.assert_allclose(cls_row, r[:, :, 0, num_prefix:], rtol=1e-5, atol=1e-9)


def test_model_selection_matches_brute_force_and_feeds_last_block():
  model = models.create("trs_deit_tiny_patch16", 5, 64, depth=4, head_zeroinit=False)
  x = jax.random.normal(jax.random.key(1), (3, 64, 64, 3))
  variables = model.init(jax.random.key(0), x)
  logits, aux = model.apply(variables, x, return_attention=True)
  assert aux["selected"].shape == (3, 3) and aux["selected"].dtype == jnp.int32
  n = 16
  assert int(aux["selected"].min()) >= 0 and int(aux["selected"].max()) < n
  score_ref, _ = _brute_force_trs(aux["attention"][:-1], 2)
  np.testing.assert_array_equal(np.asarray(aux["selected"]), score_ref.argmax(-1))
  # The last block saw [cls, dist, 3 selected patches].
  assert aux["attention"][-1].shape == (3, 3, 5, 5)
  assert aux["tokens"].shape == (3, 5, 192)
  # Same logits with and without the attention output; differs from plain DeiT.
  logits2, _ = model.apply(variables, x)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(logits2), atol=1e-5)
  plain = models.create("trs_deit_tiny_patch16", 5, 64, depth=4, head_zeroinit=False,
                        region_selection=None)
  logits3, aux3 = plain.apply(variables, x)
  assert "selected" not in aux3 and not np.allclose(np.asarray(logits3), np.asarray(logits))
  # Gradients flow through the gathered hidden states into earlier blocks.
  g = jax.grad(lambda p: model.apply({"params": p}, x)[0].sum())(variables["params"])
  assert float(jnp.abs(g["blocks_0"]["mlp"]["fc1"]["kernel"]).sum()) > 0


def test_selection_is_jittable_with_bf16():
  model = models.create("trs_deit_tiny_patch16", 5, 64, depth=3, dtype=jnp.bfloat16)
  x = jnp.ones((2, 64, 64, 3))
  variables = model.init(jax.random.key(0), x)
  logits, aux = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
  assert aux["selected"].shape == (2, 3) and bool(jnp.all(jnp.isfinite(logits)))

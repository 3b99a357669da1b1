"""The small CNN (the demo's teacher): options, parameter names, pooling."""
import jax
import jax.numpy as jnp
import pytest

from fgjax import models


def _init(**kw):
  model = models.create("cnn_small", 5, 32, **kw)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init(jax.random.key(1), x)
  return model, variables, x


def test_names_shapes_and_norm_option():
  model, variables, x = _init(widths=(8, 16), convs_per_stage=1)
  assert set(variables["params"]) == {"stage0_conv0", "stage1_conv0", "head"}
  logits, aux = model.apply(variables, x)
  assert logits.shape == (2, 5)
  model, variables, _ = _init(widths=(8, 16), convs_per_stage=2, norm=True)
  assert {"stage0_norm0", "stage0_norm1", "stage1_norm1"} <= set(variables["params"])


def test_max_pool_sees_one_hot_spot_that_mean_pool_dilutes():
  # Zero inputs except one pixel: with max pooling the pooled feature responds to it fully.
  kw = dict(widths=(8,), convs_per_stage=1, head_zeroinit=False)
  x = jnp.zeros((1, 32, 32, 3)).at[0, 10, 20].set(5.0)
  outs = {}
  for pool in ("max", "mean"):
    model = models.create("cnn_small", 5, 32, pool=pool, **kw)
    v = model.init(jax.random.key(1), x)
    base = model.apply(v, jnp.zeros_like(x))[0]
    outs[pool] = float(jnp.abs(model.apply(v, x)[0] - base).max())
  assert outs["max"] > 10 * outs["mean"] > 0


def test_bad_pool_is_a_clear_error():
  with pytest.raises(ValueError, match="pool must be 'mean' or 'max'"):
    _init(widths=(8,), pool="avg")

"""PMG's jigsaw generator: a permutation of intact cells, per image, deterministic per rng."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax.jigsaw import jigsaw


def _cells(img, n):
  h, w = img.shape[0] // n, img.shape[1] // n
  return [img[i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(n) for j in range(n)]


@pytest.mark.parametrize("n", [2, 4, 8])
def test_output_is_a_permutation_of_intact_cells(n):
  # Every pixel distinct, so each cell is identifiable.
  x = jnp.arange(3 * 32 * 32 * 2, dtype=jnp.float32).reshape(3, 32, 32, 2)
  out = np.asarray(jax.jit(lambda x, k: jigsaw(x, n, k))(x, jax.random.key(0)))
  perms = []
  for b in range(3):
    src = _cells(np.asarray(x[b]), n)
    perm = []
    for cell in _cells(out[b], n):
      hits = [i for i, s in enumerate(src) if np.array_equal(cell, s)]
      assert len(hits) == 1  # an intact source cell
      perm.append(hits[0])
    assert sorted(perm) == list(range(n * n))  # each cell exactly once
    perms.append(perm)
  assert perms[0] != list(range(n * n))  # actually shuffled
  assert len({tuple(p) for p in perms}) > 1  # per image, not one shuffle for the batch


def test_deterministic_per_rng_and_identity_for_one_cell():
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  a = jigsaw(x, 4, jax.random.key(5))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(jigsaw(x, 4, jax.random.key(5))))
  assert not np.array_equal(np.asarray(a), np.asarray(jigsaw(x, 4, jax.random.key(6))))
  np.testing.assert_array_equal(np.asarray(jigsaw(x, 1, jax.random.key(5))), np.asarray(x))


def test_sizes_that_do_not_divide_are_clear_errors():
  with pytest.raises(ValueError, match="does not divide into 8 x 8"):
    jigsaw(jnp.zeros((1, 36, 36, 3)), 8, jax.random.key(0))
  # 64 px with 16 px patches: 8 x 8 cells of 8 px would split patches.
  with pytest.raises(ValueError, match="multiple of 128"):
    jigsaw(jnp.zeros((1, 64, 64, 3)), 8, jax.random.key(0), patch_size=16)
  out = jigsaw(jnp.zeros((1, 64, 64, 3)), 4, jax.random.key(0), patch_size=16)
  assert out.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_matches_the_reshape_transpose_reference(n):
  """The einops split/merge is the plain reshape/transpose chain, bit for bit."""
  x = jax.random.normal(jax.random.key(1), (3, 32, 48, 3))
  key = jax.random.key(2)
  b, h, w, c = x.shape
  ch, cw = h // n, w // n
  cells = x.reshape(b, n, ch, n, cw, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, n * n, ch, cw, c)
  perm = jnp.argsort(jax.random.uniform(key, (b, n * n)), axis=1)
  cells = jnp.take_along_axis(cells, perm[:, :, None, None, None], axis=1)
  ref = cells.reshape(b, n, n, ch, cw, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
  np.testing.assert_array_equal(np.asarray(jigsaw(x, n, key)), np.asarray(ref))

"""PMG's jigsaw generator: a permutation of intact cells, the reference's cycle for the batch by
default (every cell moves), per image as an option, deterministic per rng."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgjax.jigsaw import jigsaw, permutations, reference_cycle


def _cells(img, n):
  h, w = img.shape[0] // n, img.shape[1] // n
  return [img[i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(n) for j in range(n)]


def _source_cells(x, out, n):
  """For every image, the source cell of each output cell (asserting intact cells)."""
  perms = []
  for b in range(x.shape[0]):
    src = _cells(np.asarray(x[b]), n)
    perm = []
    for cell in _cells(out[b], n):
      hits = [i for i, s in enumerate(src) if np.array_equal(cell, s)]
      assert len(hits) == 1  # an intact source cell
      perm.append(hits[0])
    assert sorted(perm) == list(range(n * n))  # each cell exactly once
    perms.append(perm)
  return perms


def _cycle_length(perm):
  seen, k, length = set(), 0, 0
  while k not in seen:
    seen.add(k)
    k, length = perm[k], length + 1
  return length


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("permutation,per_image", [("cycle", False), ("cycle", True),
                                                    ("uniform", True)])
def test_output_is_a_permutation_of_intact_cells(n, permutation, per_image):
  # Every pixel distinct, so each cell is identifiable.
  x = jnp.arange(4 * 32 * 32 * 2, dtype=jnp.float32).reshape(4, 32, 32, 2)
  out = np.asarray(jax.jit(lambda x, k: jigsaw(x, n, k, permutation=permutation,
                                               per_image=per_image))(x, jax.random.key(0)))
  perms = _source_cells(x, out, n)
  assert perms[0] != list(range(n * n))  # actually shuffled
  # One puzzle order for the batch (the reference), or one per image.
  assert (len({tuple(p) for p in perms}) > 1) == per_image
  if permutation == "cycle":  # every cell moves, in one cycle through all n^2 cells
    for p in perms:
      assert all(p[k] != k for k in range(n * n)) and _cycle_length(p) == n * n


def _reference_swaps(image, order, n):
  """PMG's reference jigsaw_generator in numpy: for each cell (a, b) of the shuffled list,
  swap cell (0, 0) with it."""
  out, s = image.copy(), image.shape[0] // n
  for k in order:
    a, b = divmod(int(k), n)
    tmp = out[:s, :s].copy()
    out[:s, :s] = out[a * s:(a + 1) * s, b * s:(b + 1) * s]
    out[a * s:(a + 1) * s, b * s:(b + 1) * s] = tmp
  return out


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_the_cycle_is_the_references_swaps(n):
  x = jax.random.normal(jax.random.key(3), (1, 8 * n, 8 * n, 3))
  rng = np.random.default_rng(n)
  for _ in range(5):
    order = rng.permutation(np.arange(1, n * n))
    with_zero = np.insert(order, rng.integers(0, n * n), 0)  # the reference lists (0, 0) too
    ref = _reference_swaps(np.asarray(x[0]), with_zero, n)
    perm = np.asarray(reference_cycle(jnp.asarray(order)[None]))[0]
    cells = _cells(np.asarray(x[0]), n)
    got = [cells[perm[k]] for k in range(n * n)]
    for k, cell in enumerate(_cells(ref, n)):
      np.testing.assert_array_equal(got[k], cell)


def test_how_often_a_puzzle_keeps_a_cell():
  """The issue's numbers: uniform 2 x 2 permutations keep a cell in 15/24 = 62.5% of puzzles and
  leave 1/24 = 4.2% unchanged; the reference's cycles never keep one."""
  keys = jax.random.split(jax.random.key(0), 50)
  uniform = np.concatenate([np.asarray(permutations(k, 200, 2, permutation="uniform",
                                                    per_image=True)) for k in keys])
  fixed = (uniform == np.arange(4)).any(1).mean()
  same = (uniform == np.arange(4)).all(1).mean()
  assert abs(fixed - 15 / 24) < 0.01 and abs(same - 1 / 24) < 0.005, (fixed, same)
  cycle = np.asarray(permutations(keys[0], 2000, 2, per_image=True))
  assert not (cycle == np.arange(4)).any()


def test_unknown_permutation_is_a_config_error():
  with pytest.raises(ValueError, match="config.pmg.jigsaw_permutation"):
    jigsaw(jnp.zeros((1, 16, 16, 3)), 2, jax.random.key(0), permutation="shuffle")


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
  perm = permutations(key, b, n, per_image=True)
  cells = jnp.take_along_axis(cells, perm[:, :, None, None, None], axis=1)
  ref = cells.reshape(b, n, n, ch, cw, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
  np.testing.assert_array_equal(np.asarray(jigsaw(x, n, key, per_image=True)), np.asarray(ref))

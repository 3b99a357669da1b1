"""PMG's jigsaw generator P(d, n) (Du et al. 2020; spec section 5), jittable.

`jigsaw(images, n, rng)` splits every image of a (B, H, W, C) batch into an n x n grid of equal
cells and rearranges them. The default is the PRIS-CV reference's `jigsaw_generator`: the cells
are listed in a shuffled order and cell (0, 0) is swapped with each in turn, which makes one
n^2-cycle (every cell moves) shared by the whole batch. Options (`permutation`, `per_image`):
  "cycle", per_image=False   the reference (default)
  "cycle", per_image=True    a cycle like the reference's, drawn for each image
  "uniform", per_image=True  any permutation, per image (fgjax before 2026-12: 62% of 2 x 2
                             puzzles keep a cell in place, 4% come out unchanged)
n = 1 returns the images unchanged. For a ViT pass `patch_size` so that the cells stay aligned
to the patch grid (every cell a whole number of patches); a size that does not divide is a clear
error, never a silent crop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

PERMUTATIONS = ("cycle", "uniform")


def check_permutation(permutation: str) -> str:
  """`permutation` if it is one of PERMUTATIONS, else a ValueError naming the config key."""
  if permutation not in PERMUTATIONS:
    raise ValueError(f"config.pmg.jigsaw_permutation must be one of {PERMUTATIONS}, got "
                     f"{permutation!r}")
  return permutation


def check_jigsaw_size(height: int, width: int, n: int, patch_size: int | None = None):
  """Raises ValueError unless an (height, width) image splits into n x n whole cells (each a
  whole number of `patch_size` patches when given)."""
  if n < 1:
    raise ValueError(f"jigsaw: n must be >= 1, got {n}")
  if height % n or width % n:
    raise ValueError(f"jigsaw: image size {height}x{width} does not divide into {n} x {n} "
                     f"cells; use an image size that is a multiple of {n}")
  if patch_size and n > 1 and ((height // n) % patch_size or (width // n) % patch_size):
    raise ValueError(f"jigsaw: {n} x {n} cells of {height // n}x{width // n} px do not align "
                     f"with the {patch_size} px patch grid; use an image size that is a "
                     f"multiple of {n * patch_size}")


def reference_cycle(order: jax.Array) -> jax.Array:
  """The source cell of every position after the reference's swaps.

  `order` (..., n^2 - 1) lists the cells 1 .. n^2 - 1 in the shuffled order (the reference's
  shuffled list also holds cell 0, whose swap with itself changes nothing). Swapping cell 0
  with order[0], order[1], ... in turn leaves at order[k] the cell from order[k - 1] (cell 0
  for k = 0) and at position 0 the cell from order[-1]: the cycle 0 -> order[0] -> ... ."""
  seq = jnp.concatenate([jnp.zeros(order.shape[:-1] + (1,), order.dtype), order], -1)
  # Position seq[k] receives cell seq[k - 1]: gather the rolled sequence at seq's inverse.
  return jnp.take_along_axis(jnp.roll(seq, 1, axis=-1), jnp.argsort(seq, axis=-1), axis=-1)


def permutations(rng: jax.Array, batch: int, n: int, *, permutation: str = "cycle",
                 per_image: bool = False) -> jax.Array:
  """(batch, n^2) int32: row b gives, for every output cell (row-major), its source cell."""
  check_permutation(permutation)
  rows = batch if per_image else 1
  if permutation == "uniform":
    perm = jnp.argsort(jax.random.uniform(rng, (rows, n * n)), axis=1)
  else:
    order = 1 + jnp.argsort(jax.random.uniform(rng, (rows, n * n - 1)), axis=1)
    perm = reference_cycle(order)
  return jnp.broadcast_to(perm, (batch, n * n)).astype(jnp.int32)


def jigsaw(images: jax.Array, n: int, rng: jax.Array, *, patch_size: int | None = None,
           permutation: str = "cycle", per_image: bool = False) -> jax.Array:
  """The n x n cells of `images` (B, H, W, C) rearranged (module docstring)."""
  b, h, w, c = images.shape
  check_jigsaw_size(h, w, n, patch_size)
  if n == 1:
    return images
  # Cells in row-major grid order: cell i * n + j is grid row i, column j.
  cells = rearrange(images, "b (i ch) (j cw) c -> b (i j) ch cw c", i=n, j=n)
  perm = permutations(rng, b, n, permutation=permutation, per_image=per_image)
  cells = jnp.take_along_axis(cells, perm[:, :, None, None, None], axis=1)
  return rearrange(cells, "b (i j) ch cw c -> b (i ch) (j cw) c", i=n, j=n)

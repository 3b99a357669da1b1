"""PMG's jigsaw generator P(d, n) (Du et al. 2020; spec section 5), jittable.

`jigsaw(images, n, rng)` splits every image of a (B, H, W, C) batch into an n x n grid of equal
cells and rearranges them with a random permutation drawn per image (the PRIS-CV reference
applies one shuffle to the whole batch; per-image permutations give the same marginal per
image and more variety per batch). n = 1 returns the images unchanged. For a ViT pass
`patch_size` so that the cells stay aligned to the patch grid (every cell a whole number of
patches); a size that does not divide is a clear error, never a silent crop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange


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


def jigsaw(images: jax.Array, n: int, rng: jax.Array, *,
           patch_size: int | None = None) -> jax.Array:
  """Per-image random permutation of the n x n cells of `images` (B, H, W, C)."""
  b, h, w, c = images.shape
  check_jigsaw_size(h, w, n, patch_size)
  if n == 1:
    return images
  # Cells in row-major grid order: cell i * n + j is grid row i, column j.
  cells = rearrange(images, "b (i ch) (j cw) c -> b (i j) ch cw c", i=n, j=n)
  perm = jnp.argsort(jax.random.uniform(rng, (b, n * n)), axis=1)  # a permutation per image
  cells = jnp.take_along_axis(cells, perm[:, :, None, None, None], axis=1)
  return rearrange(cells, "b (i j) ch cw c -> b (i ch) (j cw) c", i=n, j=n)

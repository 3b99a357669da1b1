"""Position-embedding resampling, numerically equal to timm's `resample_abs_pos_embed`.

timm resizes the patch part of the position embedding with
`F.interpolate(mode="bicubic", antialias=True, align_corners=False)` and keeps the prefix
tokens (cls, dist) apart. PyTorch's antialiased bicubic is a separable filter in the style of
PIL: for output pixel i the source centre is `scale * (i + 0.5)`, the Keys cubic kernel with
a = -0.5 is stretched by `scale` when downsampling, the window is clipped to the input
(no border replication) and the weights are renormalised to sum to one. This module builds
that filter as a dense (out, in) matrix per axis and applies it with two matmuls in float64,
which reproduces PyTorch to float32 rounding.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def antialias_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) interpolation matrix of torch's bicubic with antialias=True."""
  scale = in_size / out_size
  support = 2.0 * scale if scale >= 1.0 else 2.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  mat = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    # int() truncates toward zero like the C++ int64 cast.
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), in_size)
    j = np.arange(xmin, xmax)
    w = _cubic((j - center + 0.5) * invscale)
    total = w.sum()
    if total != 0:
      w = w / total
    mat[i, xmin:xmax] = w
  return mat


def resize_grid(grid: np.ndarray, new_hw: Sequence[int]) -> np.ndarray:
  """Resizes a (H, W, C) array to (new_h, new_w, C) with torch's antialiased bicubic."""
  h, w, _ = grid.shape
  nh, nw = new_hw
  if (h, w) == (nh, nw):
    return grid
  mh = antialias_bicubic_matrix(h, nh)
  mw = antialias_bicubic_matrix(w, nw)
  g = grid.astype(np.float64)
  out = np.einsum("ih,hwc->iwc", mh, g)
  out = np.einsum("jw,iwc->ijc", mw, out)
  return out


def resample_pos_embed(posemb: np.ndarray, new_grid: Sequence[int],
                       num_prefix_tokens: int,
                       old_grid: Sequence[int] | None = None) -> np.ndarray:
  """Resamples a (1, prefix + H*W, D) position embedding to `new_grid` = (h, w).

  Prefix tokens (1 for ViT's cls, 2 for DeiT's cls + dist) are kept unchanged. The old grid is
  assumed square unless `old_grid` is given. Output dtype equals the input dtype.
  """
  posemb = np.asarray(posemb)
  if posemb.ndim == 2:
    posemb = posemb[None]
  n_old = posemb.shape[1] - num_prefix_tokens
  if old_grid is None:
    side = int(math.isqrt(n_old))
    if side * side != n_old:
      raise ValueError(f"position embedding has {n_old} patch rows, which is not a square "
                       f"grid; pass old_grid")
    old_grid = (side, side)
  old_grid = tuple(old_grid)
  new_grid = tuple(new_grid)
  if old_grid == new_grid:
    return posemb
  prefix, patches = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
  dim = posemb.shape[-1]
  grid = patches[0].astype(np.float32).reshape(old_grid[0], old_grid[1], dim)
  grid = resize_grid(grid, new_grid).astype(np.float32)
  patches = grid.reshape(1, new_grid[0] * new_grid[1], dim).astype(posemb.dtype)
  return np.concatenate([prefix, patches], axis=1)

"""Where a ViT looks: the part-hit metric and the region pictures of the ViT-family methods.

The selected patches are the model's own selection (TRS-DeiT's rollout argmax, TransFG's part
selection) or, for a plain ViT/DeiT, the argmax of the TRS rollout score computed from its
attention. The part-hit rate is the share of selected patches that hit a part: with part
locations (CUB's 15 annotated points, `part_locs`) a patch hits when it contains a visible
one (`point_hits`); with part boxes (the beak, crest and throat of the synthetic birds) when
its centre lies in a box (`part_hits`). `part_hit_chance` is the same share over all patches,
what uniformly random picks would score. Part locations win when a batch has both.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fgjax.models import vit


def part_hits(selected, part_boxes, grid, patch_size, stride):
  """Per example, the share of selected patches whose centre lies in a part box (-1 = pad).

  selected: (B, K) patch indices; part_boxes: (B, P, 4) x0, y0, x1, y1 in input pixels.
  Returns (hits (B,), has_parts (B,)).
  """
  gw = grid[1]
  row = selected // gw
  col = selected % gw
  cx = (col * stride + patch_size / 2.0)[:, :, None]
  cy = (row * stride + patch_size / 2.0)[:, :, None]
  b = part_boxes[:, None, :, :]
  valid = b[..., 2] > b[..., 0]
  inside = (cx >= b[..., 0]) & (cx < b[..., 2]) & (cy >= b[..., 1]) & (cy < b[..., 3]) & valid
  hit = inside.any(-1).astype(jnp.float32).mean(-1)
  has = valid.any(-1).any(-1)
  return hit, has


def point_hits(selected, part_locs, grid, patch_size, stride):
  """Per example, the share of selected patches that contain a visible part location.

  selected: (B, K) patch indices; part_locs: (B, P, 3) x, y, visible in input pixels (rows
  with visible <= 0 are absent parts or padding). A patch covers [col * stride, col * stride
  + patch_size) x [row * stride, row * stride + patch_size). Returns (hits (B,), has_parts (B,)).
  """
  gw = grid[1]
  x0 = ((selected % gw) * stride)[:, :, None]
  y0 = ((selected // gw) * stride)[:, :, None]
  px, py = part_locs[:, None, :, 0], part_locs[:, None, :, 1]
  valid = part_locs[:, None, :, 2] > 0
  inside = (px >= x0) & (px < x0 + patch_size) & (py >= y0) & (py < y0 + patch_size) & valid
  hit = inside.any(-1).astype(jnp.float32).mean(-1)
  return hit, valid.any(-1).any(-1)


class Regions:
  """Patch selection of a ViT-family model: evaluation values and pictures."""

  def __init__(self, model: vit.VisionTransformer):
    self.model = model
    self.stride = model.patch_stride or model.patch_size

  @classmethod
  def of(cls, model) -> "Regions | None":
    """A `Regions` for a ViT-family model that selects patches (its own selection, or the
    rollout over the blocks before the last: depth >= 2), None for other models."""
    if not isinstance(model, vit.VisionTransformer):
      return None
    if model.region_selection is None and model.depth < 2:
      return None
    return cls(model)

  def selection(self, variables, images):
    """(logits, scores (B, heads, N), selected (B, heads)) in eval mode: the model's own
    selection, or a plain ViT's TRS score streamed from its blocks' q and k (no attention
    matrix is formed)."""
    logits, aux = self.model.apply(variables, images, train=False, return_rollout=True)
    return logits, aux["rollout"], aux["selected"]

  @staticmethod
  def has_parts(batch) -> bool:
    return "part_locs" in batch or "part_boxes" in batch

  def eval_outputs(self, variables, batch):
    """(logits, {"part_hit", "has_parts", "part_hit_chance"}) for a batch with part locations
    or part boxes."""
    m = self.model
    logits, _, sel = self.selection(variables, batch["image"])
    if "part_locs" in batch:
      fn, parts = point_hits, batch["part_locs"]
    else:
      fn, parts = part_hits, batch["part_boxes"]
    hit, has = fn(sel, parts, m.grid, m.patch_size, self.stride)
    n = m.grid[0] * m.grid[1]
    every = jnp.broadcast_to(jnp.arange(n), (sel.shape[0], n))
    chance = fn(every, parts, m.grid, m.patch_size, self.stride)[0]
    return logits, {"part_hit": hit, "has_parts": has, "part_hit_chance": chance}

  @staticmethod
  def summarize(values) -> dict[str, float]:
    if "part_hit" not in values:
      return {}
    has = values["has_parts"].astype(bool)
    if not has.any():
      return {}
    return {"part_hit_rate": float(values["part_hit"][has].mean()),
            "part_hit_chance": float(values["part_hit_chance"][has].mean())}

  def render(self, variables, images: np.ndarray, normalize: str) -> list:
    """One PIL image per input: [selected patches | rollout heat-map]."""
    from fgjax.methods import drawing
    m = self.model
    fn = jax.jit(lambda v, x: self.selection(v, x)[1:])
    out = []
    for i in range(len(images)):
      scores, sel = jax.device_get(fn(variables, jnp.asarray(images[i:i + 1])))
      out.append(drawing.render_regions(drawing.denormalize(images[i], normalize), scores[0],
                                        sel[0], m.grid, m.patch_size, self.stride))
    return out

"""Pictures the methods draw (PIL): region boxes over an image beside a heat-map overlay."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def heat_colors(v: np.ndarray) -> np.ndarray:
  """A jet-like colormap for values in [0, 1]: (..., 3) uint8."""
  v = np.clip(v, 0, 1)[..., None]
  r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
  g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
  b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
  return (np.concatenate([r, g, b], -1) * 255).astype(np.uint8)


def denormalize(x: np.ndarray, normalize: str) -> np.ndarray:
  """A normalised (H, W, 3) float image back to uint8 (`data.normalize` "imagenet" or "half")."""
  if normalize == "imagenet":
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  else:
    mean, std = np.array([0.5, 0.5, 0.5]), np.array([0.5, 0.5, 0.5])
  return (np.clip(x * std + mean, 0, 1) * 255).astype(np.uint8)


def heat_overlay(image_u8: np.ndarray, heat: np.ndarray) -> np.ndarray:
  """`heat` (h, w), any range, resized to the image and blended over it half and half."""
  h, w = image_u8.shape[:2]
  heat = (heat - heat.min()) / max(heat.max() - heat.min(), 1e-12)
  heat_img = Image.fromarray((heat * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
  return (0.5 * image_u8 + 0.5 * heat_colors(np.asarray(heat_img) / 255.0)).astype(np.uint8)


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
  w, h = left.size
  canvas = Image.new("RGB", (2 * w + 4, h), (255, 255, 255))
  canvas.paste(left, (0, 0))
  canvas.paste(right, (w + 4, 0))
  return canvas


def render_regions(image_u8: np.ndarray, scores: np.ndarray, selected: np.ndarray, grid,
                   patch_size: int, stride: int) -> Image.Image:
  """[image with the selected patches | rollout heat-map overlay] side by side."""
  w = image_u8.shape[1]
  s = scores / np.maximum(scores.max(-1, keepdims=True), 1e-30)  # per head, max = 1
  overlay = heat_overlay(image_u8, s.mean(0).reshape(grid))
  boxes = Image.fromarray(image_u8).convert("RGB")
  draw = ImageDraw.Draw(boxes)
  gw = grid[1]
  for k, idx in enumerate(selected):
    r, c = divmod(int(idx), gw)
    x0, y0 = c * stride, r * stride
    draw.rectangle([x0, y0, x0 + patch_size - 1, y0 + patch_size - 1], outline=(255, 40, 40),
                   width=max(1, w // 150))
    draw.text((x0 + 1, y0), str(k), fill=(255, 255, 0))
  return side_by_side(boxes, Image.fromarray(overlay))


def render_attention(image_u8: np.ndarray, maps: np.ndarray, box=None) -> Image.Image:
  """[image with the attention-crop box | mean attention map overlay] (CAL, WS-DAN)."""
  overlay = heat_overlay(image_u8, maps.mean(-1))
  left = Image.fromarray(image_u8).convert("RGB")
  if box is not None:
    y0, x0, y1, x1 = (int(v) for v in box)
    ImageDraw.Draw(left).rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 40, 40),
                                   width=max(1, image_u8.shape[1] // 150))
  return side_by_side(left, Image.fromarray(overlay))

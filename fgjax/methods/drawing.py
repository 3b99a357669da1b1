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


STAGE_COLOURS = ((255, 40, 40), (255, 200, 0), (40, 200, 255), (120, 255, 80))


def render_blocks(image_u8: np.ndarray, boxes, lines) -> Image.Image:
  """[image with each box (x0, y0, x1, y1 pixels) outlined and numbered 1, 2, ... | the text
  `lines` listed beside it] (PMA's located blocks and the phrases' weights)."""
  img = Image.fromarray(image_u8).convert("RGB")
  w, h = img.size
  scale = max(1, 256 // max(w, h))  # small inputs are drawn larger, so the numbers read
  if scale > 1:
    img = img.resize((w * scale, h * scale), Image.NEAREST)
  draw = ImageDraw.Draw(img)
  width = max(1, img.size[0] // 120)
  for k, box in enumerate(np.asarray(boxes, np.float64)):
    colour = STAGE_COLOURS[k % len(STAGE_COLOURS)]
    x0, y0, x1, y1 = (float(v) * scale for v in box)
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=width)
    draw.rectangle([x0, y0, x0 + 9, y0 + 11], fill=colour)
    draw.text((x0 + 2, y0), str(k + 1), fill=(0, 0, 0))
  line_h = 14
  panel_w = max(240, 7 * max((len(s) for s in lines), default=0) + 8)
  panel = Image.new("RGB", (panel_w, max(img.size[1], line_h * len(lines) + 8)),
                    (255, 255, 255))
  pdraw = ImageDraw.Draw(panel)
  for j, s in enumerate(lines):
    colour = STAGE_COLOURS[j] if s.startswith("stage") and j < len(STAGE_COLOURS) else (0, 0, 0)
    pdraw.text((4, 4 + j * line_h), s, fill=tuple(int(c * 0.7) for c in colour))
  canvas = Image.new("RGB", (img.size[0] + 4 + panel.size[0], max(img.size[1], panel.size[1])),
                     (255, 255, 255))
  canvas.paste(img, (0, 0))
  canvas.paste(panel, (img.size[0] + 4, 0))
  return canvas

"""A synthetic fine-grained dataset: "birds" that differ only in small textured parts.

Every image shows one bird built from a body plan shared by all classes (body, head, beak, eye,
wing, tail, legs) at a random position, scale (body length 42-56% of the image width), rotation
(+-25 degrees), facing direction and colours, on a cluttered background of random shapes and
decoy textured blobs. Classes differ *only* in the textures of small parts - the crest, the
wing patch, the tail patch and (from 65 classes on) the breast patch - each one of
{striped, checkered, spotted, ringed}. Every texture covers about half of its part with ink, and
ink and base colours are drawn independently of the class, so colour histograms and
low-resolution pixels carry no class information: a model has to find the parts and read their
texture. Each part covers at most 3% of the image.

Examples (deterministic from (seed, split, index), any count, 2-200 classes, any size):
  {"image": uint8 (S, S, 3), "label": int, "id": int,
   "object_box": float32 (4,) x0, y0, x1, y1 pixels of the bird,
   "part_boxes": float32 (P, 4) boxes of its discriminative parts (P = 3, or 4 from 65 classes),
   "text": "a red bird with a striped crest, a spotted wing and a ringed tail."}
"""
from __future__ import annotations

import itertools
import math
import zlib

import numpy as np
from PIL import Image, ImageDraw

from fgjax.data.sources import Source

TEXTURES = ("striped", "checkered", "spotted", "ringed")
PARTS = ("crest", "wing", "tail", "breast")
COLOURS = {  # name -> RGB; body and ink/base colours are drawn from here, never by class
    "red": (200, 40, 40), "orange": (235, 140, 30), "yellow": (230, 210, 50),
    "green": (60, 160, 70), "teal": (30, 150, 150), "blue": (50, 80, 200),
    "purple": (130, 60, 170), "pink": (230, 120, 170), "brown": (130, 80, 40),
    "grey": (128, 128, 128), "black": (25, 25, 25), "white": (240, 240, 240),
}
_COLOUR_NAMES = tuple(COLOURS)
# Part geometry in the bird's frame (units of body length L; x forward, y down):
# centre (x, y), semi-axes (a, b).
_PART_GEOMETRY = {
    "crest": ((0.50, -0.43), (0.12, 0.08)),
    "wing": ((-0.05, -0.03), (0.21, 0.09)),
    "tail": ((-0.72, 0.0), (0.13, 0.085)),
    "breast": ((0.28, 0.13), (0.12, 0.085)),
}
_PERIOD = 0.10  # texture period in units of L
# Points that bound the bird (bird frame), for placing it inside the image.
_BIRD_HULL = np.array([(-0.9, -0.17), (-0.9, 0.17), (0.86, -0.5), (0.86, 0.0), (0.4, -0.52),
                       (0.0, 0.55), (0.15, 0.55), (-0.5, -0.3), (0.5, 0.3)])
_SS = 2  # supersampling factor for anti-aliasing


def class_attributes(num_classes: int) -> list[tuple[int, ...]]:
  """The part-texture combination of each class (a fixed function of num_classes)."""
  if not 2 <= num_classes <= 200:
    raise ValueError(f"synthetic: num_classes must be in [2, 200], got {num_classes}")
  n_parts = 3 if num_classes <= 64 else 4
  combos = list(itertools.product(range(len(TEXTURES)), repeat=n_parts))
  order = np.random.default_rng(12345).permutation(len(combos))
  return [combos[i] for i in order[:num_classes]]


def _ellipse_points(cx, cy, a, b, n=40):
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  return np.stack([cx + a * np.cos(t), cy + b * np.sin(t)], 1)


class _Frame:
  """Bird frame -> canvas pixels: scale L, rotation, mirror, translation."""

  def __init__(self, length, angle, mirror, cx, cy):
    self.length, self.mirror, self.cx, self.cy = length, mirror, cx, cy
    self.c, self.s = math.cos(angle), math.sin(angle)

  def __call__(self, pts):
    pts = np.asarray(pts, np.float64) * self.length
    x = pts[:, 0] * (-1 if self.mirror else 1)
    y = pts[:, 1]
    return np.stack([self.cx + self.c * x - self.s * y, self.cy + self.s * x + self.c * y], 1)

  def inverse(self, px, py):
    dx, dy = px - self.cx, py - self.cy
    x = self.c * dx + self.s * dy
    y = -self.s * dx + self.c * dy
    if self.mirror:
      x = -x
    return x / self.length, y / self.length


def _texture(kind: int, u, v, period, phase):
  """Boolean ink mask (about 50% coverage) of texture `kind` at part coordinates (u, v)."""
  uu, vv = u / period + phase[0], v / period + phase[1]
  if kind == 0:    # striped (across the part's long axis)
    return np.floor(uu) % 2 == 0
  if kind == 1:    # checkered
    return (np.floor(uu) + np.floor(vv)) % 2 == 0
  if kind == 2:    # spotted: discs of radius 0.4 period on a square grid (pi * 0.16 ~ 50%)
    fu, fv = uu - np.floor(uu) - 0.5, vv - np.floor(vv) - 0.5
    return fu * fu + fv * fv < 0.16
  r = np.sqrt(u * u + v * v) / period  # ringed: concentric rings around the part centre
  return np.floor(2 * r + phase[0]) % 2 == 0


def _paint_textured_ellipse(canvas: np.ndarray, frame: _Frame, centre, axes, kind, ink, base,
                            phase):
  """Paints a textured ellipse (bird frame geometry) into the (H, W, 3) uint8 canvas."""
  pts = frame(_ellipse_points(centre[0], centre[1], axes[0], axes[1]))
  h, w = canvas.shape[:2]
  x0, y0 = max(int(pts[:, 0].min()) - 1, 0), max(int(pts[:, 1].min()) - 1, 0)
  x1, y1 = min(int(pts[:, 0].max()) + 2, w), min(int(pts[:, 1].max()) + 2, h)
  if x1 <= x0 or y1 <= y0:
    return pts
  py, px = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
  bx, by = frame.inverse(px, py)
  u, v = bx - centre[0], by - centre[1]
  inside = (u / axes[0]) ** 2 + (v / axes[1]) ** 2 <= 1.0
  ink_mask = _texture(kind, u, v, _PERIOD, phase)
  region = canvas[y0:y1, x0:x1]
  region[inside & ink_mask] = ink
  region[inside & ~ink_mask] = base
  return pts


def _box(pts, size, scale):
  p = np.asarray(pts) / scale
  return np.array([np.clip(p[:, 0].min(), 0, size), np.clip(p[:, 1].min(), 0, size),
                   np.clip(p[:, 0].max(), 0, size), np.clip(p[:, 1].max(), 0, size)], np.float32)


def render(index: int, label: int, attributes: tuple[int, ...], image_size: int,
           rng: np.random.Generator):
  """Draws one example; returns (uint8 image, object_box, part_boxes, text)."""
  size = image_size * _SS
  colours = np.array([COLOURS[c] for c in _COLOUR_NAMES], np.float64)
  # Background: a soft gradient plus clutter.
  c0, c1 = rng.uniform(60, 220, 3), rng.uniform(60, 220, 3)
  t = np.linspace(0, 1, size)[:, None, None]
  canvas = (c0 * (1 - t) + c1 * t).repeat(size, axis=1).astype(np.uint8)
  img = Image.fromarray(canvas)
  draw = ImageDraw.Draw(img)
  for _ in range(int(rng.integers(8, 16))):
    col = tuple(int(v) for v in rng.uniform(30, 230, 3))
    x, y = rng.uniform(0, size, 2)
    r = rng.uniform(0.03, 0.15) * size
    shape = rng.integers(0, 3)
    if shape == 0:
      draw.ellipse([x - r, y - r * rng.uniform(0.4, 1), x + r, y + r], fill=col)
    elif shape == 1:
      draw.rectangle([x - r, y - r * 0.6, x + r * rng.uniform(0.5, 1.2), y + r], fill=col)
    else:
      pts = [tuple(p) for p in rng.uniform(0, size, (4, 2))]
      draw.line(pts, fill=col, width=max(1, int(rng.uniform(0.005, 0.02) * size)))
  canvas = np.array(img)
  # Decoy textured blobs (random textures, away from nothing in particular).
  for _ in range(int(rng.integers(1, 4))):
    decoy = _Frame(rng.uniform(0.45, 0.7) * size, rng.uniform(-np.pi, np.pi), False,
                   *rng.uniform(0, size, 2))
    ink, base = colours[rng.choice(len(colours), 2, replace=False)]
    _paint_textured_ellipse(canvas, decoy, (0.0, 0.0), (0.15, 0.09), int(rng.integers(0, 4)),
                            ink, base, rng.uniform(0, 1, 2))
  # The bird: scale, rotation and facing, then a position that keeps it inside the image.
  length = rng.uniform(0.42, 0.56) * size
  angle = np.deg2rad(rng.uniform(-25, 25))
  mirror = bool(rng.integers(0, 2))
  extent = _Frame(length, angle, mirror, 0.0, 0.0)(_BIRD_HULL)
  lo, hi = -extent.min(0), size - extent.max(0)
  cx, cy = (rng.uniform(lo[k], hi[k]) if hi[k] > lo[k] else size / 2 for k in range(2))
  frame = _Frame(length, angle, mirror, cx, cy)
  body_i = int(rng.integers(len(colours)))
  body = colours[body_i]
  dark = np.clip(body * 0.6, 0, 255)
  img = Image.fromarray(canvas)
  draw = ImageDraw.Draw(img)
  poly = lambda pts: [tuple(p) for p in frame(pts)]
  col = lambda c: tuple(int(v) for v in c)
  outline = []
  # legs, tail, body, wing, head, beak, eye
  for sx in (-0.08, 0.1):
    leg = poly([(sx, 0.2), (sx + 0.03, 0.52)])
    draw.line(leg, fill=col(dark * 0.6), width=max(2, int(0.025 * length)))
    outline += leg
  tail = [(-0.40, -0.06), (-0.88, -0.16), (-0.88, 0.16), (-0.40, 0.06)]
  draw.polygon(poly(tail), fill=col(dark))
  body_pts = _ellipse_points(0.0, 0.0, 0.5, 0.27)
  draw.polygon(poly(body_pts), fill=col(body))
  draw.polygon(poly(_ellipse_points(-0.05, -0.03, 0.27, 0.12)), fill=col(dark))
  head = _ellipse_points(0.52, -0.24, 0.17, 0.16)
  draw.polygon(poly(head), fill=col(body))
  beak = [(0.66, -0.29), (0.84, -0.22), (0.66, -0.17)]
  draw.polygon(poly(beak), fill=col((210, 170, 60)))
  draw.polygon(poly(_ellipse_points(0.57, -0.28, 0.035, 0.035, 12)), fill=(10, 10, 10))
  canvas = np.array(img)
  outline = np.concatenate([np.asarray(outline), frame(body_pts), frame(tail), frame(head),
                            frame(beak)])
  # The discriminative parts.
  part_boxes, words = [], []
  for p, kind in enumerate(attributes):
    name = PARTS[p]
    centre, axes = _PART_GEOMETRY[name]
    ink, base = colours[rng.choice(len(colours), 2, replace=False)]
    pts = _paint_textured_ellipse(canvas, frame, centre, axes, kind, ink, base,
                                  rng.uniform(0, 1, 2))
    outline = np.concatenate([outline, pts])
    part_boxes.append(_box(pts, image_size, _SS))
    words.append(f"a {TEXTURES[kind]} {name}")
  image = Image.fromarray(canvas).reduce(_SS)
  listing = ", ".join(words[:-1]) + " and " + words[-1]
  text = f"a {_COLOUR_NAMES[body_i]} bird with {listing}."
  return (np.asarray(image, np.uint8), _box(outline, image_size, _SS),
          np.stack(part_boxes), text)


class SyntheticSource(Source):
  """`get_source("synthetic", split, num_classes=20, num_examples=None, image_size=224, seed=0)`.

  num_examples defaults to 50 per class for train and 20 per class for test/val. Labels cycle
  through the classes (balanced); train, val and test draw from separate random streams.
  """
  box_shapes: dict = {}

  def __init__(self, split: str = "train", num_classes: int = 20, num_examples: int | None = None,
               image_size: int = 224, seed: int = 0):
    if split not in ("train", "val", "test"):
      raise ValueError(f"synthetic: unknown split {split!r}; use train, val or test")
    if image_size < 32:
      raise ValueError(f"synthetic: image_size must be >= 32, got {image_size}")
    self.name, self.split = "synthetic", split
    self.attributes = class_attributes(num_classes)
    self.class_names = [
        "-".join(f"{TEXTURES[k]}_{PARTS[p]}" for p, k in enumerate(a)) for a in self.attributes]
    if num_examples is None:
      num_examples = (50 if split == "train" else 20) * num_classes
    self.image_size, self.seed = int(image_size), int(seed)
    self._split_code = zlib.crc32(split.encode())
    n = int(num_examples)
    self.ids = np.arange(n, dtype=np.int64)
    self.labels = self.ids % num_classes
    n_parts = len(self.attributes[0])
    self.box_shapes = {"object_box": (4,), "part_boxes": (n_parts, 4)}

  def example(self, i: int) -> dict:
    rng = np.random.default_rng([self.seed, self._split_code, int(i)])
    label = int(self.labels[i])
    image, obj, parts, text = render(int(i), label, self.attributes[label], self.image_size, rng)
    return {"image": image, "label": label, "id": int(self.ids[i]), "object_box": obj,
            "part_boxes": parts, "text": text}

  def get(self, i, min_size=None):
    ex = self.example(i)
    return Image.fromarray(ex.pop("image")), ex

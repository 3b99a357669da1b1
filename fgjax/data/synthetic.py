"""A synthetic fine-grained dataset: "birds" that differ only in the colours of small parts.

Every image shows one bird built from a body plan shared by all classes (tail, legs, body, wing,
head with an eye, and three small parts: a beak, a crest and a throat) at a random position,
scale (body length 40-54% of the image side), rotation (+-25 degrees) and facing direction, in
random muted colours, perched on a random branch over a cluttered background (a colour gradient
with random ellipses, boxes, lines and triangles). A class is a combination of the colours of the
three parts, three different colours out of seven vivid ones (red, orange, yellow, green, cyan,
blue, magenta): "a bird with a red beak, a blue crest and a yellow throat". Nothing else
depends on the class.

Global statistics carry no class information: each image also holds four decoys - triangles
congruent to the parts, in the four vivid colours its parts do not use, placed where a part of
another random bird pose would be, randomly rotated. So every image contains each vivid colour
exactly once in a part-sized triangle, colour histograms are the same for all classes, and a
part differs from a decoy only by where it sits on the bird: a logistic regression on colour
histograms or on 8x8 pixels stays near chance (figures in docs/datasets.md;
`python -m fgjax.data.synthetic` measures them). A model has to find the beak, the crest and
the throat and read their colours. The parts are solid and anti-aliased (2x supersampling).
Small CNNs with global max pooling learn the task from a few thousand images (the demo
teacher's CNN: 95-97% top-1 after 800 steps of 64 on this default variant); plain ViTs trained
from scratch need far more steps (a hard case by design: only the parts' positions relative to
the head separate them from the decoys).

The demo's variant, `part_scale=4, decoys=False`: every part has 4x the area (each about one
12 px patch at 96 px) and no decoys are drawn. A ViT trained from scratch learns it in a few
hundred steps; it is easier than the default in a second way too: without decoys the set of
vivid colours in an image is a class cue, so colour statistics partly solve it (figures in the
docs/demo.md), and only classes with the same three colours on different parts need the parts'
positions.

Up to 38 classes come from a code in which any two classes differ in at least two of the three
parts; from 39 to 200 classes, any two differ in at least one.

Examples are deterministic functions of (seed, split, index) - train, val and test draw from
different random streams - for any count, 2-200 classes and any image size (default 224, min 32):

  {"image": uint8 (S, S, 3), "label": int, "id": int (the index),
   "object_box": float32 (4,) x0, y0, x1, y1 in pixels: the bird,
   "part_boxes": float32 (3, 4): the beak, the crest and the throat, in pixels,
   "text": "a grey bird with a red beak, a blue crest and a yellow throat."}

Rendering takes a few milliseconds at 224 pixels (numpy + PIL ImageDraw).

Text (`has_text`; `texts(i)` gives the sentences as a list). The default `text="plain"` is the
sentence above: it names the three parts' true colours, so it alone determines the class.
`text="hard"` (`text_sentences=4`, `text_noise=0.1`) describes only some of the parts, in
CUB-caption-like sentences ("this bird has a red beak", "a small bird with a blue crest as well
as a pointed red beak", "this bird has a yellow throat and a short tail perched on a branch"):
each example describes a random subset of one or two of the three parts (equal chances, fixed
for the example), each of its `text_sentences` sentences mentions a non-empty random subset of
those, in random order and wording, with colourless filler phrases; each mention names the
part's true colour or, with probability `text_noise`, another of the seven vivid colours; the
body colour is never named. So the text alone cannot determine the class and the image must
still be read, while the text still helps: over 2000 train examples of 20 classes (seed 0) the
true colours of the mentioned parts identify the class uniquely for 50.6% of the examples
(those mentioning two parts, as any two of the first 38 classes differ in two parts, and a few
mentioning one: one part leaves 1-5 candidate classes; 2.1 on average), a text-only guess
knowing the true colours would be right 66.7% of the time, and 10.1% of the 9973 mentions
name a wrong colour (docs/datasets.md; `python -m fgjax.data.synthetic --text-stats`). The
hard text comes from its own random stream, seeded by (seed, split, index): `texts(i)` renders
nothing, and the images are bit-identical to the plain variant's. The record's "text" is the plain
sentence (a str) or the hard variant's list of sentences.
"""
from __future__ import annotations

import colorsys
import itertools
import math
import zlib

import numpy as np
from PIL import Image, ImageDraw

from fgjax.data.base import Source

PARTS = ("beak", "crest", "throat")
PART_COLOURS = {  # the vivid colours of the parts and of the decoys
    "red": (225, 30, 35), "orange": (255, 140, 0), "yellow": (250, 230, 30),
    "green": (30, 190, 50), "cyan": (40, 220, 235), "blue": (35, 70, 235),
    "magenta": (225, 40, 220),
}
_NAMES = tuple(PART_COLOURS)
_VIVID = np.array([PART_COLOURS[c] for c in _NAMES], np.float64)
_SS = 2  # supersampling factor (anti-aliasing)
MAX_PART_AREA = 0.03  # of the image area, per part box (at the default part_scale=1)
_PART_AREA = 0.026  # mean drawn area of each part and decoy, in units of L^2
_AREA_JITTER = (0.75, 1.25)  # random factor on the area of each part and decoy
_LENGTH = (0.32, 0.46)  # body length L, as a fraction of the image side


def class_attributes(num_classes: int) -> list[tuple[int, int, int]]:
  """(beak, crest, throat) colour ids (indices into PART_COLOURS) of each class.

  A fixed function of num_classes: three different colours per class; the first 38 classes form
  a code with pairwise distance >= 2 (any two classes differ in at least two parts).
  """
  if not 2 <= num_classes <= 200:
    raise ValueError(f"synthetic: num_classes must be in [2, 200], got {num_classes}")
  combos = list(itertools.permutations(range(len(_NAMES)), 3))
  order = np.random.default_rng(19).permutation(len(combos))
  combos = [combos[i] for i in order]
  code, rest = [], []
  for c in combos:  # greedy distance-2 code first, then everything else
    if all(sum(a != b for a, b in zip(c, d)) >= 2 for d in code):
      code.append(c)
    else:
      rest.append(c)
  return (code + rest)[:num_classes]


def class_name(attributes) -> str:
  b, c, w = (_NAMES[v] for v in attributes)
  return f"{b}_beak-{c}_crest-{w}_throat"


# ----------------------------------------------------------------------------- geometry
# Bird frame: units of the body length L, x towards the head, y down.


def _ellipse(cx, cy, a, b, n=28):
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  return np.stack([cx + a * np.cos(t), cy + b * np.sin(t)], 1)


def _polygon_area(p):
  x, y = p[:, 0], p[:, 1]
  return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def _scaled_to_area(p, area, anchor):
  """Scales polygon p about `anchor` so that its area is `area`."""
  anchor = np.asarray(anchor, np.float64)
  return anchor + (p - anchor) * math.sqrt(area / _polygon_area(p))


_BODY = _ellipse(0.0, 0.0, 0.48, 0.25, 40)
_HEAD = _ellipse(0.50, -0.21, 0.165, 0.165, 32)
_EYE = _ellipse(0.56, -0.25, 0.036, 0.036, 14)
_TAIL = np.array([(-0.38, -0.08), (-0.86, -0.20), (-0.90, 0.10), (-0.38, 0.07)])
_WING = _ellipse(-0.07, -0.04, 0.31, 0.135, 32)
_LEGS = [np.array([(-0.06, 0.2), (-0.03, 0.5)]), np.array([(0.1, 0.2), (0.13, 0.5)])]
_FEET_Y = 0.5
# The parts: congruent triangles (so that every part and decoy has the same area and outline),
# drawn on top of the head / wing so that all of their area is visible.
_TRIANGLE_H = math.sqrt(_PART_AREA * 2 / 0.58)  # height; base = 0.58 * height
_TRIANGLE = np.array([(0.0, -0.29), (1.0, 0.0), (0.0, 0.29)]) * _TRIANGLE_H  # tip along +x


def _placed(tri, x, y, angle):
  c, s = math.cos(angle), math.sin(angle)
  return tri @ np.array([[c, s], [-s, c]]) + np.array([x, y])


_BEAK = _placed(_TRIANGLE, 0.635, -0.20, 0.0)
_CREST = _placed(_TRIANGLE, 0.50, -0.345, -math.pi / 2)
_THROAT = _placed(_TRIANGLE, 0.53, -0.07, math.radians(110))
_PARTS = (_BEAK, _CREST, _THROAT)
_ALL_POINTS = np.concatenate([_BODY, _HEAD, _TAIL, _WING, *_LEGS, *_PARTS,
                              np.array([(-0.2, 0.52), (0.35, 0.52)])])


class _Pose:
  """Bird frame -> canvas pixels: scale, rotation, mirror, translation."""

  def __init__(self, length, angle, mirror, cx, cy):
    self.length, self.mirror, self.cx, self.cy = length, mirror, cx, cy
    self.c, self.s = math.cos(angle), math.sin(angle)

  def __call__(self, pts):
    pts = np.asarray(pts, np.float64)
    x = pts[:, 0] * (-self.length if self.mirror else self.length)
    y = pts[:, 1] * self.length
    return np.stack([self.cx + self.c * x - self.s * y, self.cy + self.s * x + self.c * y], 1)


def _box(pts: np.ndarray, limit: float) -> np.ndarray:
  return np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()],
                  np.float64).clip(0, limit)


# ----------------------------------------------------------------------------- rendering

_MUTED_NAMES = ((0.0, "brown"), (0.11, "olive"), (0.2, "sage"), (0.45, "teal-grey"),
                (0.55, "slate"), (0.75, "mauve"), (0.95, "brown"))


def _muted(rng, s_max=0.35, v=(0.25, 0.85)):
  """A random low-saturation colour (RGB 0..255) and its name."""
  h, s, val = rng.uniform(0, 1), rng.uniform(0.0, s_max), rng.uniform(*v)
  rgb = np.array(colorsys.hsv_to_rgb(h, s, val)) * 255
  if s < 0.12:
    name = "grey" if 0.3 < val < 0.75 else ("dark grey" if val <= 0.3 else "pale grey")
  else:
    name = [n for x, n in _MUTED_NAMES if h >= x][-1]
  return rgb, name


def _rgb(c) -> tuple[int, int, int]:
  return tuple(int(round(float(v))) for v in np.clip(c, 0, 255))


def _vivid(rng, i):
  return _rgb(_VIVID[i] + rng.uniform(-12, 12, 3))


def _background(rng, size: int) -> Image.Image:
  c0, c1 = _muted(rng, 0.4, (0.3, 0.95))[0], _muted(rng, 0.4, (0.3, 0.95))[0]
  t = np.linspace(0.0, 1.0, size)[:, None]
  line = (c0 * (1 - t) + c1 * t).astype(np.uint8)  # (size, 3)
  arr = np.broadcast_to(line[:, None, :], (size, size, 3))
  if rng.integers(2):
    arr = arr.transpose(1, 0, 2)
  img = Image.fromarray(np.ascontiguousarray(arr))
  draw = ImageDraw.Draw(img)
  for _ in range(int(rng.integers(10, 18))):
    col = _rgb(_muted(rng, 0.45, (0.15, 1.0))[0])
    x, y = rng.uniform(-0.05, 1.05, 2) * size
    r = rng.uniform(0.03, 0.14) * size
    kind = int(rng.integers(4))
    if kind == 0:
      draw.ellipse([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r], fill=col)
    elif kind == 1:
      draw.rectangle([x - r, y - r * rng.uniform(0.2, 1), x + r * rng.uniform(0.3, 1.2), y + r],
                     fill=col)
    elif kind == 2:
      pts = [tuple(p) for p in rng.uniform(-0.05, 1.05, (int(rng.integers(2, 5)), 2)) * size]
      draw.line(pts, fill=col, width=max(1, int(rng.uniform(0.004, 0.02) * size)))
    else:
      a0 = rng.uniform(0, 2 * math.pi)
      pts = [(x + r * math.cos(a), y + r * math.sin(a))
             for a in a0 + np.array([0, 2.1, 4.2]) + rng.uniform(-0.5, 0.5, 3)]
      draw.polygon(pts, fill=col)
  return img


def _sample_pose(rng, size: int) -> _Pose:
  """Scale, rotation, facing and a position that keeps the whole bird inside the canvas; every
  part box of the default size (part_scale=1) stays within MAX_PART_AREA of the image."""
  length = rng.uniform(*_LENGTH) * size
  angle = math.radians(rng.uniform(-25, 25))
  mirror = bool(rng.integers(2))
  for _ in range(8):
    pose0 = _Pose(length, angle, mirror, 0.0, 0.0)
    worst = max(np.prod(np.ptp(pose0(p), axis=0)) for p in _PARTS) / float(size * size)
    if worst <= MAX_PART_AREA * 0.97:
      break
    length *= math.sqrt(MAX_PART_AREA * 0.97 / worst)
  extent = _Pose(length, angle, mirror, 0.0, 0.0)(_ALL_POINTS)
  lo, hi = -extent.min(0) + 0.01 * size, size - extent.max(0) - 0.01 * size
  cx, cy = (float(rng.uniform(lo[k], hi[k])) if hi[k] > lo[k] else size / 2 for k in range(2))
  return _Pose(length, angle, mirror, cx, cy)


def _jittered(part, rng):
  """The part polygon with its area scaled by a random factor (about its base centre)."""
  anchor = (part[0] + part[2]) / 2
  return anchor + (part - anchor) * math.sqrt(rng.uniform(*_AREA_JITTER))


def _overlaps(a, b) -> bool:
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def render(label: int, attributes, image_size: int, rng: np.random.Generator,
           part_scale: float = 1.0, decoys: bool = True):
  """Draws one bird whose (beak, crest, throat) colours are `attributes` (colour ids).

  part_scale multiplies the area of every part and decoy (the pose is drawn as for the default
  size); decoys=False leaves the decoy triangles out.
  Returns (uint8 (S, S, 3) image, object_box (4,), part_boxes (3, 4), text).
  """
  del label  # the image depends on the class only through `attributes`
  size = int(image_size) * _SS
  img = _background(rng, size)
  draw = ImageDraw.Draw(img)
  pose = _sample_pose(rng, size)
  length = pose.length
  width = lambda frac: max(1, int(round(frac * length)))

  def poly(p, fill, outline=None):
    draw.polygon([tuple(q) for q in p], fill=_rgb(fill),
                 outline=None if outline is None else _rgb(outline),
                 width=width(0.012))

  # A branch to perch on.
  feet = pose(np.array([(-0.25, _FEET_Y + 0.02), (0.40, _FEET_Y + 0.02)]))
  d = feet[1] - feet[0]
  d = d / (np.linalg.norm(d) + 1e-12)
  stretch = rng.uniform(0.3, 0.8) * size
  draw.line([tuple(feet[0] - d * stretch), tuple(feet[1] + d * stretch)],
            fill=_rgb(rng.uniform(50, 130) * np.array([1.0, 0.78, 0.55])), width=width(0.06))

  # The bird's shared body plan.
  body, body_name = _muted(rng)
  wing = np.clip(body * rng.choice([0.6, 1.35]), 0, 255)
  dark = body * 0.6
  leg_col = _rgb(rng.uniform(30, 80, 3))
  for leg in _LEGS:
    draw.line([tuple(q) for q in pose(leg)], fill=leg_col, width=width(0.03))
  poly(pose(_TAIL), dark, dark * 0.6)
  poly(pose(_BODY), body, dark * 0.6)
  poly(pose(_WING), wing, dark * 0.6)
  poly(pose(_HEAD), body, dark * 0.6)
  draw.polygon([tuple(q) for q in pose(_EYE)], fill=(15, 15, 15), outline=(235, 235, 235),
               width=width(0.014))
  parts = _PARTS if part_scale == 1 else [
      _scaled_to_area(p, _polygon_area(p) * part_scale, (p[0] + p[2]) / 2) for p in _PARTS]
  part_pts = [pose(_jittered(p, rng)) for p in parts]
  part_bbs = [_box(p, size) for p in part_pts]

  # Decoys: part-sized triangles in the four vivid colours the parts do not use, each where a
  # part of another random bird pose would be (so decoys and parts share one spatial
  # distribution), randomly rotated, clear of the parts and of each other where possible.
  tri = (_TRIANGLE - _TRIANGLE.mean(0)) * length * math.sqrt(part_scale)
  r = float(np.max(np.linalg.norm(tri, axis=1)))
  taken = list(part_bbs)
  for ci in (c for c in range(len(_NAMES)) if decoys and c not in attributes):
    for _ in range(30):
      virtual = _sample_pose(rng, size)
      centre = virtual(parts[int(rng.integers(len(parts)))]).mean(0).clip(r + 1, size - r - 1)
      dec = _placed(tri * math.sqrt(rng.uniform(*_AREA_JITTER)), centre[0], centre[1],
                    rng.uniform(0, 2 * math.pi))
      bb = _box(dec, size)
      if not any(_overlaps(bb, t) for t in taken):
        break
    taken.append(bb)
    poly(dec, _vivid(rng, ci))
  # The parts, on top.
  for pts, ci in zip(part_pts, attributes):
    poly(pts, _vivid(rng, ci))

  image = img.reduce(_SS) if _SS > 1 else img
  s = float(_SS)
  part_boxes = np.stack([_box(p / s, image_size) for p in part_pts]).astype(np.float32)
  bird = np.concatenate([pose(_BODY), pose(_HEAD), pose(_TAIL), *map(pose, _LEGS),
                         *part_pts]) / s
  object_box = _box(bird, image_size).astype(np.float32)
  b, c, w = (_NAMES[v] for v in attributes)
  text = f"{_a(body_name)} {body_name} bird with {_a(b)} {b} beak, {_a(c)} {c} crest and " \
         f"{_a(w)} {w} throat."
  return np.asarray(image, np.uint8), object_box, part_boxes, text


def _a(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------- hard text

_TEXT_STREAM = 0x7E47  # the hard text's stream constant (its rng is independent of the image's)
_PART_NOUNS = {"beak": ("beak", "bill"), "crest": ("crest",), "throat": ("throat",)}
_PART_ADJECTIVES = {"beak": ("short", "pointed", "small", "sharp"),
                    "crest": ("small", "pointed", "tall"), "throat": ("small",)}
_SIZES = ("small", "little", "tiny", "medium sized", "plump")
_FILLER_PHRASES = ("a short tail", "a long tail", "short legs", "thin legs", "a round head",
                   "a rounded belly", "small eyes", "long wings")
_FILLER_CLAUSES = ("perched on a branch", "and it is perched on a branch",
                   "sitting on a thin branch", "and it is sitting on a twig")
_FRAMES = ("this bird has {}", "the bird has {}", "a {s} bird with {}",
           "this is a {s} bird with {}", "this {s} bird has {}", "a bird with {}",
           "this bird is {s} and has {}")
_JOINS = (" and ", " as well as ", " and also ", ", and ")


def hard_text(seed: int, split_code: int, index: int, sentences: int = 4, noise: float = 0.1,
              attributes=(0, 1, 2)):
  """(sentences, mentions) of the hard text variant for example `index`: `mentions` lists per
  sentence the (part index, colour id named) pairs it mentions; `attributes` are the true
  (beak, crest, throat) colour ids. Drawn from its own random stream, seeded by (seed,
  split_code, index, a constant)."""
  rng = np.random.default_rng([int(seed), int(split_code), int(index), _TEXT_STREAM])
  described = sorted(rng.choice(len(PARTS), int(rng.integers(1, 3)), replace=False).tolist())
  out, mentions = [], []
  for _ in range(int(sentences)):
    k = len(described) if len(described) == 1 else int(rng.integers(1, 3))
    chosen = [described[j] for j in rng.permutation(len(described))[:k]]
    phrases, named = [], []
    for p in chosen:
      colour = int(attributes[p])
      if rng.uniform() < noise:
        colour = int(rng.choice([c for c in range(len(_NAMES)) if c != attributes[p]]))
      adjectives = _PART_ADJECTIVES[PARTS[p]]
      adj = adjectives[int(rng.integers(len(adjectives)))] if rng.uniform() < 0.35 else ""
      nouns = _PART_NOUNS[PARTS[p]]
      words = " ".join(w for w in (adj, _NAMES[colour], nouns[int(rng.integers(len(nouns)))])
                       if w)
      phrases.append(f"{_a(words)} {words}")
      named.append((p, colour))
    if rng.uniform() < 0.3:
      phrases.insert(int(rng.integers(len(phrases) + 1)),
                     _FILLER_PHRASES[int(rng.integers(len(_FILLER_PHRASES)))])
    body = phrases[0]
    for ph in phrases[1:]:
      body += _JOINS[int(rng.integers(len(_JOINS)))] + ph
    frame = _FRAMES[int(rng.integers(len(_FRAMES)))]
    sentence = frame.format(body, s=_SIZES[int(rng.integers(len(_SIZES)))])
    if rng.uniform() < 0.3:
      sentence += " " + _FILLER_CLAUSES[int(rng.integers(len(_FILLER_CLAUSES)))]
    out.append(sentence.replace(" ,", ","))
    mentions.append(named)
  return out, mentions


def hard_text_statistics(num_classes: int = 20, num_examples: int = 2000, seed: int = 0,
                         text_sentences: int = 4, text_noise: float = 0.1) -> dict:
  """Measures how much the hard text says about the class, over train examples: the share of
  examples whose described parts' true colours match one class only, the mean number of
  classes they match (and the range of that number when one part is mentioned), the accuracy of
  a text-only guess among them that knew the true colours (the mean of 1 / that number), and
  the share of mentions that name a wrong colour."""
  src = SyntheticSource("train", num_classes, num_examples, 32, seed, text="hard",
                        text_sentences=text_sentences, text_noise=text_noise)
  unique, candidates, best, wrong, total = 0, 0, 0.0, 0, 0
  one_part = set()
  for i in range(len(src)):
    attrs = src.attributes[int(src.labels[i])]
    _, mentions = hard_text(src.seed, src._split_code, i, text_sentences, text_noise, attrs)
    parts = sorted({p for m in mentions for p, _ in m})
    n = sum(all(a[p] == attrs[p] for p in parts) for a in src.attributes)
    unique += n == 1
    candidates += n
    best += 1.0 / n
    if len(parts) == 1:
      one_part.add(n)
    for m in mentions:
      wrong += sum(c != attrs[p] for p, c in m)
      total += len(m)
  return {"examples": len(src), "classes": num_classes, "unique_share": unique / len(src),
          "mean_candidates": candidates / len(src), "text_only_accuracy": best / len(src),
          "one_part_candidates": sorted(one_part), "wrong_colour_rate": wrong / max(total, 1),
          "mentions": total}


_CACHES: dict[tuple, dict] = {}  # (seed, split, classes, size, variant) -> {index: example}


class SyntheticSource(Source):
  """`get_source("synthetic", split, num_classes=20, num_examples=None, image_size=224, seed=0,
  part_scale=1.0, decoys=True, text="plain", text_sentences=4, text_noise=0.1)`.

  num_examples defaults to 50 per class for train and 20 per class for val/test. Labels cycle
  through the classes (example i has label i % num_classes, so every class is balanced); the
  splits draw from separate random streams, so no image repeats across splits. `cache=True`
  keeps rendered examples in memory, shared by every cached source of the same (seed, split,
  classes, size, part_scale, decoys) in the process (each example is rendered once per
  process, e.g. once for the demo's teacher and student phases): for small demo datasets where
  rendering would otherwise compete with training for the CPU.

  `part_scale` (0.25-8) multiplies the area of every part and decoy; `decoys=False` draws no
  decoys. The demo uses `part_scale=4, decoys=False` (see the module docstring): a variant a
  small ViT trained from scratch learns in minutes, and colour statistics partly solve.

  `text="plain"` (default): the record's "text" is the one sentence naming all three parts'
  colours (a str; `texts(i)` = [it], which renders the example). `text="hard"`: a list of
  `text_sentences` sentences that mention one or two of the parts, each mention with a wrong
  colour with probability `text_noise` (module docstring); `texts(i)` renders nothing, and
  the images are those of the plain variant.
  """
  box_shapes: dict = {}
  has_text = True

  def __init__(self, split: str = "train", num_classes: int = 20, num_examples: int | None = None,
               image_size: int = 224, seed: int = 0, cache: bool = False,
               part_scale: float = 1.0, decoys: bool = True, text: str = "plain",
               text_sentences: int = 4, text_noise: float = 0.1):
    if split not in ("train", "val", "test"):
      raise ValueError(f"synthetic: unknown split {split!r}; use train, val or test")
    if int(image_size) < 32:
      raise ValueError(f"synthetic: image_size must be >= 32, got {image_size}")
    if not 0.25 <= float(part_scale) <= 8:
      raise ValueError(f"synthetic: part_scale must be in [0.25, 8], got {part_scale}")
    if not isinstance(decoys, (bool, np.bool_)):
      raise ValueError(f"synthetic: decoys must be True or False, got {decoys!r}")
    if text not in ("plain", "hard"):
      raise ValueError(f"synthetic: text must be 'plain' or 'hard', got {text!r}")
    if isinstance(text_sentences, bool) or not isinstance(text_sentences, (int, np.integer)) \
        or not 1 <= int(text_sentences) <= 50:
      raise ValueError(f"synthetic: text_sentences must be an integer in [1, 50], got "
                       f"{text_sentences!r}")
    if not 0.0 <= float(text_noise) <= 1.0:
      raise ValueError(f"synthetic: text_noise must be in [0, 1], got {text_noise!r}")
    self.text_variant, self.text_sentences = text, int(text_sentences)
    self.text_noise = float(text_noise)
    self.name, self.split = "synthetic", split
    self.part_scale, self.decoys = float(part_scale), bool(decoys)
    self.attributes = class_attributes(int(num_classes))
    self.class_names = [class_name(a) for a in self.attributes]
    if num_examples is None:
      num_examples = (50 if split == "train" else 20) * int(num_classes)
    if int(num_examples) < 0:
      raise ValueError(f"synthetic: num_examples must be >= 0, got {num_examples}")
    self.image_size, self.seed = int(image_size), int(seed)
    self._split_code = zlib.crc32(split.encode())
    n = int(num_examples)
    self.ids = np.arange(n, dtype=np.int64)
    self.labels = self.ids % int(num_classes)
    self.box_shapes = {"object_box": (4,), "part_boxes": (len(PARTS), 4)}
    self._cache = _CACHES.setdefault(
        (self.seed, split, int(num_classes), self.image_size, self.part_scale, self.decoys),
        {}) if cache else None

  def __getstate__(self):  # grain worker processes start with an empty cache
    state = dict(self.__dict__)
    if state.get("_cache") is not None:
      state["_cache"] = {}
    return state

  def example(self, i: int) -> dict:
    """Example i (0 <= i < len)."""
    if self._cache is not None:
      ex = self._cache.get(i)
      if ex is None:
        ex = self._cache[i] = self._render(i)
      ex = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in ex.items()}
    else:
      ex = self._render(i)
    if self.text_variant == "hard":
      ex["text"] = self.texts(i)
    return ex

  def texts(self, i: int) -> list[str]:
    if self.text_variant == "plain":
      return [self.example(int(i))["text"]]
    label = int(self.labels[i])
    return hard_text(self.seed, self._split_code, int(i), self.text_sentences, self.text_noise,
                     self.attributes[label])[0]

  def _render(self, i: int) -> dict:
    rng = np.random.default_rng([self.seed, self._split_code, int(i)])
    label = int(self.labels[i])
    image, obj, parts, text = render(label, self.attributes[label], self.image_size, rng,
                                     self.part_scale, self.decoys)
    return {"image": image, "label": label, "id": int(self.ids[i]), "object_box": obj,
            "part_boxes": parts, "text": text}

  def get(self, i, min_size=None, decoder="opencv"):
    ex = self.example(int(i))
    return ex.pop("image"), ex


# ----------------------------------------------------------------------------- baselines


def global_features(images: np.ndarray, kind: str) -> np.ndarray:
  """Global-statistics features of uint8 (N, S, S, 3) images.

  "pixels8": the image downsampled to 8x8 (area average), 192 values in [0, 1].
  "histogram": a joint RGB colour histogram with 8 bins per channel (512 bins, normalised).
  """
  images = np.asarray(images, np.uint8)
  if kind == "pixels8":
    return np.stack([np.asarray(Image.fromarray(im).resize((8, 8), Image.BOX), np.float32)
                     for im in images]).reshape(len(images), -1) / 255.0
  if kind == "histogram":
    q = (images >> 5).astype(np.int32)
    codes = (q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).reshape(len(images), -1)
    hist = np.stack([np.bincount(c, minlength=512) for c in codes]).astype(np.float32)
    return hist / codes.shape[1]
  raise ValueError(f"unknown feature kind {kind!r}")


def logistic_regression_accuracy(x_train, y_train, x_test, y_test, l2: float = 1e-3,
                                 max_iter: int = 500) -> float:
  """Test accuracy of a multinomial logistic regression (standardised features, L2 penalty
  `l2` on the weights, fitted to convergence with L-BFGS)."""
  import scipy.optimize
  mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
  xtr = ((x_train - mu) / sd).astype(np.float64)
  xte = ((x_test - mu) / sd).astype(np.float64)
  n, d = xtr.shape
  k = int(max(y_train.max(), y_test.max())) + 1
  onehot = np.eye(k)[y_train]

  def loss(theta):
    w, b = theta[:d * k].reshape(d, k), theta[d * k:]
    z = xtr @ w + b
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    val = -np.mean(np.log(p[np.arange(n), y_train] + 1e-12)) + 0.5 * l2 * np.sum(w * w)
    g = (p - onehot) / n
    return val, np.concatenate([(xtr.T @ g + l2 * w).ravel(), g.sum(0)])

  res = scipy.optimize.minimize(loss, np.zeros(d * k + k), jac=True, method="L-BFGS-B",
                                options={"maxiter": max_iter})
  w, b = res.x[:d * k].reshape(d, k), res.x[d * k:]
  return float(np.mean(np.argmax(xte @ w + b, 1) == y_test))


def global_baselines(num_classes: int = 20, num_train: int = 2000, num_test: int = 1000,
                     image_size: int = 48, seed: int = 0, l2: float = 1e-3,
                     **variant) -> dict:
  """Accuracy of logistic regressions on global statistics (see `global_features`): a check
  that the dataset is not solvable without finding the parts. `variant`: part_scale, decoys.
  Returns {kind: accuracy, "chance": 1 / num_classes}."""
  train = SyntheticSource("train", num_classes, num_train, image_size, seed, **variant)
  test = SyntheticSource("test", num_classes, num_test, image_size, seed, **variant)
  xtr = np.stack([train[i]["image"] for i in range(len(train))])
  xte = np.stack([test[i]["image"] for i in range(len(test))])
  out = {"chance": 1.0 / num_classes}
  for kind in ("pixels8", "histogram"):
    out[kind] = logistic_regression_accuracy(global_features(xtr, kind), train.labels,
                                             global_features(xte, kind), test.labels, l2)
  return out


if __name__ == "__main__":
  import argparse
  parser = argparse.ArgumentParser(description="Global-statistics baselines of the synthetic "
                                               "dataset (logistic regressions).")
  parser.add_argument("--classes", type=int, default=20)
  parser.add_argument("--train", type=int, default=2000)
  parser.add_argument("--test", type=int, default=1000)
  parser.add_argument("--size", type=int, default=48)
  parser.add_argument("--l2", type=float, default=1e-3)
  parser.add_argument("--part-scale", type=float, default=1.0)
  parser.add_argument("--no-decoys", action="store_true")
  parser.add_argument("--text-stats", action="store_true",
                      help="measure the hard text variant instead (--classes, --train)")
  a = parser.parse_args()
  if a.text_stats:
    print(hard_text_statistics(a.classes, a.train))
    raise SystemExit(0)
  print(global_baselines(a.classes, a.train, a.test, a.size, l2=a.l2, part_scale=a.part_scale,
                         decoys=not a.no_decoys))

"""Error analysis of an evaluation (issue 19, spec section 8): per-class accuracy, the most
confused class pairs and a confusion-matrix picture ordered so that confused classes sit
together. numpy + scipy + PIL only (no sklearn, no matplotlib).

- `confusion_matrix(labels, preds, C)`: (C, C) counts, rows the true class, columns the
  predicted one.
- `per_class(cm, names)`: rows (index, name, count, correct, accuracy); accuracy is empty for
  a class without test examples.
- `confused_pairs(cm, names, top)`: unordered pairs {a, b} (a < b) with
  count = cm[a, b] + cm[b, a] (both directions summed) and each direction beside it
  (`a_as_b`: true a predicted b; `b_as_a`), most confused first (ties by a, then b); pairs
  never confused are left out.
- `class_order(cm)`: a permutation of the classes from average-linkage hierarchical clustering
  of the symmetrised row-normalised confusion (distance 1 - s / max s, s[a, b] =
  p(b | a) + p(a | b)) with scipy's optimal leaf ordering: a pair merged first (the most
  confused) is adjacent, and groups of mutually confused classes form blocks by the diagonal.
- `confusion_png(cm, path, names, order)`: the row-normalised matrix in that order: correct
  predictions (the diagonal) in blue, errors in red, both with a square-root intensity scale so
  that a few errors in a row still show; cell side clip(800 // C, 2, 24) pixels (4 at 200
  classes: an 816 x 828 picture), class names as tick labels only up to 40 classes.
- `write_reports(outdir, labels, preds, names)`: per_class.csv, confused_pairs.csv and
  confusion.png (`run.py --mode=eval` calls it).
"""
from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PAD = 8  # picture border
HEADER = 20  # picture title band
LABEL_MARGIN = 110  # room for the tick labels (up to MAX_LABELLED classes)
MAX_LABELLED = 40
TOP_PAIRS = 100


def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
  """(C, C) int64 counts: cm[t, p] = examples of true class t predicted as p."""
  labels = np.asarray(labels, np.int64).ravel()
  preds = np.asarray(preds, np.int64).ravel()
  if labels.shape != preds.shape:
    raise ValueError(f"labels {labels.shape} and predictions {preds.shape} differ in length")
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (labels, preds), 1)
  return cm


def _name(names, i: int) -> str:
  return str(names[i]) if names is not None and i < len(names) else str(i)


def per_class(cm: np.ndarray, names=None) -> list[dict]:
  """Per true class: index, name, count, correct, accuracy (None without examples)."""
  rows = []
  for c in range(cm.shape[0]):
    n, k = int(cm[c].sum()), int(cm[c, c])
    rows.append({"index": c, "name": _name(names, c), "count": n, "correct": k,
                 "accuracy": k / n if n else None})
  return rows


def confused_pairs(cm: np.ndarray, names=None, top: int | None = TOP_PAIRS) -> list[dict]:
  """The `top` most confused unordered class pairs (module docstring)."""
  sym = cm + cm.T
  a, b = np.triu_indices(cm.shape[0], k=1)
  counts = sym[a, b]
  keep = counts > 0
  a, b, counts = a[keep], b[keep], counts[keep]
  order = np.lexsort((b, a, -counts))
  if top is not None:
    order = order[:top]
  return [{"class_a": int(a[i]), "name_a": _name(names, int(a[i])), "class_b": int(b[i]),
           "name_b": _name(names, int(b[i])), "count": int(counts[i]),
           "a_as_b": int(cm[a[i], b[i]]), "b_as_a": int(cm[b[i], a[i]])} for i in order]


def _similarity(cm: np.ndarray) -> np.ndarray:
  rows = cm.sum(1, keepdims=True)
  p = cm / np.maximum(rows, 1)
  s = p + p.T
  np.fill_diagonal(s, 0.0)
  return s


def class_order(cm: np.ndarray) -> np.ndarray:
  """A permutation of the classes that puts confused ones next to each other (module
  docstring); the identity when nothing is confused."""
  from scipy.cluster import hierarchy
  from scipy.spatial.distance import squareform
  C = cm.shape[0]
  s = _similarity(cm)
  if C < 3 or s.max() <= 0:
    return np.arange(C)
  d = 1.0 - s / s.max()
  np.fill_diagonal(d, 0.0)
  condensed = squareform(d, checks=False)
  z = hierarchy.linkage(condensed, method="average")
  z = hierarchy.optimal_leaf_ordering(z, condensed)
  return hierarchy.leaves_list(z).astype(np.int64)


def cell_size(num_classes: int) -> int:
  return int(np.clip(800 // max(num_classes, 1), 2, 24))


def png_size(num_classes: int) -> tuple[int, int]:
  """(width, height) of `confusion_png`'s picture for `num_classes` classes."""
  grid = cell_size(num_classes) * num_classes
  margin = LABEL_MARGIN if num_classes <= MAX_LABELLED else 0
  return PAD + margin + grid + PAD, HEADER + margin + grid + PAD


def _colours(cm: np.ndarray) -> np.ndarray:
  """(C, C, 3) uint8: white -> blue on the diagonal, white -> red elsewhere, by sqrt of the
  row-normalised value."""
  p = cm / np.maximum(cm.sum(1, keepdims=True), 1)
  t = np.sqrt(p)[..., None]
  red = np.array([200, 20, 20], np.float64)
  blue = np.array([20, 60, 200], np.float64)
  white = np.array([255, 255, 255], np.float64)
  colour = white + t * (red - white)
  diag = np.eye(cm.shape[0], dtype=bool)
  colour[diag] = white + t[diag] * (blue - white)
  return np.round(colour).astype(np.uint8)


def confusion_png(cm: np.ndarray, path: str, names=None, order=None) -> str:
  """Writes the confusion picture (module docstring) to `path`; returns `path`."""
  C = cm.shape[0]
  order = class_order(cm) if order is None else np.asarray(order)
  m = cm[np.ix_(order, order)]
  cell = cell_size(C)
  labelled = C <= MAX_LABELLED
  margin = LABEL_MARGIN if labelled else 0
  width, height = png_size(C)
  img = Image.new("RGB", (width, height), "white")
  grid = np.repeat(np.repeat(_colours(m), cell, 0), cell, 1)
  x0, y0 = PAD + margin, HEADER + margin
  img.paste(Image.fromarray(grid), (x0, y0))
  draw = ImageDraw.Draw(img)
  draw.rectangle([x0 - 1, y0 - 1, x0 + C * cell, y0 + C * cell], outline=(90, 90, 90))
  font = ImageFont.load_default()
  draw.text((PAD, 4), f"confusion, {C} classes: rows true, columns predicted (row share; "
            f"blue correct, red errors)", fill="black", font=font)
  if labelled:
    for i, c in enumerate(order):
      label = _name(names, int(c))[:18]
      y = y0 + i * cell + max(cell // 2 - 5, 0)
      draw.text((PAD, y), label, fill="black", font=font)
      # column labels: drawn on their own strip, rotated to read bottom-up
      strip = Image.new("RGB", (margin - 4, max(cell, 11)), "white")
      ImageDraw.Draw(strip).text((0, 0), label, fill="black", font=font)
      rot = strip.rotate(90, expand=True)
      img.paste(rot, (x0 + i * cell + max((cell - rot.width) // 2, 0), HEADER))
  img.save(path)
  return path


def _write_csv(path: str, fields: list[str], rows: list[dict]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if r[k] is None else r[k]) for k in fields})
  os.replace(tmp, path)


def write_reports(outdir: str, labels, preds, names=None, num_classes: int | None = None,
                  top: int | None = TOP_PAIRS) -> dict[str, str]:
  """per_class.csv, confused_pairs.csv and confusion.png in `outdir`; {kind: path}."""
  os.makedirs(outdir, exist_ok=True)
  C = int(num_classes or (len(names) if names else int(max(np.max(labels), np.max(preds)) + 1)))
  cm = confusion_matrix(labels, preds, C)
  paths = {"per_class": os.path.join(outdir, "per_class.csv"),
           "confused_pairs": os.path.join(outdir, "confused_pairs.csv"),
           "confusion": os.path.join(outdir, "confusion.png")}
  _write_csv(paths["per_class"], ["index", "name", "count", "correct", "accuracy"],
             per_class(cm, names))
  _write_csv(paths["confused_pairs"], ["class_a", "name_a", "class_b", "name_b", "count",
                                       "a_as_b", "b_as_a"], confused_pairs(cm, names, top))
  tmp = paths["confusion"] + ".tmp.png"
  confusion_png(cm, tmp, names)
  os.replace(tmp, paths["confusion"])
  return paths

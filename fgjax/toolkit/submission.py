"""Predicting a folder of unlabeled images into a competition submission (issue 19, spec
section 8): `run.py --mode=predict --workdir=W --images=DIR --output=submission.csv`.

- `list_images(spec)`: `spec` a directory (every file with an image extension below it,
  recursively, sorted by relative path; the names written are relative to it, with "/") or a
  text file listing one image path per line (blank lines and lines starting with "#" left
  out; a relative path is relative to the list file's folder; the names written are the lines
  as given). Returns [(name, path)].
- `rows(names, probs, class_names, top_k)` / `write_csv(path, ...)`: the CSV, header
  `filename,class` (the top-1 class name); with top_k = K >= 1 also `class_2..class_K` and
  `prob_1..prob_K` (the probabilities of those classes, 6 decimals). Rows in input order.
"""
from __future__ import annotations

import csv
import os

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def list_images(spec: str) -> list[tuple[str, str]]:
  """[(name for the CSV, path to read)] of a directory or list file (module docstring)."""
  spec = os.fspath(spec)
  if os.path.isdir(spec):
    out = []
    for root, dirs, files in os.walk(spec):
      dirs.sort()
      for f in files:
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
          path = os.path.join(root, f)
          out.append((os.path.relpath(path, spec).replace(os.sep, "/"), path))
    out.sort()
    if not out:
      raise ValueError(f"--images={spec}: the directory holds no image files "
                       f"({', '.join(IMAGE_EXTENSIONS)})")
    return out
  if not os.path.exists(spec):
    raise FileNotFoundError(f"--images={spec}: no such directory or list file")
  if os.path.splitext(spec)[1].lower() in IMAGE_EXTENSIONS:
    raise ValueError(f"--images={spec}: an image file, not a directory or a text file listing "
                     f"images (give single images after the flags)")
  base = os.path.dirname(os.path.abspath(spec))
  out = []
  with open(spec) as f:
    for line in f:
      name = line.strip()
      if name and not name.startswith("#"):
        out.append((name, name if os.path.isabs(name) else os.path.join(base, name)))
  if not out:
    raise ValueError(f"--images={spec}: the list file names no image")
  return out


def header(top_k: int = 0) -> list[str]:
  k = max(int(top_k), 0)
  return (["filename", "class"] + [f"class_{i}" for i in range(2, k + 1)]
          + [f"prob_{i}" for i in range(1, k + 1)])


def rows(names, probs: np.ndarray, class_names=None, top_k: int = 0) -> list[list[str]]:
  """One row per image (module docstring); `probs` (N, C) probabilities."""
  probs = np.asarray(probs)
  top_k = min(max(int(top_k), 0), probs.shape[-1]) if probs.ndim == 2 else max(int(top_k), 0)
  k = max(top_k, 1)
  label = lambda i: str(class_names[i]) if class_names is not None and i < len(class_names) \
      else str(i)  # noqa: E731
  out = []
  for name, p in zip(names, probs):
    top = np.argsort(-p, kind="stable")[:k]
    row = [name] + [label(int(i)) for i in top]
    if top_k:
      row += [f"{float(p[i]):.6f}" for i in top]
    out.append(row)
  return out


def write_csv(path: str, names, probs, class_names=None, top_k: int = 0) -> str:
  """Writes the submission CSV to `path` (through a temporary file); returns `path`."""
  path = os.fspath(path)
  probs = np.asarray(probs)
  if int(top_k) < 0:
    raise ValueError(f"--top_k={top_k}: must be >= 0 (0: filename,class only)")
  top_k = min(int(top_k), probs.shape[-1]) if probs.ndim == 2 else int(top_k)  # <= classes
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header(top_k))
    w.writerows(rows(names, probs, class_names, top_k))
  os.replace(tmp, path)
  return path

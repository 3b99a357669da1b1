"""The `Source` interface, the dataset errors, subsets and the train/val hold-out.

A `Source` is random access: `len(source)`, `source[i] -> {"image": uint8 (H, W, 3) RGB,
"label": int, "id": int, ...}`, `source.class_names`, `source.num_classes`, and `source.ids` /
`source.labels` (numpy arrays, known without decoding). A source with text (`has_text`: CUB or a
class-folder tree read with `with_text=True`, the synthetic birds) also gives each example's
sentences, `source.texts(i) -> list[str]`, without decoding the image, and its records hold
them as "text". `fgjax.data.sources.get_source` builds
one from a dataset name; the layouts are in `fgjax.data.layouts` (files on disk),
`fgjax.data.tfds_source` (tensorflow-datasets) and `fgjax.data.synthetic`.
"""
from __future__ import annotations

from typing import Any

import numpy as np


class DatasetNotFoundError(FileNotFoundError):
  """A dataset folder is missing or incomplete; the message says what, where from, which key."""


class DatasetError(ValueError):
  """Inconsistent dataset content (e.g. a label outside [0, num_classes))."""


class Source:
  """Base class of random-access sources. Subclasses set the attributes in __init__."""
  name: str = ""
  split: str = ""
  class_names: list[str]
  ids: np.ndarray
  labels: np.ndarray
  # Per-example box arrays carried into batches: name -> shape of one example's array.
  box_shapes: dict[str, tuple[int, ...]] = {}
  # With part locations (CUB's parts/): the parts' names, in the rows' order, and the row
  # order after a horizontal flip (left <-> right parts), or None.
  part_names: list[str] = []
  part_flip: np.ndarray | None = None
  # Test-split images among the examples, trained on with predicted labels (pseudo-labels,
  # fgjax.toolkit.pseudo_labels): the run's test metrics are then transductive.
  transductive_images: int = 0
  # Text descriptions: when True, `texts(i)` gives example i's sentences and `get(i)`'s record
  # holds them as "text" (a list of sentences, empty when the example has no description).
  has_text: bool = False

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.ids)

  def get(self, i: int, min_size: int | None = None,
          decoder: str = "opencv") -> tuple[Any, dict]:
    """(RGB image: a uint8 (H, W, 3) array or a PIL image, record without the image) of
    example i (0 <= i < len): what the pipeline transforms. `min_size` allows decoding a JPEG
    at a reduced size whose shorter side stays >= min_size (boxes in the record are scaled to
    match); `decoder` ("opencv" or "pil", `fgjax.data.images.read_image`) decodes files."""
    raise NotImplementedError

  def texts(self, i: int) -> list[str]:
    """The sentences describing example i (0 <= i < len), read without decoding the image;
    an empty list when the example has no description (missing text)."""
    raise NotImplementedError(f"{type(self).__name__} {self.name}/{self.split} has no text "
                              f"(has_text is False)")

  def __getitem__(self, i: int) -> dict:
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f"index {i} out of range for {self.name}/{self.split} ({n} examples)")
    img, rec = self.get(int(i) % n)
    rec["image"] = np.asarray(img, dtype=np.uint8)
    return rec

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  def __repr__(self):
    return (f"{type(self).__name__}({self.name!r}, split={self.split!r}, n={len(self)}, "
            f"classes={self.num_classes})")


def _check_labels(name, split, labels, ids, num_classes, describe):
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    i = int(bad[0])
    raise DatasetError(f"{name}/{split}: example id {int(ids[i])} ({describe(i)}) has label "
                       f"{int(labels[i])}, outside [0, {num_classes})"
                       + (f" ({bad.size} such examples)" if bad.size > 1 else ""))


class SubsetSource(Source):
  """A subset of another source (e.g. the train/val hold-out of `split_train_val`)."""

  def __init__(self, parent: Source, indices, split: str):
    self.parent = parent
    self.indices = np.asarray(indices, np.int64).reshape(-1)
    self.name, self.split = parent.name, split
    self.class_names = parent.class_names
    self.ids = np.asarray(parent.ids)[self.indices]
    self.labels = np.asarray(parent.labels)[self.indices]
    self.box_shapes = parent.box_shapes
    self.part_names, self.part_flip = parent.part_names, parent.part_flip
    self.has_text = parent.has_text

  def get(self, i, min_size=None, decoder="opencv"):
    return self.parent.get(int(self.indices[i]), min_size, decoder)

  def texts(self, i):
    return self.parent.texts(int(self.indices[i]))


def split_train_val(source: Source, val_fraction: float, seed: int = 0):
  """Stratified, deterministic hold-out: returns (train part, val part) of `source`.

  From each class with n >= 2 examples, round(val_fraction * n) examples, clipped to
  [1, n - 1], go to validation (a class with one example stays in train), chosen by a
  permutation seeded with (seed, class). Both parts keep the source's order; together they are
  the whole source, without overlap.
  """
  if not 0.0 < float(val_fraction) < 1.0:
    raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
  labels = np.asarray(source.labels)
  val = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    if len(idx) < 2:
      continue
    k = min(max(int(round(float(val_fraction) * len(idx))), 1), len(idx) - 1)
    perm = np.random.default_rng([int(seed), int(c)]).permutation(len(idx))
    val.extend(idx[perm[:k]].tolist())
  val = np.sort(np.asarray(val, np.int64))
  train = np.setdiff1d(np.arange(len(labels)), val)
  return SubsetSource(source, train, source.split), SubsetSource(source, val, "val")

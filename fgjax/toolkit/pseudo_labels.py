"""Pseudo-labels: a model's confident predictions on unlabeled images, added to the train set.

The seed of issue 19 (FGVC9 Sorghum-100, second place; spec section 8) labelled the test
images with its best model, kept the confident predictions and retrained on train + those,
for several rounds (84.1 -> 91.9 -> 95.1 private leaderboard with 960 px and pseudo-labels).
Here a round is two commands (docs/toolkit.md, "Pseudo-labels"):

  python run.py --mode=pseudo_label --workdir=W --images=DIR   # -> W/pseudo_labels.csv
  python run.py --config=... --config.data.pseudo_labels=W/pseudo_labels.csv --workdir=W2

- `select(probs, threshold, max_per_class)`: which predictions are confident: top-1
  probability >= threshold, at most `max_per_class` per predicted class (the most confident).
- The file: CSV with the header `image,class,prob`, one row per pseudo-labelled image:
  `image` an image file (absolute, or relative to the CSV's folder) or `split:<split>:<id>`,
  example `id` of the run's dataset split `<split>` (for sources without files: synthetic,
  tfds); `class` a class name of the run; `prob` the model's probability of it.
  `write(path, rows)` / `read(path, class_names)`.
- `PseudoLabelSource(train, labels, id_start, split_sources)`: the train source with the
  pseudo-labelled images appended. Their ids are `id_start + row number` (above every id of
  the labelled train split); their records carry no boxes or part locations (the pipeline
  pads those fields as "absent"). `add_to_train(train, path, labelled, ...)` builds it from a
  file; `fgjax.train.setup.get_sources` calls it for `data.pseudo_labels` after
  `data.val_fraction` has carved the validation split, so pseudo-labelled images never enter
  model selection.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import os
from typing import Callable, Iterable, Sequence

import numpy as np

from fgjax.data.base import Source
from fgjax.data.images import BadImageError, read_image

log = logging.getLogger("fgjax")

HEADER = ("image", "class", "prob")
SPLIT_PREFIX = "split:"
DEFAULT_THRESHOLD = 0.9   # keep a prediction whose top-1 probability is at least this
DEFAULT_MAX_PER_CLASS = 0  # at most this many images per predicted class (0: no cap)
BOX_FIELDS = ("object_box", "part_boxes", "part_locs")


class PseudoLabelError(ValueError):
  """A pseudo-label file that cannot be used (garbled, an unknown class); names the file."""


@dataclasses.dataclass(frozen=True)
class PseudoLabel:
  """One row of a pseudo-label file: `image` (an absolute path or `split:<split>:<id>`), the
  class name and its index in the run's classes, and the model's probability."""
  image: str
  class_name: str
  label: int
  prob: float


def split_ref(split: str, example_id: int) -> str:
  """How a file names example `example_id` of the run's dataset split `split`."""
  return f"{SPLIT_PREFIX}{split}:{int(example_id)}"


def parse_split_ref(image: str) -> tuple[str, int] | None:
  """(split, id) of a `split:<split>:<id>` image, or None for an image file."""
  if not image.startswith(SPLIT_PREFIX):
    return None
  split, _, uid = image[len(SPLIT_PREFIX):].rpartition(":")
  if not split or not uid.lstrip("-").isdigit():
    raise ValueError(f"{image!r} is not '{SPLIT_PREFIX}<split>:<example id>'")
  return split, int(uid)


# ----------------------------------------------------------------------------- selection


def check_settings(threshold, max_per_class) -> tuple[float, int]:
  """(threshold, max_per_class) as numbers, or a ValueError naming the config key."""
  try:
    t = float(threshold)
  except (TypeError, ValueError):
    t = float("nan")
  if not 0.0 <= t <= 1.0:
    raise ValueError(f"pseudo_label.threshold (--threshold) must be a probability in [0, 1], "
                     f"got {threshold!r}")
  if isinstance(max_per_class, bool) or not isinstance(max_per_class, (int, np.integer)) \
      or int(max_per_class) < 0:
    raise ValueError(f"pseudo_label.max_per_class (--max_per_class) must be an integer >= 0 "
                     f"(0: no cap), got {max_per_class!r}")
  return t, int(max_per_class)


def select(probs, threshold: float = DEFAULT_THRESHOLD,
           max_per_class: int = DEFAULT_MAX_PER_CLASS) -> np.ndarray:
  """Indices (ascending) of the rows of `probs` (N, C) whose top-1 probability is >=
  `threshold`; of each predicted class at most `max_per_class` rows (0: all), the most
  confident ones (equal probabilities: the earlier row)."""
  threshold, max_per_class = check_settings(threshold, max_per_class)
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2:
    raise ValueError(f"select: probs must be (N, C), got shape {probs.shape}")
  if probs.shape[0] == 0:
    return np.zeros((0,), np.int64)
  pred, conf = probs.argmax(-1), probs.max(-1)
  keep = np.flatnonzero(conf >= threshold)
  if max_per_class:
    order = keep[np.lexsort((keep, -conf[keep]))]  # most confident first, then by index
    kept, count = [], {}
    for i in order:
      c = int(pred[i])
      if count.get(c, 0) < max_per_class:
        count[c] = count.get(c, 0) + 1
        kept.append(i)
    keep = np.asarray(kept, np.int64)
  return np.sort(keep).astype(np.int64)


def confident_rows(images: Sequence[str], probs, class_names: Sequence[str],
                   threshold: float = DEFAULT_THRESHOLD,
                   max_per_class: int = DEFAULT_MAX_PER_CLASS) -> list[tuple[str, str, float]]:
  """The (image, class name, prob) rows `write` takes, of the images `select` keeps."""
  probs = np.asarray(probs)
  if len(images) != len(probs):
    raise ValueError(f"{len(images)} images but {len(probs)} rows of probabilities")
  idx = select(probs, threshold, max_per_class)
  pred = probs.argmax(-1) if len(probs) else np.zeros((0,), np.int64)
  return [(images[i], class_names[int(pred[i])], float(probs[i, pred[i]])) for i in idx]


# ----------------------------------------------------------------------------- the file


def file_digest(path: str) -> str:
  """The sha256 of a pseudo-label file: a run records it (`pseudo_labels_sha256_resolved`) so
  that a resume on a file rewritten since (another round into the same path) is refused."""
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def write(path: str, rows: Iterable[tuple[str, str, float]]) -> str:
  """Writes rows (image, class name, prob) as the pseudo-label CSV `path` (image files as
  absolute paths; `split:...` references as they are). A file already there is kept as
  `<name>.<n>.csv`. Returns the path."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(HEADER)
    for image, class_name, prob in rows:
      image = str(image)
      if parse_split_ref(image) is None:
        image = os.path.abspath(image)
      w.writerow([image, str(class_name), f"{float(prob):.6f}"])
  if os.path.exists(path):
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(f"{stem}.{n}{ext}"):
      n += 1
    os.replace(path, f"{stem}.{n}{ext}")
    log.info("kept the previous %s as %s", path, f"{stem}.{n}{ext}")
  os.replace(tmp, path)
  return path


def read(path: str, class_names: Sequence[str], key: str | None = None) -> list[PseudoLabel]:
  """The rows of the pseudo-label CSV `path`, checked: the header, three fields per row, a
  class of `class_names`, a probability in [0, 1], every image file present and listed once.
  Errors are one line naming the file (and `key`, the config key that gave it): a missing
  file or image `FileNotFoundError`, anything else `PseudoLabelError`."""
  path = os.fspath(path)
  where = f"{key}={path}" if key else path
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{where}: pseudo-label file not found"
                            + (" (a folder, not a file)" if os.path.isdir(path) else ""))
  folder = os.path.dirname(os.path.abspath(path))
  index = {str(c): i for i, c in enumerate(class_names)}
  out, seen = [], {}
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's BOM
      lines = list(csv.reader(f))
  except (UnicodeDecodeError, csv.Error) as e:
    raise PseudoLabelError(f"{where}: not a pseudo-label CSV ({e})") from None
  if not lines or [c.strip() for c in lines[0]] != list(HEADER):
    raise PseudoLabelError(f"{where}: not a pseudo-label CSV: the first line must be "
                           f"'{','.join(HEADER)}'")
  for n, row in enumerate(lines[1:], 2):
    if not row or all(not c.strip() for c in row):
      continue
    if len(row) != 3 or not row[0].strip():
      raise PseudoLabelError(f"{where} line {n}: expected 'image,class,prob', got "
                             f"{','.join(row)!r}")
    image, name, prob = row[0].strip(), row[1].strip(), row[2].strip()
    try:
      p = float(prob)
    except ValueError:
      p = float("nan")
    if not 0.0 <= p <= 1.0:
      raise PseudoLabelError(f"{where} line {n}: prob {prob!r} is not a probability in [0, 1]")
    if name not in index:
      shown = ", ".join(map(repr, list(index)[:5])) + (", ..." if len(index) > 5 else "")
      raise PseudoLabelError(f"{where} line {n}: unknown class {name!r} (the run's "
                             f"{len(index)} classes: {shown})")
    try:
      ref = parse_split_ref(image)
    except ValueError as e:
      raise PseudoLabelError(f"{where} line {n}: {e}") from None
    if ref is None:
      image = os.path.normpath(os.path.join(folder, os.path.expanduser(image)))
      if not os.path.isfile(image):
        raise FileNotFoundError(f"{where} line {n}: image file {image} not found")
    if image in seen:
      raise PseudoLabelError(f"{where} line {n}: image {image} is listed twice (also line "
                             f"{seen[image]})")
    seen[image] = n
    out.append(PseudoLabel(image, name, index[name], p))
  return out


# ----------------------------------------------------------------------------- the source


class PseudoLabelSource(Source):
  """`train` followed by the pseudo-labelled images `labels` (from `read`), as one source.

  Example `len(train) + j` is row j: its label is the pseudo-label, its id `id_start + j`
  (`id_start` above every id of the labelled train split, so ids stay unique), its record has
  no boxes or part locations (`box_shapes` stay the train source's: the pipeline pads them as
  absent). `split_sources` {split: source} resolves `split:<split>:<id>` rows."""

  def __init__(self, train: Source, labels: Sequence[PseudoLabel], id_start: int,
               split_sources: dict[str, Source] | None = None, what: str = "pseudo-labels"):
    self.train = train
    self.name, self.split = train.name, train.split
    self.class_names = list(train.class_names)
    self.box_shapes = train.box_shapes
    self.part_names, self.part_flip = train.part_names, train.part_flip
    self.has_text = train.has_text  # pseudo rows: their split's text
    self.pseudo = list(labels)
    self.id_start = int(id_start)
    self.transductive_images = 0  # how many rows are test-split images (`add_to_train`)
    if len(train) and self.id_start <= int(np.max(train.ids)):
      raise ValueError(f"PseudoLabelSource: id_start {id_start} <= the train split's largest "
                       f"id {int(np.max(train.ids))}")
    self._refs = []  # per row: (source, index) or (file path, None)
    positions = {}  # split -> {id: index}
    for row in self.pseudo:
      ref = parse_split_ref(row.image)
      if ref is None:
        self._refs.append((row.image, None))
        continue
      split, uid = ref
      src = (split_sources or {}).get(split)
      if src is None:
        raise PseudoLabelError(f"{what}: {row.image} names the split {split!r}, which is not "
                               f"one this run reads ({', '.join(split_sources or {}) or 'none'})")
      if split not in positions:
        positions[split] = {int(k): i for i, k in enumerate(np.asarray(src.ids).tolist())}
      if uid not in positions[split]:
        raise PseudoLabelError(f"{what}: {row.image}: the {split} split has no example with "
                               f"id {uid}")
      self._refs.append((src, positions[split][uid]))
    n = len(self.pseudo)
    self.ids = np.concatenate([np.asarray(train.ids, np.int64),
                               self.id_start + np.arange(n, dtype=np.int64)])
    self.labels = np.concatenate([np.asarray(train.labels, np.int64),
                                  np.asarray([r.label for r in self.pseudo], np.int64)])

  @property
  def num_pseudo(self) -> int:
    return len(self.pseudo)

  def is_pseudo(self, i: int) -> bool:
    return int(i) >= len(self.train)

  def texts(self, i):
    """Example i's sentences: the train source's, a `split:` row's from its split, [] for an
    image file (no description)."""
    i = int(i)
    if i < len(self.train):
      return self.train.texts(i)
    src, k = self._refs[i - len(self.train)]
    return src.texts(k) if k is not None and src.has_text else []

  def get(self, i, min_size=None, decoder="opencv"):
    i = int(i)
    if i < len(self.train):
      return self.train.get(i, min_size, decoder)
    j = i - len(self.train)
    src, k = self._refs[j]
    rec = {"label": int(self.pseudo[j].label), "id": int(self.ids[i]),
           "file": self.pseudo[j].image, "pseudo_label": True}
    if k is None:
      try:
        img = read_image(src, min_size, decoder=decoder)
      except FileNotFoundError:
        raise BadImageError(f"pseudo-labelled image missing: {src} (example id "
                            f"{int(self.ids[i])})") from None
      if self.has_text:
        rec["text"] = []
      return img, rec
    img, got = src.get(k, min_size, decoder)  # the split's boxes and parts are not carried
    if self.has_text:
      t = got.get("text", []) if src.has_text else []
      rec["text"] = [t] if isinstance(t, str) else list(t)
    return img, rec


def add_to_train(train: Source, path: str, labelled: Source,
                 split_source: Callable[[str], Source] | None = None,
                 key: str = "data.pseudo_labels", test: Source | None = None
                 ) -> PseudoLabelSource:
  """`train` with the rows of the pseudo-label file `path` appended (`PseudoLabelSource`).
  `labelled` is the whole labelled train split (before any validation hold-out): ids start
  above its ids, and a row naming one of its images (a file, or `split:<train split>:...`) is
  dropped with a warning: it has a label, and it may sit in the validation split.
  `split_source(split)` gives the source of a split that `split:<split>:<id>` rows name. With the
  `test` source, a log line says how many rows are test images (the run's test metrics are
  then transductive, as a competition's leaderboard with pseudo-labels is)."""
  rows = read(path, train.class_names, key)
  files = set(os.path.abspath(f) for f in getattr(_root(labelled), "files", []) or [])
  kept, dropped = [], []
  for row in rows:
    ref = parse_split_ref(row.image)
    if (ref is None and row.image in files) or (ref is not None and ref[0] == labelled.split):
      dropped.append(row.image)
    else:
      kept.append(row)
  if dropped:
    log.warning("%s=%s: dropped %d rows naming images of the labelled %s split (e.g. %s)",
                key, path, len(dropped), labelled.split, dropped[0])
  id_start = int(np.max(labelled.ids)) + 1 if len(labelled) else 0
  splits = sorted({ref[0] for ref in map(parse_split_ref, (r.image for r in kept)) if ref})
  split_sources = {}
  for split in splits:
    if test is not None and split == test.split:
      split_sources[split] = test
    elif split_source is not None:
      split_sources[split] = split_source(split)
  out = PseudoLabelSource(train, kept, id_start, split_sources, what=f"{key}={path}")
  counts = np.bincount(out.labels[len(train):], minlength=train.num_classes)
  if test is not None and kept:
    test_files = set(os.path.abspath(f) for f in getattr(_root(test), "files", []) or [])
    n_test = sum((parse_split_ref(r.image) or ("",))[0] == test.split or r.image in test_files
                 for r in kept)
    out.transductive_images = int(n_test)  # final_metrics.json records it
    if n_test:
      log.info("%s: %d of the %d pseudo-labelled images are %s-split images: this run's %s "
               "metrics are transductive (the model trained on those images, with predicted "
               "labels, never their true ones)", key, n_test, len(kept), test.split, test.split)
  log.info("%s: added %d pseudo-labelled images from %s to the %d labelled train examples "
           "(train: %d examples; %d classes with pseudo-labels; ids from %d)", key,
           out.num_pseudo, path, len(train), len(out), int((counts > 0).sum()), id_start)
  return out


def _root(source: Source) -> Source:
  while hasattr(source, "parent"):
    source = source.parent
  return source

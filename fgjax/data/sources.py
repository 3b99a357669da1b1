"""Random-access dataset sources in the layouts users already have on disk.

`get_source(name, split, data_dir=None, **kw)` returns a `Source`: `len(source)`,
`source[i] -> {"image": uint8 (H, W, 3) RGB, "label": int, "id": int, ...}`, `source.class_names`,
`source.num_classes`, and `source.ids` / `source.labels` (numpy arrays, no decoding needed).

Names and the files each reads (layouts in docs/datasets.md):
  cub             CUB_200_2011/: images.txt, image_class_labels.txt, train_test_split.txt,
                  classes.txt, bounding_boxes.txt, images/      (ids: CUB image ids)
  nabirds         nabirds/: the same five files (uuid keys; sparse class ids mapped in sorted
                  order to 0..554), images/                     (ids: line number in images.txt)
  stanford_cars   cars_annos.mat + car_ims/, or the devkit: devkit/cars_train_annos.mat,
                  cars_test_annos_withlabels.mat, devkit/cars_meta.mat, cars_train/, cars_test/
  stanford_dogs   train_list.mat, test_list.mat, Images/        (ids: index in the list)
  fgvc_aircraft   fgvc-aircraft-2013b/data/: images_variant_{trainval,test}.txt, variants.txt,
                  images/, images_box.txt (optional)             (ids: the image number)
  folder          train/<class>/*, val/<class>/* or test/<class>/*
  tfds:<name>     a prepared tensorflow-datasets dataset in data_dir (random access)
  synthetic       generated on the fly (fgjax.data.synthetic)
Splits: "train" and "test" (`folder`: "val" too; "test" falls back to val/ when there is no
test/). Examples carry "object_box" (x0, y0, x1, y1 pixels) where the dataset has boxes.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import re
from typing import Any, Sequence

import numpy as np

from fgjax.data.images import BadImageError, load_image, open_image

log = logging.getLogger("fgjax")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class DatasetNotFoundError(FileNotFoundError):
  """A dataset folder is missing or incomplete; the message says what, where from, which key."""


class DatasetError(ValueError):
  """Inconsistent dataset content (e.g. a label outside [0, num_classes))."""


_ORIGIN = {
    "cub": "CUB-200-2011 (CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/"
           "cub_200_2011/, unpacked to a folder CUB_200_2011/)",
    "nabirds": "NABirds (nabirds.tar.gz from https://dl.allaboutbirds.org/nabirds)",
    "stanford_cars": "Stanford Cars (car_ims.tgz + cars_annos.mat, or the devkit with "
                     "cars_train/, cars_test/ and cars_test_annos_withlabels.mat; originally "
                     "https://ai.stanford.edu/~jkrause/cars/car_dataset.html)",
    "stanford_dogs": "Stanford Dogs (images.tar + lists.tar from "
                     "http://vision.stanford.edu/aditya86/ImageNetDogs/)",
    "fgvc_aircraft": "FGVC-Aircraft (fgvc-aircraft-2013b.tar.gz from "
                     "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/)",
    "folder": "your own images, one sub-folder per class under train/ and val/ or test/",
}


def _missing(name: str, data_dir, what: str) -> DatasetNotFoundError:
  return DatasetNotFoundError(
      f"{name}: {what} not found under data_dir={data_dir!r}. The dataset is {_ORIGIN[name]}. "
      f"Point config key data.data_dir at it (--config.data.data_dir=/path/to/it).")


class Source:
  """Base class of random-access sources. Subclasses set the attributes in __init__."""
  name: str = ""
  split: str = ""
  class_names: list[str]
  ids: np.ndarray
  labels: np.ndarray
  # Per-example box arrays carried into batches: name -> shape of one example's array.
  box_shapes: dict[str, tuple[int, ...]] = {}

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.ids)

  def get(self, i: int, min_size: int | None = None) -> tuple[Any, dict]:
    """(PIL RGB image, record without the image): what the pipeline transforms."""
    raise NotImplementedError

  def __getitem__(self, i: int) -> dict:
    if not -len(self) <= i < len(self):
      raise IndexError(f"index {i} out of range for {self.name}/{self.split} ({len(self)})")
    img, rec = self.get(int(i) % len(self))
    rec["image"] = np.asarray(img, dtype=np.uint8)
    return rec

  def __repr__(self):
    return (f"{type(self).__name__}({self.name!r}, split={self.split!r}, n={len(self)}, "
            f"classes={self.num_classes})")


class FileSource(Source):
  """Examples that are image files with integer labels (and optional boxes)."""

  def __init__(self, name: str, split: str, files: Sequence[str], labels, ids,
               class_names: Sequence[str], object_boxes=None, skip_bad_images: bool = False):
    self.name, self.split = name, split
    self.files = list(files)
    self.labels = np.asarray(labels, np.int64)
    self.ids = np.asarray(ids, np.int64)
    self.class_names = list(class_names)
    self.object_boxes = None if object_boxes is None else np.asarray(object_boxes, np.float32)
    self.box_shapes = {} if self.object_boxes is None else {"object_box": (4,)}
    if len(np.unique(self.ids)) != len(self.ids):
      raise DatasetError(f"{name}/{split}: example ids are not unique")
    bad = np.flatnonzero((self.labels < 0) | (self.labels >= self.num_classes))
    if bad.size:
      i = int(bad[0])
      raise DatasetError(f"{name}/{split}: example id {int(self.ids[i])} ({self.files[i]}) has "
                         f"label {int(self.labels[i])}, outside [0, {self.num_classes})")
    if skip_bad_images:
      self._drop_bad_images()

  def _drop_bad_images(self):
    def check(path):
      try:
        open_image(path, min_size=32)
        return True
      except (BadImageError, FileNotFoundError):
        return False
    with concurrent.futures.ThreadPoolExecutor(max(os.cpu_count() or 1, 2)) as pool:
      ok = np.array(list(pool.map(check, self.files)), bool)
    if not ok.all():
      n_bad = int((~ok).sum())
      first = [f for f, g in zip(self.files, ok) if not g][:3]
      log.warning("%s/%s: skipped %d undecodable image(s) (skip_bad_images=True), e.g. %s",
                  self.name, self.split, n_bad, ", ".join(first))
      self.files = [f for f, g in zip(self.files, ok) if g]
      self.labels, self.ids = self.labels[ok], self.ids[ok]
      if self.object_boxes is not None:
        self.object_boxes = self.object_boxes[ok]
    self.num_skipped = int((~ok).sum())

  def get(self, i, min_size=None):
    path = self.files[i]
    if not os.path.exists(path):
      raise BadImageError(f"image file missing: {path} (example id {int(self.ids[i])})")
    img, scale = open_image(path, min_size, return_scale=True)
    rec = {"label": int(self.labels[i]), "id": int(self.ids[i]), "file": path}
    if self.object_boxes is not None:
      rec["object_box"] = self.object_boxes[i] * np.float32(scale)
    return img, rec


class SubsetSource(Source):
  """A subset of another source (train/val hold-out)."""

  def __init__(self, parent: Source, indices, split: str):
    self.parent = parent
    self.indices = np.asarray(indices, np.int64)
    self.name, self.split = parent.name, split
    self.class_names = parent.class_names
    self.ids = parent.ids[self.indices]
    self.labels = parent.labels[self.indices]
    self.box_shapes = parent.box_shapes

  def get(self, i, min_size=None):
    return self.parent.get(int(self.indices[i]), min_size)


def split_train_val(source: Source, val_fraction: float, seed: int = 0):
  """Stratified, deterministic hold-out: (train part, val part) of `source`.

  From each class, round(val_fraction * n_c) examples (at least one when the class has two or
  more) go to validation, chosen by a permutation seeded with `seed`.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
  rng = np.random.default_rng(seed)
  val = []
  labels = np.asarray(source.labels)
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    idx = idx[rng.permutation(len(idx))]
    k = int(round(val_fraction * len(idx)))
    if len(idx) >= 2:
      k = min(max(k, 1), len(idx) - 1)
    else:
      k = 0
    val.extend(idx[:k].tolist())
  val = np.sort(np.array(val, np.int64))
  train = np.setdiff1d(np.arange(len(labels)), val)
  return SubsetSource(source, train, source.split), SubsetSource(source, val, "val")


# ----------------------------------------------------------------------------- helpers


def _read_table(path: str, name: str, data_dir) -> list[list[str]]:
  if not os.path.exists(path):
    raise _missing(name, data_dir, os.path.basename(path))
  with open(path, encoding="utf-8") as f:
    return [line.split() for line in f if line.strip()]


def _find_root(data_dir, name: str, marker: str, candidates: Sequence[str]) -> str:
  """The folder holding `marker`: data_dir itself or one of its `candidates` sub-folders."""
  if data_dir is None:
    data_dir = os.path.join("data", candidates[0]) if candidates else "data"
  data_dir = os.path.expanduser(os.fspath(data_dir))
  for sub in ("",) + tuple(candidates):
    root = os.path.join(data_dir, sub)
    if os.path.exists(os.path.join(root, marker)):
      return root
  if not os.path.isdir(data_dir):
    raise DatasetNotFoundError(
        f"{name}: folder {data_dir!r} does not exist. The dataset is {_ORIGIN[name]}. Point "
        f"config key data.data_dir at it (--config.data.data_dir=/path/to/it).")
  raise _missing(name, data_dir, marker)


def _check_split(name, split, allowed=("train", "test")):
  if split not in allowed:
    raise ValueError(f"{name}: unknown split {split!r}; use one of {allowed}")


def _xywh_to_xyxy(b):
  b = np.asarray(b, np.float32).reshape(-1, 4)
  return np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], 1)


# ----------------------------------------------------------------------------- datasets


def _birds_source(name, split, data_dir, skip_bad_images, candidates):
  """CUB-200-2011 and NABirds share their annotation files."""
  _check_split(name, split)
  root = _find_root(data_dir, name, "images.txt", candidates)
  images = _read_table(os.path.join(root, "images.txt"), name, data_dir)
  labels = dict(_read_table(os.path.join(root, "image_class_labels.txt"), name, data_dir))
  is_train = dict(_read_table(os.path.join(root, "train_test_split.txt"), name, data_dir))
  classes_rows = _read_table(os.path.join(root, "classes.txt"), name, data_dir)
  boxes_path = os.path.join(root, "bounding_boxes.txt")
  boxes = {r[0]: [float(v) for v in r[1:5]] for r in _read_table(boxes_path, name, data_dir)} \
      if os.path.exists(boxes_path) else None
  if name == "cub" and boxes is None:
    raise _missing(name, data_dir, "bounding_boxes.txt")
  class_text = {r[0]: " ".join(r[1:]) for r in classes_rows}
  used = sorted({labels[k] for k, _ in images if k in labels}, key=int)
  if name == "cub":
    used = sorted(class_text, key=int)
  index_of = {c: i for i, c in enumerate(used)}
  names = [re.sub(r"^\d+\.", "", class_text.get(c, c)) for c in used]
  want = "1" if split == "train" else "0"
  files, ys, ids, bxs = [], [], [], []
  for line_no, (key, rel) in enumerate(images, start=1):
    if key not in labels or key not in is_train:
      raise DatasetError(f"{name}: image {key} ({rel}) has no entry in "
                         f"{'image_class_labels.txt' if key not in labels else 'train_test_split.txt'}")
    if is_train[key] != want:
      continue
    if labels[key] not in index_of:
      raise DatasetError(f"{name}: image {key} ({rel}) has class id {labels[key]}, which is "
                         f"not in classes.txt")
    files.append(os.path.join(root, "images", rel))
    ys.append(index_of[labels[key]])
    ids.append(int(key) if name == "cub" else line_no)
    if boxes is not None:
      bxs.append(boxes.get(key, [0, 0, 0, 0]))
  if not files:
    raise DatasetError(f"{name}: the {split} split is empty (train_test_split.txt)")
  return FileSource(name, split, files, ys, ids, names,
                    _xywh_to_xyxy(bxs) if boxes is not None else None, skip_bad_images)


def _mat_struct_field(rec, field):
  v = rec[field]
  while isinstance(v, np.ndarray) and v.size == 1 and v.dtype == object:
    v = v.item()
  if isinstance(v, np.ndarray):
    v = v.squeeze()
    if v.dtype.kind in "US":
      return str(v)
    return v.item() if v.size == 1 else v
  return v


def _loadmat(path, name, data_dir):
  if not os.path.exists(path):
    raise _missing(name, data_dir, os.path.relpath(path, os.fspath(data_dir or ".")))
  import scipy.io
  try:
    return scipy.io.loadmat(path)
  except Exception as e:  # noqa: BLE001 - scipy raises many kinds for corrupt files
    raise DatasetError(f"{name}: cannot read {path}: {e}") from None


def _mat_strings(arr) -> list[str]:
  out = []
  for v in np.asarray(arr).ravel():
    while isinstance(v, np.ndarray):
      v = v.ravel()[0] if v.size else ""
    out.append(str(v))
  return out


def _cars_source(split, data_dir, skip_bad_images):
  name = "stanford_cars"
  _check_split(name, split)
  base = os.path.expanduser(os.fspath(data_dir)) if data_dir else os.path.join("data",
                                                                                "stanford_cars")
  if not os.path.isdir(base):
    raise DatasetNotFoundError(f"{name}: folder {base!r} does not exist. The dataset is "
                               f"{_ORIGIN[name]}. Point config key data.data_dir at it "
                               f"(--config.data.data_dir=/path/to/it).")
  annos = os.path.join(base, "cars_annos.mat")
  files, ys, ids, boxes = [], [], [], []
  if os.path.exists(annos):
    mat = _loadmat(annos, name, base)
    names = _mat_strings(mat["class_names"])
    recs = mat["annotations"].ravel()
    for i, r in enumerate(recs):
      test = int(_mat_struct_field(r, "test"))
      if (split == "test") != bool(test):
        continue
      rel = _mat_struct_field(r, "relative_im_path")
      files.append(os.path.join(base, rel))
      ys.append(int(_mat_struct_field(r, "class")) - 1)
      ids.append(i + 1)
      boxes.append([float(_mat_struct_field(r, f"bbox_{k}")) for k in ("x1", "y1", "x2", "y2")])
  else:
    devkit = os.path.join(base, "devkit")
    meta = _loadmat(os.path.join(devkit, "cars_meta.mat"), name, base)
    names = _mat_strings(meta["class_names"])
    if split == "train":
      mat = _loadmat(os.path.join(devkit, "cars_train_annos.mat"), name, base)
      img_dir = os.path.join(base, "cars_train")
    else:
      path = next((p for p in (os.path.join(base, "cars_test_annos_withlabels.mat"),
                               os.path.join(devkit, "cars_test_annos_withlabels.mat"))
                   if os.path.exists(p)), None)
      if path is None:
        raise _missing(name, base, "cars_test_annos_withlabels.mat (or cars_annos.mat)")
      mat = _loadmat(path, name, base)
      img_dir = os.path.join(base, "cars_test")
    if not os.path.isdir(img_dir):
      raise _missing(name, base, os.path.basename(img_dir) + "/")
    for i, r in enumerate(mat["annotations"].ravel()):
      fname = _mat_struct_field(r, "fname")
      files.append(os.path.join(img_dir, fname))
      ys.append(int(_mat_struct_field(r, "class")) - 1)
      ids.append(int(re.sub(r"\D", "", fname) or i + 1))
      boxes.append([float(_mat_struct_field(r, f"bbox_{k}")) for k in ("x1", "y1", "x2", "y2")])
  return FileSource(name, split, files, ys, ids, names, np.asarray(boxes, np.float32),
                    skip_bad_images)


def _dogs_source(split, data_dir, skip_bad_images):
  name = "stanford_dogs"
  _check_split(name, split)
  root = _find_root(data_dir, name, f"{split}_list.mat", ["stanford_dogs", "lists"])
  mat = _loadmat(os.path.join(root, f"{split}_list.mat"), name, data_dir)
  rels = _mat_strings(mat["file_list"])
  labels = np.asarray(mat["labels"]).ravel().astype(np.int64) - 1
  img_root = next((p for p in (os.path.join(root, "Images"), os.path.join(root, "..", "Images"),
                               os.path.join(root, "images", "Images"))
                   if os.path.isdir(p)), None)
  if img_root is None:
    raise _missing(name, data_dir, "Images/")
  synsets = {}
  for rel, y in zip(rels, labels):
    synsets.setdefault(int(y), rel.split("/")[0])
  if len(synsets) < 120:  # class names from the folder names of both lists
    for other in ("train", "test"):
      p = os.path.join(root, f"{other}_list.mat")
      if other != split and os.path.exists(p):
        m = _loadmat(p, name, data_dir)
        for rel, y in zip(_mat_strings(m["file_list"]),
                          np.asarray(m["labels"]).ravel().astype(np.int64) - 1):
          synsets.setdefault(int(y), rel.split("/")[0])
  n = max(synsets) + 1
  names = [synsets.get(c, f"class_{c}").split("-", 1)[-1] for c in range(n)]
  files = [os.path.join(img_root, r) for r in rels]
  return FileSource(name, split, files, labels, np.arange(1, len(files) + 1), names, None,
                    skip_bad_images)


def _aircraft_source(split, data_dir, skip_bad_images):
  name = "fgvc_aircraft"
  _check_split(name, split)
  fname = "images_variant_trainval.txt" if split == "train" else "images_variant_test.txt"
  root = _find_root(data_dir, name, fname, ["data", "fgvc-aircraft-2013b/data"])
  variants_path = os.path.join(root, "variants.txt")
  if not os.path.exists(variants_path):
    raise _missing(name, data_dir, "variants.txt")
  with open(variants_path, encoding="utf-8") as f:
    names = [line.strip() for line in f if line.strip()]
  index = {v: i for i, v in enumerate(names)}
  rows = []
  with open(os.path.join(root, fname), encoding="utf-8") as f:
    for line in f:
      if line.strip():
        img_id, variant = line.strip().split(" ", 1)
        rows.append((img_id, variant))
  box_path = os.path.join(root, "images_box.txt")
  boxes = {}
  if os.path.exists(box_path):
    for r in _read_table(box_path, name, data_dir):
      boxes[r[0]] = [float(v) for v in r[1:5]]
  files, ys, ids, bxs = [], [], [], []
  for img_id, variant in rows:
    if variant not in index:
      raise DatasetError(f"{name}: image {img_id} has variant {variant!r}, not in variants.txt")
    files.append(os.path.join(root, "images", f"{img_id}.jpg"))
    ys.append(index[variant])
    ids.append(int(img_id))
    bxs.append(boxes.get(img_id, [0, 0, 0, 0]))
  return FileSource(name, split, files, ys, ids, names,
                    np.asarray(bxs, np.float32) if boxes else None, skip_bad_images)


def _folder_source(split, data_dir, skip_bad_images):
  name = "folder"
  if data_dir is None:
    raise DatasetNotFoundError("folder: no data_dir given. Point config key data.data_dir at a "
                               "folder with train/<class>/ and val/<class>/ or test/<class>/ "
                               "(--config.data.data_dir=/path/to/it).")
  root = os.path.expanduser(os.fspath(data_dir))
  train_dir = os.path.join(root, "train")
  if not os.path.isdir(train_dir):
    raise _missing(name, data_dir, "train/")
  classes = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
  if not classes:
    raise DatasetError(f"folder: {train_dir} has no class sub-folders")
  if split == "train":
    split_dir = train_dir
  elif split in ("val", "test"):
    cands = [split, "test" if split == "val" else "val"]
    split_dir = next((os.path.join(root, c) for c in cands if os.path.isdir(os.path.join(root, c))),
                     None)
    if split_dir is None:
      raise _missing(name, data_dir, "val/ or test/")
  else:
    raise ValueError(f"folder: unknown split {split!r}; use train, val or test")
  index = {c: i for i, c in enumerate(classes)}
  files, ys = [], []
  for c in sorted(os.listdir(split_dir)):
    cdir = os.path.join(split_dir, c)
    if not os.path.isdir(cdir):
      continue
    if c not in index:
      raise DatasetError(f"folder: class folder {cdir} has no counterpart in {train_dir}")
    for fn in sorted(os.listdir(cdir)):
      if fn.lower().endswith(IMAGE_EXTENSIONS):
        files.append(os.path.join(cdir, fn))
        ys.append(index[c])
  if not files:
    raise DatasetError(f"folder: no images under {split_dir}")
  return FileSource(name, split, files, ys, np.arange(len(files)), classes, None, skip_bad_images)


class TfdsSource(Source):
  """A prepared tensorflow-datasets dataset read as a random-access data source."""

  def __init__(self, tfds_name, split, data_dir, image_key="image", label_key="label"):
    import tensorflow_datasets as tfds
    self.name, self.split = f"tfds:{tfds_name}", split
    try:
      builder = tfds.builder(tfds_name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001
      raise DatasetNotFoundError(f"tfds:{tfds_name}: {e}. Prepare it in data.data_dir "
                                 f"(--config.data.data_dir=/path) with tfds.") from None
    if not builder.is_prepared():
      raise DatasetNotFoundError(
          f"tfds:{tfds_name}: not prepared in data_dir={data_dir!r} (expected "
          f"{builder.data_dir}). Prepare it with tfds (array_record format) and point config key "
          f"data.data_dir at it (--config.data.data_dir=/path).")
    self._ds = builder.as_data_source(split=split)
    self.image_key, self.label_key = image_key, label_key
    feat = builder.info.features[label_key]
    self.class_names = list(getattr(feat, "names", None) or
                            [str(i) for i in range(feat.num_classes)])
    n = len(self._ds)
    self.ids = np.arange(n, dtype=np.int64)
    self._labels = None

  @property
  def labels(self):
    if self._labels is None:
      self._labels = np.array([int(self._ds[i][self.label_key]) for i in range(len(self._ds))])
    return self._labels

  def get(self, i, min_size=None):
    from PIL import Image
    ex = self._ds[int(i)]
    img = np.asarray(ex[self.image_key])
    if img.ndim == 2:
      img = np.repeat(img[..., None], 3, -1)
    if img.shape[-1] == 1:
      img = np.repeat(img, 3, -1)
    y = int(ex[self.label_key])
    if not 0 <= y < self.num_classes:
      raise DatasetError(f"{self.name}/{self.split}: example {i} has label {y}, outside "
                         f"[0, {self.num_classes})")
    return Image.fromarray(img[..., :3].astype(np.uint8)), {"label": y, "id": int(i)}


def get_source(name: str, split: str, data_dir: str | None = None, **kw) -> Source:
  """Returns the random-access source `name`/`split` (see the module docstring)."""
  skip = bool(kw.pop("skip_bad_images", False))
  if name == "synthetic":
    from fgjax.data.synthetic import SyntheticSource
    return SyntheticSource(split=split, **kw)
  if name.startswith("tfds:"):
    return TfdsSource(name.split(":", 1)[1], split, data_dir, **kw)
  if kw:
    raise TypeError(f"get_source({name!r}): unexpected arguments {sorted(kw)}")
  if name == "cub":
    return _birds_source("cub", split, data_dir, skip, ["CUB_200_2011"])
  if name == "nabirds":
    return _birds_source("nabirds", split, data_dir, skip, ["nabirds"])
  if name == "stanford_cars":
    return _cars_source(split, data_dir, skip)
  if name == "stanford_dogs":
    return _dogs_source(split, data_dir, skip)
  if name == "fgvc_aircraft":
    return _aircraft_source(split, data_dir, skip)
  if name == "folder":
    return _folder_source(split, data_dir, skip)
  raise ValueError(f"config.data.name: unknown dataset {name!r}; available: cub, nabirds, "
                   f"stanford_cars, stanford_dogs, fgvc_aircraft, folder, tfds:<name>, synthetic")

"""Dataset layouts on disk: CUB-200-2011, NABirds, Stanford Cars, Stanford Dogs, FGVC-Aircraft
and a folder per class, each read into a `FileSource` (the files each reads: the docstring of
`fgjax.data.sources`; folder trees in docs/datasets.md).

`_FILE_DATASETS` maps each name to its reader `(split, data_dir, skip_bad_images) -> FileSource`.
`load_texts(source, text_dir, allow_missing_text)` reads the images' text descriptions (one
sentence a line): each image's file is `<text_dir>/<image path relative to the dataset's image
folder, extension .txt>`, which for CUB is Reed et al.'s (2016) `text_c10/<class folder>/<image
stem>.txt`; without a text_dir, CUB uses a `text_c10/` in or beside its folder, and every other
dataset (and CUB without one) the `.txt` beside each image.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import warnings
from typing import Sequence

import numpy as np

from fgjax import text
from fgjax.data.base import DatasetError, DatasetNotFoundError, Source, _check_labels
from fgjax.data.images import BadImageError, read_image

log = logging.getLogger("fgjax")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".jfif")


_ORIGIN = {
    "cub": "CUB-200-2011 (CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/"
           "cub_200_2011/, unpacked to a folder CUB_200_2011/)",
    "nabirds": "NABirds (nabirds.tar.gz from https://dl.allaboutbirds.org/nabirds, unpacked "
               "to a folder nabirds/)",
    "stanford_cars": "Stanford Cars (car_ims.tgz + cars_annos.mat, or the devkit with cars_train/, "
                     "cars_test/ and cars_test_annos_withlabels.mat; from "
                     "https://ai.stanford.edu/~jkrause/cars/car_dataset.html)",
    "stanford_dogs": "Stanford Dogs (images.tar + lists.tar from "
                     "http://vision.stanford.edu/aditya86/ImageNetDogs/, unpacked together)",
    "fgvc_aircraft": "FGVC-Aircraft (fgvc-aircraft-2013b.tar.gz from "
                     "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/)",
    "folder": "your own images, one sub-folder per class under train/ and val/ or test/",
}
_HOW = ("Point config key data.data_dir at it (--config.data.data_dir=/path/to/it); "
        "see docs/datasets.md.")


def _missing(name: str, data_dir, what: str) -> DatasetNotFoundError:
  return DatasetNotFoundError(
      f"{name}: {what} not found in data_dir={os.fspath(data_dir)!r}. The dataset is "
      f"{_ORIGIN[name]}. {_HOW}")


class FileSource(Source):
  """Examples that are image files with integer labels (and optional object boxes and part
  locations: `part_locs` (N, P, 3) x, y, visible in the stored image's pixels, with
  `part_names` (P) and `part_flip`, the row order after a horizontal flip).

  Every listed file must exist (else `DatasetNotFoundError` naming the first missing one);
  with `skip_bad_images=True` missing and undecodable files are dropped instead (see the
  docstring of `fgjax.data.sources`). `texts`: optionally one list of sentences per file (the
  records then hold "text"; `load_texts` reads them from description files). `image_dir`: the
  folder the dataset's image paths are relative to (default `root`), for the text layout.
  """

  def __init__(self, name: str, split: str, files: Sequence[str], labels, ids,
               class_names: Sequence[str], object_boxes=None, skip_bad_images: bool = False,
               root: str | None = None, part_locs=None, part_names: Sequence[str] = (),
               texts: Sequence[Sequence[str]] | None = None, image_dir: str | None = None):
    self.name, self.split = name, split
    self.root, self.image_dir = root, image_dir if image_dir is not None else root
    self.files = [os.fspath(f) for f in files]
    self.labels = np.asarray(labels, np.int64).reshape(-1)
    self.ids = np.asarray(ids, np.int64).reshape(-1)
    self.class_names = [str(c) for c in class_names]
    self.object_boxes = None if object_boxes is None else \
        np.asarray(object_boxes, np.float32).reshape(-1, 4)
    self.box_shapes = {} if self.object_boxes is None else {"object_box": (4,)}
    self.part_locs = None
    if part_locs is not None:
      self.part_locs = np.asarray(part_locs, np.float32).reshape(len(self.files), -1, 3)
      self.part_names = [str(n) for n in part_names]
      self.part_flip = flip_order(self.part_names)
      self.box_shapes["part_locs"] = self.part_locs.shape[1:]
    self.num_skipped = 0
    self._texts = None
    if texts is not None:
      self._set_texts(texts)
    if not (len(self.files) == len(self.labels) == len(self.ids)):
      raise DatasetError(f"{name}/{split}: {len(self.files)} files, {len(self.labels)} labels, "
                         f"{len(self.ids)} ids")
    if len(np.unique(self.ids)) != len(self.ids):
      raise DatasetError(f"{name}/{split}: example ids are not unique")
    _check_labels(name, split, self.labels, self.ids, self.num_classes, lambda i: self.files[i])
    if skip_bad_images:
      self._drop_bad_images()
    else:
      missing = [f for f in self.files if not os.path.isfile(f)]
      if missing:
        where = os.path.relpath(missing[0], root) if root else missing[0]
        more = f" (and {len(missing) - 1} more of the {len(self.files)} {split} images)" \
            if len(missing) > 1 else ""
        origin = _ORIGIN.get(name)
        raise DatasetNotFoundError(
            f"{name}: image file {where} not found{more} in data_dir={root or ''!r}. "
            + (f"The dataset is {origin}. " if origin else "") + _HOW
            + " (get_source(..., skip_bad_images=True) / data.skip_bad_images=True skips "
              "missing and undecodable images.)")
    if len(self.files) == 0:
      raise DatasetError(f"{name}/{split}: no examples")

  def _keep(self, ok: np.ndarray):
    self.files = [f for f, g in zip(self.files, ok) if g]
    self.labels, self.ids = self.labels[ok], self.ids[ok]
    if self.object_boxes is not None:
      self.object_boxes = self.object_boxes[ok]
    if self.part_locs is not None:
      self.part_locs = self.part_locs[ok]
    if self._texts is not None:
      self._texts = [t for t, g in zip(self._texts, ok) if g]

  def _set_texts(self, texts):
    texts = [[str(t) for t in ts] for ts in texts]
    if len(texts) != len(self.files):
      raise DatasetError(f"{self.name}/{self.split}: {len(texts)} texts for {len(self.files)} "
                         f"files")
    self._texts, self.has_text = texts, True

  def texts(self, i):
    if self._texts is None:
      return super().texts(i)
    return list(self._texts[i])

  def _drop_bad_images(self):
    def check(path):
      try:
        read_image(path, min_size=32)
        return True
      except (BadImageError, OSError):
        return False
    with concurrent.futures.ThreadPoolExecutor(max(os.cpu_count() or 1, 2) * 2) as pool:
      ok = np.fromiter(pool.map(check, self.files), bool, len(self.files))
    self.num_skipped = int((~ok).sum())
    if self.num_skipped:
      first = [f for f, g in zip(self.files, ok) if not g][:3]
      msg = (f"{self.name}/{self.split}: skipped {self.num_skipped} of {len(ok)} images that are "
             f"missing or cannot be decoded (skip_bad_images=True), e.g. {', '.join(first)}")
      log.warning(msg)
      warnings.warn(msg, stacklevel=3)
      self._keep(ok)

  def get(self, i, min_size=None, decoder="opencv"):
    path = self.files[i]
    try:
      img, scale = read_image(path, min_size, return_scale=True, decoder=decoder)
    except FileNotFoundError:
      raise BadImageError(f"image file missing: {path} (example id {int(self.ids[i])})") \
          from None
    rec = {"label": int(self.labels[i]), "id": int(self.ids[i]), "file": path}
    if self.object_boxes is not None:
      rec["object_box"] = self.object_boxes[i] * np.float32(scale)
    if self.part_locs is not None:
      locs = self.part_locs[i].copy()
      locs[:, :2] *= np.float32(scale)
      rec["part_locs"] = locs
    if self._texts is not None:
      rec["text"] = list(self._texts[i])
    return img, rec


# ----------------------------------------------------------------------------- text

TEXT_FOLDER = "text_c10"  # Reed et al. 2016's CUB descriptions (cvpr2016_cub.tar.gz)


def _read_description(path: str):
  """The sentences of a description file, or None when it is missing."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      return text.sentences(f.read())
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
    return None


def description_path(source: FileSource, file: str, text_dir: str | None) -> str:
  """The description file of image `file`: `<text_dir>/<path relative to source.image_dir>`
  with extension .txt, or the .txt beside the image when text_dir is None."""
  if text_dir is None:
    return os.path.splitext(file)[0] + ".txt"
  rel = os.path.relpath(file, source.image_dir or os.path.dirname(file))
  return os.path.join(text_dir, os.path.splitext(rel)[0] + ".txt")


def default_text_dir(source: FileSource) -> str | None:
  """CUB: `text_c10/` in the CUB folder, beside it, or in a `cvpr2016_cub/` beside it (the
  first that exists); None (descriptions beside the images) otherwise."""
  if source.name != "cub" or not source.root:
    return None
  parent = os.path.dirname(os.path.abspath(source.root))
  for cand in (os.path.join(source.root, TEXT_FOLDER), os.path.join(parent, TEXT_FOLDER),
               os.path.join(parent, "cvpr2016_cub", TEXT_FOLDER)):
    if os.path.isdir(cand):
      return cand
  return None


def load_texts(source: FileSource, text_dir=None, allow_missing_text: bool = False) -> FileSource:
  """Reads every image's description file (one sentence a line, UTF-8, blank lines ignored;
  see the module docstring for where) into `source` (in place; returned). A missing or empty
  file is a `DatasetNotFoundError` naming it and the number of such files, unless
  `allow_missing_text`: those images then get an empty list of sentences (one warning)."""
  name, split = source.name, source.split
  if text_dir is not None:
    text_dir = os.path.abspath(os.path.expanduser(os.fspath(text_dir)))
    if not os.path.isdir(text_dir):
      raise DatasetNotFoundError(f"{name}: data.text_dir={text_dir!r} is not a folder (the "
                                 f"text descriptions, e.g. CUB's {TEXT_FOLDER}/)")
  else:
    text_dir = default_text_dir(source)
  paths = [description_path(source, f, text_dir) for f in source.files]
  with concurrent.futures.ThreadPoolExecutor(max(os.cpu_count() or 1, 2) * 2) as pool:
    texts = list(pool.map(_read_description, paths))
  missing = [p for p, t in zip(paths, texts) if t is None]
  empty = [p for p, t in zip(paths, texts) if t is not None and not t]
  if missing or empty:
    first = (missing or empty)[0]
    where = text_dir or source.root
    shown = os.path.relpath(first, where) if where else first
    counts = (f"{len(missing)} missing and {len(empty)} empty of the {len(paths)} {split} "
              f"images' description files")
    place = f"data.text_dir={text_dir!r}" if text_dir else "beside the images"
    if not allow_missing_text:
      raise DatasetNotFoundError(
          f"{name}/{split}: description file {shown} "
          f"{'not found' if missing else 'is empty'} ({counts}; {place}). Set data.text_dir to "
          f"the descriptions' folder (CUB: Reed et al.'s {TEXT_FOLDER}/, one sentence a line), "
          f"or data.allow_missing_text=True to give those images an empty text.")
    msg = (f"{name}/{split}: {counts} ({place}), e.g. {shown}; those images get an empty text "
           f"(allow_missing_text=True)")
    log.warning(msg)
    warnings.warn(msg, stacklevel=3)
  source._set_texts([t or [] for t in texts])
  return source


# ----------------------------------------------------------------------------- helpers


def _resolve_dir(data_dir, default: str) -> str:
  return os.path.abspath(os.path.expanduser(os.fspath(data_dir if data_dir is not None
                                                      else default)))


def _find_root(name: str, data_dir, markers: Sequence[str], candidates: Sequence[str],
               default: str) -> str:
  """The folder holding all `markers`: data_dir itself or one of its `candidates` sub-folders.
  When none has them all, raises DatasetNotFoundError for the first marker missing in the best
  candidate."""
  base = _resolve_dir(data_dir, default)
  if not os.path.isdir(base):
    hint = "" if data_dir is not None else " (data.data_dir is not set)"
    raise DatasetNotFoundError(f"{name}: folder {base!r} does not exist{hint}. The dataset is "
                               f"{_ORIGIN[name]}. {_HOW}")
  best, best_n = base, -1
  for sub in ("",) + tuple(candidates):
    root = os.path.join(base, sub) if sub else base
    n = sum(os.path.exists(os.path.join(root, m)) for m in markers)
    if n == len(markers):
      return root
    if n > best_n:
      best, best_n = root, n
  missing = next(m for m in markers if not os.path.exists(os.path.join(best, m)))
  rel = os.path.relpath(os.path.join(best, missing), base)
  raise _missing(name, base, rel)


def _read_rows(path: str, name: str, base: str, maxsplit: int = -1) -> list[list[str]]:
  if not os.path.isfile(path):
    raise _missing(name, base, os.path.relpath(path, base))
  with open(path, encoding="utf-8") as f:
    return [line.split(None, maxsplit) for line in f if line.strip()]


def _check_split(name, split, allowed=("train", "test")):
  if split not in allowed:
    raise ValueError(f"{name}: unknown split {split!r}; use one of {', '.join(allowed)}")


def flip_order(part_names: Sequence[str]) -> np.ndarray:
  """Row order of parts after a horizontal flip: "left X" and "right X" trade rows (CUB's eyes,
  legs and wings), every other part keeps its row."""
  names = [str(n).strip().lower() for n in part_names]
  order = np.arange(len(names))
  for i, n in enumerate(names):
    for a, b in (("left", "right"), ("right", "left")):
      if n.startswith(a + " ") and (b + n[len(a):]) in names:
        order[i] = names.index(b + n[len(a):])
  return order


def _read_parts(name: str, root: str, base: str, keys: Sequence[str]):
  """(part_locs (N, P, 3), part names) from parts/parts.txt (<part id> <name>) and
  parts/part_locs.txt (<image id> <part id> <x> <y> <visible>), for the images `keys`; None
  when neither file exists. Parts an image has no line for are (0, 0, not visible)."""
  names_path = os.path.join(root, "parts", "parts.txt")
  locs_path = os.path.join(root, "parts", "part_locs.txt")
  have = [os.path.isfile(p) for p in (names_path, locs_path)]
  if not any(have):
    return None
  if not all(have):
    missing, present = (locs_path, names_path) if have[0] else (names_path, locs_path)
    raise DatasetNotFoundError(f"{name}: {os.path.relpath(missing, base)} not found, but "
                               f"{os.path.relpath(present, base)} is there: the part "
                               f"annotations need both files (or neither)")
  part_rows = _read_rows(names_path, name, base, 1)
  if not part_rows or any(len(r) < 2 for r in part_rows):
    raise DatasetError(f"{name}: {names_path} is empty or has a line that is not "
                       f"'<part id> <name>'")
  part_index = {r[0]: j for j, r in enumerate(part_rows)}
  row_of = {k: i for i, k in enumerate(keys)}
  out = np.zeros((len(keys), len(part_rows), 3), np.float32)
  with open(locs_path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      r = line.split()
      if not r:
        continue
      try:
        if len(r) != 5 or r[1] not in part_index:
          raise ValueError
        x, y, vis = float(r[2]), float(r[3]), float(r[4])
      except ValueError:
        raise DatasetError(f"{name}: {locs_path} line {n} is not '<image id> <part id> <x> <y> "
                           f"<visible>' with a part id of parts.txt: {line.strip()!r}") from None
      i = row_of.get(r[0])
      if i is not None:
        out[i, part_index[r[1]]] = (x, y, float(vis > 0))
  return out, [r[1].strip() for r in part_rows]


def _xywh_to_xyxy(b):
  b = np.asarray(b, np.float32).reshape(-1, 4)
  return np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], 1)


# ----------------------------------------------------------------------------- datasets


def _birds_source(name, split, data_dir, skip_bad_images):
  """CUB-200-2011 and NABirds share their annotation files."""
  _check_split(name, split)
  folder = "CUB_200_2011" if name == "cub" else "nabirds"
  files_needed = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
  if name == "cub":
    files_needed += ("bounding_boxes.txt",)
  root = _find_root(name, data_dir, files_needed + ("images",), [folder],
                    os.path.join("data", folder))
  base = _resolve_dir(data_dir, os.path.join("data", folder))
  rd = lambda f, k=-1: _read_rows(os.path.join(root, f), name, base, k)
  images = rd("images.txt", 1)
  labels = {r[0]: r[1] for r in rd("image_class_labels.txt")}
  is_train = {r[0]: r[1] for r in rd("train_test_split.txt")}
  class_text = {r[0]: (r[1].strip() if len(r) > 1 else r[0]) for r in rd("classes.txt", 1)}
  boxes = None
  if os.path.isfile(os.path.join(root, "bounding_boxes.txt")):
    boxes = {r[0]: [float(v) for v in r[1:5]] for r in rd("bounding_boxes.txt")}
  sort_key = lambda c: (0, int(c), "") if c.isdigit() else (1, 0, c)
  if name == "cub":  # all classes of classes.txt, in id order
    used = sorted(class_text, key=sort_key)
  else:  # NABirds: only the (sparse) class ids that have images, in sorted order
    used = sorted({labels[k] for k, _ in images if k in labels}, key=sort_key)
  index_of = {c: i for i, c in enumerate(used)}
  names = [re.sub(r"^\d+\.", "", class_text.get(c, c)) for c in used]
  want = "1" if split == "train" else "0"
  files, ys, ids, bxs, keys = [], [], [], [], []
  for pos, row in enumerate(images):
    if len(row) < 2:
      raise DatasetError(f"{name}: images.txt line {pos + 1} is not '<image id> <path>'")
    key, rel = row[0], row[1].strip()
    for table, fname in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
      if key not in table:
        raise DatasetError(f"{name}: image {key} ({rel}) has no entry in {fname}")
    if is_train[key] != want:
      continue
    img_id = int(key) if (name == "cub" and key.isdigit()) else pos
    if labels[key] not in index_of:
      raise DatasetError(f"{name}/{split}: example id {img_id} ({rel}) has class id "
                         f"{labels[key]}, which is not in classes.txt")
    files.append(os.path.join(root, "images", rel))
    ys.append(index_of[labels[key]])
    ids.append(img_id)
    keys.append(key)
    if boxes is not None:
      bxs.append(boxes.get(key, [0.0, 0.0, 0.0, 0.0]))
  if not files:
    raise DatasetError(f"{name}: the {split} split is empty (train_test_split.txt)")
  parts = _read_parts(name, root, base, keys)
  return FileSource(name, split, files, ys, ids, names,
                    _xywh_to_xyxy(bxs) if boxes is not None else None, skip_bad_images, root,
                    *(parts or (None, ())), image_dir=os.path.join(root, "images"))


def _mat_value(v):
  """Unwraps scipy.io.loadmat's nested size-1 arrays to a str or a number."""
  while isinstance(v, np.ndarray):
    if v.size == 0:
      return ""
    if v.dtype.kind in "US":
      return str(v.ravel()[0]) if v.size == 1 else "".join(map(str, v.ravel()))
    if v.size != 1:
      raise DatasetError(f"unexpected array of shape {v.shape} in a .mat annotation")
    v = v.ravel()[0]
  if isinstance(v, bytes):
    return v.decode("utf-8", "replace")
  return v.item() if isinstance(v, np.generic) else v


def _loadmat(path, name, base):
  if not os.path.isfile(path):
    raise _missing(name, base, os.path.relpath(path, base))
  import scipy.io
  try:
    return scipy.io.loadmat(path)
  except Exception as e:  # noqa: BLE001 - scipy raises many kinds for corrupt files
    raise DatasetError(f"{name}: cannot read {path}: {e}") from None


def _mat_records(mat, key, fields, path, name):
  """The struct array `key` of a loaded .mat as a list of {field: value} dicts."""
  if key not in mat:
    raise DatasetError(f"{name}: {path} has no variable {key!r}")
  arr = mat[key].ravel()
  have = arr.dtype.names or ()
  lacking = [f for f in fields if f not in have]
  if lacking:
    raise DatasetError(f"{name}: {path} records lack the field(s) {', '.join(lacking)}")
  return [{f: _mat_value(r[f]) for f in have} for r in arr]


def _mat_strings(arr) -> list[str]:
  return [str(_mat_value(v)) for v in np.asarray(arr).ravel()]


def _cars_source(split, data_dir, skip_bad_images):
  name = "stanford_cars"
  _check_split(name, split)
  base = _resolve_dir(data_dir, os.path.join("data", "stanford_cars"))
  if not os.path.isdir(base):
    hint = "" if data_dir is not None else " (data.data_dir is not set)"
    raise DatasetNotFoundError(f"{name}: folder {base!r} does not exist{hint}. The dataset is "
                               f"{_ORIGIN[name]}. {_HOW}")
  root = next((os.path.join(base, sub) for sub in ("", "stanford_cars", "stanford-cars")
               if os.path.isfile(os.path.join(base, sub, "cars_annos.mat")) or
               os.path.isdir(os.path.join(base, sub, "devkit"))), None)
  if root is None:
    raise _missing(name, base, "cars_annos.mat (or devkit/cars_train_annos.mat)")
  bbox = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
  annos = os.path.join(root, "cars_annos.mat")
  files, ys, boxes = [], [], []
  if os.path.isfile(annos):
    mat = _loadmat(annos, name, base)
    names = _mat_strings(mat["class_names"]) if "class_names" in mat else None
    for r in _mat_records(mat, "annotations", ("relative_im_path", "class", "test") + bbox,
                          annos, name):
      if bool(int(r["test"])) != (split == "test"):
        continue
      files.append(os.path.join(root, str(r["relative_im_path"])))
      ys.append(int(r["class"]) - 1)
      boxes.append([float(r[k]) for k in bbox])
  else:
    devkit = os.path.join(root, "devkit")
    meta_path = os.path.join(devkit, "cars_meta.mat")
    names = _mat_strings(_loadmat(meta_path, name, base)["class_names"]) \
        if os.path.isfile(meta_path) else None
    if split == "train":
      path = os.path.join(devkit, "cars_train_annos.mat")
      img_dir = os.path.join(root, "cars_train")
    else:
      path = next((p for p in (os.path.join(root, "cars_test_annos_withlabels.mat"),
                               os.path.join(devkit, "cars_test_annos_withlabels.mat"))
                   if os.path.isfile(p)), None)
      if path is None:
        raise _missing(name, base, "cars_test_annos_withlabels.mat (the test labels; "
                                   "devkit/cars_test_annos.mat has none)")
      img_dir = os.path.join(root, "cars_test")
    mat = _loadmat(path, name, base)
    if not os.path.isdir(img_dir):
      raise _missing(name, base, os.path.relpath(img_dir, base) + "/")
    nested = os.path.join(img_dir, os.path.basename(img_dir))  # e.g. cars_train/cars_train/
    if os.path.isdir(nested):
      img_dir = nested
    for r in _mat_records(mat, "annotations", ("fname", "class") + bbox, path, name):
      files.append(os.path.join(img_dir, str(r["fname"])))
      ys.append(int(r["class"]) - 1)
      boxes.append([float(r[k]) for k in bbox])
  if names is None:
    names = [f"class_{c + 1}" for c in range(max(ys) + 1)]
  return FileSource(name, split, files, ys, np.arange(len(files)), names,
                    np.asarray(boxes, np.float32).reshape(-1, 4), skip_bad_images, root)


def _dogs_source(split, data_dir, skip_bad_images):
  name = "stanford_dogs"
  _check_split(name, split)
  list_file = f"{split}_list.mat"
  root = _find_root(name, data_dir, (list_file,), ["stanford_dogs", "lists"],
                    os.path.join("data", "stanford_dogs"))
  base = _resolve_dir(data_dir, os.path.join("data", "stanford_dogs"))
  img_root = next((p for p in (os.path.join(root, "Images"), os.path.join(root, "images", "Images"),
                               os.path.join(root, "images"), os.path.join(root, "..", "Images"))
                   if os.path.isdir(p)), None)
  if img_root is None:
    raise _missing(name, base, "Images/")

  def read_list(path):
    mat = _loadmat(path, name, base)
    for key in ("file_list", "labels"):
      if key not in mat:
        raise DatasetError(f"{name}: {path} has no variable {key!r}")
    rels = _mat_strings(mat["file_list"])
    labels = np.asarray(mat["labels"]).ravel().astype(np.int64) - 1
    if len(rels) != len(labels):
      raise DatasetError(f"{name}: {path}: {len(rels)} files but {len(labels)} labels")
    return rels, labels

  rels, labels = read_list(os.path.join(root, list_file))
  synsets = {}  # class index -> synset folder name ("n02085620-Chihuahua")
  for other in (split, "test" if split == "train" else "train"):
    path = os.path.join(root, f"{other}_list.mat")
    if os.path.isfile(path):
      for rel, y in zip(*(read_list(path) if other != split else (rels, labels))):
        synsets.setdefault(int(y), rel.replace("\\", "/").split("/")[0])
  num = max(synsets) + 1 if synsets else 0
  names = [synsets[c].split("-", 1)[-1] if c in synsets else f"class_{c}" for c in range(num)]
  files = [os.path.join(img_root, r) for r in rels]
  return FileSource(name, split, files, labels, np.arange(len(files)), names, None,
                    skip_bad_images, root, image_dir=img_root)


def _aircraft_source(split, data_dir, skip_bad_images):
  name = "fgvc_aircraft"
  _check_split(name, split)
  fname = "images_variant_trainval.txt" if split == "train" else "images_variant_test.txt"
  root = _find_root(name, data_dir, (fname, "variants.txt", "images"),
                    ["data", "fgvc-aircraft-2013b/data", "fgvc-aircraft-2013b"],
                    os.path.join("data", "fgvc-aircraft-2013b"))
  base = _resolve_dir(data_dir, os.path.join("data", "fgvc-aircraft-2013b"))
  with open(os.path.join(root, "variants.txt"), encoding="utf-8") as f:
    names = [line.strip() for line in f if line.strip()]
  index = {v: i for i, v in enumerate(names)}
  rows = _read_rows(os.path.join(root, fname), name, base, 1)
  boxes = None
  box_path = os.path.join(root, "images_box.txt")
  if os.path.isfile(box_path):
    boxes = {r[0]: [float(v) for v in r[1:5]] for r in _read_rows(box_path, name, base)}
  files, ys, ids, bxs = [], [], [], []
  for row in rows:
    img_id, variant = row[0], row[1].strip() if len(row) > 1 else ""
    if variant not in index:
      raise DatasetError(f"{name}/{split}: image {img_id} has variant {variant!r}, which is not "
                         f"in variants.txt")
    files.append(os.path.join(root, "images", f"{img_id}.jpg"))
    ys.append(index[variant])
    ids.append(int(img_id) if img_id.isdigit() else len(ids))
    if boxes is not None:
      bxs.append(boxes.get(img_id, [0.0, 0.0, 0.0, 0.0]))
  return FileSource(name, split, files, ys, ids, names,
                    None if boxes is None else np.asarray(bxs, np.float32), skip_bad_images,
                    root, image_dir=os.path.join(root, "images"))


def _list_images(folder: str) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
               if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
  return out


def _folder_source(split, data_dir, skip_bad_images):
  name = "folder"
  _check_split(name, split, ("train", "val", "test"))
  if data_dir is None:
    raise DatasetNotFoundError(f"folder: no data_dir given. The dataset is {_ORIGIN[name]}. "
                               f"{_HOW}")
  root = _resolve_dir(data_dir, ".")
  if not os.path.isdir(root):
    raise DatasetNotFoundError(f"folder: folder {root!r} does not exist. The dataset is "
                               f"{_ORIGIN[name]}. {_HOW}")
  train_dir = os.path.join(root, "train")
  if not os.path.isdir(train_dir):
    raise _missing(name, root, "train/")
  classes = sorted(d for d in os.listdir(train_dir)
                   if os.path.isdir(os.path.join(train_dir, d)) and not d.startswith("."))
  if not classes:
    raise DatasetError(f"folder: {train_dir} has no class sub-folders")
  if split == "train":
    split_dir = train_dir
  else:
    cands = ["val"] if split == "val" else ["test", "val"]
    split_dir = next((os.path.join(root, c) for c in cands if os.path.isdir(os.path.join(root, c))),
                     None)
    if split_dir is None:
      raise _missing(name, root, "val/" if split == "val" else "test/ (or val/)")
  index = {c: i for i, c in enumerate(classes)}
  files, ys = [], []
  for c in sorted(os.listdir(split_dir)):
    cdir = os.path.join(split_dir, c)
    if not os.path.isdir(cdir) or c.startswith("."):
      continue
    if c not in index:
      raise DatasetError(f"folder: class folder {cdir} has no counterpart in {train_dir}; the "
                         f"classes are the sub-folders of train/")
    found = _list_images(cdir)
    files.extend(found)
    ys.extend([index[c]] * len(found))
  if not files:
    raise DatasetError(f"folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}")
  return FileSource(name, split, files, ys, np.arange(len(files)), classes, None,
                    skip_bad_images, root)



_FILE_DATASETS = {
    "cub": lambda split, d, skip: _birds_source("cub", split, d, skip),
    "nabirds": lambda split, d, skip: _birds_source("nabirds", split, d, skip),
    "stanford_cars": _cars_source,
    "stanford_dogs": _dogs_source,
    "fgvc_aircraft": _aircraft_source,
    "folder": _folder_source,
}

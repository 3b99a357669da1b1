"""Tiny fake datasets on disk in the real layouts (CUB, NABirds, Stanford Cars in both
annotation formats, Stanford Dogs, FGVC-Aircraft, a class-folder tree, a prepared tfds dataset),
with real JPEG / PNG files, for the data tests and any other test that needs a dataset folder.

Every `make_fake_*` returns a `FakeDataset`: `data_dir` (what to pass to `get_source`), the
class names, and per split the expected examples as (id, label, path relative to the dataset
root) in the order the source lists them. Images are small (default 50x40) and each example's
image is filled with `example_colour(uid)` (top half) so tests can tell images apart.

`write_image(path, kind, size, colour)` writes one image of a given kind - the decodable ones
in IMAGE_KINDS (RGB JPEG/PNG, grayscale, CMYK JPEG, palette PNG with and without transparency,
RGBA PNG, 16-bit PNG, EXIF-rotated JPEG) and the undecodable ones in BAD_KINDS (a truncated
JPEG, garbage bytes). `bad={index: kind}` puts such files into a fake dataset.
"""
from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import uuid
from typing import Sequence

import numpy as np
from PIL import Image

IMAGE_KINDS = ("jpeg", "png", "gray", "cmyk", "palette", "palette_alpha", "rgba", "png16",
               "exif")
BAD_KINDS = ("truncated", "garbage")
_EXT = {"png": ".png", "palette": ".png", "palette_alpha": ".png", "rgba": ".png",
        "png16": ".png"}


def extension(kind: str) -> str:
  return _EXT.get(kind, ".jpg")


def example_colour(uid: int) -> tuple[int, int, int]:
  """A distinct, JPEG-robust colour per example number."""
  rng = np.random.default_rng(1000 + int(uid))
  return tuple(int(v) for v in rng.integers(30, 226, 3))


def pattern(size=(50, 40), colour=(200, 30, 30)) -> np.ndarray:
  """(h, w, 3) uint8: top half `colour`, bottom half its complement, a white top-left block."""
  w, h = size
  arr = np.empty((h, w, 3), np.uint8)
  arr[: h // 2] = colour
  arr[h // 2:] = 255 - np.asarray(colour, np.uint8)
  arr[: max(h // 5, 1), : max(w // 5, 1)] = 255
  return arr


def write_image(path, kind: str = "jpeg", size=(50, 40), colour=(200, 30, 30)) -> str:
  """Writes an image of `kind` (IMAGE_KINDS or BAD_KINDS) showing `pattern(size, colour)`.

  What decoding must give back (RGB uint8 of `size`):
    jpeg, png, cmyk, palette, exif: the pattern (lossy for jpeg/cmyk);
    gray: the pattern's luminance; png16: luminance * 257 stored as 16 bits;
    palette_alpha, rgba: the pattern with the bottom half transparent (alpha 0) -> white.
  exif stores the pixels rotated by 90 degrees with EXIF Orientation 6 (display = pattern).
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  arr = pattern(size, colour)
  img = Image.fromarray(arr)
  w, h = size
  if kind == "jpeg":
    img.save(path, "JPEG", quality=95)
  elif kind == "png":
    img.save(path, "PNG")
  elif kind == "gray":
    img.convert("L").save(path, "JPEG", quality=95)
  elif kind == "cmyk":
    img.convert("CMYK").save(path, "JPEG", quality=95)
  elif kind == "palette":
    img.convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(path, "PNG")
  elif kind == "palette_alpha":
    p = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    parr = np.array(p)
    parr[h // 2:] = 9  # an extra palette entry, fully transparent
    p = Image.fromarray(parr, "P")
    pal = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=8).getpalette()[:24]
    p.putpalette(pal + [0, 0, 0] * 248)
    p.info["transparency"] = 9
    p.save(path, "PNG", transparency=9)
  elif kind == "rgba":
    rgba = np.concatenate([arr, np.full((h, w, 1), 255, np.uint8)], -1)
    rgba[h // 2:, :, 3] = 0
    rgba[h // 2:, :, :3] = (0, 0, 0)  # hidden colour under full transparency
    Image.fromarray(rgba, "RGBA").save(path, "PNG")
  elif kind == "png16":
    lum = np.asarray(img.convert("L"), np.uint16) * 257
    Image.fromarray(lum.astype(np.uint16)).save(path, "PNG")  # mode I;16
  elif kind == "exif":
    stored = img.transpose(Image.Transpose.ROTATE_90)  # rotate 90 CCW; orientation 6 undoes it
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, "JPEG", quality=95, exif=exif.tobytes())
  elif kind == "truncated":
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), np.uint8)).save(
        buf, "JPEG", quality=95)
    data = buf.getvalue()
    with open(path, "wb") as f:
      f.write(data[: len(data) // 2])
  elif kind == "garbage":
    with open(path, "wb") as f:
      f.write(np.random.default_rng(1).bytes(300))
  else:
    raise ValueError(f"unknown image kind {kind!r}")
  return path


def expected_pixels(kind: str, size=(50, 40), colour=(200, 30, 30)) -> np.ndarray:
  """What decoding `write_image(..., kind, size, colour)` should give (RGB uint8)."""
  arr = pattern(size, colour)
  w, h = size
  if kind in ("gray", "png16"):
    lum = np.asarray(Image.fromarray(arr).convert("L"))
    return np.repeat(lum[..., None], 3, -1)
  if kind in ("palette_alpha", "rgba"):
    arr = arr.copy()
    arr[h // 2:] = 255
  return arr


@dataclasses.dataclass
class FakeDataset:
  """A fake dataset on disk. `splits[split]` = [(id, label, relpath)] in source order."""
  name: str
  data_dir: str
  root: str
  class_names: list[str]
  splits: dict[str, list[tuple[int, int, str]]]
  boxes: dict[int, tuple[float, float, float, float]] = dataclasses.field(default_factory=dict)
  bad_ids: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  # id -> (P, 3) x, y, visible as written to parts/part_locs.txt (CUB)
  part_locs: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
  # image path relative to the dataset root -> the sentences of its description file
  # (make_fake_cub / make_fake_folder with text=...); text_dir: where CUB's text_c10/ went
  texts: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  text_dir: str | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _kind_for(i: int, image_kinds: Sequence[str], bad: dict | None) -> str:
  if bad and i in bad:
    return bad[i]
  return image_kinds[i % len(image_kinds)]


TEXT_COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "grey")
TEXT_LINES = 10  # captions per image, as in Reed et al.'s text_c10


def captions(class_index: int, tag: str) -> list[str]:
  """TEXT_LINES short captions that depend on the class (its colour) and name `tag` (so
  tests can tell which image's file a text came from)."""
  colour = TEXT_COLOURS[class_index % len(TEXT_COLOURS)]
  frames = ("this bird has a {} crown", "a small bird with a {} crown and a short beak",
            "the bird has {} wings", "this is a {} bird with a long tail",
            "a {} crown sits on its head", "the bird is mostly {}",
            "this bird has a {} breast and dark eyes", "a bird with {} feathers",
            "its belly is {}", "photo {} shows a {} bird")
  out = [f.format(colour) for f in frames[:-1]]
  return out[:TEXT_LINES - 1] + [frames[-1].format(tag, colour)]


def _write_text(path: str, lines: Sequence[str]):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def _box_for(i: int, size) -> tuple[float, float, float, float]:
  """(x, y, w, h) of a box inside an image of `size`."""
  w, h = size
  return (float(2 + i % 5), float(1 + i % 3), float(w // 2 + i % 7), float(h // 2))


# ----------------------------------------------------------------------------- CUB / NABirds

CUB_PARTS = ("back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg",
             "left wing", "nape", "right eye", "right leg", "right wing", "tail", "throat")


def _part_locs_for(i: int, size) -> np.ndarray:
  """(15, 3) x, y, visible: spread over the image, about a third not visible (0, 0, 0 as in
  CUB's file)."""
  w, h = size
  j = np.arange(len(CUB_PARTS))
  vis = ((i + j) % 3 != 0).astype(np.float32)
  x = np.round((3 + 7 * j + 5 * i) % (w - 2) + 1.0)
  y = np.round((2 + 5 * j + 3 * i) % (h - 2) + 1.0)
  return np.stack([x * vis, y * vis, vis], 1).astype(np.float32)



def make_fake_cub(root, num_classes: int = 3, per_class: int = 4, image_size=(50, 40),
                  image_kinds: Sequence[str] = ("jpeg",), bad: dict | None = None,
                  omit: Sequence[str] = (), text=False) -> FakeDataset:
  """root/CUB_200_2011/ with images.txt, image_class_labels.txt, train_test_split.txt,
  classes.txt, bounding_boxes.txt, parts/parts.txt, parts/part_locs.txt and
  images/<NNN.Class>/...; every other image of a class is a test image. `bad` = {running
  index: kind} for bad files; `omit` = files not to write (e.g. "parts/part_locs.txt").
  `text`: also write Reed et al.'s descriptions, text_c10/<NNN.Class>/<image stem>.txt with
  `captions(class, image id)`: True puts text_c10/ in CUB_200_2011/, "parent" beside it (in
  root, as cvpr2016_cub.tar.gz unpacks it), any other str is the folder to use as text_c10."""
  base = os.path.join(os.fspath(root), "CUB_200_2011")
  names = [f"Class_{c + 1}_{'ABC'[c % 3]}ird" for c in range(num_classes)]
  lines = {k: [] for k in ("images", "labels", "split", "boxes", "locs")}
  splits = {"train": [], "test": []}
  boxes, bad_ids, part_locs = {}, {"train": [], "test": []}, {}
  i = 0
  for c in range(num_classes):
    for j in range(per_class):
      img_id = i + 1
      kind = _kind_for(i, image_kinds, bad)
      rel = f"{c + 1:03d}.{names[c]}/{names[c]}_{j:04d}_{img_id}{extension(kind)}"
      write_image(os.path.join(base, "images", rel), kind, image_size, example_colour(img_id))
      train = j % 2 == 0
      lines["images"].append(f"{img_id} {rel}")
      lines["labels"].append(f"{img_id} {c + 1}")
      lines["split"].append(f"{img_id} {int(train)}")
      box = _box_for(i, image_size)
      lines["boxes"].append(f"{img_id} " + " ".join(f"{v:.1f}" for v in box))
      split = "train" if train else "test"
      splits[split].append((img_id, c, os.path.join("images", rel)))
      boxes[img_id] = box
      part_locs[img_id] = _part_locs_for(i, image_size)
      lines["locs"] += [f"{img_id} {p + 1} {x:.1f} {y:.1f} {int(v)}"
                        for p, (x, y, v) in enumerate(part_locs[img_id])]
      if kind in BAD_KINDS:
        bad_ids[split].append(img_id)
      i += 1
  files = {"images.txt": lines["images"], "image_class_labels.txt": lines["labels"],
           "train_test_split.txt": lines["split"], "bounding_boxes.txt": lines["boxes"],
           "classes.txt": [f"{c + 1} {c + 1:03d}.{n}" for c, n in enumerate(names)],
           "parts/parts.txt": [f"{p + 1} {n}" for p, n in enumerate(CUB_PARTS)],
           "parts/part_locs.txt": lines["locs"]}
  os.makedirs(os.path.join(base, "parts"), exist_ok=True)
  for fname, rows in files.items():
    if fname not in omit:
      with open(os.path.join(base, fname), "w") as f:
        f.write("\n".join(rows) + "\n")
  out = FakeDataset("cub", base, base, names, splits, boxes, bad_ids, part_locs)
  if text:
    out.text_dir = (os.path.join(base, "text_c10") if text is True else
                    os.path.join(os.fspath(root), "text_c10") if text == "parent" else
                    os.fspath(text))
    for split in splits.values():
      for img_id, c, rel in split:
        out.texts[rel] = captions(c, str(img_id))
        stem = os.path.splitext(os.path.relpath(rel, "images"))[0]
        _write_text(os.path.join(out.text_dir, stem + ".txt"), out.texts[rel])
  return out


NABIRDS_CLASS_IDS = (295, 313, 1002, 47)  # sparse ids that have images (sorted: 47, 295, ...)


def make_fake_nabirds(root, per_class: int = 3, image_size=(50, 40),
                      class_ids: Sequence[int] = NABIRDS_CLASS_IDS,
                      image_kinds: Sequence[str] = ("jpeg",)) -> FakeDataset:
  """root/nabirds/ with uuid-keyed images.txt, image_class_labels.txt, train_test_split.txt,
  bounding_boxes.txt, a classes.txt that also lists hierarchy classes without images, and
  images/<class id>/<uuid>.jpg. Contiguous labels follow the sorted class ids."""
  base = os.path.join(os.fspath(root), "nabirds")
  order = sorted(class_ids)
  label_of = {cid: order.index(cid) for cid in class_ids}
  all_classes = sorted(set(class_ids) | {0, 1, 2, 500})  # 0, 1, 2, 500: no images
  class_text = {cid: f"Bird species {cid} (Adult)" if cid in class_ids else f"Group {cid}"
                for cid in all_classes}
  rows = {k: [] for k in ("images", "labels", "split", "boxes")}
  splits = {"train": [], "test": []}
  boxes = {}
  pos = 0
  for cid in class_ids:  # deliberately not sorted
    for j in range(per_class):
      key = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"nabirds-{cid}-{j}"))
      kind = image_kinds[pos % len(image_kinds)]
      rel = f"{cid:04d}/{key.replace('-', '')}{extension(kind)}"
      write_image(os.path.join(base, "images", rel), kind, image_size, example_colour(pos))
      train = j != 1
      rows["images"].append(f"{key} {rel}")
      rows["labels"].append(f"{key} {cid}")
      rows["split"].append(f"{key} {int(train)}")
      box = _box_for(pos, image_size)
      rows["boxes"].append(f"{key} " + " ".join(str(int(v)) for v in box))
      splits["train" if train else "test"].append((pos, label_of[cid],
                                                   os.path.join("images", rel)))
      boxes[pos] = box
      pos += 1
  files = {"images.txt": rows["images"], "image_class_labels.txt": rows["labels"],
           "train_test_split.txt": rows["split"], "bounding_boxes.txt": rows["boxes"],
           "classes.txt": [f"{cid} {class_text[cid]}" for cid in all_classes]}
  for fname, lines in files.items():
    with open(os.path.join(base, fname), "w") as f:
      f.write("\n".join(lines) + "\n")
  names = [class_text[cid] for cid in order]
  return FakeDataset("nabirds", base, base, names, splits, boxes)


# ----------------------------------------------------------------------------- Stanford Cars


def _mat_struct(records: list[dict], fields: Sequence[str]) -> np.ndarray:
  """A (1, N) MATLAB struct array as scipy.io.savemat writes it."""
  arr = np.zeros((1, len(records)), dtype=[(f, "O") for f in fields])
  for i, r in enumerate(records):
    for f in fields:
      arr[0, i][f] = r[f]
  return arr


def _mat_cell_strings(strings: Sequence[str], shape) -> np.ndarray:
  cell = np.empty(shape, dtype=object)
  for i, s in enumerate(strings):
    cell.flat[i] = np.array([s])
  return cell


CAR_NAMES = ("AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012",
             "BMW M3 Coupe 2012", "Chevrolet Corvette ZR1 2012")


def make_fake_cars(root, fmt: str = "annos", num_classes: int = 3, per_class: int = 4,
                   image_size=(50, 40), test_annos_in: str = "root",
                   image_kinds: Sequence[str] = ("jpeg",)) -> FakeDataset:
  """Stanford Cars under root/ in one of its two formats.

  fmt="annos": cars_annos.mat (struct `annotations` with relative_im_path, bbox_x1, bbox_y1,
  bbox_x2, bbox_y2, class (1-based), test; cell `class_names`) + car_ims/000001.jpg ...
  fmt="devkit": devkit/cars_meta.mat (class_names), devkit/cars_train_annos.mat (bbox_*,
  class, fname), cars_test_annos_withlabels.mat (in root/ or, with test_annos_in="devkit", in
  devkit/), cars_train/00001.jpg ..., cars_test/00001.jpg ...
  Field values have the shapes and integer dtypes of the real files.
  """
  import scipy.io
  base = os.fspath(root)
  os.makedirs(base, exist_ok=True)
  names = [CAR_NAMES[c % len(CAR_NAMES)] + ("" if c < len(CAR_NAMES) else f" v{c}")
           for c in range(num_classes)]
  splits = {"train": [], "test": []}
  boxes = {}
  num = lambda v, dt=np.uint16: np.array([[v]], dtype=dt)
  class_cell = _mat_cell_strings(names, (1, num_classes))
  if fmt == "annos":
    recs = []
    i = 0
    for c in range(num_classes):
      for j in range(per_class):
        test = j % 2 == 1
        kind = image_kinds[i % len(image_kinds)]
        rel = f"car_ims/{i + 1:06d}{extension(kind)}"
        write_image(os.path.join(base, rel), kind, image_size, example_colour(i))
        x, y, w, h = _box_for(i, image_size)
        recs.append({"relative_im_path": np.array([rel]), "bbox_x1": num(int(x)),
                     "bbox_y1": num(int(y)), "bbox_x2": num(int(x + w)),
                     "bbox_y2": num(int(y + h)), "class": num(c + 1, np.uint8),
                     "test": num(int(test), np.uint8)})
        split = "test" if test else "train"
        uid = len(splits[split])
        splits[split].append((uid, c, rel))
        boxes[(split, uid)] = (int(x), int(y), int(x + w), int(y + h))
        i += 1
    fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    scipy.io.savemat(os.path.join(base, "cars_annos.mat"),
                     {"annotations": _mat_struct(recs, fields), "class_names": class_cell})
  elif fmt == "devkit":
    os.makedirs(os.path.join(base, "devkit"), exist_ok=True)
    scipy.io.savemat(os.path.join(base, "devkit", "cars_meta.mat"), {"class_names": class_cell})
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    i = 0
    recs = {"train": [], "test": []}
    for c in range(num_classes):
      for j in range(per_class):
        split = "test" if j % 2 == 1 else "train"
        k = len(recs[split])
        kind = image_kinds[i % len(image_kinds)]
        fname = f"{k + 1:05d}{extension(kind)}"
        folder = "cars_train" if split == "train" else "cars_test"
        write_image(os.path.join(base, folder, fname), kind, image_size, example_colour(i))
        x, y, w, h = _box_for(i, image_size)
        recs[split].append({"bbox_x1": num(int(x)), "bbox_y1": num(int(y)),
                            "bbox_x2": num(int(x + w)), "bbox_y2": num(int(y + h)),
                            "class": num(c + 1, np.uint8), "fname": np.array([fname])})
        splits[split].append((k, c, f"{folder}/{fname}"))
        boxes[(split, k)] = (int(x), int(y), int(x + w), int(y + h))
        i += 1
    scipy.io.savemat(os.path.join(base, "devkit", "cars_train_annos.mat"),
                     {"annotations": _mat_struct(recs["train"], fields)})
    test_dir = base if test_annos_in == "root" else os.path.join(base, "devkit")
    scipy.io.savemat(os.path.join(test_dir, "cars_test_annos_withlabels.mat"),
                     {"annotations": _mat_struct(recs["test"], fields)})
    # The unlabeled test annotations of the devkit, which must not be used.
    scipy.io.savemat(os.path.join(base, "devkit", "cars_test_annos.mat"),
                     {"annotations": _mat_struct(
                         [{k: v for k, v in r.items() if k != "class"} for r in recs["test"]],
                         [f for f in fields if f != "class"])})
  else:
    raise ValueError(f"fmt must be 'annos' or 'devkit', got {fmt!r}")
  return FakeDataset("stanford_cars", base, base, names, splits, boxes)


# ----------------------------------------------------------------------------- Stanford Dogs


DOG_SYNSETS = ("n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog",
               "n02086079-Pekinese", "n02086240-Shih-Tzu")


def make_fake_dogs(root, num_classes: int = 3, per_class: int = 4, image_size=(50, 40),
                   image_kinds: Sequence[str] = ("jpeg",)) -> FakeDataset:
  """root/ with Images/<synset>/<synset id>_<n>.jpg and train_list.mat / test_list.mat
  (file_list and annotation_list: (N, 1) cells, labels: (N, 1) doubles, 1-based)."""
  import scipy.io
  base = os.fspath(root)
  synsets = [DOG_SYNSETS[c % len(DOG_SYNSETS)] + ("" if c < len(DOG_SYNSETS) else str(c))
             for c in range(num_classes)]
  lists = {"train": [], "test": []}
  i = 0
  for c, syn in enumerate(synsets):
    for j in range(per_class):
      kind = image_kinds[i % len(image_kinds)]
      rel = f"{syn}/{syn.split('-')[0]}_{1000 + j}{extension(kind)}"
      write_image(os.path.join(base, "Images", rel), kind, image_size, example_colour(i))
      lists["test" if j % 2 else "train"].append((rel, c + 1))
      i += 1
  splits = {}
  for split, items in lists.items():
    # the real lists are sorted by class, interleave them to check that order is kept
    items = items[::2] + items[1::2]
    n = len(items)
    scipy.io.savemat(os.path.join(base, f"{split}_list.mat"), {
        "file_list": _mat_cell_strings([r for r, _ in items], (n, 1)),
        "annotation_list": _mat_cell_strings([r.rsplit(".", 1)[0] for r, _ in items], (n, 1)),
        "labels": np.array([[y] for _, y in items], np.float64)})
    splits[split] = [(k, y - 1, os.path.join("Images", r)) for k, (r, y) in enumerate(items)]
  names = [s.split("-", 1)[1] for s in synsets]
  return FakeDataset("stanford_dogs", base, base, names, splits)


# ----------------------------------------------------------------------------- FGVC-Aircraft


AIRCRAFT_VARIANTS = ("707-320", "A300B4", "F/A-18", "Cessna 172", "DHC-1", "Falcon 900")


def make_fake_aircraft(root, num_classes: int = 3, per_class: int = 4, image_size=(50, 40),
                       image_kinds: Sequence[str] = ("jpeg",)) -> FakeDataset:
  """root/fgvc-aircraft-2013b/data/ with variants.txt, images_variant_trainval.txt,
  images_variant_test.txt (lines "<7-digit id> <variant with spaces>"), images_box.txt and
  images/<id>.jpg. `data_dir` is the fgvc-aircraft-2013b folder."""
  top = os.path.join(os.fspath(root), "fgvc-aircraft-2013b")
  base = os.path.join(top, "data")
  names = [AIRCRAFT_VARIANTS[c % len(AIRCRAFT_VARIANTS)] for c in range(num_classes)]
  rows = {"train": [], "test": []}
  splits = {"train": [], "test": []}
  box_rows, boxes = [], {}
  i = 0
  for c in range(num_classes):
    for j in range(per_class):
      img_id = 1000000 + 7919 * i  # 7-digit ids, not in order of the lists
      key = f"{img_id:07d}"
      kind = "jpeg" if image_kinds[i % len(image_kinds)] not in ("jpeg", "gray", "cmyk",
                                                                 "exif") \
          else image_kinds[i % len(image_kinds)]
      write_image(os.path.join(base, "images", f"{key}.jpg"), kind, image_size,
                  example_colour(i))
      split = "test" if j % 2 else "train"
      rows[split].append(f"{key} {names[c]}")
      splits[split].append((img_id, c, os.path.join("images", f"{key}.jpg")))
      x, y, w, h = _box_for(i, image_size)
      box_rows.append(f"{key} {int(x)} {int(y)} {int(x + w)} {int(y + h)}")
      boxes[img_id] = (int(x), int(y), int(x + w), int(y + h))
      i += 1
  files = {"variants.txt": names, "images_variant_trainval.txt": rows["train"],
           "images_variant_test.txt": rows["test"], "images_box.txt": box_rows}
  for fname, lines in files.items():
    with open(os.path.join(base, fname), "w") as f:
      f.write("\n".join(lines) + "\n")
  return FakeDataset("fgvc_aircraft", top, base, names, splits, boxes)


# ----------------------------------------------------------------------------- folder


def make_fake_folder(root, classes: Sequence[str] = ("owl", "crow", "finch"),
                     per_class: int = 3, image_size=(50, 40), eval_dirs: Sequence[str] = ("val",),
                     image_kinds: Sequence[str] = ("jpeg", "png"),
                     bad: dict | None = None, text: bool = False) -> FakeDataset:
  """root/train/<class>/img_<n>.<ext> and root/<eval dir>/<class>/... for each of
  `eval_dirs` ("val", "test"). Class order: sorted train sub-folders. Also writes a
  non-image file and a hidden file that must be ignored. `text=True`: also a description
  <stem>.txt beside each image, `captions(class, relpath)`."""
  base = os.fspath(root)
  names = sorted(classes)
  splits, bad_ids, texts = {}, {}, {}
  i = 0
  for split in ("train",) + tuple(eval_dirs):
    items = []
    bad_ids[split] = []
    for c in names:
      for j in range(per_class if split == "train" else max(per_class - 1, 1)):
        kind = _kind_for(i, image_kinds, bad)
        rel = f"{split}/{c}/img_{j:03d}{extension(kind)}"
        write_image(os.path.join(base, rel), kind, image_size, example_colour(i))
        if kind in BAD_KINDS:
          bad_ids[split].append(len(items))
        items.append((len(items), names.index(c), rel))
        if text:
          texts[rel] = captions(names.index(c), rel)
          _write_text(os.path.join(base, os.path.splitext(rel)[0] + ".txt"), texts[rel])
        i += 1
      with open(os.path.join(base, split, c, "notes.txt"), "w") as f:
        f.write("not an image\n")
      with open(os.path.join(base, split, c, ".hidden.jpg"), "w") as f:
        f.write("hidden\n")
    splits[split] = items
  return FakeDataset("folder", base, base, names, splits, bad_ids=bad_ids, texts=texts)


# ----------------------------------------------------------------------------- tfds

_TFDS_BUILDERS = {}


def _tfds_builder_class(name: str):
  """A tfds GeneratorBasedBuilder whose examples are PNG-encoded images (no TensorFlow needed
  to prepare or read it)."""
  if name in _TFDS_BUILDERS:
    return _TFDS_BUILDERS[name]
  import tensorflow_datasets as tfds

  class _Builder(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    spec = {}

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=list(self.spec["class_names"]))}))

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(s) for s in ("train", "test")}

    def _generate_examples(self, split):
      for uid, label, png in self.spec["examples"][split]:
        yield uid, {"image": png, "label": label}

  _Builder.name = name
  _Builder.__name__ = "".join(p.title() for p in name.split("_"))
  _TFDS_BUILDERS[name] = _Builder
  return _Builder


def make_fake_tfds(data_dir, name: str = "fake_fg_birds", num_classes: int = 3,
                   per_class: int = 3, image_size=(50, 40)) -> FakeDataset:
  """A tfds dataset `name` prepared under data_dir in the array_record format (train: 2/3,
  test: 1/3 of each class). Ids are the record indices; splits list (index, label, "")."""
  import tensorflow_datasets as tfds
  builder_cls = _tfds_builder_class(name)
  names = [f"bird_{c}" for c in range(num_classes)]
  examples = {"train": [], "test": []}
  i = 0
  for c in range(num_classes):
    for j in range(per_class):
      buf = io.BytesIO()
      Image.fromarray(pattern(image_size, example_colour(i))).save(buf, "PNG")
      examples["test" if j % 3 == 2 else "train"].append((i, c, buf.getvalue()))
      i += 1
  builder_cls.spec = {"class_names": names, "examples": examples}
  builder = builder_cls(data_dir=os.fspath(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      verify_ssl=False))
  # tfds' array_record writer shuffles records by key: record order = the builder's order.
  splits = {}
  for split in ("train", "test"):
    ds = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    splits[split] = [(k, int(ds[k]["label"]), "") for k in range(len(ds))]
  return FakeDataset(f"tfds:{name}", os.fspath(data_dir), os.fspath(data_dir), names, splits)


def train_quick_config(module, maker, tmp_path, steps: int = 1):
  """Trains `module.get_config("runlocal")` for `steps` steps on a fake dataset made by
  `maker` (3 classes, 4 images each) in tmp_path/"w". Returns (fake dataset, final metrics)."""
  from fgjax.train import trainer
  fake = maker(tmp_path / "data", num_classes=3, per_class=4)
  cfg = module.get_config("runlocal")
  with cfg.unlocked():
    cfg.data.data_dir = fake.data_dir
    cfg.total_steps = steps
    cfg.eval_every_steps = steps
  return fake, trainer.train_and_evaluate(cfg, str(tmp_path / "w"))


def config_differences(module, other, arg=None) -> set:
  """The flattened keys whose values differ between `module.get_config(arg)` and
  `other.get_config(arg)`."""
  def flat(d, prefix=""):
    for k, v in d.items():
      if isinstance(v, dict) and v:
        yield from flat(v, f"{prefix}{k}.")
      else:
        yield f"{prefix}{k}", v
  a = dict(flat(module.get_config(arg).to_dict()))
  b = dict(flat(other.get_config(arg).to_dict()))
  return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def check_only_data_differs(base, *modules):
  """Each of `modules` runs `base`'s recipe: their configs (full and `runlocal`) differ from
  base's only in `data.*` keys."""
  for module in modules:
    for arg in (None, "runlocal"):
      diff = config_differences(module, base, arg)
      assert diff and all(k.startswith("data.") for k in diff), (module.__name__, diff)


def check_config_reads_its_layout(module, maker, tmp_path, source: str):
  """`module`'s quick config names the dataset `source`, and its train and test pipelines read
  a fake dataset made by `maker` in that layout (3 classes, 4 images each)."""
  from fgjax.train import setup
  fake = maker(tmp_path / "data", num_classes=3, per_class=4)
  cfg = module.get_config("runlocal")
  assert cfg.data.name == source
  cfg.data.data_dir = fake.data_dir
  train, _, test = setup.get_sources(cfg)
  assert train.num_classes == 3 and len(test) == len(fake.splits["test"])
  size = int(cfg.model.img_size)
  batch = next(iter(setup.make_train_iter(cfg, train)))
  assert batch["image"].shape == (cfg.batch_size, size, size, 3)
  batch = next(iter(setup.make_eval_iter(cfg, test)))
  assert batch["image"].shape[1:] == (size, size, 3)


def state_and_step(cfg, method, mesh, total_steps: int = 10, phase: int = 0):
  """(train state, step fn, optimizers) for `method` as the trainer builds them (one step per
  epoch for schedules, initialised from the example of `cfg`'s batch spec)."""
  import jax
  from fgjax.train import setup
  from fgjax.train.step import make_train_step
  example = setup.config_example(cfg)
  optimizers = setup.build_optimizers(cfg, method, setup.params_shape(method, example), 1,
                                      total_steps)
  state = setup.create_train_state(cfg, method, optimizers, mesh, jax.random.key(0), example)
  fn = make_train_step(cfg, method, optimizers, method.phases()[phase], jax.random.key(1))
  return state, fn, optimizers


def interrupted_run(cfg, workdir, monkeypatch, at_step: int):
  """Runs cfg in workdir, sends SIGTERM when the progress bar reaches `at_step`, then reruns
  the same command (which resumes) to the end."""
  import signal
  from fgjax.train import logs, trainer
  orig = logs.ProgressBar.update

  def update(self, step, info="", force=False):
    if step == at_step and not getattr(self, "_sent", False):
      self._sent = True
      os.kill(os.getpid(), signal.SIGTERM)
    return orig(self, step, info, force)

  monkeypatch.setattr(logs.ProgressBar, "update", update)
  out = trainer.train_and_evaluate(cfg, str(workdir))
  assert out == {"stopped_at": at_step}  # SIGTERM: checkpoint saved, clean return
  assert os.path.isdir(workdir / "checkpoints" / str(at_step))
  monkeypatch.setattr(logs.ProgressBar, "update", orig)
  assert signal.getsignal(signal.SIGTERM) is not None
  trainer.train_and_evaluate(cfg, str(workdir))  # resumes at at_step


# ----------------------------------------------------------------------------- run.py and configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(*args, timeout=600) -> subprocess.CompletedProcess:
  """`python run.py ARGS` in a subprocess, as a user runs it (the real device count: 1 CPU)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.pop("XLA_FLAGS", None)
  env.pop("JAX_NUM_CPU_DEVICES", None)
  return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def check_ok(proc):
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc


def set_keys(config, over: dict):
  """`config` with each dotted key of `over` ("optim.lr") set to its value."""
  for key, value in over.items():
    node = config
    *path, last = key.split(".")
    for name in path:
      node = node[name]
    node[last] = value
  return config


def randomise_batchnorm(ref, generator):
  """A torch reference's BatchNorm2d layers given non-trivial running statistics and affine
  terms drawn from `generator` (so that parity tests compare more than the identity)."""
  import torch
  with torch.no_grad():
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=generator))
        m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=generator))
        m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=generator))
        m.bias.copy_(0.1 * torch.randn(m.num_features, generator=generator))
  return ref

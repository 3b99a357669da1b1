"""Random-access dataset sources in the layouts users already have on disk.

`get_source(name, split, data_dir=None, **kw)` returns a `Source`: `len(source)`,
`source[i] -> {"image": uint8 (H, W, 3) RGB, "label": int, "id": int, ...}`, `source.class_names`,
`source.num_classes`, and `source.ids` / `source.labels` (numpy arrays, known without decoding).

Names and the files each reads (folder trees in docs/datasets.md):
  cub             CUB_200_2011/ (data_dir may be it or its parent): images.txt,
                  image_class_labels.txt, train_test_split.txt, classes.txt,
                  bounding_boxes.txt, images/.          ids: CUB image ids; "object_box"
  nabirds         nabirds/ (or its parent): the same five files with uuid keys, images/. Sparse
                  class ids that have images map to 0..554 in sorted order.
                                                        ids: position (0-based) in images.txt
  stanford_cars   cars_annos.mat (relative_im_path, class, test, bbox_*) + car_ims/, or the
                  devkit: devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat (in
                  data_dir or devkit/), devkit/cars_meta.mat, cars_train/, cars_test/
                                                        ids: index in the split; "object_box"
  stanford_dogs   train_list.mat, test_list.mat (file_list, labels 1-based), Images/
                                                        ids: index in the split
  fgvc_aircraft   fgvc-aircraft-2013b/ or its data/: images_variant_{trainval,test}.txt,
                  variants.txt, images/<id>.jpg, images_box.txt (optional)
                                                        ids: the image number; train = trainval
  folder          train/<class>/..., and val/<class>/... and/or test/<class>/... (classes: the
                  sorted train sub-folders; "test" reads test/ or else val/, "val" needs val/)
                                                        ids: index in the split
  tfds:<name>     a prepared tensorflow-datasets dataset under data_dir, read as a random-access
                  data source (image_key="image", label_key="label")   ids: index in the split
  synthetic       generated on the fly (fgjax.data.synthetic)
Splits: "train" and "test" for all; "val" too for `folder` and `synthetic`. Boxes are
(x0, y0, x1, y1) float32 pixels of the decoded image.

Text (`with_text=True`, every file dataset but tfds): each image's description file, one
sentence a line, is `<text_dir>/<image path relative to the image folder>.txt` (CUB: Reed et
al.'s `text_c10/<class folder>/<image stem>.txt`, found in or beside CUB_200_2011/ when
text_dir is None), or the `.txt` beside the image; the records then hold "text" (a list of
sentences) and `source.texts(i)` gives them (`fgjax.data.layouts.load_texts`). The synthetic
birds always have text (`text="plain"` or `"hard"`, `fgjax.data.synthetic`).

Errors: a missing or incomplete dataset folder raises `DatasetNotFoundError` (a
FileNotFoundError) naming the missing file, where the dataset comes from and the config key
(`data.data_dir`); inconsistent annotations (e.g. a label outside [0, num_classes)) raise
`DatasetError` (a ValueError) naming the example; an undecodable image raises `BadImageError`
(an OSError) naming the file when it is read. With `skip_bad_images=True`, `get_source` decodes
every image once at construction (PIL draft mode keeps that cheap for JPEGs) and drops the
undecodable and missing ones, with one warning giving their count, so the source stays a
consistent random-access source.

This module maps the names to the sources; the code of each lives in `fgjax.data.base` (`Source`,
the errors, `SubsetSource`, `split_train_val`), `fgjax.data.layouts` (the layouts on disk,
`FileSource`), `fgjax.data.tfds_source` (`TfdsSource`) and `fgjax.data.synthetic`.
"""
from __future__ import annotations

import os

from fgjax.data.base import (DatasetError, DatasetNotFoundError, Source, SubsetSource,
                             split_train_val)
from fgjax.data.layouts import _FILE_DATASETS, IMAGE_EXTENSIONS, FileSource, load_texts
from fgjax.data.synthetic import SyntheticSource
from fgjax.data.tfds_source import TfdsSource

__all__ = [  # with the names imported above, still importable from here
    "DATASETS", "DatasetError", "DatasetNotFoundError", "FileSource", "IMAGE_EXTENSIONS",
    "Source", "SubsetSource", "SyntheticSource", "TfdsSource", "get_source", "split_train_val",
]

DATASETS = tuple(_FILE_DATASETS) + ("tfds:<name>", "synthetic")


def get_source(name: str, split: str, data_dir: str | os.PathLike | None = None,
               **kw) -> Source:
  """Returns the random-access source `name` / `split` (see the module docstring).

  Keyword arguments: `skip_bad_images` (all but synthetic); `with_text`, `text_dir`,
  `allow_missing_text` (file datasets; see the module docstring); `image_key`, `label_key`
  (tfds); `num_classes`, `num_examples`, `image_size`, `seed`, `cache`, `part_scale`, `decoys`,
  `text`, `text_sentences`, `text_noise` (synthetic, which always has text and ignores the
  file datasets' text arguments).
  """
  name = str(name).strip()
  key = name.lower()
  with_text = bool(kw.pop("with_text", False))
  text_dir = kw.pop("text_dir", None)
  allow_missing_text = bool(kw.pop("allow_missing_text", False))
  if key == "synthetic":
    kw.pop("skip_bad_images", None)
    return SyntheticSource(split=split, **kw)
  if key.startswith("tfds:"):
    if with_text:
      raise ValueError(f"data.name={name!r}: text (with_text / data.text_dir) is not supported "
                       f"for tfds datasets; use the cub or folder layout with text files")
    return TfdsSource(name.split(":", 1)[1], split, data_dir, **kw)
  skip = bool(kw.pop("skip_bad_images", False))
  if kw:
    raise TypeError(f"get_source({name!r}): unexpected arguments {sorted(kw)}")
  aliases = {"cub200": "cub", "cub_200_2011": "cub", "cars": "stanford_cars",
             "dogs": "stanford_dogs", "aircraft": "fgvc_aircraft"}
  key = aliases.get(key, key)
  if key not in _FILE_DATASETS:
    raise ValueError(f"config.data.name: unknown dataset {name!r}; available: "
                     f"{', '.join(DATASETS)}")
  source = _FILE_DATASETS[key](split, data_dir, skip)
  if with_text:
    load_texts(source, text_dir, allow_missing_text)
  return source

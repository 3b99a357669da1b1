"""A prepared tensorflow-datasets dataset as a random-access `Source` (`tfds:<name>`)."""
from __future__ import annotations

import io
import logging
import os
import warnings

import numpy as np

from fgjax.data.base import DatasetNotFoundError, Source, _check_labels
from fgjax.data.images import BadImageError, read_image

log = logging.getLogger("fgjax")


class TfdsSource(Source):
  """A prepared tensorflow-datasets dataset read as a random-access data source.

  `data_dir` is the tfds data dir holding `<name>/<version>/` (prepared in the array_record
  format). `tfds:<name>` may carry a config and version (`tfds:cars196:2.1.0`). Image features
  are read undecoded and decoded here like files (RGB uint8); array features (H, W[, C]) are
  converted to RGB. Labels are read once at construction without decoding images.
  """

  def __init__(self, tfds_name: str, split: str, data_dir=None, image_key: str = "image",
               label_key: str = "label", skip_bad_images: bool = False):
    import tensorflow_datasets as tfds
    self.name, self.split = f"tfds:{tfds_name}", split
    hint = (f"Prepare it with tensorflow-datasets in the array_record format (e.g. "
            f"`tfds build {tfds_name.split(':')[0]} --data_dir=/path --file_format=array_record`) "
            f"and point config key data.data_dir at that data dir (--config.data.data_dir=/path).")
    try:
      builder = tfds.builder(tfds_name, data_dir=data_dir)
    except Exception:  # noqa: BLE001 - not registered here: read the prepared folder itself
      builder = None
      if data_dir is not None:
        path = os.path.join(os.fspath(data_dir), *tfds_name.replace(":", "/").split("/"))
        versions = sorted(d for d in (os.listdir(path) if os.path.isdir(path) else [])
                          if os.path.isfile(os.path.join(path, d, "dataset_info.json")))
        path = os.path.join(path, versions[-1]) if versions else path
        if os.path.isfile(os.path.join(path, "dataset_info.json")):
          try:
            builder = tfds.builder_from_directory(path)
          except Exception:  # noqa: BLE001
            builder = None
      if builder is None:
        raise DatasetNotFoundError(f"tfds:{tfds_name}: no prepared dataset {tfds_name!r} in "
                                   f"data_dir={data_dir!r}. {hint}") from None
    if not builder.is_prepared():
      raise DatasetNotFoundError(f"tfds:{tfds_name}: not prepared in data_dir={data_dir!r} "
                                 f"(expected {builder.data_dir}). {hint}")
    splits = list(builder.info.splits)
    if split not in splits:
      raise ValueError(f"tfds:{tfds_name}: no split {split!r}; it has {', '.join(splits)}")
    features = builder.info.features
    for key in (image_key, label_key):
      if key not in features:
        raise ValueError(f"tfds:{tfds_name}: no feature {key!r} (features: "
                         f"{', '.join(features.keys())}); set image_key / label_key")
    self.image_key, self.label_key = image_key, label_key
    self._encoded = isinstance(features[image_key], tfds.features.Image)
    try:
      decoders = {image_key: tfds.decode.SkipDecoding()} if self._encoded else None
      self._ds = builder.as_data_source(split=split, decoders=decoders)
      cheap = builder.as_data_source(split=split,
                                     decoders={image_key: tfds.decode.SkipDecoding()})
    except NotImplementedError:
      raise DatasetNotFoundError(f"tfds:{tfds_name}: not prepared in the array_record format "
                                 f"(random access needs it). {hint}") from None
    feat = features[label_key]
    names = getattr(feat, "names", None)
    num = getattr(feat, "num_classes", None)
    labels = np.array([int(cheap[i][label_key]) for i in range(len(cheap))], np.int64)
    self.class_names = list(names) if names else [str(c) for c in range(
        int(num) if num else int(labels.max()) + 1)]
    self.ids = np.arange(len(labels), dtype=np.int64)
    self.labels = labels
    self._index = np.arange(len(labels))
    _check_labels(self.name, split, labels, self.ids, self.num_classes,
                  lambda i: f"record {i}")
    if skip_bad_images:
      ok = np.array([self._decodes(i) for i in range(len(labels))], bool)
      if not ok.all():
        msg = (f"{self.name}/{split}: skipped {int((~ok).sum())} of {len(ok)} undecodable images "
               f"(skip_bad_images=True)")
        log.warning(msg)
        warnings.warn(msg, stacklevel=3)
        self._index, self.ids, self.labels = self._index[ok], self.ids[ok], self.labels[ok]

  def __getstate__(self):
    return self.__dict__

  def _decodes(self, i):
    try:
      self._image(int(i))
      return True
    except BadImageError:
      return False

  def _image(self, j, min_size=None, decoder="opencv"):
    value = self._ds[int(j)][self.image_key]
    if self._encoded:
      data = value if isinstance(value, bytes) else np.asarray(value).item()
      try:
        return read_image(io.BytesIO(data), min_size, decoder=decoder,
                          name=f"{self.name}/{self.split} record {j}")
      except FileNotFoundError:
        raise BadImageError(f"{self.name}/{self.split} record {j}: empty image") from None
    img = np.asarray(value)
    if img.ndim == 2:
      img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 2, 3, 4):
      raise BadImageError(f"{self.name}/{self.split} record {j}: image of shape {img.shape}")
    if img.dtype != np.uint8:
      hi = 65535.0 if img.dtype == np.uint16 else (1.0 if img.dtype.kind == "f" else 255.0)
      img = np.clip(np.round(img.astype(np.float64) * (255.0 / hi)), 0, 255).astype(np.uint8)
    img = img[..., :3] if img.shape[-1] >= 3 else np.repeat(img[..., :1], 3, -1)
    return np.ascontiguousarray(img)

  def get(self, i, min_size=None, decoder="opencv"):
    j = int(self._index[i])
    img = self._image(j, min_size, decoder)
    return img, {"label": int(self.labels[i]), "id": int(self.ids[i])}

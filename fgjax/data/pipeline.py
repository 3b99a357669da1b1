"""Input pipelines on grain: sharded per process, deterministic, resumable.

Train (`make_train_loader`): the example stream is a seeded shuffle of the whole training set,
reshuffled every epoch and repeated forever (grain `MapDataset.shuffle().repeat()`); the
example at stream position q gets its augmentation rng from (seed, q), which fixes (seed,
epoch, index). Global batch b is the stream positions [b*G, (b+1)*G); process p of P keeps the
positions congruent to p modulo P. So every process reads only its own examples, the
processes' batches are disjoint and together hold exactly the global batch a single process
would build, and the augmentations do not depend on the number of processes or workers. Each
grain element is a whole batch, built by writing every example straight into preallocated
batch arrays, so worker processes (`worker_count`, grain `mp_prefetch`) each build whole
batches and the output is the same for any worker count. The loader's `get_state()` /
`set_state()` (grain iterator state, a JSON-serialisable dict) resume exactly: a restored
loader yields the batches an uninterrupted one would have. With `crop_boxes` ((N, 4) normalised
x0, y0, x1, y1 per example of the source, in its order: the attention-region crops of
`fgjax.toolkit.crops`) each example is first cut to its box, then augmented as usual; a loader
with other boxes takes the state of one without (the state counts stream positions only), which
is how the trainer swaps in new crops at an epoch boundary.

Eval (`make_eval_loader`): one pass in order; the last global batch is padded (with copies of
example 0) and a boolean `mask` marks the real examples, so every example is seen exactly once
and every process yields the same number of batches (as multi-host jit requires). Process p
gets rows [p*L, (p+1)*L) of each global batch.

Batches are dicts of numpy arrays (L = global_batch_size / process count):
  image       uint8 (L, S, S, 3), RGB: normalisation happens on the device, as the first op
              of every jitted step (`fgjax.data.normalize_batch` with the loader's `normalize`
              kind), which keeps host memory and host-to-device copies 4x smaller than float32;
              with `host_normalize=True` float32 (L, S, S, 3), normalised on the host
  label, id   int32 (L,)
  object_box  float32 (L, 4) x0, y0, x1, y1 in output pixels; -1 where the dataset has none or
              the box left the crop
  part_boxes  float32 (L, P, 4), when the source has part boxes (or `max_parts` is set):
              padded to P with -1 rows
  part_locs   float32 (L, P, 3) x, y, visible in output pixels, when the source has part
              locations (CUB's `parts/part_locs.txt`): a part the crop left out, or not
              visible, is (-1, -1, 0); a flip also swaps left and right parts' rows
  phrases     int32 (L, P, W), with a text encoder (`text=`, `fgjax.text.TextEncoder`): the
              word ids of each example's noun phrases (0 = padding), from its record's "text"
              (one sentence or a list: training samples one with the example's own rng, or
              concatenates them; evaluation takes all or the first, per the encoder)
  phrase_mask bool (L, P): the real phrases (all False: no text, the missing-modality case)
  mask        bool (L,), eval only
A loader's `element_spec` gives the fields of its global batch as ShapeDtypeStructs
(`batch_spec`), and `normalize` the normalisation its images are meant for.

Decoding and transforms: `backend` "opencv" (default) or "pil" decodes the files
(`fgjax.data.images.read_image`: the same pixels) and runs the transforms
(`fgjax.data.transforms`: each op within one level of uint8 of PIL's); `draft=True` decodes
JPEGs at the smallest DCT scale whose shorter side is still >= resize_size, an image close to
the full decode's resize, not equal to it (`fgjax.data.images`).
Raw text and file names stay out of batches (text enters as `phrases` / `phrase_mask`).
`to_global_batch` assembles global `jax.Array`s with
`jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

import math
import os
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fgjax.data import transforms
from fgjax.data.base import Source

BOX_KEYS = ("object_box", "part_boxes", "part_locs")
_AUGMENT_STREAM = 0x5EED  # separates the augmentation rngs from other uses of the seed
_TEXT_STREAM = 0x7E47  # the sentence sampling of text (images keep their augmentation rngs)


def _fields(image_size: int, num_parts: int | None, host_normalize: bool = False,
            num_part_locs: int | None = None, text_shape: tuple[int, int] | None = None) -> dict:
  """{field: (per-example shape, dtype)} of a batch (see the module docstring)."""
  s = int(image_size)
  out = {"image": ((s, s, 3), np.float32 if host_normalize else np.uint8),
         "label": ((), np.int32), "id": ((), np.int32),
         "object_box": ((4,), np.float32)}
  if num_parts is not None:
    out["part_boxes"] = ((int(num_parts), 4), np.float32)
  if num_part_locs is not None:
    out["part_locs"] = ((int(num_part_locs), 3), np.float32)
  if text_shape is not None:
    p, w = (int(v) for v in text_shape)
    out["phrases"] = ((p, w), np.int32)
    out["phrase_mask"] = ((p,), np.bool_)
  return out


def batch_spec(image_size: int, num_parts: int | None = None, batch_size: int = 1,
               eval: bool = False, host_normalize: bool = False,
               num_part_locs: int | None = None,
               text_shape: tuple[int, int] | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """The fields of a global batch as ShapeDtypeStructs (a loader's `element_spec`); with
  `eval` the `mask` too; with `text_shape` (max phrases, max words) the text fields. Models
  are initialised from an example of it."""
  out = {k: jax.ShapeDtypeStruct((int(batch_size),) + shape, dtype)
         for k, (shape, dtype) in _fields(image_size, num_parts, host_normalize,
                                          num_part_locs, text_shape).items()}
  if eval:
    out["mask"] = jax.ShapeDtypeStruct((int(batch_size),), np.bool_)
  return out


def _process_shard(shard_index, shard_count):
  if shard_index is None and shard_count is None:
    return jax.process_index(), jax.process_count()
  if shard_index is None or shard_count is None:
    raise ValueError("pass both shard_index and shard_count, or neither")
  if not 0 <= int(shard_index) < int(shard_count):
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  return int(shard_index), int(shard_count)


def _box_layout(source: Source, max_parts: int | None) -> int | None:
  """Number of part-box rows in batches (None: no part_boxes key)."""
  shape = source.box_shapes.get("part_boxes")
  if max_parts is not None:
    if shape is not None and shape[0] > max_parts:
      raise ValueError(f"max_parts={max_parts} < the source's {shape[0]} part boxes")
    return int(max_parts)
  return None if shape is None else int(shape[0])


def _pad_points(p, n: int) -> np.ndarray:
  out = np.full((n, 3), -1, np.float32)
  out[:, 2] = 0.0
  if p is not None:
    p = np.asarray(p, np.float32).reshape(-1, 3)[:n]
    out[:len(p)] = p
  return out


def _pad_parts(b, n: int) -> np.ndarray:
  out = np.full((n, 4), -1, np.float32)
  if b is not None:
    b = np.asarray(b, np.float32).reshape(-1, 4)[:n]
    out[:len(b)] = b
  return out


class _BatchBuilder:
  """Builds whole per-process batches, writing each example straight into preallocated batch
  arrays (no per-example float32 copies, no stacking). A picklable callable for grain workers."""

  def __init__(self, source: Source, image_size: int, resize_size: int, resize_mode: str,
               normalize: str, num_parts: int | None, interpolation: str = "bilinear",
               backend: str = "opencv", draft: bool = True, host_normalize: bool = False,
               text=None):
    transforms.resample_filter(interpolation)  # validates the name
    self.source = source
    self.text = text  # a fgjax.text.TextEncoder, or None: no text fields
    self.image_size, self.resize_size, self.resize_mode = image_size, resize_size, resize_mode
    self.interpolation = interpolation
    self.normalizer = transforms.Normalizer(normalize)  # validates the kind
    self.host_normalize = bool(host_normalize)
    self.backend = transforms.check_backend(backend)
    self.min_size = resize_size if draft else None  # the draft decoding bound
    self.num_parts = num_parts
    locs = source.box_shapes.get("part_locs")
    self.num_part_locs = None if locs is None else int(locs[0])
    self.part_flip = getattr(source, "part_flip", None)  # row order of part_locs after a flip

  def _boxes_in(self, rec) -> dict:
    return {k: rec[k] for k in BOX_KEYS if rec.get(k) is not None}

  @property
  def text_shape(self) -> tuple[int, int] | None:
    return None if self.text is None else (self.text.max_phrases, self.text.max_words)

  def _alloc(self, n: int) -> dict:
    return {k: np.empty((n,) + shape, dtype)
            for k, (shape, dtype) in _fields(self.image_size, self.num_parts,
                                             self.host_normalize, self.num_part_locs,
                                             self.text_shape).items()}

  def spec(self, global_batch_size: int, eval: bool = False) -> dict:
    return batch_spec(self.image_size, self.num_parts, global_batch_size, eval,
                      self.host_normalize, self.num_part_locs, self.text_shape)

  def _fill_text(self, out: dict, k: int, rec: dict, rng=None):
    if self.text is not None:
      out["phrases"][k], out["phrase_mask"][k] = self.text.encode(
          rec.get("text"), rng=rng, train=rng is not None)

  def _fill(self, out: dict, k: int, rec: dict, u8: np.ndarray, boxes: dict):
    if self.host_normalize:
      self.normalizer(u8, out=out["image"][k])
    else:
      out["image"][k] = u8
    out["label"][k] = rec["label"]
    out["id"][k] = rec["id"]
    ob = boxes.get("object_box")
    out["object_box"][k] = -1.0 if ob is None else np.asarray(ob, np.float32).reshape(4)
    if self.num_parts is not None:
      out["part_boxes"][k] = _pad_parts(boxes.get("part_boxes"), self.num_parts)
    if self.num_part_locs is not None:
      out["part_locs"][k] = _pad_points(boxes.get("part_locs"), self.num_part_locs)


class TrainBatch(_BatchBuilder):
  """Batch number b -> this process's rows of global batch b, augmented and normalised.

  Global batch b holds the shuffled stream positions [b*G, (b+1)*G); this process keeps those
  congruent to `shard_index` mod `shard_count`. The example at stream position q is
  `index[q]` (a seeded per-epoch shuffle) and its augmentation rng is seeded by (seed, q), so
  the batches depend on neither the number of processes nor the number of workers.
  """

  def __init__(self, source, image_size, resize_size, resize_mode, normalize, num_parts,
               interpolation, backend, draft, host_normalize, *, index: grain.MapDataset,
               seed: int, global_batch_size: int, shard_index: int, shard_count: int,
               crop_boxes: np.ndarray | None = None, text=None, **augment):
    super().__init__(source, image_size, resize_size, resize_mode, normalize, num_parts,
                     interpolation, backend, draft, host_normalize, text)
    self.index, self.seed = index, int(seed)
    self.global_batch_size = int(global_batch_size)
    self.shard_index, self.shard_count = int(shard_index), int(shard_count)
    self.crop_boxes = crop_boxes
    self.augment = augment

  def _decode_size(self, crop_box) -> int | None:
    """The draft decoding bound for an example cut to `crop_box` first: large enough that the
    window's shorter side still reaches resize_size."""
    if self.min_size is None or crop_box is None:
      return self.min_size
    side = min(float(crop_box[2] - crop_box[0]), float(crop_box[3] - crop_box[1]))
    return int(math.ceil(self.min_size / max(side, 1e-3)))

  def __call__(self, b):
    local = self.global_batch_size // self.shard_count
    out = self._alloc(local)
    for k in range(local):
      q = int(b) * self.global_batch_size + self.shard_index + k * self.shard_count
      rng = np.random.default_rng((self.seed, _AUGMENT_STREAM, q))
      i = int(self.index[q])
      crop_box = None if self.crop_boxes is None else self.crop_boxes[i]
      img, rec = self.source.get(i, min_size=self._decode_size(crop_box),
                                 decoder=self.backend)
      u8, boxes = transforms.train_crop(img, rng, image_size=self.image_size,
                                        resize_size=self.resize_size,
                                        resize_mode=self.resize_mode,
                                        interpolation=self.interpolation,
                                        backend=self.backend,
                                        boxes=self._boxes_in(rec), part_flip=self.part_flip,
                                        crop_box=crop_box, **self.augment)
      self._fill(out, k, rec, u8, boxes)
      if self.text is not None:
        self._fill_text(out, k, rec, np.random.default_rng((self.seed, _TEXT_STREAM, q)))
    return out


class EvalBatch(_BatchBuilder):
  """A row of global positions -> one batch; positions >= len(source) are padding (mask False,
  a copy of example 0)."""

  def __call__(self, positions):
    positions = np.asarray(positions).reshape(-1)
    out = self._alloc(len(positions))
    out["mask"] = np.empty(len(positions), bool)
    for k, position in enumerate(positions):
      real = int(position) < len(self.source)
      img, rec = self.source.get(int(position) if real else 0, min_size=self.min_size,
                                 decoder=self.backend)
      u8, boxes = transforms.eval_crop(img, image_size=self.image_size,
                                       resize_size=self.resize_size,
                                       resize_mode=self.resize_mode,
                                       interpolation=self.interpolation,
                                       backend=self.backend,
                                       boxes=self._boxes_in(rec))
      self._fill(out, k, rec, u8, boxes)
      self._fill_text(out, k, rec)
      out["mask"][k] = real
    return out


class Loader:
  """Iterator over per-process batches (wraps a grain dataset iterator).

  `get_state()` returns the grain iterator state (a JSON-serialisable dict); `set_state(s)`
  on a loader built with the same arguments continues exactly from there. Call `close()` (or
  use `with`) to stop worker processes early.
  """

  def __init__(self, dataset: grain.IterDataset, num_batches: int | None = None,
               element_spec: dict | None = None, normalize: str = "imagenet"):
    self._dataset = dataset
    self._iter = iter(dataset)
    self.num_batches = num_batches
    # The fields of one global batch: {name: jax.ShapeDtypeStruct} (`batch_spec`).
    self.element_spec = element_spec
    # What the jitted steps normalise its uint8 images with (`fgjax.data.normalize_batch`).
    self.normalize = normalize

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iter)

  def __len__(self):
    if self.num_batches is None:
      raise TypeError("the train loader is infinite")
    return self.num_batches

  def get_state(self) -> dict:
    return self._iter.get_state()

  def set_state(self, state: dict | bytes | str):
    if isinstance(state, (bytes, str)):
      import json
      state = json.loads(state)
    self._iter.set_state(state)

  def close(self):
    close = getattr(self._iter, "close", None)
    if close is not None:
      close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class EvalLoader(Loader):
  """A finite loader; iterating it again (`iter(loader)`) starts a fresh pass."""

  def __init__(self, dataset, num_batches, element_spec=None, normalize="imagenet"):
    super().__init__(dataset, num_batches, element_spec, normalize)
    self._started = False

  def __iter__(self):
    if self._started:
      self.close()
      self._iter = iter(self._dataset)
    self._started = True
    return self

  def __next__(self):
    self._started = True
    return next(self._iter)


_MAX_BATCHES = 2 ** 62 // 2 ** 20  # "forever": the train stream is indexed lazily


def _finish(ds: grain.MapDataset, worker_count: int, prefetch: int,
            threads: int | None) -> grain.IterDataset:
  if threads is None:
    threads = min(4, os.cpu_count() or 1)
  prefetch = max(int(prefetch), 1)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(threads),
                                            prefetch_buffer_size=max(prefetch, int(threads))))
  if worker_count and int(worker_count) > 0:
    # grain's worker processes read absl flags; outside an absl app (a notebook, pytest) they
    # are unparsed and grain fails, so fall back to the flag defaults.
    from absl import flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(worker_count),
                                                     per_worker_buffer_size=prefetch))
  return it


def _parse_randaugment(randaugment) -> tuple[int, float]:
  """None/0/False -> (0, 9); int N -> (N, 9); "N,M" / "rand-mM-nN" / (N, M) -> (N, M)."""
  if not randaugment:
    return 0, 9.0
  if isinstance(randaugment, bool):
    return 2, 9.0
  if isinstance(randaugment, str):
    s = randaugment.strip().lower()
    if s.startswith("rand"):
      n, m = 2, 9.0
      for part in s.split("-")[1:]:
        if part.startswith("n"):
          n = int(part[1:])
        elif part.startswith("m"):
          m = float(part[1:])
      return n, m
    parts = s.split(",")
    return int(parts[0]), float(parts[1]) if len(parts) > 1 else 9.0
  if isinstance(randaugment, (tuple, list)):
    return int(randaugment[0]), float(randaugment[1]) if len(randaugment) > 1 else 9.0
  return int(randaugment), 9.0


def _check_sizes(source, global_batch_size, shard_count, image_size, resize_size, resize_mode,
                 what):
  if len(source) == 0:
    raise ValueError(f"{source!r} is empty")
  if int(global_batch_size) <= 0 or int(global_batch_size) % shard_count:
    raise ValueError(f"{what} batch size {global_batch_size} is not a positive multiple of the "
                     f"{shard_count} processes")
  if resize_mode not in ("shorter", "square"):
    raise ValueError(f"resize_mode must be 'shorter' or 'square', got {resize_mode!r}")
  if int(resize_size) < int(image_size):
    raise ValueError(f"resize_size {resize_size} < image_size {image_size}: the crop would not "
                     f"fit (config.data.resize_size)")


def _check_text(source, text):
  if text is not None and not source.has_text:
    raise ValueError(f"config.data.text.enabled: {source!r} has no text (CUB reads its "
                     f"descriptions from data.text_dir, a folder dataset a .txt beside each "
                     f"image; docs/text.md)")
  return text


def check_crop_boxes(crop_boxes, num_examples: int) -> np.ndarray:
  """`crop_boxes` as float32 (N, 4) normalised x0, y0, x1, y1, one row per example; a clear
  error for another shape or a box outside [0, 1] or empty."""
  b = np.asarray(crop_boxes, np.float32)
  if b.shape != (int(num_examples), 4):
    raise ValueError(f"crop_boxes must be ({num_examples}, 4), one normalised x0, y0, x1, y1 "
                     f"box per training example; got shape {b.shape}")
  bad = ~np.isfinite(b).all(1) | (b.min(1) < 0) | (b.max(1) > 1) | (b[:, 2] <= b[:, 0]) \
      | (b[:, 3] <= b[:, 1])
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(f"crop_boxes[{i}] = {b[i].tolist()} is not a box inside [0, 1] with "
                     f"x1 > x0 and y1 > y0 ({int(bad.sum())} such rows)")
  return b


def make_train_loader(source: Source, *, global_batch_size: int, image_size: int,
                      resize_size: int | None = None, seed: int = 0, normalize: str = "imagenet",
                      resize_mode: str = "shorter", square_resize: bool = False,
                      interpolation: str = "bilinear", flip: bool = True,
                      sharpness: float = 0.0, sharpness_p: float = 0.5,
                      randaugment: Any = None, autoaugment: Any = False,
                      color_jitter: Any = None, crop_padding: int = 0,
                      backend: str = "opencv", draft: bool = True,
                      host_normalize: bool = False,
                      max_parts: int | None = None, worker_count: int = 0, prefetch: int = 2,
                      threads: int | None = None, shard_index: int | None = None,
                      shard_count: int | None = None, crop_boxes=None, text=None) -> Loader:
  """Infinite, reshuffled, augmented per-process batches of global_batch_size / shard_count.

  Transform: resize (shorter side to `resize_size`, default image_size * 8 / 7; or the whole
  image to resize_size^2 with `resize_mode="square"` / `square_resize=True`; `interpolation`
  "bilinear" or "bicubic") -> random crop `image_size` (reaching `crop_padding` pixels past the
  image, filled black, as torchvision's RandomCrop padding) -> horizontal flip (p=0.5, `flip`) ->
  sharpness (factor `sharpness`, p = `sharpness_p`; 0 = off) -> colour jitter (`color_jitter`
  = (brightness, contrast, saturation) as torchvision's ColorJitter) -> AutoAugment ImageNet policy
  (`autoaugment=True`) -> RandAugment (`randaugment`: N ops at magnitude 9, "N,M",
  "rand-m9-n2" or (N, M)); uint8 out, normalised on the device with `normalize` ("imagenet"
  mean/std or "half": 0.5/0.5; on the host into float32 with `host_normalize=True`).
  `backend` "opencv" or "pil"; `draft` JPEG decoding at a reduced DCT scale (module docstring).
  `shard_index` / `shard_count` default to jax.process_index() / jax.process_count().
  `worker_count` > 0 builds batches in that many grain worker processes; `threads` threads per
  process (default min(4, cores)); `prefetch` batches buffered. `crop_boxes` (N, 4): each
  example is first cut to its normalised x0, y0, x1, y1 box (`transforms.crop_to_box`; the
  attention-region crops), then transformed as above. `text` (a `fgjax.text.TextEncoder`):
  batches also hold each example's `phrases` / `phrase_mask` (module docstring); the source
  must have text (`Source.has_text`).
  """
  shard_index, shard_count = _process_shard(shard_index, shard_count)
  image_size = int(image_size)
  resize_size = int(resize_size or round(image_size * 8 / 7))
  resize_mode = "square" if square_resize else resize_mode
  _check_sizes(source, global_batch_size, shard_count, image_size, resize_size, resize_mode,
               "train")
  ra_ops, ra_mag = _parse_randaugment(randaugment)
  if crop_boxes is not None:
    crop_boxes = check_crop_boxes(crop_boxes, len(source))
  _check_text(source, text)
  index = grain.MapDataset.range(len(source)).seed(int(seed)).shuffle().repeat()
  fn = TrainBatch(source, image_size, resize_size, resize_mode, normalize,
                  _box_layout(source, max_parts), interpolation, backend, bool(draft),
                  bool(host_normalize), index=index, seed=int(seed),
                  global_batch_size=int(global_batch_size), shard_index=shard_index,
                  shard_count=shard_count, crop_boxes=crop_boxes, text=text, flip=bool(flip),
                  sharpness=float(sharpness or 0.0),
                  sharpness_p=float(sharpness_p), randaugment_ops=ra_ops,
                  randaugment_magnitude=ra_mag, autoaugment=bool(autoaugment),
                  color_jitter=transforms.parse_color_jitter(color_jitter),
                  crop_padding=int(crop_padding or 0))
  ds = grain.MapDataset.range(_MAX_BATCHES).map(fn)
  return Loader(_finish(ds, worker_count, prefetch, threads),
                element_spec=fn.spec(global_batch_size), normalize=normalize)


def make_eval_loader(source: Source, *, global_batch_size: int, image_size: int,
                     resize_size: int | None = None, normalize: str = "imagenet",
                     resize_mode: str = "shorter", square_resize: bool = False,
                     interpolation: str = "bilinear", backend: str = "opencv",
                     draft: bool = True, host_normalize: bool = False,
                     max_parts: int | None = None, worker_count: int = 0, prefetch: int = 2,
                     threads: int | None = None, shard_index: int | None = None,
                     shard_count: int | None = None, text=None,
                     **unused_augment) -> EvalLoader:
  """One ordered pass of resize + centre crop (uint8; normalised on the device as for
  `make_train_loader`), padded with a `mask` (module
  docstring). Augmentation arguments (flip, sharpness, ...) are accepted and ignored, so the
  train and eval loaders can share a config. `len(loader)` is the number of batches. `text`:
  the text fields as for `make_train_loader` (all sentences or the first, per the encoder)."""
  del unused_augment
  shard_index, shard_count = _process_shard(shard_index, shard_count)
  image_size = int(image_size)
  resize_size = int(resize_size or round(image_size * 8 / 7))
  resize_mode = "square" if square_resize else resize_mode
  _check_sizes(source, global_batch_size, shard_count, image_size, resize_size, resize_mode,
               "eval")
  local = int(global_batch_size) // shard_count
  n_batches = math.ceil(len(source) / int(global_batch_size))
  positions = (np.arange(n_batches)[:, None] * int(global_batch_size) + shard_index * local
               + np.arange(local)[None, :])
  fn = EvalBatch(source, image_size, resize_size, resize_mode, normalize,
                 _box_layout(source, max_parts), interpolation, backend, bool(draft),
                 bool(host_normalize), _check_text(source, text))
  ds = grain.MapDataset.source(list(positions.reshape(n_batches, local))).map(fn)
  return EvalLoader(_finish(ds, worker_count, prefetch, threads), n_batches,
                    element_spec=fn.spec(global_batch_size, eval=True), normalize=normalize)


def to_global_batch(batch: dict, mesh: jax.sharding.Mesh | None = None,
                    partition_spec: P | None = None, *,
                    sharding: jax.sharding.Sharding | None = None) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded along the batch axis.

  Uses `sharding` if given, else NamedSharding(mesh, partition_spec); the default spec splits
  the batch over every mesh axis (P(("data",)) on the trainer's data mesh, P(("data", "fsdp"))
  with fsdp). Each process passes its own rows; the global batch is their concatenation in
  process order. Non-numeric entries (strings) are left out.
  """
  if sharding is None:
    if mesh is None:
      raise ValueError("to_global_batch needs a mesh or a sharding")
    if partition_spec is None:
      partition_spec = P(tuple(mesh.axis_names))
    sharding = NamedSharding(mesh, partition_spec)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.dtype.kind in "USO":
      continue
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out

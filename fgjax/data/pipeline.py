"""Input pipelines on grain: sharded per process, deterministic, resumable.

Train (`make_train_loader`): the example stream is a seeded shuffle of the whole training set,
reshuffled every epoch and repeated forever; each example's augmentation rng is derived from
(seed, position in that global stream). Global batch b is positions [b*G, (b+1)*G); process p of
P keeps the positions congruent to p modulo P. So every process reads only its own examples, the
processes' batches are disjoint and together form exactly the global batch a single process
would build, and augmentations do not depend on the number of processes.
The iterator's `get_state()` / `set_state()` (JSON-serialisable) resume exactly.

Eval (`make_eval_loader`): one pass in order; the last global batch is padded with copies of
example 0 and a boolean `mask` marks real examples, so every example is seen exactly once and all
processes yield the same number of batches (as multi-host jit requires).

Batches are dicts of numpy arrays: image float32 (local_batch, S, S, 3) normalised, label int32,
id int32, the source's boxes (object_box (4,), part_boxes (P, 4); -1 = none), and mask (eval).
`to_global_batch` assembles the global `jax.Array` with `jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

import math
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fgjax.data import transforms
from fgjax.data.sources import Source


def _process_shard(shard_index, shard_count):
  if shard_index is None:
    shard_index = jax.process_index()
  if shard_count is None:
    shard_count = jax.process_count()
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  return shard_index, shard_count


def _record(source: Source, rec: dict, img_f32: np.ndarray, boxes: dict) -> dict:
  out = {"image": img_f32, "label": np.int32(rec["label"]), "id": np.int32(rec["id"])}
  for key, shape in source.box_shapes.items():
    b = boxes.get(key)
    out[key] = np.full(shape, -1, np.float32) if b is None else np.asarray(b, np.float32)
  return out


class TrainExample:
  """index, rng -> augmented, normalised example (a picklable callable for grain workers)."""

  def __init__(self, source: Source, image_size: int, resize_size: int, **options):
    self.source, self.image_size, self.resize_size = source, image_size, resize_size
    self.options = options

  def __call__(self, index, rng: np.random.Generator):
    img, rec = self.source.get(int(index), min_size=self.resize_size)
    boxes = {k: rec[k] for k in self.source.box_shapes if k in rec}
    image, boxes = transforms.train_transform(img, rng, image_size=self.image_size,
                                              resize_size=self.resize_size, boxes=boxes,
                                              **self.options)
    return _record(self.source, rec, image, boxes)


class EvalExample:
  """global position -> example (position >= len(source): padding with mask False)."""

  def __init__(self, source: Source, image_size: int, resize_size: int, resize_mode: str,
               normalize: str):
    self.source, self.image_size, self.resize_size = source, image_size, resize_size
    self.resize_mode, self.normalize = resize_mode, normalize

  def __call__(self, position):
    real = position < len(self.source)
    img, rec = self.source.get(int(position) if real else 0, min_size=self.resize_size)
    boxes = {k: rec[k] for k in self.source.box_shapes if k in rec}
    image, boxes = transforms.eval_transform(img, image_size=self.image_size,
                                             resize_size=self.resize_size,
                                             resize_mode=self.resize_mode,
                                             normalize=self.normalize, boxes=boxes,
                                             return_boxes=True)
    out = _record(self.source, rec, image, boxes)
    out["mask"] = np.bool_(real)
    return out


class Loader:
  """A resumable iterator over per-process batches (wraps a grain dataset iterator)."""

  def __init__(self, dataset: grain.IterDataset, num_batches: int | None = None):
    self._dataset = dataset
    self._iter = iter(dataset)
    self.num_batches = num_batches

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

  def set_state(self, state: dict):
    self._iter.set_state(state)


def _read_options(prefetch: int, threads: int | None):
  return grain.ReadOptions(num_threads=threads if threads is not None else 8,
                           prefetch_buffer_size=max(int(prefetch), 1) * 8)


def _finish(ds: grain.MapDataset, worker_count: int, prefetch: int, threads) -> grain.IterDataset:
  it = ds.to_iter_dataset(_read_options(prefetch, threads))
  if worker_count and worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(worker_count),
                                                     per_worker_buffer_size=max(prefetch, 1)))
  return it


def make_train_loader(source: Source, *, global_batch_size: int, image_size: int,
                      resize_size: int | None = None, seed: int = 0, normalize: str = "imagenet",
                      resize_mode: str = "shorter", flip: bool = True, sharpness: float = 0.0,
                      randaugment: Any = None, autoaugment: bool = False, worker_count: int = 0,
                      prefetch: int = 2, threads: int | None = None,
                      shard_index: int | None = None, shard_count: int | None = None) -> Loader:
  """Infinite, shuffled, augmented per-process batches of `global_batch_size / shard_count`.

  `randaugment`: None/0, an int (number of ops at magnitude 9) or "N,M" / (N, M).
  """
  shard_index, shard_count = _process_shard(shard_index, shard_count)
  if global_batch_size % shard_count:
    raise ValueError(f"batch_size {global_batch_size} is not divisible by the {shard_count} "
                     f"processes")
  if len(source) == 0:
    raise ValueError(f"{source!r} is empty")
  ra_ops, ra_mag = 0, 9.0
  if randaugment:
    if isinstance(randaugment, str):
      parts = randaugment.split(",")
      ra_ops, ra_mag = int(parts[0]), float(parts[1]) if len(parts) > 1 else 9.0
    elif isinstance(randaugment, (tuple, list)):
      ra_ops, ra_mag = int(randaugment[0]), float(randaugment[1])
    else:
      ra_ops = int(randaugment)
  fn = TrainExample(source, image_size, int(resize_size or image_size), resize_mode=resize_mode,
                    flip=flip, sharpness=float(sharpness or 0.0), randaugment_ops=ra_ops,
                    randaugment_magnitude=ra_mag, autoaugment_policy=bool(autoaugment),
                    normalize_kind=normalize)
  ds = grain.MapDataset.range(len(source)).seed(int(seed)).shuffle().repeat()
  ds = ds.random_map(fn)
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  ds = ds.batch(global_batch_size // shard_count, drop_remainder=True)
  return Loader(_finish(ds, worker_count, prefetch, threads))


def make_eval_loader(source: Source, *, global_batch_size: int, image_size: int,
                     resize_size: int | None = None, normalize: str = "imagenet",
                     resize_mode: str = "shorter", worker_count: int = 0, prefetch: int = 2,
                     threads: int | None = None, shard_index: int | None = None,
                     shard_count: int | None = None, **unused) -> Loader:
  """One ordered pass; padded last batch with a `mask` (see the module docstring)."""
  shard_index, shard_count = _process_shard(shard_index, shard_count)
  if global_batch_size % shard_count:
    raise ValueError(f"eval batch size {global_batch_size} is not divisible by the "
                     f"{shard_count} processes")
  local = global_batch_size // shard_count
  n_batches = max(math.ceil(len(source) / global_batch_size), 1)
  positions = np.array([b * global_batch_size + shard_index * local + j
                        for b in range(n_batches) for j in range(local)], np.int64)
  fn = EvalExample(source, image_size, int(resize_size or image_size), resize_mode, normalize)
  ds = grain.MapDataset.source(positions).map(fn).batch(local, drop_remainder=True)
  return Loader(_finish(ds, worker_count, prefetch, threads), n_batches)


def to_global_batch(batch: dict, mesh: jax.sharding.Mesh, partition_spec=P("data")) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded over `mesh` along the batch axis."""
  sharding = NamedSharding(mesh, partition_spec)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.dtype.kind in "USO":
      continue  # strings stay on the host
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out

"""Attention-region random crops (issue 19; spec section 8) and SCDA boxes.

The second place of the CVPR 2022 FGVC9 Sorghum-100 challenge (the seed of issue 19) trained
on attention-region random crops: every few epochs the current model predicts an attention
map for every training image, the map is binarised at a threshold T, N random w x h boxes are
drawn and the one covering most attended pixels becomes that image's crop for the next epochs.
The alternative is SCDA's box (Wei et al., "Selective Convolutional Descriptor Aggregation for
Fine-Grained Image Retrieval", TIP 2017, section 3.2): the channel-sum map of the last
convolutional features, the mask of the positions above its mean, its largest connected
component (found by flood fill in the paper, which does not state the connectivity; here
8-connected: diagonal neighbours join) and that component's bounding box.

Pieces (each usable alone):
- `best_random_box(mask, box_h, box_w, num_boxes, rng)`: the best of `num_boxes` uniformly
  drawn box positions by the count of mask pixels inside, from an integral image.
- `largest_component_box(mask)`, `scda_box(feature_map)`: SCDA's box.
- `attention_maps(model, variables, inputs, kind)` (jit-able): per image a (h, w) map,
  "cam" (the class activation map of the predicted class: the classifier's weights of that
  class over the last stage's channels, Zhou et al. 2016), "mean" (the channel mean of the
  last stage's map), "rollout" (a ViT's TRS rollout score, `return_rollout=True`, averaged
  over the heads), "auto" (rollout for ViTs, cam for CNNs).
- `threshold_masks(maps, threshold, of)`: with m = map - min(map) per image, the mask
  m >= T * max(m) (`of="max"`, T in [0, 1]) or m >= T * mean(m) (`of="mean"`; T = 1: the
  positions above the map's mean, SCDA's rule).
- `Refresher(config, method, mesh)(variables, source, step)` (or `refresh(...)` once): the
  `CropTable` of a whole training source: one ordered pass of the images, each resized whole
  (no centre crop, so the map covers the whole image) to the model's input size, batched on
  every device.
- `CropPlan`: when the trainer refreshes (`config.crop`, below).

Boxes are stored normalised: (x0, y0, x1, y1) in [0, 1] of the decoded image's width and
height (`fgjax.data.transforms.crop_to_box`), so they do not depend on the image's size, on
draft JPEG decoding, or on the resolution of the map they came from. `best_random_box` itself
returns mask pixels (y0, x0, y1, x1), the end exclusive.

Config (`config.crop`, declared off in `configs/common.py:base_config`):
  enabled       False: plain random crops
  kind          "random_box" (the seed's crop) or "scda"
  start_epoch   the first refresh is at the start of this epoch (0: before the first step,
                with the initial model; 1: after one epoch of training)
  every_epochs  and then every that many epochs
  map           "auto", "cam", "mean" or "rollout" (above; for scda "auto" is "mean" on a CNN,
                SCDA's channel sum up to a factor, and "rollout" on a ViT)
  threshold, threshold_of   T and "max" | "mean" (random_box; SCDA always keeps the positions
                above the mean)
  box_size      (h, w) of the random boxes as fractions of the image's sides (or one number)
  num_boxes     N
The trainer (`fgjax.train.trainer`) refreshes at the due epoch boundaries, writes a "crops" row
into metrics.jsonl, rebuilds the train loader with the boxes (the loader's state carries over)
and saves the boxes beside every checkpoint (`Checkpointer.save(..., crops=...)`); a resumed
run crops by the boxes that belonged to its restored step.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from fgjax import data as fgdata
from fgjax.models import vit
from fgjax.train import setup, sharding

log = logging.getLogger("fgjax")

KINDS = ("random_box", "scda")
MAPS = ("auto", "cam", "mean", "rollout")
THRESHOLD_OF = ("max", "mean")
DEFAULTS = dict(enabled=False, kind="random_box", start_epoch=1, every_epochs=1, map="auto",
                threshold=0.5, threshold_of="max", box_size=(0.6, 0.6), num_boxes=32)
_BOX_STREAM = 0xC409  # separates the box positions' rngs from other uses of the seed


# ----------------------------------------------------------------------------- boxes


def _generator(rng) -> np.random.Generator:
  if isinstance(rng, np.random.Generator):
    return rng
  if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
    return np.random.default_rng(int(rng))
  raise TypeError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def _mask2d(mask) -> np.ndarray:
  m = np.asarray(mask)
  if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
    raise ValueError(f"mask must be a non-empty 2-D array, got shape {m.shape}")
  return m != 0


def integral_image(mask) -> np.ndarray:
  """(H + 1, W + 1) int64 table: [y, x] = number of nonzero mask pixels in [0, y) x [0, x)."""
  m = _mask2d(mask)
  ii = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.int64)
  np.cumsum(np.cumsum(m, 0, dtype=np.int64), 1, out=ii[1:, 1:])
  return ii


def box_counts(ii: np.ndarray, ys, xs, box_h: int, box_w: int) -> np.ndarray:
  """Mask pixels inside the boxes [y, y + box_h) x [x, x + box_w) from an integral image."""
  ys, xs = np.asarray(ys), np.asarray(xs)
  return ii[ys + box_h, xs + box_w] - ii[ys, xs + box_w] - ii[ys + box_h, xs] + ii[ys, xs]


def best_random_box(mask, box_h, box_w, num_boxes, rng) -> tuple[int, int, int, int]:
  """The box covering most mask pixels among `num_boxes` uniformly drawn positions.

  mask: 2-D, bool or 0/1 (every nonzero pixel is attended). box_h, box_w: the box's size in
  mask pixels, >= 1; a box larger than the mask along a side is clipped to that side (it then
  spans the whole side). rng: a numpy Generator or an int seed (`np.random.default_rng`); the
  top-left corners are drawn as ys = rng.integers(0, H - h + 1, n), then xs =
  rng.integers(0, W - w + 1, n). The counts come from an integral image (four look-ups per
  box). Ties go to the box drawn first. Returns (y0, x0, y1, x1) in mask pixels, the end
  exclusive: the box is mask[y0:y1, x0:x1].
  """
  m = _mask2d(mask)
  for name, v in (("box_h", box_h), ("box_w", box_w), ("num_boxes", num_boxes)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 1:
      raise ValueError(f"{name} must be an int >= 1, got {v!r}")
  gen = _generator(rng)
  h, w = m.shape
  bh, bw = min(int(box_h), h), min(int(box_w), w)
  ys = gen.integers(0, h - bh + 1, int(num_boxes))
  xs = gen.integers(0, w - bw + 1, int(num_boxes))
  k = int(np.argmax(box_counts(integral_image(m), ys, xs, bh, bw)))  # first of the maxima
  return int(ys[k]), int(xs[k]), int(ys[k]) + bh, int(xs[k]) + bw


_EIGHT = np.ones((3, 3), bool)


def largest_component_box(mask) -> tuple[int, int, int, int]:
  """(y0, x0, y1, x1), end exclusive, of the largest 8-connected component of the nonzero
  pixels (ties: the component met first in raster order); the whole mask when it is empty."""
  m = _mask2d(mask)
  labels, n = ndimage.label(m, structure=_EIGHT)
  if n == 0:
    return 0, 0, m.shape[0], m.shape[1]
  sizes = np.bincount(labels.ravel())[1:]
  ys, xs = np.nonzero(labels == int(np.argmax(sizes)) + 1)
  return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def scda_box(feature_map) -> tuple[int, int, int, int]:
  """SCDA's box of one image: the channel sum of an (h, w, C) feature map (or an (h, w) map,
  as is), the mask of the positions strictly above its mean, the bounding box (y0, x0, y1, x1)
  of that mask's largest connected component (`largest_component_box`)."""
  a = np.asarray(feature_map, np.float64)
  if a.ndim == 3:
    a = a.sum(-1)
  if a.ndim != 2:
    raise ValueError(f"scda_box needs an (h, w, C) or (h, w) map, got shape {a.shape}")
  return largest_component_box(a > a.mean())


def normalized(box, h: int, w: int) -> np.ndarray:
  """A (y0, x0, y1, x1) box in the pixels of an h x w map -> normalised (x0, y0, x1, y1)."""
  y0, x0, y1, x1 = box
  return np.array([x0 / w, y0 / h, x1 / w, y1 / h], np.float32)


# ----------------------------------------------------------------------------- maps


def resolve_map(model, kind: str) -> str:
  """`config.crop.map` for `model`: "auto" is "rollout" for a ViT, "cam" otherwise."""
  if kind not in MAPS:
    raise ValueError(f"config.crop.map must be one of {list(MAPS)}, got {kind!r}")
  is_vit = isinstance(model, vit.VisionTransformer)
  if kind == "auto":
    return "rollout" if is_vit else "cam"
  if kind == "rollout" and not is_vit:
    raise ValueError(f"config.crop.map='rollout' needs a ViT model; {type(model).__name__} "
                     f"is not one: use 'cam' or 'mean'")
  if kind in ("cam", "mean") and is_vit:
    raise ValueError(f"config.crop.map={kind!r} needs a CNN's feature map; "
                     f"{type(model).__name__} is a ViT: use 'rollout'")
  return kind


def _classifier_kernel(params: Mapping, channels: int):
  """The (channels, classes) kernel of the classifier over the last stage: a Dense named
  "head" (cnn_small, RegNet), "fc" (ResNet) or "head/fc"."""
  for path in (("head",), ("fc",), ("head", "fc")):
    node: Any = params
    for name in path:
      node = node.get(name) if isinstance(node, Mapping) else None
    kernel = node.get("kernel") if isinstance(node, Mapping) else None
    if kernel is not None and kernel.ndim == 2 and kernel.shape[0] == channels:
      return kernel
  return None


def attention_maps(model, variables, inputs, kind: str):
  """(B, h, w) float32 attention maps of `model` (eval mode) on its positional `inputs`
  (`Method.model_inputs`); `kind` as `resolve_map` returns it (module docstring)."""
  if kind == "rollout":
    _, aux = model.apply(variables, *inputs, train=False, return_rollout=True)
    scores = aux["rollout"].astype(jnp.float32).mean(1)  # (B, heads, N) -> (B, N)
    gh, gw = model.grid
    return scores.reshape(scores.shape[0], gh, gw)
  logits, aux = model.apply(variables, *inputs, train=False)
  stages = aux.get("stages") if isinstance(aux, Mapping) else None
  if not stages:
    raise ValueError(f"config.crop.map={kind!r} needs a model that returns its feature maps "
                     f"(aux['stages']); {type(model).__name__} does not")
  fmap = stages[-1].astype(jnp.float32)  # (B, h, w, C)
  if kind == "mean":
    return fmap.mean(-1)
  kernel = _classifier_kernel(variables["params"], fmap.shape[-1])
  if kernel is None:
    raise ValueError(f"config.crop.map='cam' needs a classifier Dense ('head' or 'fc') over "
                     f"the last stage's {fmap.shape[-1]} channels; {type(model).__name__} has "
                     f"none: use crop.map='mean'")
  weights = kernel.astype(jnp.float32)[:, jnp.argmax(logits, -1)]  # (C, B): the predicted
  return jnp.einsum("bhwc,cb->bhw", fmap, weights)                  # class's weights


def threshold_masks(maps, threshold: float, of: str = "max"):
  """Bool masks of (B, h, w) maps: m = map - its min per image; m >= T * max(m) or
  m >= T * mean(m) (module docstring). jnp or numpy."""
  xp = jnp if isinstance(maps, jax.Array) else np
  m = maps - maps.min(axis=(1, 2), keepdims=True)
  if of == "max":
    ref = m.max(axis=(1, 2), keepdims=True)
  elif of == "mean":
    ref = m.mean(axis=(1, 2), keepdims=True)
  else:
    raise ValueError(f"config.crop.threshold_of must be one of {list(THRESHOLD_OF)}, got {of!r}")
  return xp.asarray(m >= threshold * ref)


# ----------------------------------------------------------------------------- config, plan


def settings(config) -> dict:
  """`config.crop` with the defaults filled in and every value checked (errors name the key)."""
  given = dict(config.get("crop") or {})
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"config.crop: unknown keys {unknown}; known: {sorted(DEFAULTS)}")
  s = dict(DEFAULTS, **given)
  if s["kind"] not in KINDS:
    raise ValueError(f"config.crop.kind must be one of {list(KINDS)}, got {s['kind']!r}")
  if s["map"] not in MAPS:
    raise ValueError(f"config.crop.map must be one of {list(MAPS)}, got {s['map']!r}")
  if s["threshold_of"] not in THRESHOLD_OF:
    raise ValueError(f"config.crop.threshold_of must be one of {list(THRESHOLD_OF)}, got "
                     f"{s['threshold_of']!r}")
  for key, low in (("start_epoch", 0), ("every_epochs", 1), ("num_boxes", 1)):
    v = s[key]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
      raise ValueError(f"config.crop.{key} must be an int >= {low}, got {v!r}")
  t = s["threshold"]
  if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
    raise ValueError(f"config.crop.threshold must be a number >= 0, got {t!r}")
  size = s["box_size"]
  size = (size, size) if isinstance(size, (int, float)) else tuple(size)
  if len(size) != 2 or not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in size):
    raise ValueError(f"config.crop.box_size must be (h, w) fractions in (0, 1] of the image's "
                     f"sides (or one fraction), got {s['box_size']!r}")
  s["box_size"] = (float(size[0]), float(size[1]))
  return s


@dataclasses.dataclass(frozen=True)
class CropPlan:
  """When the crops are refreshed: at the start of epoch e (after e * steps_per_epoch steps)
  for e = start_epoch, start_epoch + every_epochs, ..., never at the run's last step."""
  start_epoch: int
  every_epochs: int
  steps_per_epoch: int
  total_steps: int

  @classmethod
  def of(cls, config, steps_per_epoch: int, total_steps: int) -> "CropPlan | None":
    """The plan of `config.crop`, None when it is off."""
    s = settings(config)
    if not s["enabled"]:
      return None
    return cls(int(s["start_epoch"]), int(s["every_epochs"]), int(steps_per_epoch),
               int(total_steps))

  def due(self, step: int) -> bool:
    """Whether the crops are refreshed after `step` steps."""
    if step >= self.total_steps or step % self.steps_per_epoch:
      return False
    e = step // self.steps_per_epoch
    return e >= self.start_epoch and (e - self.start_epoch) % self.every_epochs == 0

  def latest(self, step: int) -> int | None:
    """The step of the newest refresh at or before `step` (None: none yet)."""
    step = min(int(step), self.total_steps - 1)
    e = step // self.steps_per_epoch
    if step < 0 or e < self.start_epoch:
      return None
    return (self.start_epoch + (e - self.start_epoch) // self.every_epochs * self.every_epochs) \
        * self.steps_per_epoch


@dataclasses.dataclass
class CropTable:
  """The crops of a training source, in its order: `boxes` (N, 4) float32 normalised x0, y0,
  x1, y1 of each decoded image; `ids` (N,) the source's example ids (a saved table is used
  only for the same examples); `coverage` (N,) the share of each image's attended pixels
  inside its box; `step` the train step they were computed after."""
  boxes: np.ndarray
  ids: np.ndarray
  coverage: np.ndarray
  step: int
  seconds: float = 0.0

  def arrays(self) -> dict[str, np.ndarray]:
    """What a checkpoint stores (`Checkpointer.save(..., crops=table.arrays())`)."""
    return {"boxes": self.boxes, "ids": self.ids, "coverage": self.coverage,
            "step": np.asarray(self.step, np.int64)}

  @classmethod
  def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "CropTable":
    return cls(np.asarray(arrays["boxes"], np.float32), np.asarray(arrays["ids"]),
               np.asarray(arrays["coverage"], np.float32), int(arrays["step"]))

  def fits(self, source) -> bool:
    """Whether the table belongs to `source`'s examples (the same ids in the same order)."""
    ids = np.asarray(source.ids)
    return self.ids.shape == ids.shape and bool(np.all(self.ids == ids))

  def summary(self) -> dict[str, float]:
    """The "crops" row the trainer logs."""
    area = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
    return {"num_images": int(len(self.boxes)), "mean_coverage": float(self.coverage.mean()),
            "mean_box_area": float(area.mean()), "seconds": float(self.seconds)}


def restored(arrays: Mapping[str, np.ndarray] | None, plan: CropPlan, start: int,
             source) -> tuple["CropTable | None", bool]:
  """(table, refresh now) for a run starting at step `start` with the crop arrays saved with
  its checkpoint (None: none saved). The saved table is used when it is the one the plan had
  in use at `start`; when that table is missing (a checkpoint from before `crop.enabled`, a
  damaged file) or stale, the crops are computed again now (with a warning unless the refresh
  is due at `start` anyway)."""
  want = plan.latest(start)
  if want is None:
    return None, False
  try:
    table = CropTable.from_arrays(arrays) if arrays is not None else None
  except (KeyError, ValueError, TypeError) as e:  # not a crop table of this fgjax
    log.warning("the crop boxes saved with the checkpoint of step %d are unusable (%r)", start,
                e)
    table = None
  if table is not None and table.step == want and table.fits(source):
    return table, False
  if want != start:
    why = ("none were saved with it" if table is None else
           f"those saved are of step {table.step}" if table.step != want else
           "those saved are of other training examples")
    log.warning("the crop boxes of step %d were expected with the checkpoint of step %d, but "
                "%s: they are computed again from the restored model", want, start, why)
  return None, True


# ----------------------------------------------------------------------------- refresh


class Refresher:
  """Computes `CropTable`s for `config.crop` with one jitted map function (compiled once per
  run, not once per refresh): `Refresher(config, method, mesh)(variables, source, step)`.

  One ordered pass over `source`: each image resized whole to the model's input size S x S
  (`resize_mode="square"`, no centre crop, so the map covers the whole image) and normalised as
  in training, in batches of `config.eval_batch_size` sharded over every device of `mesh`.
  random_box: the map upsampled (bilinear) to S x S, thresholded (`threshold_masks`),
  `best_random_box` of round(box_size * S) pixels with an rng seeded by (config.seed, step, the
  example's position in the source); scda: `scda_box` of the map at its own resolution (map
  "auto" is then the channel mean for a CNN: SCDA's channel sum up to a factor, the same mask;
  the rollout for a ViT). Every process computes the whole table from the gathered maps.
  """

  def __init__(self, config, method, mesh):
    self.config, self.method, self.mesh = config, method, mesh
    self.s = s = settings(config)
    model = method.model
    kind = s["map"]
    if s["kind"] == "scda" and kind == "auto":
      kind = "rollout" if isinstance(model, vit.VisionTransformer) else "mean"
    self.map_kind = resolve_map(model, kind)
    self.size = size = int(config.model.img_size)
    self.random_box = random_box = s["kind"] == "random_box"
    normalize = setup.normalize_kind(config)
    kind = self.map_kind

    def fn(v, batch):
      inputs = method.model_inputs(fgdata.normalize_batch(batch, normalize))
      maps = attention_maps(model, v, inputs, kind)
      if random_box:
        maps = jax.image.resize(maps, (maps.shape[0], size, size), "linear")
        return {"mask": batch["mask"],
                "attended": threshold_masks(maps, float(s["threshold"]), s["threshold_of"])}
      return {"mask": batch["mask"], "map": maps}

    self.fn = jax.jit(fn, out_shardings=sharding.replicated(mesh))

  def check(self, example):
    """Traces the map on an example batch (`fgjax.train.setup.example_batch`; nothing is
    compiled or run): a model the map does not fit (no classifier for "cam") fails before
    training, naming the config key, not at the first refresh."""
    def trace():
      v = self.method.init_variables(jax.random.key(0), example)
      return attention_maps(self.method.model, v, self.method.model_inputs(example),
                            self.map_kind)
    jax.eval_shape(trace)

  def __call__(self, variables, source, step: int) -> CropTable:
    s, size, t0 = self.s, self.size, time.time()
    kw = setup.pipeline_kwargs(self.config, train=False)
    kw.update(image_size=size, resize_size=size, resize_mode="square")
    bs = int(self.config.get("eval_batch_size") or self.config.batch_size)
    n = len(source)
    boxes = np.zeros((n, 4), np.float32)
    coverage = np.zeros((n,), np.float32)
    bh = max(1, int(round(s["box_size"][0] * size)))
    bw = max(1, int(round(s["box_size"][1] * size)))
    seed = int(self.config.seed)
    with fgdata.make_eval_loader(source, global_batch_size=bs, **kw) as loader:
      for j, batch in enumerate(loader):
        out = jax.device_get(self.fn(variables, fgdata.to_global_batch(batch, self.mesh)))
        for r in np.flatnonzero(out["mask"]):
          pos = j * bs + int(r)
          if self.random_box:
            m = out["attended"][r]
            rng = np.random.default_rng((seed, _BOX_STREAM, int(step), pos))
            box = best_random_box(m, bh, bw, int(s["num_boxes"]), rng)
          else:
            m = out["map"][r]
            box = scda_box(m)
            m = m > m.mean()
          y0, x0, y1, x1 = box
          total = int(np.count_nonzero(m))
          coverage[pos] = np.count_nonzero(m[y0:y1, x0:x1]) / total if total else 1.0
          boxes[pos] = normalized(box, *m.shape)
    table = CropTable(boxes, np.asarray(source.ids).copy(), coverage, int(step),
                      time.time() - t0)
    log.info("attention-region crops (%s, %s map) after step %d: %d images in %.1f s, %.0f%% "
             "of the attended pixels inside the boxes", s["kind"], self.map_kind, step, n,
             table.seconds, 100 * float(coverage.mean()))
    return table


def refresh(config, method, variables, source, mesh, step: int) -> CropTable:
  """The `CropTable` of `source` from the model's current `variables` (eval mode), seeded by
  `step` (`Refresher`, which a caller refreshing more than once keeps)."""
  return Refresher(config, method, mesh)(variables, source, step)

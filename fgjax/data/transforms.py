"""Image transforms (per example, deterministic given an rng), uint8 in and uint8 out.

Train (`train_crop`): resize (shorter side to `resize_size`, or the whole image to a
resize_size x resize_size square with `resize_mode="square"`) -> random crop `image_size` ->
horizontal flip (p=0.5) -> random sharpness (factor `sharpness` with probability `sharpness_p`,
like torchvision's RandomAdjustSharpness) -> optional colour jitter (`color_jitter` =
(brightness, contrast, saturation): factors drawn from [max(0, 1 - j), 1 + j] and applied in a
random order, as torchvision's ColorJitter) -> optional AutoAugment (ImageNet policy) ->
optional RandAugment. Eval (`eval_crop`): resize -> centre crop. Both return uint8 crops.
Normalisation ((x / 255 - mean) / std, ImageNet ("imagenet") or 0.5 / 0.5 ("half")
statistics) happens on the device, inside the jitted steps (`normalize_batch`); `Normalizer`
is its host twin (visualisation, `train_transform` / `eval_transform`).

Two backends, one result (`backend`, `config.data.backend`):
  "opencv" (default): resize, flip, sharpness and colour jitter on OpenCV, about 3x faster
    than PIL on the host. Every op reproduces PIL's output, the reference of the FGVC code
    (torchvision transforms on PIL images), within one level of uint8: the bilinear
    upsampling (cv2.INTER_LINEAR: PIL's triangle filter at scale >= 1, with the same pixel
    centres), PIL's SMOOTH kernel with its untouched border for sharpness, the blends of
    `ImageEnhance` with PIL's truncation. Where OpenCV has no equivalent, the op runs on PIL:
    bicubic (PIL's a = -0.5 kernel; OpenCV's is -0.75), any downscaling (PIL's bilinear
    antialiases with a filter as wide as the reduction; OpenCV's does not), AutoAugment and
    RandAugment.
  "pil": every op on PIL (what fgjax did before; the reference the tests compare with).

PIL's resize and crop are fused: the crop window is mapped back to the source image and only
the image_size^2 output pixels are resampled (`Image.resize(size, box=...)`). OpenCV resizes
the whole image and slices the crop (for a CUB image 683 x 512 for 448 x 448, still 3.5x
faster than PIL's fused resample). `interpolation` is "bilinear" (default: what torchvision's
`Resize` does in the TransFG, PMG and CAL reference code) or "bicubic" (timm's and DeiT's
`build_transform`).

Boxes (x0, y0, x1, y1 in pixels) follow the same geometry (resize, crop, flip) and are clipped
to the crop; a box that falls outside (or was invalid) becomes all -1. Points (`part_locs`:
x, y, visible; CUB's part locations) follow it too: a point the crop leaves out (or that was
not visible) becomes (-1, -1, 0), and a flip also swaps the rows of left and right parts
(`part_flip`, e.g. CUB's left eye <-> right eye), so every row keeps naming the bird's own part.
RandAugment / AutoAugment geometric ops (rotate, shear, translate) do not move boxes or points.

A `crop_box` (normalised x0, y0, x1, y1 of the decoded image, `crop_to_box`; the attention-region
crops of `fgjax.toolkit.crops`) cuts the image to that window first, with its boxes and points;
the train augmentation then runs on the window as on a whole image.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from fgjax.data.images import opencv

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization(kind: str):
  """(mean, std) float32 (3,) of `kind` ("imagenet" or "half")."""
  if kind == "imagenet":
    return np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
  if kind in ("half", "0.5", "inception"):
    return np.full(3, 0.5, np.float32), np.full(3, 0.5, np.float32)
  raise ValueError(f"config.data.normalize must be 'imagenet' or 'half', got {kind!r}")


class Normalizer:
  """uint8 (..., 3) -> float32 (x / 255 - mean) / std through a (3, 256) float32 table.

  One table lookup per channel (`np.take` into the output) is exact and about twice as fast
  as the float arithmetic on a 448 x 448 crop.
  """

  def __init__(self, kind: str = "imagenet"):
    mean, std = normalization(kind)
    values = np.arange(256, dtype=np.float64)[None, :] / 255.0
    self.kind = kind
    self.table = ((values - mean[:, None]) / std[:, None]).astype(np.float32)

  def __call__(self, img_u8: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Returns the normalised float32 image, written into `out` when given."""
    img_u8 = np.asarray(img_u8, np.uint8)
    if out is None:
      out = np.empty(img_u8.shape, np.float32)
    for c in range(3):
      np.take(self.table[c], img_u8[..., c], out=out[..., c])
    return out


def normalize_image(img_u8: np.ndarray, kind: str = "imagenet") -> np.ndarray:
  """uint8 (H, W, 3) -> float32 (x / 255 - mean) / std."""
  return Normalizer(kind)(img_u8)


def normalize_images(images, kind: str = "imagenet"):
  """On the device (jnp, inside jit): uint8 (..., 3) images -> float32 (x / 255 - mean) / std,
  one multiply-add per value (no measurable cost in a DeiT-Ti train step, docs/benchmarks.md).
  Equal to `Normalizer` within float32 rounding (under 1e-6). Float images pass through unchanged (already
  normalised: a batch made by hand, an old host-normalised pipeline)."""
  import jax.numpy as jnp
  if images.dtype != jnp.uint8:
    return images
  mean, std = normalization(kind)
  scale = (1.0 / (255.0 * std.astype(np.float64))).astype(np.float32)
  bias = (-mean.astype(np.float64) / std).astype(np.float32)
  return images.astype(jnp.float32) * scale + bias


def normalize_batch(batch, kind: str = "imagenet"):
  """`batch` with its uint8 "image" normalised on the device (`normalize_images`); what every
  jitted train, eval and predict step does first, so methods, teachers and losses see the
  same float32 images as the host-normalised pipeline did."""
  if "image" not in batch:
    return batch
  out = dict(batch)
  out["image"] = normalize_images(batch["image"], kind)
  return out


BACKENDS = ("opencv", "pil")


def check_backend(backend: str) -> str:
  """Validates `config.data.backend`; "opencv" needs the cv2 module."""
  if backend not in BACKENDS:
    raise ValueError(f"config.data.backend must be one of {list(BACKENDS)}, got {backend!r}")
  if backend == "opencv" and opencv() is None:
    raise ValueError("config.data.backend='opencv' needs OpenCV: pip install "
                     "opencv-python-headless (in requirements.txt), or set "
                     "--config.data.backend=pil")
  return backend


def resized_size(w: int, h: int, resize_size: int, mode: str = "shorter") -> tuple[int, int]:
  """Size (w, h) of the resized image before cropping."""
  if mode == "square":
    return resize_size, resize_size
  if mode != "shorter":
    raise ValueError(f"config.data.resize_mode must be 'shorter' or 'square', got {mode!r}")
  s = resize_size / min(w, h)
  return max(int(round(w * s)), resize_size), max(int(round(h * s)), resize_size)


INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def resample_filter(interpolation: str):
  """PIL resampling filter of `interpolation` ("bilinear" or "bicubic")."""
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"config.data.interpolation must be one of {sorted(INTERPOLATIONS)}, got "
                     f"{interpolation!r}")
  return INTERPOLATIONS[interpolation]


def resized_crop(img: Image.Image, resize_size: int, image_size: int, offset, mode="shorter",
                 interpolation: str = "bilinear"):
  """Resize to `resize_size` then crop `image_size` at `offset` (in resized pixels), fused.

  Returns (crop, (sx, sy, ox, oy)): a source point (x, y) maps to (x * sx - ox, y * sy - oy).
  """
  resample = resample_filter(interpolation)
  w, h = img.size
  rw, rh = resized_size(w, h, resize_size, mode)
  if image_size > min(rw, rh):
    raise ValueError(f"image_size {image_size} is larger than the resized image {rw}x{rh} "
                     f"(config.data.resize_size={resize_size})")
  sx, sy = rw / w, rh / h
  ox, oy = offset
  box = (ox / sx, oy / sy, (ox + image_size) / sx, (oy + image_size) / sy)
  crop = img.resize((image_size, image_size), resample, box=box, reducing_gap=None)
  return crop, (sx, sy, ox, oy)


def transform_boxes(boxes, geom, image_size: int, flip: bool) -> np.ndarray:
  """Maps (..., 4) boxes through resize + crop (+ flip); invalid or outside boxes -> -1."""
  boxes = np.asarray(boxes, np.float32)
  if boxes.size == 0:
    return boxes.reshape(boxes.shape)
  sx, sy, ox, oy = geom
  b = boxes.reshape(-1, 4).astype(np.float32)
  valid = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]) & (b.min(1) >= 0)
  b[:, [0, 2]] = b[:, [0, 2]] * sx - ox
  b[:, [1, 3]] = b[:, [1, 3]] * sy - oy
  b = np.clip(b, 0, image_size)
  if flip:
    b[:, [0, 2]] = image_size - b[:, [2, 0]]
  valid &= (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
  b[~valid] = -1
  return b.reshape(boxes.shape)


POINT_KEYS = ("part_locs",)  # annotations that are (..., 3) points, not boxes


def transform_points(points, geom, image_size: int, flip: bool, flip_index=None) -> np.ndarray:
  """Maps (P, 3) points (x, y, visible) through resize + crop (+ flip, which also reorders the
  rows by `flip_index`, row i <- row flip_index[i]); a point outside the crop or not visible
  -> (-1, -1, 0)."""
  p = np.array(points, np.float32).reshape(-1, 3)
  sx, sy, ox, oy = geom
  x = p[:, 0] * sx - ox
  y = p[:, 1] * sy - oy
  keep = (p[:, 2] > 0) & (x >= 0) & (x < image_size) & (y >= 0) & (y < image_size)
  if flip:
    x = image_size - x
  out = np.stack([x, y, np.ones_like(x)], 1)
  out[~keep] = (-1.0, -1.0, 0.0)
  if flip and flip_index is not None:
    out = out[np.asarray(flip_index, np.int64)]
  return out


def transform_annotations(boxes: dict | None, geom, image_size: int, flip: bool,
                          part_flip=None) -> dict:
  """Every box array (`transform_boxes`) and point array (`POINT_KEYS`, `transform_points`)
  of a record through the crop's geometry."""
  out = {}
  for k, v in (boxes or {}).items():
    out[k] = transform_points(v, geom, image_size, flip, part_flip) if k in POINT_KEYS \
        else transform_boxes(v, geom, image_size, flip)
  return out


def box_pixels(box, w: int, h: int) -> tuple[int, int, int, int]:
  """A normalised (x0, y0, x1, y1) box -> its pixel window (x0, y0, x1, y1) in a w x h image:
  the start rounded down, the end up, inside the image and at least one pixel wide."""
  b = np.asarray(box, np.float64).reshape(4)
  if not np.all(np.isfinite(b)):
    raise ValueError(f"crop box {b.tolist()} is not finite")
  eps = 1e-6  # 0.5 * 40 must stay pixel 20, not 19.99...
  x0 = int(np.clip(np.floor(b[0] * w + eps), 0, w - 1))
  y0 = int(np.clip(np.floor(b[1] * h + eps), 0, h - 1))
  x1 = int(np.clip(np.ceil(b[2] * w - eps), x0 + 1, w))
  y1 = int(np.clip(np.ceil(b[3] * h - eps), y0 + 1, h))
  return x0, y0, x1, y1


def _window_annotations(boxes: dict | None, x0: int, y0: int, w: int, h: int) -> dict:
  """Boxes and points of a record in the pixels of the window at (x0, y0) of size w x h:
  boxes clipped to it (outside or invalid: -1), points outside it (-1, -1, 0)."""
  out = {}
  for k, v in (boxes or {}).items():
    if k in POINT_KEYS:
      p = np.array(v, np.float32).reshape(-1, 3)
      x, y = p[:, 0] - x0, p[:, 1] - y0
      keep = (p[:, 2] > 0) & (x >= 0) & (x < w) & (y >= 0) & (y < h)
      q = np.stack([x, y, p[:, 2]], 1)
      q[~keep] = (-1.0, -1.0, 0.0)
      out[k] = q.reshape(np.shape(v))
      continue
    b = np.array(v, np.float32)
    if b.size == 0:
      out[k] = b
      continue
    f = b.reshape(-1, 4).copy()
    valid = (f[:, 2] > f[:, 0]) & (f[:, 3] > f[:, 1]) & (f.min(1) >= 0)
    f[:, [0, 2]] = np.clip(f[:, [0, 2]] - x0, 0, w)
    f[:, [1, 3]] = np.clip(f[:, [1, 3]] - y0, 0, h)
    valid &= (f[:, 2] > f[:, 0]) & (f[:, 3] > f[:, 1])
    f[~valid] = -1
    out[k] = f.reshape(b.shape)
  return out


def crop_to_box(img, box, boxes: dict | None = None):
  """The window of `img` (a uint8 (H, W, 3) array or a PIL image) that the normalised box
  (x0, y0, x1, y1 in [0, 1] of the image's width and height; `box_pixels` rounds it outwards)
  covers, with the record's boxes and points moved into it -> (window, annotations). The
  window keeps the input's type."""
  w, h = _size_of(img)
  x0, y0, x1, y1 = box_pixels(box, w, h)
  if isinstance(img, Image.Image):
    win = img.crop((x0, y0, x1, y1))
  else:
    win = np.ascontiguousarray(np.asarray(img)[y0:y1, x0:x1])
  return win, _window_annotations(boxes, x0, y0, x1 - x0, y1 - y0)


# ----------------------------------------------------------------------------- augmentations

_FILL = (128, 128, 128)


def _shear_x(img, m, rng):
  return img.transform(img.size, Image.AFFINE, (1, m, 0, 0, 1, 0), Image.BILINEAR,
                       fillcolor=_FILL)


def _shear_y(img, m, rng):
  return img.transform(img.size, Image.AFFINE, (1, 0, 0, m, 1, 0), Image.BILINEAR,
                       fillcolor=_FILL)


def _translate_x(img, m, rng):
  return img.transform(img.size, Image.AFFINE, (1, 0, m * img.size[0], 0, 1, 0),
                       Image.BILINEAR, fillcolor=_FILL)


def _translate_y(img, m, rng):
  return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, m * img.size[1]),
                       Image.BILINEAR, fillcolor=_FILL)


def _solarize_add(img, m, rng):
  a = np.asarray(img).astype(np.int32)
  return Image.fromarray(np.where(a < 128, np.clip(a + int(m), 0, 255), a).astype(np.uint8))


# name -> (fn(img, magnitude_value, rng), magnitude range at level 10, signed)
_OPS = {
    "AutoContrast": (lambda img, m, r: ImageOps.autocontrast(img), None, False),
    "Equalize": (lambda img, m, r: ImageOps.equalize(img), None, False),
    "Invert": (lambda img, m, r: ImageOps.invert(img), None, False),
    "Rotate": (lambda img, m, r: img.rotate(m, Image.BILINEAR, fillcolor=_FILL), 30.0, True),
    "Posterize": (lambda img, m, r: ImageOps.posterize(img, max(1, int(m))), (8, 4), False),
    "Solarize": (lambda img, m, r: ImageOps.solarize(img, int(m)), (256, 0), False),
    "SolarizeAdd": (_solarize_add, 110.0, False),
    "Color": (lambda img, m, r: ImageEnhance.Color(img).enhance(1 + m), 0.9, True),
    "Contrast": (lambda img, m, r: ImageEnhance.Contrast(img).enhance(1 + m), 0.9, True),
    "Brightness": (lambda img, m, r: ImageEnhance.Brightness(img).enhance(1 + m), 0.9, True),
    "Sharpness": (lambda img, m, r: ImageEnhance.Sharpness(img).enhance(1 + m), 0.9, True),
    "ShearX": (_shear_x, 0.3, True),
    "ShearY": (_shear_y, 0.3, True),
    "TranslateX": (_translate_x, 0.45, True),
    "TranslateY": (_translate_y, 0.45, True),
}
_RANDAUGMENT_OPS = ("AutoContrast", "Equalize", "Rotate", "Posterize", "Solarize", "Color",
                    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
                    "TranslateY")

# AutoAugment ImageNet policy (Cubuk et al. 2019, appendix): (op, probability, level 0-10).
AUTOAUGMENT_IMAGENET = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, 2)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, 8), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
    (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)),
    (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
)


def _apply_op(img, name, level, rng):
  fn, rng_spec, signed = _OPS[name]
  if rng_spec is None:
    m = 0.0
  elif isinstance(rng_spec, tuple):  # interpolate from start (level 0) to end (level 10)
    m = rng_spec[0] + (rng_spec[1] - rng_spec[0]) * level / 10.0
  else:
    m = rng_spec * level / 10.0
  if signed and rng.random() < 0.5:
    m = -m
  return fn(img, m, rng)


def randaugment(img, rng, num_ops: int = 2, magnitude: float = 9.0):
  """RandAugment (Cubuk et al. 2020): `num_ops` uniformly chosen ops at `magnitude` (0-10)."""
  for _ in range(num_ops):
    img = _apply_op(img, _RANDAUGMENT_OPS[int(rng.integers(len(_RANDAUGMENT_OPS)))],
                    magnitude, rng)
  return img


def autoaugment_imagenet(img, rng, policy=AUTOAUGMENT_IMAGENET):
  """AutoAugment: one random sub-policy; each op applied with its probability."""
  for name, prob, level in policy[int(rng.integers(len(policy)))]:
    if rng.random() < prob:
      img = _apply_op(img, name, level, rng)
  return img


# ----------------------------------------------------------------------------- full transforms


def _as_pil(img):
  return Image.fromarray(np.asarray(img, np.uint8)) if isinstance(img, np.ndarray) else img


_JITTER_OPS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def parse_color_jitter(value) -> tuple[float, float, float]:
  """None/0/() -> (0, 0, 0); (brightness, contrast, saturation) or a dict with those keys."""
  if not value:
    return (0.0, 0.0, 0.0)
  if isinstance(value, dict):
    unknown = set(value) - {"brightness", "contrast", "saturation"}
    if unknown:
      raise ValueError(f"color_jitter: unknown keys {sorted(unknown)} (brightness, contrast, "
                       f"saturation; hue is not supported)")
    value = [value.get(k, 0.0) for k in ("brightness", "contrast", "saturation")]
  out = tuple(float(v) for v in value)
  if len(out) != 3 or any(v < 0 for v in out):
    raise ValueError(f"color_jitter must be (brightness, contrast, saturation) >= 0, got {value}")
  return out


def jitter_colours(img, rng: np.random.Generator, strengths):
  """torchvision's ColorJitter(brightness, contrast, saturation) on a PIL image: each factor
  uniform in [max(0, 1 - s), 1 + s], the enhancements in a random order."""
  img = _as_pil(img)
  for i in rng.permutation(3):
    s = float(strengths[i])
    if s > 0:
      img = _JITTER_OPS[i](img).enhance(float(rng.uniform(max(0.0, 1.0 - s), 1.0 + s)))
  return img


# ----------------------------------------------------------------------------- OpenCV ops

_SMOOTH = (np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float64) / 13.0).astype(np.float32)
_TRUNC = -0.5 + 2.0 ** -10  # round(v - 0.499) == floor(v): PIL's blends truncate


def blend(degenerate: np.ndarray, img: np.ndarray, factor: float) -> np.ndarray:
  """PIL's `Image.blend(degenerate, img, factor)` on uint8 arrays: trunc(d + f (x - d)),
  clipped to [0, 255] (the blend behind every `ImageEnhance` op)."""
  cv2 = opencv()
  factor = float(factor)
  if factor == 1.0:
    return img.copy()
  if factor == 0.0:
    return degenerate.copy()
  return cv2.addWeighted(img, factor, degenerate, 1.0 - factor, _TRUNC)


def adjust_sharpness(img: np.ndarray, factor: float) -> np.ndarray:
  """`ImageEnhance.Sharpness(img).enhance(factor)` on a uint8 array: a blend with PIL's SMOOTH
  filter (3x3, centre 5, rounded), whose one-pixel border is the image itself."""
  cv2 = opencv()
  img = np.ascontiguousarray(img)
  if img.shape[0] < 3 or img.shape[1] < 3:
    return img.copy()
  smooth = cv2.filter2D(img, -1, _SMOOTH, borderType=cv2.BORDER_REPLICATE)
  smooth[0], smooth[-1] = img[0], img[-1]
  smooth[:, 0], smooth[:, -1] = img[:, 0], img[:, -1]
  return blend(smooth, img, factor)


def _gray(img):
  return opencv().cvtColor(img, opencv().COLOR_RGB2GRAY)


def adjust_brightness(img, factor):
  """`ImageEnhance.Brightness`: a blend with black."""
  return blend(np.zeros_like(img), img, factor)


def adjust_contrast(img, factor):
  """`ImageEnhance.Contrast`: a blend with the mean grey level (rounded) of the image."""
  mean = int(opencv().mean(_gray(img))[0] + 0.5)
  return blend(np.full_like(img, mean), img, factor)


def adjust_saturation(img, factor):
  """`ImageEnhance.Color`: a blend with the image's grey levels."""
  return blend(opencv().cvtColor(_gray(img), opencv().COLOR_GRAY2RGB), img, factor)


_JITTER_ARRAY_OPS = (adjust_brightness, adjust_contrast, adjust_saturation)


def _jitter_array(img, rng, strengths):
  """`jitter_colours` on a uint8 array (the same rng draws, OpenCV ops)."""
  for i in rng.permutation(3):
    s = float(strengths[i])
    if s > 0:
      img = _JITTER_ARRAY_OPS[i](img, float(rng.uniform(max(0.0, 1.0 - s), 1.0 + s)))
  return img


def _size_of(img):
  return img.size if isinstance(img, Image.Image) else (img.shape[1], img.shape[0])


def _opencv_resizes(img, resized, interpolation, backend) -> bool:
  """Whether OpenCV makes this resize (bilinear upsampling on the "opencv" backend)."""
  w, h = _size_of(img)
  return backend == "opencv" and interpolation == "bilinear" and resized[0] >= w \
      and resized[1] >= h


def _opencv_resize(img, resized):
  arr = np.asarray(img, np.uint8)
  if tuple(resized) != (arr.shape[1], arr.shape[0]):
    arr = opencv().resize(arr, tuple(resized), interpolation=opencv().INTER_LINEAR)
  return arr


def _crop(img, resize_size, image_size, offset, mode, interpolation, backend):
  """Resize + crop -> (uint8 array, geom) on `backend` (module docstring: where OpenCV runs)."""
  w, h = _size_of(img)
  rw, rh = resized_size(w, h, resize_size, mode)
  ox, oy = offset
  if ox < 0 or oy < 0 or ox + image_size > rw or oy + image_size > rh:
    return _padded_crop(img, (rw, rh), image_size, offset, interpolation, backend)
  if _opencv_resizes(img, (rw, rh), interpolation, backend):
    if image_size > min(rw, rh):
      raise ValueError(f"image_size {image_size} is larger than the resized image {rw}x{rh} "
                       f"(config.data.resize_size={resize_size})")
    arr = _opencv_resize(img, (rw, rh))
    return arr[oy:oy + image_size, ox:ox + image_size], (rw / w, rh / h, ox, oy)
  crop, geom = resized_crop(_as_pil(img), resize_size, image_size, offset, mode, interpolation)
  return np.asarray(crop, np.uint8), geom


def _padded_crop(img, resized, image_size, offset, interpolation, backend):
  """A crop that reaches past the resized image (`crop_padding`): the whole image resized,
  then the crop window on a black (zero) canvas, as torchvision's RandomCrop(padding=p)."""
  w, h = _size_of(img)
  rw, rh = resized
  if _opencv_resizes(img, resized, interpolation, backend):
    arr = _opencv_resize(img, resized)
  else:
    arr = np.asarray(_as_pil(img).resize((rw, rh), resample_filter(interpolation),
                                         reducing_gap=None), np.uint8)
  ox, oy = offset
  out = np.zeros((image_size, image_size, arr.shape[2]), np.uint8)
  x0, y0 = max(ox, 0), max(oy, 0)
  x1, y1 = min(ox + image_size, rw), min(oy + image_size, rh)
  if x1 > x0 and y1 > y0:
    out[y0 - oy:y1 - oy, x0 - ox:x1 - ox] = arr[y0:y1, x0:x1]
  return out, (rw / w, rh / h, ox, oy)


def _flip(img, backend):
  if backend == "opencv":
    return opencv().flip(np.ascontiguousarray(img), 1)
  return np.ascontiguousarray(img[:, ::-1])  # PIL's FLIP_LEFT_RIGHT, exactly


def _on_pil(op, img, *args):
  """`op` (a PIL op) on a uint8 array -> uint8 array."""
  return np.asarray(op(Image.fromarray(np.ascontiguousarray(img)), *args), np.uint8)


def _sharpen(img, factor, backend):
  if backend == "opencv":
    return adjust_sharpness(img, factor)
  return _on_pil(lambda im: ImageEnhance.Sharpness(im).enhance(factor), img)


def _jitter(img, rng, strengths, backend):
  if backend == "opencv":
    return _jitter_array(np.ascontiguousarray(img), rng, strengths)
  return _on_pil(jitter_colours, img, rng, strengths)


def _auto_rand_augment(img, rng, autoaugment, ops, magnitude):
  """AutoAugment then RandAugment, on PIL in both backends."""
  def run(pil):
    if autoaugment:
      pil = autoaugment_imagenet(pil, rng)
    if ops:
      pil = randaugment(pil, rng, ops, magnitude)
    return pil
  return _on_pil(run, img)


def train_crop(img, rng: np.random.Generator, *, image_size: int, resize_size: int,
               resize_mode: str = "shorter", flip: bool = True, sharpness: float = 0.0,
               sharpness_p: float = 0.5, randaugment_ops: int = 0,
               randaugment_magnitude: float = 9.0, autoaugment: bool = False,
               boxes: dict | None = None, interpolation: str = "bilinear",
               color_jitter=(), backend: str = "opencv", crop_padding: int = 0,
               part_flip=None, crop_box=None):
  """The train augmentation (module docstring) -> (uint8 (S, S, 3) crop, transformed boxes
  and points; `part_flip`: the row order of the points after a flip). With `crop_box`
  (normalised x0, y0, x1, y1: an attention-region crop) the image is first cut to that window
  (`crop_to_box`), and everything below runs on the window.
  `img` is a uint8 (H, W, 3) array or a PIL image. The backends share this flow and differ
  only in the ops (`_crop`, `_flip`, `_sharpen`, `_jitter`), so they draw the same random
  numbers and make the same crop, flip and factors. `crop_padding` p: the crop window may
  reach p pixels past every side of the resized image, filled black (torchvision's
  RandomCrop(size, padding=p), as PMG's reference)."""
  check_backend(backend)
  if crop_box is not None:
    img, boxes = crop_to_box(img, crop_box, boxes)
  w, h = _size_of(img)
  rw, rh = resized_size(w, h, resize_size, resize_mode)
  pad = int(crop_padding)
  if pad < 0:
    raise ValueError(f"config.data.augment.crop_padding must be >= 0, got {crop_padding}")
  ox = int(rng.integers(-pad, rw - image_size + pad + 1))
  oy = int(rng.integers(-pad, rh - image_size + pad + 1))
  crop, geom = _crop(img, resize_size, image_size, (ox, oy), resize_mode, interpolation,
                     backend)
  do_flip = bool(flip) and rng.random() < 0.5
  if do_flip:
    crop = _flip(crop, backend)
  if sharpness and rng.random() < sharpness_p:
    crop = _sharpen(crop, float(sharpness), backend)
  if any(color_jitter):
    crop = _jitter(crop, rng, color_jitter, backend)
  if autoaugment or randaugment_ops:
    crop = _auto_rand_augment(crop, rng, autoaugment, randaugment_ops, randaugment_magnitude)
  return crop, transform_annotations(boxes, geom, image_size, do_flip, part_flip)


def eval_crop(img, *, image_size: int, resize_size: int, resize_mode: str = "shorter",
              boxes: dict | None = None, interpolation: str = "bilinear",
              backend: str = "opencv"):
  """Resize + centre crop -> (uint8 (S, S, 3) crop, transformed boxes)."""
  check_backend(backend)
  w, h = _size_of(img)
  rw, rh = resized_size(w, h, resize_size, resize_mode)
  crop, geom = _crop(img, resize_size, image_size,
                     ((rw - image_size) // 2, (rh - image_size) // 2), resize_mode,
                     interpolation, backend)
  return np.ascontiguousarray(crop), transform_annotations(boxes, geom, image_size, False)


def train_transform(img, rng: np.random.Generator, *, image_size: int, resize_size: int,
                    normalize: str = "imagenet", boxes: dict | None = None, **augment):
  """`train_crop` + host normalisation -> (float32 (S, S, 3) image, transformed boxes)."""
  u8, out_boxes = train_crop(img, rng, image_size=image_size, resize_size=resize_size,
                             boxes=boxes, **augment)
  return Normalizer(normalize)(u8), out_boxes


def eval_transform(img, *, image_size: int, resize_size: int, resize_mode: str = "shorter",
                   normalize: str = "imagenet", boxes: dict | None = None,
                   return_boxes: bool = False, interpolation: str = "bilinear",
                   backend: str = "opencv"):
  """Resize + centre crop + host normalisation. `img` may be a PIL image or a uint8 array."""
  u8, out_boxes = eval_crop(img, image_size=image_size, resize_size=resize_size,
                            resize_mode=resize_mode, boxes=boxes, interpolation=interpolation,
                            backend=backend)
  out = Normalizer(normalize)(u8)
  return (out, out_boxes) if return_boxes else out

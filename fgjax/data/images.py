"""Image decoding: every decodable file becomes an RGB uint8 image.

- EXIF orientation is applied (`ImageOps.exif_transpose`), so the pixels are as viewers show them.
- Grayscale (L, 1), CMYK (Adobe's inverted CMYK JPEGs included), YCbCr -> RGB by PIL's
  conversions.
- Palette (P) images with transparency, RGBA, LA and PA: *composited on a white background*
  (transparent pixels become white, as a browser on a white page shows them; semi-transparent
  ones are blended). Palette images without transparency are converted directly.
- 16-bit grayscale (I;16*, and I holding 16-bit data): scaled by 255/65535 with rounding (65535
  -> 255; no clipping of the upper range). 32-bit float (F): [0, 1] data is scaled by 255,
  other ranges are min-max scaled. (PIL already reduces 16-bit RGB PNGs to 8 bits per channel.)
- An undecodable or truncated file raises `BadImageError` (an OSError) whose message names the
  file. (This relies on PIL's default `ImageFile.LOAD_TRUNCATED_IMAGES = False`.)

`min_size` lets JPEG decoding work at a reduced DCT scale (1/2, 1/4 or 1/8: libjpeg's scaled
IDCT, through PIL's `Image.draft` or OpenCV's `IMREAD_REDUCED_*`) when the image is at least twice
as large as needed: the smallest scale whose shorter side stays >= min_size. A 3000 x 2000 photo
for a 960-pixel crop decodes at 1500 x 1000, which doubles the train loader's rate
(docs/benchmarks.md).

Two decoders, one result. `read_image` (what the sources and `load_image` use) decodes RGB and
grayscale JPEGs with OpenCV (libjpeg-turbo, the same library and settings as PIL's: the pixels
are identical, tested) and every other file with PIL as above; `open_image` always uses PIL and
returns a PIL image. The OpenCV path reads the header (mode, size, EXIF or XMP orientation)
with PIL, which decodes nothing, and applies the orientation itself. A JPEG that does not end
in its EOI marker (a truncated file, which libjpeg may fill with grey rows; also a file with
data appended after the image) goes to PIL, which raises `BadImageError` for a truncated one.
Once per process a small JPEG is decoded both ways; an OpenCV that disagrees with PIL leaves
every file to PIL. One difference remains: for a JPEG with corrupt entropy data (that PIL and
OpenCV decode to the same pixels), libjpeg in OpenCV prints a "Corrupt JPEG data" line to
stderr, where PIL is silent.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

Image.MAX_IMAGE_PIXELS = 20000 * 20000
# PIL's EXIF/ICC chatter ("Possibly corrupt EXIF data", ...); errors still raise. A module-level
# filter, not `warnings.catch_warnings()`, which is not thread-safe (sources decode in threads).
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")


class BadImageError(OSError):
  """A file that is not a decodable image (the message names it)."""


def _to_rgb(im: Image.Image) -> Image.Image:
  mode = im.mode
  if mode == "RGB":
    return im
  if mode == "P":
    has_alpha = "transparency" in im.info or (im.palette is not None and
                                               im.palette.mode == "RGBA")
    im = im.convert("RGBA" if has_alpha else "RGB")
    mode = im.mode
    if mode == "RGB":
      return im
  if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  if mode.startswith("I;16") or mode == "I":
    arr = np.asarray(im).astype(np.float64)
    hi = 65535.0 if (mode.startswith("I;16") or arr.max(initial=0) <= 65535) else \
        float(arr.max())
    arr = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L").convert("RGB")
  if mode == "F":
    arr = np.asarray(im, dtype=np.float64)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if lo >= 0.0 and hi <= 1.0:
      arr = arr * 255.0
    else:
      arr = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.round(np.nan_to_num(arr)), 0, 255).astype(np.uint8),
                           "L").convert("RGB")
  return im.convert("RGB")


def open_image(path, min_size: int | None = None, return_scale: bool = False,
               name: str | None = None):
  """Decodes `path` (a path or a binary file object) to an RGB PIL image (see the module
  docstring). `name` is how errors refer to it (default: the path).

  With `return_scale`, returns (image, scale), scale = decoded size / stored size (< 1 when
  draft mode decoded a reduced image), for mapping annotation boxes.
  """
  data, label = _read(path, name)
  return _decode(io.BytesIO(data), label, min_size, return_scale)


def _read(path, name):
  """(the bytes of `path` (a path or a binary file object), the name errors use for it)."""
  if isinstance(path, (str, os.PathLike)):
    path = os.fspath(path)
    with open(path, "rb") as f:
      return f.read(), name or path
  return path.read(), name or getattr(path, "name", "<image bytes>")


def _decode(fileobj, label, min_size, return_scale):
  try:
    with Image.open(fileobj) as im:
      full_w, full_h = im.size
      if im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
        factor = draft_factor(im.size, min_size)
        if factor > 1:  # PIL picks `factor` for this request (w // (w // f) is in [f, 2f))
          im.draft(im.mode, (full_w // factor, full_h // factor))
      im.load()
      scale = im.size[0] / full_w
      out = _to_rgb(ImageOps.exif_transpose(im))
      if out is im:
        out = im.copy()
    if out.size[0] == 0 or out.size[1] == 0:
      raise ValueError("empty image")
    return (out, scale) if return_scale else out
  except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, EOFError,
          ZeroDivisionError, Image.DecompressionBombError) as e:
    raise BadImageError(f"cannot decode image {label}: {e}") from None


def load_image(path, min_size: int | None = None) -> np.ndarray:
  """Decodes `path` to an (H, W, 3) uint8 RGB array (`read_image`)."""
  return read_image(path, min_size)


def draft_factor(size, min_size: int | None) -> int:
  """The DCT reduction (1, 2, 4 or 8) a JPEG of `size` (w, h) decodes at for `min_size`: the
  largest power of two that keeps the shorter side >= min_size (PIL's `draft` rule)."""
  if not min_size:
    return 1
  w, h = size
  scale = min(w, h) / float(min_size)
  if scale < 2:
    return 1
  want = (int(np.ceil(w / scale)), int(np.ceil(h / scale)))
  ratio = min(w // want[0], h // want[1])
  return next(s for s in (8, 4, 2, 1) if ratio >= s)


_cv2 = None
_cv2_decodes = None


def opencv():
  """The cv2 module (imported once; its own thread pool off, since the loaders parallelise
  over examples), or None where OpenCV is not installed."""
  global _cv2
  if _cv2 is None:
    try:
      import cv2
    except ImportError:
      _cv2 = False
    else:
      cv2.setNumThreads(1)
      _cv2 = cv2
  return _cv2 or None


def _opencv_decodes_as_pil() -> bool:
  """Whether this OpenCV decodes JPEGs to PIL's pixels (checked once per process on a small
  image, at full and half scale; an OpenCV that differs, e.g. in its channel order, leaves
  every JPEG to PIL)."""
  global _cv2_decodes
  if _cv2_decodes is None:
    _cv2_decodes = False
    if opencv() is not None:
      y, x = np.mgrid[0:24, 0:40]
      arr = np.stack([x * 6, y * 10, (x * y) % 256], -1).astype(np.uint8)
      buf = io.BytesIO()
      Image.fromarray(arr).save(buf, "JPEG", quality=90)
      data = buf.getvalue()
      try:
        _cv2_decodes = all(_check_factor(data, f) for f in (1, 2))
      except Exception:  # noqa: BLE001 - any failure means: do not use it
        _cv2_decodes = False
      if not _cv2_decodes:
        warnings.warn(f"OpenCV {_cv2.__version__} does not decode JPEGs as PIL does here; "
                      f"fgjax decodes them with PIL (slower)", stacklevel=2)
  return _cv2_decodes


def _check_factor(data, factor):
  got = _cv2_imdecode(data, factor)
  with Image.open(io.BytesIO(data)) as im:
    if factor > 1:
      im.draft("RGB", (im.size[0] // factor, im.size[1] // factor))
    want = np.asarray(im.convert("RGB"))
  return got is not None and got.shape == want.shape and np.array_equal(got, want)


def _cv2_imdecode(data: bytes, factor: int):
  cv2 = _cv2
  reduced = {1: 0, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}[factor] & ~cv2.IMREAD_COLOR
  return cv2.imdecode(np.frombuffer(data, np.uint8),
                      reduced | cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)


# EXIF orientation -> the array transform `ImageOps.exif_transpose` applies.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def _cv2_jpeg(data: bytes, min_size, draft: bool):
  """(RGB uint8 array, scale) of an RGB/grayscale JPEG (or an MPO camera file's first frame)
  through OpenCV, or None when the file is something else (PIL then decodes it)."""
  if (not data.startswith(b"\xff\xd8\xff") or not data.rstrip(b"\x00").endswith(b"\xff\xd9")
      or not _opencv_decodes_as_pil()):
    return None
  try:
    with Image.open(io.BytesIO(data)) as im:
      if im.format not in ("JPEG", "MPO") or im.mode not in ("RGB", "L"):
        return None
      size = im.size
      orientation = im.getexif().get(0x0112, 1)  # EXIF, or XMP's tiff:Orientation
  except Exception:  # noqa: BLE001 - PIL decides what is an error (it raises BadImageError)
    return None
  factor = draft_factor(size, min_size) if draft else 1
  arr = _cv2_imdecode(data, factor)
  want = (-(-size[1] // factor), -(-size[0] // factor))
  if arr is None or arr.shape != want + (3,):
    return None
  scale = arr.shape[1] / size[0]
  if orientation in _ORIENT:
    arr = np.ascontiguousarray(_ORIENT[orientation](arr))
  return arr, scale


def read_image(path, min_size: int | None = None, return_scale: bool = False,
               name: str | None = None, draft: bool = True, decoder: str = "opencv"):
  """Decodes `path` (a path or a binary file object) to an (H, W, 3) uint8 RGB array: with
  `decoder="opencv"`, OpenCV for RGB and grayscale JPEGs and PIL for the rest; with "pil",
  PIL for all (module docstring). `name` is how errors refer to it. `draft=False` decodes
  JPEGs at full size whatever `min_size`. With `return_scale`, returns (array, scale), scale =
  decoded size / stored size."""
  data, label = _read(path, name)
  fast = _cv2_jpeg(data, min_size, draft) if decoder == "opencv" else None
  if fast is None:
    img, scale = _decode(io.BytesIO(data), label, min_size if draft else None, True)
    fast = np.asarray(img, dtype=np.uint8), scale
  return fast if return_scale else fast[0]

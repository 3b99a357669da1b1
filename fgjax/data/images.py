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

`min_size` lets JPEG decoding use PIL's draft mode (DCT scaling by 1/2, 1/4, 1/8) when the image
is at least twice as large as needed; the decoded image's shorter side stays >= min_size.
"""
from __future__ import annotations

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
  if isinstance(path, (str, os.PathLike)):
    path = os.fspath(path)
    label = name or path
    with open(path, "rb") as f:  # closed on every path out, errors included
      return _decode(f, label, min_size, return_scale)
  label = name or getattr(path, "name", "<image bytes>")
  return _decode(path, label, min_size, return_scale)


def _decode(fileobj, label, min_size, return_scale):
  try:
    with Image.open(fileobj) as im:
      full_w, full_h = im.size
      if min_size and im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
        scale = min(full_w, full_h) / float(min_size)
        if scale >= 2:
          im.draft(im.mode, (int(np.ceil(full_w / scale)), int(np.ceil(full_h / scale))))
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
  """Decodes `path` to an (H, W, 3) uint8 RGB array."""
  return np.asarray(open_image(path, min_size), dtype=np.uint8)

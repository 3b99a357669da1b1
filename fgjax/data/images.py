"""Image decoding: every decodable file becomes an RGB uint8 array.

- EXIF orientation is applied (`ImageOps.exif_transpose`).
- Grayscale (L, 1), CMYK, YCbCr, LAB, HSV -> RGB by PIL's conversions.
- Palette (P) images, with or without transparency, and RGBA / LA: composited on a white
  background (transparent pixels become white, as a browser shows them).
- 16-bit (I;16*, I) and 32-bit float (F) grayscale: scaled from their range to 0..255
  (65535 -> 255), never clipped.
- An undecodable or truncated file raises `BadImageError` naming the file.

`min_size` lets JPEG decoding use PIL's draft mode (DCT scaling by 1/2, 1/4, 1/8) when the image
is far larger than what the pipeline keeps; the decoded image's shorter side stays >= min_size.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps

Image.MAX_IMAGE_PIXELS = 20000 * 20000


class BadImageError(OSError):
  """A file that is not a decodable image (the message names it)."""


def _to_rgb(im: Image.Image) -> Image.Image:
  mode = im.mode
  if mode == "RGB":
    return im
  if mode == "P":
    im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    mode = im.mode
    if mode == "RGB":
      return im
  if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  if mode.startswith("I;16") or mode == "I":
    arr = np.asarray(im, dtype=np.float64)
    hi = 65535.0 if mode.startswith("I;16") or arr.max() <= 65535 else float(arr.max())
    arr = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L").convert("RGB")
  if mode == "F":
    arr = np.asarray(im, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    scale = 255.0 if hi <= 1.0 and lo >= 0.0 else 255.0 / max(hi - lo, 1e-12)
    arr = (arr - (0.0 if scale == 255.0 else lo)) * scale
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
  return im.convert("RGB")


def open_image(path: str | os.PathLike, min_size: int | None = None,
               return_scale: bool = False):
  """Decodes `path` to an RGB PIL image (see the module docstring).

  With `return_scale`, returns (image, scale) where scale = decoded width / stored width
  (< 1 when draft mode decoded a reduced image), for mapping annotation boxes.
  """
  path = os.fspath(path)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # PIL's EXIF/ICC chatter; errors still raise
      im = Image.open(path)
      full_w = im.size[0]
      if min_size and im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
        w, h = im.size
        scale = min(w, h) / float(min_size)
        if scale >= 2:
          im.draft(im.mode, (int(np.ceil(w / scale)), int(np.ceil(h / scale))))
      im.load()
      scale = im.size[0] / full_w
      im = _to_rgb(ImageOps.exif_transpose(im))
      return (im, scale) if return_scale else im
  except FileNotFoundError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError,
          ZeroDivisionError) as e:
    raise BadImageError(f"cannot decode image {path}: {e}") from None


def load_image(path: str | os.PathLike, min_size: int | None = None) -> np.ndarray:
  """Decodes `path` to an (H, W, 3) uint8 RGB array."""
  return np.asarray(open_image(path, min_size), dtype=np.uint8)

"""Decoding every kind of image file to RGB uint8, and the errors for undecodable ones."""
import io

import numpy as np
import pytest
from PIL import Image

import data_fixtures as fx
from fgjax.data import BadImageError, load_image, open_image

SIZE = (50, 40)
COLOUR = (200, 40, 90)
# Max abs difference allowed per kind (lossy JPEG and colour-space round trips).
TOLERANCE = {"jpeg": 12, "gray": 6, "cmyk": 20, "exif": 12, "png": 0, "rgba": 0,
             "palette": 0, "palette_alpha": 0, "png16": 1}


@pytest.mark.parametrize("kind", fx.IMAGE_KINDS)
def test_every_kind_decodes_to_rgb_uint8(tmp_path, kind):
  path = fx.write_image(tmp_path / f"x{fx.extension(kind)}", kind, SIZE, COLOUR)
  img = load_image(path)
  assert img.dtype == np.uint8 and img.shape == (SIZE[1], SIZE[0], 3)
  want = fx.expected_pixels(kind, SIZE, COLOUR).astype(int)
  # Compare away from the colour edges, which JPEG blurs.
  inner = (slice(12, 18), slice(15, 45)), (slice(24, 36), slice(15, 45))
  for sl in inner:
    diff = np.abs(img[sl].astype(int) - want[sl]).max()
    assert diff <= TOLERANCE[kind], (kind, diff)


def test_transparent_pixels_become_white_not_black(tmp_path):
  for kind in ("rgba", "palette_alpha"):
    img = load_image(fx.write_image(tmp_path / f"{kind}.png", kind, SIZE, COLOUR))
    assert (img[SIZE[1] // 2 + 2:] == 255).all(), kind
    assert (img[8, 20] == COLOUR).all(), kind


def test_semi_transparent_rgba_is_blended_on_white(tmp_path):
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., 0] = 255  # red at alpha 128 over white -> (255, 127, 127)
  rgba[..., 3] = 128
  Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
  px = load_image(tmp_path / "half.png")[0, 0].astype(int)
  assert px[0] == 255 and abs(px[1] - 127) <= 1 and abs(px[2] - 127) <= 1


def test_16bit_png_is_scaled_not_clipped(tmp_path):
  values = np.array([[0, 257, 32768, 65535]], np.uint16)
  Image.fromarray(values).save(tmp_path / "g16.png")
  assert Image.open(tmp_path / "g16.png").mode.startswith("I")
  img = load_image(tmp_path / "g16.png")
  np.testing.assert_array_equal(img[0, :, 0], [0, 1, 128, 255])
  assert (img[..., 0] == img[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path):
  path = fx.write_image(tmp_path / "rot.jpg", "exif", SIZE, COLOUR)
  with Image.open(path) as raw:
    assert raw.size == (SIZE[1], SIZE[0])  # stored rotated
  img = load_image(path)
  assert img.shape == (SIZE[1], SIZE[0], 3)
  assert img[2, 2].min() > 230  # the white block is top-left after applying the orientation


def test_grayscale_and_cmyk_modes_are_what_we_think(tmp_path):
  assert Image.open(fx.write_image(tmp_path / "g.jpg", "gray")).mode == "L"
  assert Image.open(fx.write_image(tmp_path / "c.jpg", "cmyk")).mode == "CMYK"
  assert Image.open(fx.write_image(tmp_path / "p.png", "palette")).mode == "P"
  assert "transparency" in Image.open(fx.write_image(tmp_path / "pa.png", "palette_alpha")).info


@pytest.mark.parametrize("kind", fx.BAD_KINDS)
def test_bad_files_raise_bad_image_error_naming_the_file(tmp_path, kind):
  path = fx.write_image(tmp_path / f"broken_{kind}.jpg", kind, SIZE)
  with pytest.raises(BadImageError, match=f"broken_{kind}.jpg"):
    load_image(path)
  with pytest.raises(OSError):  # BadImageError is an OSError
    open_image(path)


def test_empty_file_and_bytes(tmp_path):
  (tmp_path / "empty.png").write_bytes(b"")
  with pytest.raises(BadImageError, match="empty.png"):
    load_image(tmp_path / "empty.png")
  buf = io.BytesIO()
  Image.fromarray(fx.pattern(SIZE, COLOUR)).save(buf, "PNG")
  img = open_image(io.BytesIO(buf.getvalue()), name="record 3")
  assert img.mode == "RGB" and img.size == SIZE
  with pytest.raises(BadImageError, match="record 3"):
    open_image(io.BytesIO(b"nonsense"), name="record 3")


def test_draft_decoding_keeps_min_size_and_reports_scale(tmp_path):
  Image.fromarray(np.zeros((400, 800, 3), np.uint8)).save(tmp_path / "big.jpg")
  img, scale = open_image(tmp_path / "big.jpg", min_size=100, return_scale=True)
  assert min(img.size) >= 100 and img.size[0] < 800
  assert scale == pytest.approx(img.size[0] / 800)
  img, scale = open_image(tmp_path / "big.jpg", min_size=300, return_scale=True)
  assert img.size == (800, 400) and scale == 1.0

"""The fast input path: OpenCV decoding and transforms against PIL's (today's reference), draft
decoding, and uint8 batches normalised on the device."""
import io

import jax
import numpy as np
import pytest
from PIL import Image, ImageEnhance

import tiny_config
from fgjax.data import (Normalizer, get_source, images, make_eval_loader, make_train_loader,
                        normalize_batch, normalize_images, open_image, read_image, transforms)

cv2 = pytest.importorskip("cv2")


def _photo(h=375, w=500, seed=0, noise=0.3):
  """A photo-like uint8 image: smooth structure, edges and pixel noise (`noise` of the range),
  not symmetric in x or y."""
  rng = np.random.default_rng(seed)
  smooth = cv2.GaussianBlur(rng.random((h, w, 3)), (0, 0), 4)
  smooth = (smooth - smooth.min()) / (np.ptp(smooth) + 1e-9)
  img = (1 - noise) * smooth + noise * rng.random((h, w, 3))
  img[h // 5: h // 3, w // 7: w // 2] = (0.9, 0.2, 0.1)  # a hard-edged block off centre
  return (img * 255).astype(np.uint8)


def _jpeg(arr, path=None, quality=90, **kw):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "JPEG", quality=quality, **kw)
  if path is not None:
    path.write_bytes(buf.getvalue())
    return path
  return buf.getvalue()


def _diff(a, b):
  assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
  d = np.abs(a.astype(int) - b)
  return int(d.max()), float((d > 0).mean())


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("min_size", [None, 180, 90, 40])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_opencv_jpeg_decoding_is_pils_pixel_for_pixel(tmp_path, mode, min_size):
  """RGB and grayscale JPEGs at full size and at DCT scales 1/2, 1/4, 1/8: OpenCV's pixels are
  PIL's, and the reported scale is the same."""
  arr = _photo(401, 803)
  img = Image.fromarray(arr).convert(mode)
  path = tmp_path / "x.jpg"
  img.save(path, "JPEG", quality=90)
  want, want_scale = open_image(path, min_size, return_scale=True)
  got, scale = read_image(path, min_size, return_scale=True)
  assert images._cv2_jpeg(path.read_bytes(), min_size, True) is not None  # OpenCV decoded it
  np.testing.assert_array_equal(got, np.asarray(want))
  assert scale == want_scale
  if min_size:
    assert min(got.shape[:2]) >= min_size
  assert {None: 1, 180: 2, 90: 4, 40: 8}[min_size] == images.draft_factor((803, 401), min_size)


_XMP = ('<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
        'rdf:about="" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{}"/>'
        '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>')


@pytest.mark.parametrize("where", ["exif", "xmp"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_are_applied_as_pil_does(tmp_path, orientation, where):
  """The orientation in EXIF, or only in XMP (`tiff:Orientation`), as `exif_transpose`."""
  if where == "exif":
    exif = Image.Exif()
    exif[0x0112] = orientation
    kw = {"exif": exif.tobytes()}
  else:
    kw = {"xmp": _XMP.format(orientation).encode()}
  path = _jpeg(_photo(60, 90), tmp_path / "o.jpg", **kw)
  want, want_scale = open_image(path, 30, return_scale=True)
  got, scale = read_image(path, 30, return_scale=True)
  assert images._cv2_jpeg(path.read_bytes(), 30, True) is not None  # OpenCV decoded it
  np.testing.assert_array_equal(got, np.asarray(want))
  assert scale == want_scale
  # decoded at half size (60 // 30 = 2), then turned upright for orientations 5-8
  assert got.shape[:2] == ((45, 30) if orientation >= 5 else (30, 45))


def test_camera_mpo_files_and_zero_padding_take_opencv(tmp_path):
  """An MPO file (a JPEG with more frames after it, as some cameras write) decodes to PIL's
  first frame; a JPEG padded with zero bytes after its EOI marker still takes OpenCV."""
  a, b = _photo(40, 60), _photo(40, 60, seed=5)
  Image.fromarray(a).save(tmp_path / "x.mpo", "MPO", save_all=True,
                          append_images=[Image.fromarray(b)])
  padded = _jpeg(a) + b"\x00" * 64
  (tmp_path / "pad.jpg").write_bytes(padded)
  for name in ("x.mpo", "pad.jpg"):
    data = (tmp_path / name).read_bytes()
    assert images._cv2_jpeg(data, None, True) is not None, name
    np.testing.assert_array_equal(read_image(tmp_path / name),
                                  np.asarray(open_image(tmp_path / name)))


def test_the_pil_decoder_never_calls_opencv(tmp_path, monkeypatch):
  """`decoder="pil"` (and the loaders with `backend="pil"`) decode every file with PIL."""
  path = _jpeg(_photo(60, 90), tmp_path / "x.jpg")
  want = read_image(path)

  def forbidden(*a, **k):
    raise AssertionError("OpenCV decoded a file with decoder='pil'")
  monkeypatch.setattr(images, "_cv2_jpeg", forbidden)
  np.testing.assert_array_equal(read_image(path, decoder="pil"), want)
  src = get_source("folder", "train", _folder(tmp_path, path))
  batch = next(make_train_loader(src, global_batch_size=1, image_size=48, resize_size=64,
                                 threads=1, backend="pil"))
  assert batch["image"].shape == (1, 48, 48, 3)


def test_an_opencv_that_decodes_otherwise_leaves_jpegs_to_pil(tmp_path, monkeypatch):
  """The once-per-process check: an OpenCV whose pixels differ from PIL's (here: channels
  swapped) is not used, with a warning, and decoding still gives PIL's pixels."""
  path = _jpeg(_photo(60, 90), tmp_path / "x.jpg")
  real = images._cv2_imdecode
  monkeypatch.setattr(images, "_cv2_imdecode", lambda d, f: real(d, f)[..., ::-1])
  monkeypatch.setattr(images, "_cv2_decodes", None)
  with pytest.warns(UserWarning, match="does not decode JPEGs as PIL does"):
    assert images._cv2_jpeg(path.read_bytes(), None, True) is None
  np.testing.assert_array_equal(read_image(path), np.asarray(open_image(path)))


def test_other_files_go_to_pil(tmp_path):
  """CMYK JPEGs, PNGs and a truncated JPEG (OpenCV would fill it with grey) take PIL's path:
  the same pixels, and the truncated file raises BadImageError naming it."""
  arr = _photo(40, 50)
  Image.fromarray(arr).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
  Image.fromarray(arr).save(tmp_path / "p.png")
  for name in ("c.jpg", "p.png"):
    data = (tmp_path / name).read_bytes()
    assert images._cv2_jpeg(data, None, True) is None
    np.testing.assert_array_equal(read_image(tmp_path / name),
                                  np.asarray(open_image(tmp_path / name)))
  data = _jpeg(_photo(200, 300))
  (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
  assert images._cv2_jpeg((tmp_path / "cut.jpg").read_bytes(), None, True) is None
  with pytest.raises(images.BadImageError, match="cut.jpg"):
    read_image(tmp_path / "cut.jpg")


def test_draft_decoding_gives_the_full_decode_within_resize_tolerance(tmp_path):
  """A large photo decoded at 1/4 scale then resized and cropped is the full decode's crop
  within resize tolerance: closer to it than the full decode resized with bicubic instead of
  bilinear is; the loader's `draft=False` decodes at full size."""
  path = _jpeg(_photo(1200, 1600, seed=3, noise=0.05), tmp_path / "big.jpg", quality=95)
  src = get_source("folder", "train", _folder(tmp_path, path))
  kw = dict(global_batch_size=1, image_size=256, resize_size=288, threads=1)
  drafted = next(iter(make_eval_loader(src, **kw)))["image"][0].astype(int)
  full = next(iter(make_eval_loader(src, draft=False, **kw)))["image"][0].astype(int)
  bicubic = next(iter(make_eval_loader(src, draft=False, interpolation="bicubic",
                                       **kw)))["image"][0].astype(int)
  assert read_image(path, 288).shape == (300, 400, 3)  # 1/4: the shorter side stays >= 288
  assert read_image(path, 288, draft=False).shape == (1200, 1600, 3)
  d = np.abs(drafted - full).mean()
  assert 0 < d < np.abs(bicubic - full).mean(), (d, np.abs(bicubic - full).mean())


def _folder(tmp_path, path):
  root = tmp_path / "ds"
  (root / "train" / "a").mkdir(parents=True)
  (root / "train" / "a" / "x.jpg").write_bytes(path.read_bytes())
  return root


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("shape", [(375, 500), (500, 333), (96, 97)])
def test_bilinear_upsampling_crop_is_pils_within_one_level(shape):
  img = _photo(*shape)
  for mode in ("shorter", "square"):
    for offset in ((0, 0), (7, 11)):
      resize = max(512, min(shape) + 10) if shape[0] > 100 else 128
      a, ga = transforms._crop(img, resize, 112, offset, mode, "bilinear", "opencv")
      b, gb = transforms._crop(img, resize, 112, offset, mode, "bilinear", "pil")
      worst, share = _diff(np.ascontiguousarray(a), b)
      assert worst <= 1 and share < 0.35, (mode, offset, worst, share)
      np.testing.assert_allclose(ga, gb)


@pytest.mark.parametrize("interpolation,resize", [("bicubic", 512), ("bilinear", 200)])
def test_bicubic_and_downscaling_are_pils_exactly(interpolation, resize):
  """OpenCV has neither PIL's bicubic kernel nor its antialiased downscaling: those run on PIL,
  so both backends give the same bytes."""
  img = _photo()
  a, _ = transforms.eval_crop(img, image_size=160, resize_size=resize,
                              interpolation=interpolation, backend="opencv")
  b, _ = transforms.eval_crop(img, image_size=160, resize_size=resize,
                              interpolation=interpolation, backend="pil")
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("factor", [0.0, 0.5, 1.0, 1.7, 2.0])
def test_sharpness_is_pils(factor):
  img = _photo(64, 80)
  worst, share = _diff(transforms.adjust_sharpness(img, factor),
                       np.asarray(ImageEnhance.Sharpness(Image.fromarray(img)).enhance(factor)))
  assert worst <= 1 and share < 1e-3, (worst, share)


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
@pytest.mark.parametrize("factor", [0.0, 0.3, 0.874, 1.0, 1.5])
def test_colour_ops_are_imageenhance(name, factor):
  img = _photo(64, 80, seed=1)
  ops = {"brightness": (transforms.adjust_brightness, ImageEnhance.Brightness),
         "contrast": (transforms.adjust_contrast, ImageEnhance.Contrast),
         "saturation": (transforms.adjust_saturation, ImageEnhance.Color)}
  mine, pil = ops[name]
  worst, share = _diff(mine(img, factor), np.asarray(pil(Image.fromarray(img)).enhance(factor)))
  assert worst <= 1 and share < 2e-3, (worst, share)


@pytest.mark.parametrize("seed", range(4))
def test_train_crop_backends_draw_the_same_augmentation(seed):
  """The whole train transform (crop, flip, sharpness, colour jitter) on both backends: the
  same random draws, the same boxes, pixels within rounding. Without a resize the chain is
  PIL's but for a rare level (saturation's grey); with one, the resize's level of difference
  on a fifth of the pixels is scaled by sharpness 2 and the colour factors (up to 1.4 each
  here), so a few pixels differ by up to 8 levels and the mean by under one."""
  img = _photo(seed=seed)
  box = {"object_box": np.array([50, 60, 300, 280], np.float32)}
  kw = dict(image_size=448, resize_size=512, sharpness=2.0, sharpness_p=0.5,
            color_jitter=(0.4, 0.4, 0.4), boxes=box)
  a, ba = transforms.train_crop(img, np.random.default_rng(seed), backend="opencv", **kw)
  b, bb = transforms.train_crop(img, np.random.default_rng(seed), backend="pil", **kw)
  worst, share = _diff(a, b)
  assert worst <= 8 and np.abs(a.astype(int) - b).mean() < 1.0, (worst, share)
  np.testing.assert_array_equal(ba["object_box"], bb["object_box"])
  same_size = dict(kw, image_size=320, resize_size=375)  # no resize: the crop is a slice
  a, _ = transforms.train_crop(img, np.random.default_rng(seed), backend="opencv", **same_size)
  b, _ = transforms.train_crop(img, np.random.default_rng(seed), backend="pil", **same_size)
  worst, share = _diff(a, b)
  assert worst <= 4 and share < 2e-3, (worst, share)  # the grey level, then scaled
  # RandAugment stays on PIL, after the OpenCV ops
  c, _ = transforms.train_crop(img, np.random.default_rng(seed), backend="opencv",
                               randaugment_ops=2, **kw)
  assert c.shape == (448, 448, 3) and c.dtype == np.uint8


@pytest.mark.parametrize("backend", ["pil", "opencv"])
def test_crop_padding_is_torchvisions_random_crop_padding(backend):
  """PMG's `RandomCrop(448, padding=8)` after `Resize((550, 550))`, at the offsets fgjax drew
  (torchvision's padded coordinates are fgjax's + 8): the black border where the window
  passes the image, and the boxes moved with it."""
  tv = pytest.importorskip("torchvision.transforms.functional")
  img = _photo(h=120, w=150, seed=3)
  kw = dict(image_size=64, resize_size=72, resize_mode="square", flip=False, crop_padding=8,
            boxes={"object_box": np.array([0, 0, 150, 120], np.float32)}, backend=backend)
  ref_resized = tv.resize(Image.fromarray(img), [72, 72])
  offsets = set()
  for seed in range(40):
    out, boxes = transforms.train_crop(img, np.random.default_rng(seed), **kw)
    rng = np.random.default_rng(seed)  # the draws train_crop made
    ox, oy = int(rng.integers(-8, 72 - 64 + 9)), int(rng.integers(-8, 72 - 64 + 9))
    offsets.add((ox < 0 or oy < 0, ox > 8 or oy > 8))
    ref = np.asarray(tv.crop(tv.pad(ref_resized, 8), oy + 8, ox + 8, 64, 64))
    # Within one level: windows inside the image take the fused resize-and-crop (PIL's box
    # resize) or OpenCV's bilinear upsampling; torchvision resizes the whole image first.
    assert np.abs(out.astype(int) - ref).max() <= 1, (seed, ox, oy)
    expect = np.clip(np.array([-ox, -oy, 72 - ox, 72 - oy], np.float32), 0, 64)
    np.testing.assert_allclose(boxes["object_box"], expect, atol=1e-4)
  assert offsets >= {(True, False), (False, True)}  # both borders were drawn
  with pytest.raises(ValueError, match="crop_padding"):
    transforms.train_crop(img, np.random.default_rng(0), **dict(kw, crop_padding=-1))


@pytest.mark.parametrize("backend", ["pil", "opencv"])
def test_part_locations_follow_the_pixels_through_crop_flip_and_padding(backend):
  """Each part is a 7 x 7 blob of its own colour at its location: after every train crop (with
  flips and crop padding) and the eval crop, a visible transformed location lands on its own
  part's colour, where a flip moves left parts into right parts' rows (`part_flip`); a part the
  crop leaves out, or not visible, is (-1, -1, 0)."""
  rng = np.random.default_rng(0)
  img = np.full((80, 100, 3), 128, np.uint8)
  n = 6
  colours = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255),
                      (255, 0, 255)], np.uint8)
  pts = np.zeros((n, 3), np.float32)
  for j in range(n):
    x, y = int(rng.integers(5, 95)), int(rng.integers(5, 75))
    img[y - 3:y + 4, x - 3:x + 4] = colours[j]
    pts[j] = (x + 0.5, y + 0.5, 1.0)
  pts[5] = (0.0, 0.0, 0.0)  # not visible, as CUB writes it
  flip_index = np.array([1, 0, 2, 4, 3, 5])  # parts 0 <-> 1 and 3 <-> 4 are left/right pairs
  kw = dict(image_size=64, resize_size=72, flip=True, crop_padding=6, backend=backend,
            part_flip=flip_index)
  seen = {"flip": 0, "keep": 0, "lost": 0}
  for seed in range(30):
    out, ann = transforms.train_crop(img, np.random.default_rng(seed),
                                     boxes={"part_locs": pts}, **kw)
    locs = ann["part_locs"]
    assert locs.shape == (n, 3) and locs.dtype == np.float32
    flipped = _drew_flip(seed, 100, 80, kw)
    source_row = flip_index if flipped else np.arange(n)
    seen["flip" if flipped else "keep"] += 1
    for j in range(n):
      if locs[j, 2] == 0:
        np.testing.assert_array_equal(locs[j], (-1, -1, 0))
        seen["lost"] += j != 5
        continue
      px = out[int(locs[j, 1]), int(locs[j, 0])].astype(int)
      assert np.abs(px - colours[source_row[j]]).max() <= 40, (seed, j, px)
    assert locs[5, 2] == 0
  assert min(seen.values()) > 0, seen  # flips, no flips and parts left out all happened
  out, ann = transforms.eval_crop(img, image_size=64, resize_size=72, backend=backend,
                                  boxes={"part_locs": pts})
  for j in np.flatnonzero(ann["part_locs"][:, 2] > 0):
    px = out[int(ann["part_locs"][j, 1]), int(ann["part_locs"][j, 0])].astype(int)
    assert np.abs(px - colours[j]).max() <= 40


def _drew_flip(seed, w, h, kw):
  """Whether `train_crop` flipped with this seed: its draws are the crop offsets, then the
  flip."""
  rw, rh = transforms.resized_size(w, h, kw["resize_size"], "shorter")
  rng, pad, s = np.random.default_rng(seed), kw["crop_padding"], kw["image_size"]
  rng.integers(-pad, rw - s + pad + 1), rng.integers(-pad, rh - s + pad + 1)
  return rng.random() < 0.5


def test_backend_errors():
  with pytest.raises(ValueError, match="config.data.backend"):
    transforms.check_backend("torch")
  with pytest.raises(ValueError, match="config.data.backend"):
    make_train_loader(get_source("synthetic", "train", num_classes=2, num_examples=4,
                                 image_size=40),
                      global_batch_size=2, image_size=32, resize_size=36, backend="cv")


# ----------------------------------------------------------------------------- on the device


@pytest.mark.parametrize("kind", ["imagenet", "half"])
def test_device_normalisation_equals_the_host_table(kind):
  x = np.arange(256, dtype=np.uint8)[None, :, None].repeat(3, -1)[None]
  got = np.asarray(jax.jit(lambda v: normalize_images(v, kind))(x))
  want = Normalizer(kind)(x)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  f = want.astype(np.float32)
  assert normalize_batch({"image": f}, kind)["image"] is f  # float images pass through


def test_loader_batches_are_uint8_and_host_normalize_keeps_the_old_contract():
  src = get_source("synthetic", "train", num_classes=2, num_examples=8, image_size=40)
  kw = dict(global_batch_size=4, image_size=32, resize_size=48, seed=0, threads=1,
            sharpness=2.0, normalize="half")  # 40 -> 48: an upsampling, OpenCV's resize
  u8 = next(make_train_loader(src, **kw))
  f32 = next(make_train_loader(src, host_normalize=True, **kw))
  assert u8["image"].dtype == np.uint8 and f32["image"].dtype == np.float32
  np.testing.assert_allclose(np.asarray(normalize_batch(u8, "half")["image"]), f32["image"],
                             atol=1e-6)
  loader = make_train_loader(src, **kw)
  assert loader.element_spec["image"].dtype == np.uint8 and loader.normalize == "half"
  pil = next(make_train_loader(src, backend="pil", **kw))
  np.testing.assert_array_equal(u8["id"], pil["id"])
  assert np.abs(u8["image"].astype(int) - pil["image"]).max() <= 2


def _method_config(name):
  from configs import common, pmg_synthetic
  if name == "classifier":
    return tiny_config.get_config()
  if name == "pmg":  # the jigsaw, on normalised images
    c = pmg_synthetic.get_config()
    c.data.source_kwargs = dict(num_classes=4, num_examples=16, image_size=112)
    c.data.split_kwargs = {}
  else:  # CAL: attention crops and drops of the normalised images
    c = common.base_config("cal")
    c.model.name = "cal_cnn_small"
    c.model.img_size = 32
    c.model.kwargs = dict(num_attentions=4)
    c.data.resize_size = 36
    c.data.source_kwargs = dict(num_classes=4, num_examples=16, image_size=40)
  c.batch_size = 8
  c.data.augment = dict(flip=True, sharpness=2.0)
  # Plain SGD: an update linear in the gradient. AdamW's first step is about lr * sign(g),
  # which turns the 1e-7 rounding of a near-zero gradient into a full step (and PMG's next
  # update runs on those parameters), so it would compare the optimizer, not the inputs.
  c.optim.name, c.optim.momentum, c.optim.weight_decay = "sgd", 0.0, 0.0
  return c


def _spied(method):
  """`method` whose every update also returns the images its loss received (metric "seen")."""
  from fgjax.methods import base as protocol

  def wrap(loss):
    def spy(params, extra, ctx):
      value, (metrics, new_extra) = loss(params, extra, ctx)
      return value, (dict(metrics, seen=ctx.batch["image"]), new_extra)
    return spy
  phases = tuple(protocol.Phase(tuple(protocol.Update(wrap(u.loss), u.optimizer)
                                      for u in ph.updates), ph.steps)
                 for ph in method.phases())
  method.phases = lambda: phases
  return method


@pytest.mark.parametrize("name", ["classifier", "pmg", "cal"])
def test_steps_see_the_images_the_host_normalised_pipeline_gave(name):
  """A jitted train step on a uint8 batch hands the method's losses (the classifier's, PMG's
  jigsaw updates, CAL's crops) the float32 images that the old host-normalised pipeline gave,
  within float32 rounding; the loss, the parameters and the eval step's predictions follow.
  PMG's later updates are compared more loosely: at initialisation a few BatchNorm channels of
  the jigsaw puzzles have almost no variance, and dividing by their standard deviation scales
  the 1e-7 rounding of the inputs up to 1e-4 in the loss and 1e-2 in the gradient norm (the
  same step compiled with and without the spy differs as much)."""
  import data_fixtures as fx
  from fgjax.train import evaluation, setup
  cfg = _method_config(name)
  _, method = setup.build(cfg, 4)
  method = _spied(method)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  loader = setup.make_train_iter(cfg, setup.get_source(cfg, "train"))
  u8 = next(loader)
  assert u8["image"].dtype == np.uint8
  host = dict(u8, image=Normalizer(cfg.data.normalize)(u8["image"]))
  state, fn, _ = fx.state_and_step(cfg, method, mesh)
  step = jax.jit(fn)
  s1, m1 = step(state, u8, {})
  s2, m2 = step(state, host, {})
  seen = np.asarray(m1.pop("seen"))
  assert seen.dtype == np.float32
  np.testing.assert_allclose(seen, host["image"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(seen, np.asarray(m2.pop("seen")), rtol=0, atol=1e-6)
  loose = {"loss": 1e-3, "loss_jigsaw2": 1e-3, "loss_concat": 1e-3, "grad_norm": 2e-2} \
      if name == "pmg" else {"grad_norm": 1e-4}  # a norm of gradients through ReLU kinks
  for k in m1:
    np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=loose.get(k, 2e-5), err_msg=k)
  atol = 2e-4 if name == "pmg" else 1e-6  # PMG: lr x those gradients (param norm 54)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=atol)
  ev = jax.jit(evaluation.make_eval_step(method))
  batch = dict(u8, mask=np.ones(len(u8["id"]), bool))
  r1 = ev(setup.eval_variables(s1), batch)
  r2 = ev(setup.eval_variables(s1), dict(batch, image=host["image"]))
  np.testing.assert_array_equal(np.asarray(r1["pred"]), np.asarray(r2["pred"]))


def test_a_run_saved_before_the_backend_keys_resumes(tmp_path):
  """A config.json written before `data.backend` / `data.draft_decode` existed (and with a
  float32 batch spec) resumes with today's config: the keys are resumable."""
  import json
  from fgjax.train import workdir as workdir_lib
  cfg = tiny_config.get_config()
  saved = workdir_lib.as_json(cfg)
  del saved["data"]["backend"], saved["data"]["draft_decode"]
  saved["batch_spec_resolved"] = {"image": [[32, 32, 3], "float32"]}
  (tmp_path / "config.json").write_text(json.dumps(saved))
  guard = workdir_lib.check(tiny_config.get_config(), str(tmp_path))
  assert guard.kind == "changed" and not guard.backup
  from fgjax.train import setup  # its model is restored from a float32 example, as before
  old = setup.load_config(str(tmp_path))
  assert setup.config_example(old)["image"].dtype == np.float32
  with old.unlocked():
    old.batch_spec_resolved = {"image": [[32, 32, 3], "uint8"]}  # a run saved from now on
  assert setup.config_example(old)["image"].dtype == np.float32
  with cfg.unlocked():
    cfg.data.backend = "pil"
  assert workdir_lib.check(cfg, str(tmp_path)).kind == "changed"

"""Input pipelines (grain): determinism, per-process sharding, resume, eval masks; the
synthetic dataset's guarantees."""
import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import data_fixtures as fx
from fgjax.data import (get_source, make_eval_loader, make_train_loader, normalize_batch,
                        synthetic, to_global_batch, transforms)

SIZE = 32


def _synth(n=24, classes=4, split="train", size=40):
  return get_source("synthetic", split, num_classes=classes, num_examples=n, image_size=size)


def _train(src, batch=8, seed=0, **kw):
  kw.setdefault("threads", 1)
  return make_train_loader(src, global_batch_size=batch, image_size=SIZE, resize_size=36,
                           seed=seed, **kw)


def _take(loader, n):
  return [next(loader) for _ in range(n)]


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_train_batches_shapes_and_determinism():
  src = _synth()
  a = _take(_train(src), 4)
  b = _take(_train(src), 4)
  for x, y in zip(a, b):
    _same(x, y)
  assert a[0]["image"].shape == (8, SIZE, SIZE, 3) and a[0]["image"].dtype == np.uint8
  assert a[0]["label"].shape == (8,) and a[0]["part_boxes"].shape == (8, 3, 4)
  c = _take(_train(src, seed=1), 1)[0]
  assert not np.array_equal(a[0]["id"], c["id"]) or not np.array_equal(a[0]["image"],
                                                                       c["image"])


def test_each_epoch_is_a_permutation_and_epochs_reshuffle():
  src = _synth(n=24)
  ids = np.concatenate([b["id"] for b in _take(_train(src), 6)])  # 2 epochs of 24
  assert sorted(ids[:24].tolist()) == list(range(24))
  assert sorted(ids[24:].tolist()) == list(range(24))
  assert ids[:24].tolist() != ids[24:].tolist()


def test_two_processes_read_disjoint_shards_that_make_the_single_process_batch():
  src = _synth(n=24)
  single = _take(_train(src), 4)
  shards = [_take(_train(src, shard_index=p, shard_count=2), 4) for p in range(2)]
  for b, whole in enumerate(single):
    p0, p1 = shards[0][b], shards[1][b]
    assert p0["image"].shape[0] == p1["image"].shape[0] == 4
    assert not set(p0["id"].tolist()) & set(p1["id"].tolist())
    assert sorted(p0["id"].tolist() + p1["id"].tolist()) == sorted(whole["id"].tolist())
    # Process p holds the global stream positions congruent to p mod 2, augmented identically.
    for p, part in enumerate((p0, p1)):
      for k in ("image", "label", "id", "part_boxes"):
        np.testing.assert_array_equal(part[k], whole[k][p::2], err_msg=k)


def test_resume_from_saved_state_yields_the_uninterrupted_batches():
  src = _synth(n=20)
  ref = _take(_train(src), 7)
  loader = _train(src)
  _take(loader, 3)
  state = json.dumps(loader.get_state())  # what the trainer writes to disk
  fresh = _train(src)
  fresh.set_state(state)
  for got, want in zip(_take(fresh, 4), ref[3:]):
    _same(got, want)


def test_worker_processes_give_the_same_batches():
  src = _synth(n=16)
  want = _take(_train(src), 3)
  with _train(src, worker_count=2) as loader:
    got = _take(loader, 3)
  for g, w in zip(got, want):
    _same(g, w)


@pytest.mark.parametrize("n", [10, 16, 17])
def test_eval_sees_every_example_once_across_processes(n):
  src = _synth(n=n, split="test")
  seen = []
  lens = []
  for p in range(2):
    loader = make_eval_loader(src, global_batch_size=8, image_size=SIZE, resize_size=36,
                              shard_index=p, shard_count=2, threads=1)
    batches = list(loader)
    lens.append(len(batches))
    assert len(batches) == len(loader) == -(-n // 8)
    for b in batches:
      assert b["image"].shape == (4, SIZE, SIZE, 3) and b["mask"].dtype == bool
      seen += b["id"][b["mask"]].tolist()
  assert lens[0] == lens[1]
  assert sorted(seen) == list(range(n))
  # A second pass over the same loader starts again.
  loader = make_eval_loader(src, global_batch_size=8, image_size=SIZE, resize_size=36,
                            threads=1)
  assert sum(int(b["mask"].sum()) for b in loader) == n
  assert sum(int(b["mask"].sum()) for b in loader) == n


def test_eval_is_deterministic_centre_crop():
  src = _synth(n=8, split="test")
  kw = dict(global_batch_size=8, image_size=SIZE, resize_size=36, threads=1)
  a, b = next(iter(make_eval_loader(src, **kw))), next(iter(make_eval_loader(src, **kw)))
  _same(a, b)
  assert a["id"].tolist() == list(range(8))


def test_real_jpeg_folder_through_the_train_loader(tmp_path):
  fake = fx.make_fake_cub(tmp_path, num_classes=3, per_class=4)
  src = get_source("cub", "train", fake.data_dir)
  loader = _train(src, batch=4, randaugment="2,9", sharpness=0.5, normalize="half")
  batch = next(loader)
  assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
  x = np.asarray(normalize_batch(batch, loader.normalize)["image"])  # what the steps see
  assert loader.normalize == "half" and x.dtype == np.float32 and np.isfinite(x).all()
  assert -1.0001 <= x.min() and x.max() <= 1.0001
  box = batch["object_box"]
  inside = box[:, 0] >= 0
  assert ((box[inside] >= 0) & (box[inside] <= SIZE)).all()
  assert set(batch["label"].tolist()) <= {0, 1, 2}


def test_cub_part_locations_in_batches(tmp_path):
  """`part_locs` (L, 15, 3) in eval and train batches: the eval rows are the record's points
  through the centre crop; the train rows are visible inside the crop or (-1, -1, 0)."""
  fake = fx.make_fake_cub(tmp_path, num_classes=3, per_class=4)
  src = get_source("cub", "test", fake.data_dir)
  loader = make_eval_loader(src, global_batch_size=4, image_size=SIZE, resize_size=36,
                            threads=1)
  assert loader.element_spec["part_locs"].shape == (4, 15, 3)
  rows = 0
  for batch in loader:
    for k in np.flatnonzero(batch["mask"]):
      i = src.ids.tolist().index(int(batch["id"][k]))
      img, rec = src.get(i, min_size=36)
      _, want = transforms.eval_crop(img, image_size=SIZE, resize_size=36,
                                     boxes={"part_locs": rec["part_locs"]})
      np.testing.assert_allclose(batch["part_locs"][k], want["part_locs"], atol=1e-5)
      rows += 1
  assert rows == len(src)
  train = _train(get_source("cub", "train", fake.data_dir), batch=4)
  assert train.element_spec["part_locs"].shape == (4, 15, 3)
  locs = next(train)["part_locs"]
  vis = locs[..., 2] > 0
  assert vis.any() and (~vis).any()
  assert ((locs[vis][:, :2] >= 0) & (locs[vis][:, :2] < SIZE)).all()
  assert (locs[~vis] == (-1, -1, 0)).all()


def test_bad_sizes_are_clear_errors():
  src = _synth(n=8)
  with pytest.raises(ValueError, match="multiple of the 2 processes"):
    _train(src, batch=7, shard_index=0, shard_count=2)
  with pytest.raises(ValueError, match="resize_size"):
    make_train_loader(src, global_batch_size=4, image_size=64, resize_size=48)


def test_to_global_batch_on_the_data_mesh():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  n = 2 * len(jax.devices())
  batch = {"image": np.zeros((n, 4, 4, 3), np.float32), "label": np.arange(n, dtype=np.int32),
           "file": np.array(["x"] * n)}
  out = to_global_batch(batch, mesh)
  assert set(out) == {"image", "label"}
  assert out["label"].shape == (n,)
  assert out["label"].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 1)
  np.testing.assert_array_equal(np.asarray(out["label"]), np.arange(n))


# ------------------------------------------------------------------ the synthetic dataset


def test_synthetic_is_deterministic_any_size_and_class_count():
  a = get_source("synthetic", "train", num_classes=7, num_examples=5, image_size=37)
  b = get_source("synthetic", "train", num_classes=7, num_examples=5, image_size=37)
  for i in range(5):
    x, y = a[i], b[i]
    assert x["image"].shape == (37, 37, 3) and x["image"].dtype == np.uint8
    np.testing.assert_array_equal(x["image"], y["image"])
    assert x["text"] == y["text"] and x["label"] == i % 7
  test = get_source("synthetic", "test", num_classes=7, num_examples=5, image_size=37)
  assert not np.array_equal(a[0]["image"], test[0]["image"])
  other_seed = get_source("synthetic", "train", num_classes=7, num_examples=5, image_size=37,
                          seed=3)
  assert not np.array_equal(a[0]["image"], other_seed[0]["image"])
  for classes in (2, 200):
    s = get_source("synthetic", "train", num_classes=classes, num_examples=3, image_size=32)
    assert len(s.class_names) == len(set(s.class_names)) == classes
  with pytest.raises(ValueError, match="num_classes"):
    get_source("synthetic", "train", num_classes=201)


def test_synthetic_parts_are_small_inside_the_bird_and_described():
  src = get_source("synthetic", "train", num_classes=20, num_examples=40, image_size=96)
  for i in range(len(src)):
    ex = src[i]
    parts, obj = ex["part_boxes"], ex["object_box"]
    areas = (parts[:, 2] - parts[:, 0]) * (parts[:, 3] - parts[:, 1]) / 96.0 ** 2
    assert (areas > 0).all() and (areas <= 0.03).all()
    assert (parts[:, :2] >= obj[:2] - 1e-3).all() and (parts[:, 2:] <= obj[2:] + 1e-3).all()
    beak, crest, throat = (synthetic.class_attributes(20)[ex["label"]][k] for k in range(3))
    names = synthetic._NAMES
    assert f"{names[beak]} beak" in ex["text"] and f"{names[crest]} crest" in ex["text"]
    assert f"{names[throat]} throat" in ex["text"]


def _vivid_mask(image):
  """Pixels in a vivid part/decoy colour (the bird, branch and background are muted)."""
  x = image.astype(np.float32) / 255.0
  hi, lo = x.max(-1), x.min(-1)
  return (hi > 0.5) & ((hi - lo) / np.maximum(hi, 1e-6) > 0.6)


def test_synthetic_demo_variant_has_larger_parts_and_no_decoys():
  """part_scale multiplies the parts' area on the same bird; decoys=False leaves every vivid
  pixel on a part; both are validated and keep the rest of the example as it was."""
  kw = dict(num_classes=20, num_examples=12, image_size=96)
  plain = get_source("synthetic", "train", **kw)
  demo = get_source("synthetic", "train", part_scale=4.0, decoys=False, **kw)
  ratios = []
  for i in range(len(plain)):
    a, b = plain[i], demo[i]
    assert a["label"] == b["label"] and a["text"] == b["text"]
    area = lambda p: (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
    ratios.append(area(b["part_boxes"]) / area(a["part_boxes"]))
    for ex, decoys in ((a, True), (b, False)):
      off_part = _vivid_mask(ex["image"])
      for x0, y0, x1, y1 in ex["part_boxes"]:
        off_part[max(int(y0) - 1, 0):int(y1) + 2, max(int(x0) - 1, 0):int(x1) + 2] = False
      # The default draws four part-sized decoys (about 0.4% of the image each) off the parts.
      assert (off_part.mean() > 0.005) if decoys else (off_part.sum() == 0), (i, decoys)
  assert 3.0 < np.median(ratios) < 4.5, np.median(ratios)  # clipping at the border lowers some
  for bad in (dict(part_scale=0.1), dict(part_scale=9), dict(decoys="no")):
    with pytest.raises(ValueError, match="synthetic: (part_scale|decoys)"):
      get_source("synthetic", "train", **bad)


def _part_colour_features(src):
  """Mean colour inside each part box: what a model that found the parts would see."""
  feats = []
  for i in range(len(src)):
    ex = src[i]
    cols = []
    for x0, y0, x1, y1 in ex["part_boxes"]:
      cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)  # the part's centre pixel region
      cols.append(ex["image"][max(cy - 1, 0):cy + 2, max(cx - 1, 0):cx + 2].reshape(-1, 3)
                  .mean(0) / 255.0)
    feats.append(np.concatenate(cols))
  return np.stack(feats)


@pytest.mark.slow
def test_synthetic_is_not_solvable_from_global_statistics_but_is_from_the_parts():
  classes, size = 20, 48
  train = get_source("synthetic", "train", num_classes=classes, num_examples=1200,
                     image_size=size)
  test = get_source("synthetic", "test", num_classes=classes, num_examples=600, image_size=size)
  xtr = np.stack([train[i]["image"] for i in range(len(train))])
  xte = np.stack([test[i]["image"] for i in range(len(test))])
  for kind in ("pixels8", "histogram"):
    acc = synthetic.logistic_regression_accuracy(
        synthetic.global_features(xtr, kind), train.labels,
        synthetic.global_features(xte, kind), test.labels)
    assert acc < 0.12, (kind, acc)  # chance 0.05
  # The same regression on the colours of the parts solves it: the labels live in the parts.
  acc = synthetic.logistic_regression_accuracy(_part_colour_features(train), train.labels,
                                               _part_colour_features(test), test.labels)
  assert acc > 0.9, acc


def test_interpolation_option_and_error():
  src = _synth(n=8, split="test")
  kw = dict(global_batch_size=8, image_size=SIZE, resize_size=36, threads=1)
  bil = next(iter(make_eval_loader(src, **kw)))
  bic = next(iter(make_eval_loader(src, interpolation="bicubic", **kw)))
  assert not np.array_equal(bil["image"], bic["image"])
  # the same crop, other filter (mean difference under 6 of 255 levels)
  assert np.abs(bil["image"].astype(int) - bic["image"]).mean() < 6
  with pytest.raises(ValueError, match="config.data.interpolation"):
    _train(src, interpolation="lanczos")


def test_colour_jitter_is_torchvisions_and_runs_in_the_loader():
  """color_jitter=(brightness, contrast, saturation) applies torchvision's ColorJitter
  operations (adjust_brightness / _contrast / _saturation on PIL images) in a random order with
  factors in [1 - s, 1 + s]; the CAL recipe's (0.126, 0, 0.5) runs through the train loader."""
  tvf = pytest.importorskip("torchvision.transforms.functional")
  from PIL import Image
  from fgjax.data import transforms
  img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), np.uint8))
  strengths = (0.4, 0.3, 0.5)
  out = transforms.jitter_colours(img, np.random.default_rng(5), strengths)
  rng = np.random.default_rng(5)  # the same draws, applied with torchvision
  ref = img
  ops = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation)
  for i in rng.permutation(3):
    factor = rng.uniform(1 - strengths[i], 1 + strengths[i])
    assert 1 - strengths[i] <= factor <= 1 + strengths[i]
    ref = ops[i](ref, factor)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  assert transforms.parse_color_jitter({"brightness": 0.126, "saturation": 0.5}) == \
      (0.126, 0.0, 0.5)
  with pytest.raises(ValueError, match="hue is not supported"):
    transforms.parse_color_jitter({"hue": 0.1})
  src = synthetic.SyntheticSource("train", 4, 8, 48)
  plain = next(_train(src, batch=4))
  jittered = next(_train(src, batch=4, color_jitter=(0.126, 0.0, 0.5)))
  assert jittered["image"].shape == plain["image"].shape
  assert not np.allclose(jittered["image"], plain["image"])

"""Dataset sources in their real on-disk layouts (tiny fake copies from data_fixtures)."""
import os
import shutil
import warnings

import numpy as np
import pytest

import data_fixtures as fx
from fgjax import data as fd
from fgjax.data import (BadImageError, DatasetError, DatasetNotFoundError, get_source,
                        split_train_val)


def _check_against(fake: fx.FakeDataset, name: str, data_dir=None, splits=None, **kw):
  """Every split lists exactly the expected (id, label, file) in order, decodes to RGB uint8,
  and has the expected class names."""
  for split in splits or fake.splits:
    src = get_source(name, split, data_dir or fake.data_dir, **kw)
    want = fake.splits[split]
    assert len(src) == len(want), (name, split)
    assert src.class_names == fake.class_names and src.num_classes == fake.num_classes
    assert src.ids.tolist() == [w[0] for w in want]
    assert src.labels.tolist() == [w[1] for w in want]
    for i, (uid, label, rel) in enumerate(want):
      ex = src[i]
      assert ex["id"] == uid and ex["label"] == label
      assert ex["image"].dtype == np.uint8 and ex["image"].shape == (40, 50, 3)
      if rel:
        assert os.path.samefile(ex["file"], os.path.join(fake.root, rel))
    assert len(set(src.ids.tolist())) == len(src)


# ----------------------------------------------------------------------------- layouts


def test_cub_layout_ids_labels_boxes(tmp_path):
  fake = fx.make_fake_cub(tmp_path, num_classes=3, per_class=4)
  _check_against(fake, "cub")
  src = get_source("cub", "train", fake.data_dir)
  ex = src[1]
  x, y, w, h = fake.boxes[ex["id"]]
  np.testing.assert_allclose(ex["object_box"], [x, y, x + w, y + h])
  assert ex["object_box"].dtype == np.float32
  assert src.class_names[0] == "Class_1_Aird"  # "001." prefix stripped
  # the parent of CUB_200_2011/ works too
  assert get_source("cub", "test", tmp_path).ids.tolist() == src_ids(fake, "test")


def test_cub_part_locations(tmp_path):
  """parts/parts.txt + parts/part_locs.txt -> source[i]["part_locs"] (15, 3): x, y, visible in
  the stored image's pixels, in parts.txt's order; scaled with a draft (reduced) decode."""
  fake = fx.make_fake_cub(tmp_path, num_classes=2, per_class=4, image_size=(400, 320))
  for split in ("train", "test"):
    src = get_source("cub", split, fake.data_dir)
    assert src.part_names == list(fx.CUB_PARTS) and src.box_shapes["part_locs"] == (15, 3)
    for i in range(len(src)):
      ex = src[i]
      assert ex["part_locs"].dtype == np.float32
      np.testing.assert_array_equal(ex["part_locs"], fake.part_locs[ex["id"]])
  assert 0 < (ex["part_locs"][:, 2] == 0).sum() < 15  # the fixture hides some parts
  # left <-> right rows after a flip: eye 7 <-> 11, leg 8 <-> 12, wing 9 <-> 13 (1-based ids)
  names = np.array(src.part_names)
  assert [names[src.part_flip[k - 1]] for k in (7, 8, 9, 11, 2)] == \
      ["right eye", "right leg", "right wing", "left eye", "beak"]
  img, rec = src.get(0, min_size=100)  # JPEG draft decode at 1/2: 200 x 160
  assert np.asarray(img).shape[:2] == (160, 200)
  want = fake.part_locs[rec["id"]] * [0.5, 0.5, 1.0]
  np.testing.assert_allclose(rec["part_locs"], want)
  x, y, w, h = fake.boxes[rec["id"]]
  np.testing.assert_allclose(rec["object_box"], np.multiply([x, y, x + w, y + h], 0.5))


def test_cub_part_locations_stay_aligned_when_images_are_skipped(tmp_path):
  fake = fx.make_fake_cub(tmp_path, num_classes=2, per_class=6, bad={0: "garbage"})
  src = _quiet(lambda: get_source("cub", "train", fake.data_dir, skip_bad_images=True))
  assert len(src) == len(fake.splits["train"]) - 1
  for i in range(len(src)):
    np.testing.assert_array_equal(src[i]["part_locs"], fake.part_locs[int(src.ids[i])])


def test_cub_part_files_absent_one_missing_or_malformed(tmp_path):
  fake = fx.make_fake_cub(tmp_path / "none", omit=("parts/parts.txt", "parts/part_locs.txt"))
  src = get_source("cub", "train", fake.data_dir)
  assert "part_locs" not in src[0] and "part_locs" not in src.box_shapes
  assert src.part_flip is None
  fake = fx.make_fake_cub(tmp_path / "one", omit=("parts/part_locs.txt",))
  with pytest.raises(DatasetNotFoundError, match="part_locs.txt not found.*parts.txt is there"):
    get_source("cub", "train", fake.data_dir)
  fake = fx.make_fake_cub(tmp_path / "bad")
  path = os.path.join(fake.root, "parts", "part_locs.txt")
  lines = open(path).read().splitlines()
  lines[6] = "3 16 10.0 12.0 1"  # no part 16 in parts.txt
  open(path, "w").write("\n".join(lines) + "\n")
  with pytest.raises(DatasetError, match=r"part_locs.txt line 7 .*'3 16 10.0 12.0 1'"):
    get_source("cub", "train", fake.data_dir)


def test_nabirds_part_locations_with_uuid_keys(tmp_path):
  """NABirds shares CUB's parts/ files: uuid image keys, 0-based part ids, 11 parts."""
  fake = fx.make_fake_nabirds(tmp_path)
  parts = ["bill", "crown", "nape", "left eye", "right eye", "belly", "breast", "back", "tail",
           "left wing", "right wing"]
  keys = [line.split()[0] for line in open(os.path.join(fake.root, "images.txt"))]
  os.makedirs(os.path.join(fake.root, "parts"))
  with open(os.path.join(fake.root, "parts", "parts.txt"), "w") as f:
    f.write("".join(f"{j} {n}\n" for j, n in enumerate(parts)))
  with open(os.path.join(fake.root, "parts", "part_locs.txt"), "w") as f:
    for pos, key in enumerate(keys):
      f.write("".join(f"{key} {j} {pos + j} {2 * j} {int(j != 3)}\n" for j in range(11)))
  src = get_source("nabirds", "train", fake.data_dir)
  pos = int(src.ids[1])  # nabirds ids are positions in images.txt
  locs = src[1]["part_locs"]
  assert locs.shape == (11, 3) and src.part_names == parts
  np.testing.assert_array_equal(locs[:, 0], pos + np.arange(11))
  assert locs[3, 2] == 0 and locs[4, 2] == 1
  assert src.part_flip[3] == 4 and src.part_flip[9] == 10 and src.part_flip[0] == 0


def src_ids(fake, split):
  return [w[0] for w in fake.splits[split]]


def test_cub_every_image_kind_decodes(tmp_path):
  fake = fx.make_fake_cub(tmp_path, num_classes=2, per_class=len(fx.IMAGE_KINDS),
                          image_kinds=fx.IMAGE_KINDS)
  for split in ("train", "test"):
    src = get_source("cub", split, fake.data_dir)
    for i in range(len(src)):
      img = src[i]["image"]
      assert img.shape == (40, 50, 3) and img.dtype == np.uint8


def test_nabirds_sparse_classes_and_uuid_ids(tmp_path):
  fake = fx.make_fake_nabirds(tmp_path)
  _check_against(fake, "nabirds")
  src = get_source("nabirds", "train", tmp_path)  # parent folder
  assert src.num_classes == len(fx.NABIRDS_CLASS_IDS)  # only the classes that have images
  # contiguous labels in sorted class-id order: 47 -> 0, 295 -> 1, 313 -> 2, 1002 -> 3
  assert src.class_names == [f"Bird species {c} (Adult)" for c in sorted(fx.NABIRDS_CLASS_IDS)]
  test_ids = get_source("nabirds", "test", tmp_path).ids
  assert not set(src.ids.tolist()) & set(test_ids.tolist())
  assert "object_box" in src[0]


@pytest.mark.parametrize("fmt,where", [("annos", "root"), ("devkit", "root"),
                                       ("devkit", "devkit")])
def test_stanford_cars_both_formats(tmp_path, fmt, where):
  fake = fx.make_fake_cars(tmp_path / "stanford_cars", fmt=fmt, test_annos_in=where)
  _check_against(fake, "stanford_cars")
  for split in ("train", "test"):
    src = get_source("stanford_cars", split, fake.data_dir)
    for i in range(len(src)):
      np.testing.assert_allclose(src[i]["object_box"], fake.boxes[(split, i)])
  # data_dir may also be the parent of a stanford_cars/ folder
  parent = get_source("stanford_cars", "test", tmp_path)
  assert parent.class_names[:2] == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
  assert parent.labels.tolist() == [w[1] for w in fake.splits["test"]]


def test_stanford_dogs_lists_and_class_names(tmp_path):
  fake = fx.make_fake_dogs(tmp_path)
  _check_against(fake, "stanford_dogs")
  assert get_source("stanford_dogs", "train", tmp_path).class_names == \
      ["Chihuahua", "Japanese_spaniel", "Maltese_dog"]


def test_fgvc_aircraft_variants_and_both_data_dirs(tmp_path):
  fake = fx.make_fake_aircraft(tmp_path)
  _check_against(fake, "fgvc_aircraft")                       # fgvc-aircraft-2013b/
  _check_against(fake, "fgvc_aircraft", data_dir=fake.root)   # fgvc-aircraft-2013b/data/
  src = get_source("fgvc_aircraft", "train", fake.data_dir)
  assert "F/A-18" in src.class_names
  np.testing.assert_allclose(src[0]["object_box"], fake.boxes[src[0]["id"]])


def test_folder_val_and_test(tmp_path):
  fake = fx.make_fake_folder(tmp_path / "both", eval_dirs=("val", "test"))
  _check_against(fake, "folder")
  assert get_source("folder", "train", fake.data_dir).class_names == ["crow", "finch", "owl"]
  only_val = fx.make_fake_folder(tmp_path / "val_only", eval_dirs=("val",))
  test = get_source("folder", "test", only_val.data_dir)  # test falls back to val/
  assert [os.path.relpath(test[i]["file"], only_val.root) for i in range(len(test))] == \
      [w[2] for w in only_val.splits["val"]]
  only_test = fx.make_fake_folder(tmp_path / "test_only", eval_dirs=("test",))
  with pytest.raises(DatasetNotFoundError, match="val/"):
    get_source("folder", "val", only_test.data_dir)  # no silent use of test/ for validation


def test_folder_unknown_eval_class_is_an_error(tmp_path):
  fake = fx.make_fake_folder(tmp_path, eval_dirs=("val",))
  fx.write_image(tmp_path / "val" / "eagle" / "a.jpg")
  with pytest.raises(DatasetError, match="eagle"):
    get_source("folder", "val", fake.data_dir)


def test_tfds_prepared_dataset(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  fake = fx.make_fake_tfds(tmp_path / "tfds")
  _check_against(fake, "tfds:fake_fg_birds")
  src = get_source("tfds:fake_fg_birds", "train", fake.data_dir)
  assert src.class_names == ["bird_0", "bird_1", "bird_2"]
  with pytest.raises(ValueError, match="no feature 'img'"):
    get_source("tfds:fake_fg_birds", "train", fake.data_dir, image_key="img")
  with pytest.raises(DatasetNotFoundError, match="data.data_dir"):
    get_source("tfds:fake_fg_birds", "train", tmp_path / "elsewhere")


def test_synthetic_through_get_source():
  src = get_source("synthetic", "test", num_classes=4, num_examples=6, image_size=40)
  assert len(src) == 6 and src.num_classes == 4
  ex = src[5]
  assert ex["image"].shape == (40, 40, 3) and ex["label"] == 1 and ex["id"] == 5


def test_unknown_name_and_split():
  with pytest.raises(ValueError, match="unknown dataset 'cubb'"):
    get_source("cubb", "train", "/nonexistent")
  with pytest.raises(ValueError, match="unknown split 'validation'"):
    get_source("synthetic", "validation")


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name,make,remove", [
    ("cub", fx.make_fake_cub, "CUB_200_2011/image_class_labels.txt"),
    ("cub", fx.make_fake_cub, "CUB_200_2011/bounding_boxes.txt"),
    ("nabirds", fx.make_fake_nabirds, "nabirds/train_test_split.txt"),
    ("stanford_cars", lambda p: fx.make_fake_cars(p, fmt="devkit"),
     "cars_test_annos_withlabels.mat"),
    ("stanford_dogs", fx.make_fake_dogs, "train_list.mat"),
    ("fgvc_aircraft", fx.make_fake_aircraft, "fgvc-aircraft-2013b/data/variants.txt"),
    ("folder", fx.make_fake_folder, "train"),
])
def test_incomplete_dataset_names_the_file_origin_and_config_key(tmp_path, name, make, remove):
  fake = make(tmp_path)
  target = tmp_path / remove
  shutil.rmtree(target) if target.is_dir() else target.unlink()
  with pytest.raises(DatasetNotFoundError) as e:
    for split in ("train", "test"):
      get_source(name, split, fake.data_dir)
  msg = str(e.value)
  assert os.path.basename(remove) in msg
  assert "data.data_dir" in msg and "--config.data.data_dir=" in msg
  if name != "folder":
    assert "http" in msg  # where the dataset comes from
  assert len(msg) < 600 and "\n" not in msg
  assert e.value.__cause__ is None
  assert e.value.__context__ is None or e.value.__suppress_context__
  assert isinstance(e.value, FileNotFoundError)


@pytest.mark.parametrize("name", ["cub", "nabirds", "stanford_cars", "stanford_dogs",
                                  "fgvc_aircraft", "folder"])
def test_missing_folder(tmp_path, name):
  with pytest.raises(DatasetNotFoundError, match="data.data_dir"):
    get_source(name, "train", tmp_path / "nope")


def test_missing_image_file_is_reported_at_construction(tmp_path):
  fake = fx.make_fake_cub(tmp_path)
  uid, _, rel = fake.splits["train"][2]
  os.remove(os.path.join(fake.root, rel))
  with pytest.raises(DatasetNotFoundError, match=os.path.basename(rel)):
    get_source("cub", "train", fake.data_dir)
  src = _quiet(lambda: get_source("cub", "train", fake.data_dir, skip_bad_images=True))
  assert uid not in src.ids.tolist() and len(src) == len(fake.splits["train"]) - 1


def _quiet(fn):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return fn()


def test_bad_images_raise_or_are_skipped_once_with_a_count(tmp_path, caplog):
  fake = fx.make_fake_cub(tmp_path, num_classes=2, per_class=6,
                          bad={0: "truncated", 4: "garbage", 7: "truncated"})
  src = get_source("cub", "train", fake.data_dir)
  bad_train = fake.bad_ids["train"]
  assert len(bad_train) == 2
  i = src.ids.tolist().index(bad_train[0])
  with pytest.raises(BadImageError, match=os.path.basename(src.files[i])):
    src[i]
  with pytest.warns(UserWarning, match="skipped 2 of 6") as record:
    skipped = get_source("cub", "train", fake.data_dir, skip_bad_images=True)
  assert len([w for w in record if "skipped" in str(w.message)]) == 1
  assert "skipped 2 of 6" in caplog.text
  assert len(skipped) == 4 and not set(bad_train) & set(skipped.ids.tolist())
  for i in range(len(skipped)):  # a consistent random-access source
    assert skipped[i]["id"] == skipped.ids[i]
    assert skipped[i]["label"] == skipped.labels[i]
  assert skipped[-1]["id"] == skipped.ids[-1]
  with pytest.raises(IndexError):
    skipped[len(skipped)]


def test_folder_skip_bad_images(tmp_path):
  fake = fx.make_fake_folder(tmp_path, bad={1: "garbage"})
  with pytest.warns(UserWarning, match="skipped 1 "):
    src = get_source("folder", "train", fake.data_dir, skip_bad_images=True)
  assert len(src) == len(fake.splits["train"]) - 1


def test_label_outside_range_names_id_and_file(tmp_path):
  fake = fx.make_fake_cub(tmp_path)
  labels = tmp_path / "CUB_200_2011" / "image_class_labels.txt"
  lines = labels.read_text().splitlines()
  lines[4] = "5 9"  # class 9 does not exist
  labels.write_text("\n".join(lines) + "\n")
  split = "train" if any(w[0] == 5 for w in fake.splits["train"]) else "test"
  with pytest.raises(DatasetError, match=r"example id 5 \(.*_5\.jpg\)"):
    get_source("cub", split, fake.data_dir)


def test_cars_label_outside_range(tmp_path):
  import scipy.io
  fake = fx.make_fake_cars(tmp_path, fmt="annos")
  path = tmp_path / "cars_annos.mat"
  mat = scipy.io.loadmat(path)
  mat["annotations"][0, 0]["class"] = np.array([[99]], np.uint8)
  scipy.io.savemat(path, {k: v for k, v in mat.items() if not k.startswith("__")})
  with pytest.raises(DatasetError, match=r"example id 0 \(.*000001\.jpg\) has label 98"):
    get_source("stanford_cars", "train", fake.data_dir)


def test_file_source_label_check():
  with pytest.raises(DatasetError, match=r"id 7 \(b\.jpg\) has label 2, outside \[0, 2\)"):
    fd.FileSource("x", "train", ["a.jpg", "b.jpg"], [0, 2], [3, 7], ["a", "b"])


# ----------------------------------------------------------------------------- stability


def test_sources_are_deterministic_and_picklable(tmp_path):
  import pickle
  fake = fx.make_fake_cub(tmp_path)
  a = get_source("cub", "train", fake.data_dir)
  b = pickle.loads(pickle.dumps(get_source("cub", "train", fake.data_dir)))
  for i in range(len(a)):
    assert a[i]["id"] == b[i]["id"]
    np.testing.assert_array_equal(a[i]["image"], b[i]["image"])


def test_split_train_val_is_stratified_deterministic_and_disjoint():
  src = get_source("synthetic", "train", num_classes=5, num_examples=103, image_size=32)
  tr, va = split_train_val(src, 0.2, seed=3)
  tr2, va2 = split_train_val(src, 0.2, seed=3)
  _, va3 = split_train_val(src, 0.2, seed=4)
  assert va.ids.tolist() == va2.ids.tolist() and va.ids.tolist() != va3.ids.tolist()
  assert sorted(tr.ids.tolist() + va.ids.tolist()) == list(range(103))
  assert not set(tr.ids.tolist()) & set(va.ids.tolist())
  counts = np.bincount(va.labels, minlength=5)
  assert counts.min() >= 4 and counts.max() <= 5  # ~20% of each class (20-21 per class)
  assert va.split == "val" and tr.num_classes == va.num_classes == 5
  ex = va[0]
  assert ex["id"] == va.ids[0] and ex["label"] == va.labels[0]
  np.testing.assert_array_equal(ex["image"], src[int(va.ids[0])]["image"])
  with pytest.raises(ValueError):
    split_train_val(src, 1.0)

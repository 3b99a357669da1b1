"""Text in the data sources: CUB's text_c10 descriptions (Reed et al. 2016 layout), `.txt`
beside the images of a class-folder tree, the missing-text case, subsets, and the synthetic
birds' hard text variant (fgjax.data.synthetic)."""
import os
import re
import shutil

import numpy as np
import pytest

from fgjax import data as fgdata
from fgjax.data import synthetic
from fgjax.data.base import DatasetNotFoundError, SubsetSource, split_train_val
from fgjax.data.layouts import FileSource
from tests.data_fixtures import TEXT_LINES, captions, make_fake_cub, make_fake_folder


def _expected(fake, src, split):
  return [fake.texts[rel] for _, _, rel in fake.splits[split]][:len(src)]


@pytest.mark.parametrize("where", [True, "parent"])
def test_cub_finds_text_c10(tmp_path, where):
  fake = make_fake_cub(tmp_path, num_classes=3, per_class=2, text=where)
  for split in ("train", "test"):
    src = fgdata.get_source("cub", split, fake.data_dir, with_text=True)
    assert src.has_text and len(src) == len(fake.splits[split])
    for i, (img_id, c, rel) in enumerate(fake.splits[split]):
      assert src.texts(i) == captions(c, str(img_id)) and len(src.texts(i)) == TEXT_LINES
      img, rec = src.get(i)
      assert rec["text"] == src.texts(i) and rec["id"] == img_id
  plain = fgdata.get_source("cub", "train", fake.data_dir)  # text only when asked
  assert not plain.has_text and "text" not in plain.get(0)[1]
  with pytest.raises(NotImplementedError, match="has no text"):
    plain.texts(0)


def test_cub_explicit_text_dir(tmp_path):
  fake = make_fake_cub(tmp_path / "d", num_classes=2, per_class=2,
                       text=str(tmp_path / "elsewhere" / "text_c10"))
  src = fgdata.get_source("cub", "train", fake.data_dir, with_text=True,
                          text_dir=fake.text_dir)
  assert [src.texts(i) for i in range(len(src))] == _expected(fake, src, "train")
  # text_c10/<class folder>/<image stem>.txt, Reed et al.'s layout
  rel = fake.splits["train"][0][2]
  assert os.path.isfile(os.path.join(fake.text_dir, os.path.splitext(rel[7:])[0] + ".txt"))
  with pytest.raises(DatasetNotFoundError, match="data.text_dir"):
    fgdata.get_source("cub", "train", fake.data_dir, with_text=True,
                      text_dir=str(tmp_path / "nope"))
  # not found automatically (not in or beside CUB_200_2011/): looked for beside the images
  with pytest.raises(DatasetNotFoundError, match="beside the images"):
    fgdata.get_source("cub", "train", fake.data_dir, with_text=True)


def test_folder_text_beside_images(tmp_path):
  fake = make_fake_folder(tmp_path, per_class=2, eval_dirs=("val",), text=True)
  for split in ("train", "val"):
    src = fgdata.get_source("folder", split, fake.data_dir, with_text=True)
    assert [src.texts(i) for i in range(len(src))] == _expected(fake, src, split)
    assert src.get(len(src) - 1)[1]["text"] == fake.texts[fake.splits[split][-1][2]]


def test_missing_and_empty_text(tmp_path):
  fake = make_fake_cub(tmp_path, num_classes=2, per_class=4, text=True)
  train = fake.splits["train"]
  gone = os.path.join(fake.text_dir, os.path.splitext(train[1][2][7:])[0] + ".txt")
  os.remove(gone)
  os.remove(os.path.join(fake.text_dir, os.path.splitext(train[2][2][7:])[0] + ".txt"))
  with pytest.raises(DatasetNotFoundError) as e:
    fgdata.get_source("cub", "train", fake.data_dir, with_text=True)
  msg = str(e.value)
  assert os.path.relpath(gone, fake.text_dir) in msg and "not found" in msg
  assert "2 missing and 0 empty of the 4 train" in msg
  assert "data.allow_missing_text" in msg and "data.text_dir" in msg
  with pytest.warns(UserWarning, match="2 missing"):
    src = fgdata.get_source("cub", "train", fake.data_dir, with_text=True,
                            allow_missing_text=True)
  got = [src.texts(i) for i in range(len(src))]
  assert got[1] == [] and got[2] == [] and got[0] == fake.texts[train[0][2]]
  assert got[3] == fake.texts[train[3][2]] and src.get(1)[1]["text"] == []
  # empty (blank lines only) is missing text too; blank lines inside a file are skipped
  test = fake.splits["test"]
  with open(os.path.join(fake.text_dir, os.path.splitext(test[0][2][7:])[0] + ".txt"),
            "w") as f:
    f.write("\n  \n")
  with open(os.path.join(fake.text_dir, os.path.splitext(test[1][2][7:])[0] + ".txt"),
            "w", encoding="utf-8") as f:
    f.write("  a bird with a red crown  \n\n\nthe bird's wings are gr\u00e9y\n")
  with pytest.raises(DatasetNotFoundError, match="is empty .*0 missing and 1 empty"):
    fgdata.get_source("cub", "test", fake.data_dir, with_text=True)
  with pytest.warns(UserWarning, match="1 empty"):
    src = fgdata.get_source("cub", "test", fake.data_dir, with_text=True,
                            allow_missing_text=True)
  assert src.texts(0) == []
  assert src.texts(1) == ["a bird with a red crown", "the bird's wings are gr\u00e9y"]


def test_skip_bad_images_keeps_texts_aligned(tmp_path):
  fake = make_fake_folder(tmp_path, per_class=3, image_kinds=("jpeg",),
                          bad={1: "garbage", 4: "truncated"}, text=True)
  with pytest.warns(UserWarning, match="skipped 2"):
    src = fgdata.get_source("folder", "train", fake.data_dir, with_text=True,
                            skip_bad_images=True)
  good = [rel for k, (_, _, rel) in enumerate(fake.splits["train"]) if k not in (1, 4)]
  assert len(src) == len(good) == 7
  for i, rel in enumerate(good):
    assert src.files[i].endswith(rel) and src.texts(i) == fake.texts[rel]
    assert src.get(i)[1]["text"] == fake.texts[rel]
  # FileSource(texts=...) given before the bad images are dropped keeps them in step too
  items = fake.splits["train"]
  with pytest.warns(UserWarning, match="skipped 2"):
    direct = FileSource("folder", "train", [os.path.join(fake.root, r) for _, _, r in items],
                        [y for _, y, _ in items], [k for k, _, _ in items], fake.class_names,
                        skip_bad_images=True, texts=[fake.texts[r] for _, _, r in items])
  assert direct.has_text and [direct.texts(i) for i in range(7)] == [fake.texts[r] for r in good]


def test_subset_forwards_text(tmp_path):
  fake = make_fake_folder(tmp_path, per_class=4, text=True)
  src = fgdata.get_source("folder", "train", fake.data_dir, with_text=True)
  train, val = split_train_val(src, 0.25, seed=1)
  assert train.has_text and val.has_text
  for part in (train, val):
    for i, j in enumerate(part.indices):
      assert part.texts(i) == src.texts(int(j)) == part.get(i)[1]["text"]
  plain = SubsetSource(fgdata.get_source("folder", "train", fake.data_dir), [0, 1], "x")
  assert not plain.has_text


def test_tfds_refuses_text_and_synthetic_ignores_file_arguments():
  with pytest.raises(ValueError, match="not supported for tfds"):
    fgdata.get_source("tfds:whatever", "train", "/nonexistent", with_text=True)
  src = fgdata.get_source("synthetic", "train", None, with_text=True, text_dir="/x",
                          allow_missing_text=True, num_classes=3, num_examples=2, image_size=32)
  assert src.has_text and isinstance(src.get(0)[1]["text"], str)


# ----------------------------------------------------------------------------- synthetic

_PART_OF = {"beak": 0, "bill": 0, "crest": 1, "throat": 2}
_MENTION = re.compile(r"\b(\w+) (beak|bill|crest|throat)\b")
_MUTED = {"grey", "brown", "olive", "sage", "teal", "slate", "mauve", "pale", "dark"}


def _mentions(sentence):
  return [(_PART_OF[p], c) for c, p in _MENTION.findall(sentence)]


def test_synthetic_hard_text(monkeypatch):
  kw = dict(num_classes=20, num_examples=400, image_size=32, seed=3)
  hard = fgdata.get_source("synthetic", "train", text="hard", text_sentences=4,
                           text_noise=0.1, **kw)
  again = synthetic.SyntheticSource("train", text="hard", **kw)
  names = synthetic._NAMES
  assert hard.has_text
  # texts(i) renders nothing
  monkeypatch.setattr(synthetic, "render", lambda *a, **k: pytest.fail("rendered"))
  texts = [hard.texts(i) for i in range(len(hard))]
  monkeypatch.undo()
  wrong = total = 0
  sizes = []
  for i, ts in enumerate(texts):
    assert ts == again.texts(i) and len(ts) == 4  # deterministic
    attrs = hard.attributes[int(hard.labels[i])]
    parts = set()
    for sentence in ts:
      m = _mentions(sentence)
      assert m, sentence  # every sentence mentions a part
      assert not _MUTED & set(re.findall(r"[a-z]+", sentence)), sentence  # no body colour
      for p, colour in m:
        assert colour in names, sentence
        parts.add(p)
        wrong += colour != names[attrs[p]]
        total += 1
    assert 1 <= len(parts) <= 2
    sizes.append(len(parts))
  # ~1000 Bernoulli(0.1) mentions: the wrong share has a standard deviation of ~0.01, so
  # [0.06, 0.14] fails for a correct generator with probability ~1e-4
  assert 0.06 < wrong / total < 0.14, wrong / total
  assert 0.3 < np.mean(np.array(sizes) == 1) < 0.7  # one or two parts, equal chances
  for i in (0, 7):
    img, rec = hard.get(i)
    assert rec["text"] == texts[i]
  # other streams: another split or seed gives other texts; text_noise=0 names true colours
  test = synthetic.SyntheticSource("test", text="hard", **kw)
  assert [test.texts(i) for i in range(20)] != texts[:20]
  clean = synthetic.SyntheticSource("train", text="hard", text_noise=0.0, **kw)
  for i in range(50):
    attrs = clean.attributes[int(clean.labels[i])]
    assert all(c == names[attrs[p]] for s in clean.texts(i) for p, c in _mentions(s))
  with pytest.raises(ValueError, match="text must be"):
    synthetic.SyntheticSource("train", text="easy", **kw)
  with pytest.raises(ValueError, match="text_noise"):
    synthetic.SyntheticSource("train", text="hard", text_noise=1.5, **kw)


def test_synthetic_hard_images_equal_plain():
  kw = dict(num_classes=5, num_examples=6, image_size=48, seed=1)
  plain = synthetic.SyntheticSource("val", **kw)
  hard = synthetic.SyntheticSource("val", text="hard", **kw)
  cached = synthetic.SyntheticSource("val", text="hard", cache=True, **kw)
  for i in range(len(plain)):
    a, ra = plain.get(i)
    for src in (hard, cached, cached):  # cached twice: the cache holds the plain record
      b, rb = src.get(i)
      np.testing.assert_array_equal(a, b)
      np.testing.assert_array_equal(ra["part_boxes"], rb["part_boxes"])
      assert rb["text"] == hard.texts(i) and isinstance(rb["text"], list)
    # the plain variant is unchanged: one str naming the three parts' true colours
    b, c, w = (synthetic._NAMES[v] for v in plain.attributes[ra["label"]])
    assert isinstance(ra["text"], str) and f"{b} beak" in ra["text"]
    assert f"{c} crest" in ra["text"] and f"{w} throat" in ra["text"]
    assert plain.texts(i) == [ra["text"]]


def test_synthetic_text_statistics():
  stats = synthetic.hard_text_statistics(num_classes=20, num_examples=300)
  # two mentioned parts always identify one of the first 38 classes (distance-2 code)
  assert 0.35 < stats["unique_share"] < 0.7 and stats["mean_candidates"] > 1.3
  assert 0.06 < stats["wrong_colour_rate"] < 0.14


def test_pseudo_label_source_forwards_text(tmp_path):
  from fgjax.toolkit.pseudo_labels import PseudoLabel, PseudoLabelSource
  fake = make_fake_folder(tmp_path / "f", per_class=2, eval_dirs=("test",), text=True)
  train = fgdata.get_source("folder", "train", fake.data_dir, with_text=True)
  test = fgdata.get_source("folder", "test", fake.data_dir, with_text=True)
  extra = tmp_path / "x.jpg"
  shutil.copy(train.files[0], extra)
  rows = [PseudoLabel("split:test:1", train.class_names[0], 0, 0.95),
          PseudoLabel(str(extra), train.class_names[1], 1, 0.99)]
  src = PseudoLabelSource(train, rows, 100, {"test": test})
  n = len(train)
  assert src.has_text and src.texts(0) == train.texts(0)
  assert src.texts(n) == test.texts(1) == src.get(n)[1]["text"]
  assert src.texts(n + 1) == [] and src.get(n + 1)[1]["text"] == []

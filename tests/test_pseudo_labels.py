"""Pseudo-labels (fgjax.toolkit.pseudo_labels, run.py --mode=pseudo_label, data.pseudo_labels):
the selection rule exactly on a known array, the CSV round trip and its errors, the source that
appends pseudo-labelled images (ids, labels, boxes padded as absent) and a tiny two-round run
on a class-folder dataset whose validation split never holds a pseudo-labelled image."""
import csv
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

import data_fixtures as fx
from configs import common
from fgjax import data as fgdata
from fgjax.toolkit import pseudo_labels as pl
from fgjax.train import modes, setup, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# rows: predicted class, top-1 probability
PROBS = np.array([
    [0.97, 0.02, 0.01],  # 0: class 0, 0.97
    [0.10, 0.85, 0.05],  # 1: class 1, 0.85
    [0.92, 0.04, 0.04],  # 2: class 0, 0.92
    [0.30, 0.30, 0.40],  # 3: class 2, 0.40
    [0.99, 0.01, 0.00],  # 4: class 0, 0.99
    [0.05, 0.91, 0.04],  # 5: class 1, 0.91
    [0.92, 0.08, 0.00],  # 6: class 0, 0.92 (ties with row 2)
])


def test_select_threshold_and_cap_per_class():
  assert pl.select(PROBS, 0.9, 0).tolist() == [0, 2, 4, 5, 6]
  assert pl.select(PROBS, 0.9, 2).tolist() == [0, 4, 5]        # class 0: 0.99, 0.97
  assert pl.select(PROBS, 0.9, 3).tolist() == [0, 2, 4, 5]     # the tie: the earlier row
  assert pl.select(PROBS, 0.85, 1).tolist() == [4, 5]          # class 1: 0.91 beats 0.85
  assert pl.select(PROBS, 0.85, 0).tolist() == [0, 1, 2, 4, 5, 6]  # >= threshold
  assert pl.select(PROBS, 0.0, 0).tolist() == list(range(7))
  assert pl.select(PROBS, 1.0, 0).tolist() == []
  assert pl.select(np.zeros((0, 3)), 0.5, 1).tolist() == []
  rows = pl.confident_rows([f"im{i}" for i in range(7)], PROBS, ["a", "b", "c"], 0.9, 2)
  assert rows == [("im0", "a", 0.97), ("im4", "a", 0.99), ("im5", "b", 0.91)]
  with pytest.raises(ValueError, match="pseudo_label.threshold"):
    pl.select(PROBS, 1.5, 0)
  with pytest.raises(ValueError, match="pseudo_label.max_per_class"):
    pl.select(PROBS, 0.5, -1)


def test_write_read_round_trip(tmp_path, monkeypatch):
  images = [fx.write_image(tmp_path / "imgs" / f"{i}.jpg") for i in range(3)]
  monkeypatch.chdir(tmp_path)
  names = ["owl", "F/A-18, big", "crow"]
  rows = [(images[0], "F/A-18, big", 0.95), (os.path.join("imgs", "1.jpg"), "owl", 0.5),
          (pl.split_ref("test", 7), "crow", 1.0)]
  path = pl.write(tmp_path / "out" / "pl.csv", rows)
  with open(path, newline="") as f:
    lines = list(csv.reader(f))
  assert lines[0] == ["image", "class", "prob"] and len(lines) == 4
  assert lines[2][0] == images[1]  # written absolute
  got = pl.read(path, names)
  assert [(r.image, r.class_name, r.label, r.prob) for r in got] == [
      (images[0], "F/A-18, big", 1, 0.95), (images[1], "owl", 0, 0.5),
      ("split:test:7", "crow", 2, 1.0)]
  # a hand-written file: image paths relative to the CSV's folder
  (tmp_path / "imgs" / "hand.csv").write_text("image,class,prob\n2.jpg,crow,0.9\n\n")
  assert [r.image for r in pl.read(tmp_path / "imgs" / "hand.csv", names)] == [images[2]]
  # writing again keeps the previous file
  pl.write(path, rows[:1])
  assert len(pl.read(path, names)) == 1
  assert len(pl.read(tmp_path / "out" / "pl.1.csv", names)) == 3


@pytest.mark.parametrize("text,error,needle", [
    (None, FileNotFoundError, "pseudo-label file not found"),
    ("", pl.PseudoLabelError, "the first line must be 'image,class,prob'"),
    ("file,label\na.jpg,owl\n", pl.PseudoLabelError, "the first line must be"),
    ("image,class,prob\nIMG,owl\n", pl.PseudoLabelError, "line 2: expected 'image,class,prob'"),
    ("image,class,prob\nIMG,owl,high\n", pl.PseudoLabelError, "line 2: prob 'high'"),
    ("image,class,prob\nIMG,owl,1.2\n", pl.PseudoLabelError, "not a probability"),
    ("image,class,prob\nIMG,eagle,0.9\n", pl.PseudoLabelError, "line 2: unknown class 'eagle'"),
    ("image,class,prob\nnope.jpg,owl,0.9\n", FileNotFoundError, "nope.jpg not found"),
    ("image,class,prob\nIMG,owl,0.9\nIMG,crow,0.9\n", pl.PseudoLabelError, "listed twice"),
    ("image,class,prob\nsplit:test:x,owl,0.9\n", pl.PseudoLabelError, "split:<split>:<example"),
])
def test_read_errors_name_the_file(tmp_path, text, error, needle):
  img = fx.write_image(tmp_path / "a.jpg")
  path = tmp_path / "pl.csv"
  if text is not None:
    path.write_text(text.replace("IMG", img))
  with pytest.raises(error) as e:
    pl.read(path, ["crow", "owl"], key="data.pseudo_labels")
  msg = str(e.value.args[0])
  assert needle in msg and f"data.pseudo_labels={path}" in msg and "\n" not in msg


def test_source_appends_images_with_new_ids_and_no_boxes(tmp_path):
  """CUB has object boxes and part locations: pseudo-labelled rows get the pipeline's
  'absent' padding (-1 boxes, invisible parts); ids continue above the train split's."""
  fake = fx.make_fake_cub(tmp_path / "data", num_classes=3, per_class=4)
  train = fgdata.get_source("cub", "train", fake.data_dir)
  test = fgdata.get_source("cub", "test", fake.data_dir)
  rows = [(test.files[i], test.class_names[2 - int(test.labels[i])], 0.99) for i in range(4)]
  rows.append((train.files[0], train.class_names[0], 0.99))  # labelled: dropped
  path = pl.write(tmp_path / "pl.csv", rows)
  src = pl.add_to_train(train, path, train, test=test)
  n = len(train)
  assert len(src) == n + 4 and src.num_pseudo == 4
  assert len(set(src.ids.tolist())) == len(src)
  assert src.ids[n:].tolist() == list(range(int(train.ids.max()) + 1,
                                            int(train.ids.max()) + 5))
  assert src.labels[n:].tolist() == [2 - int(y) for y in test.labels[:4]]
  img, rec = src.get(n + 1)
  assert np.array_equal(img, fgdata.read_image(test.files[1]))
  assert not set(rec) & set(pl.BOX_FIELDS) and rec["label"] == 2 - int(test.labels[1])
  loader = fgdata.make_eval_loader(src, global_batch_size=len(src), image_size=32,
                                   resize_size=36)
  batch = next(iter(loader))
  pseudo = batch["id"] > train.ids.max()
  assert pseudo.sum() == 4
  assert (batch["object_box"][pseudo] == -1).all() and (batch["object_box"][~pseudo] >= 0).all()
  assert (batch["part_locs"][pseudo][..., 2] == 0).all()
  assert (batch["part_locs"][~pseudo][..., 2] > 0).any()


def test_split_references_resolve_through_the_config():
  """Sources without files (synthetic): rows `split:test:<id>` read that test example."""
  cfg = common.base_config("classifier")
  cfg.data.source_kwargs = dict(num_classes=3, num_examples=9, image_size=32)
  cfg.data.val_fraction = 1 / 3
  train, val, test = setup.get_sources(cfg)
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    path = pl.write(os.path.join(d, "pl.csv"),
                    [(pl.split_ref("test", 4), test.class_names[0], 0.95),
                     (pl.split_ref("train", 1), test.class_names[0], 0.95)])  # dropped
    cfg.data.pseudo_labels = path
    train2, val2, _ = setup.get_sources(cfg)
  assert len(train2) == len(train) + 1 and val2.ids.tolist() == val.ids.tolist()
  img, rec = train2.get(len(train))
  assert np.array_equal(img, test[4]["image"]) and rec["label"] == 0 and rec["id"] == 9
  assert "object_box" not in rec and "part_boxes" not in rec


CONFIG = '''
from configs import common


def get_config(arg=None):
  c = common.base_config("classifier")
  c.model.name = "cnn_small"
  c.model.img_size = 32
  c.model.kwargs = dict(widths=(8, 16), convs_per_stage=1, stem_stride=2)
  c.data.name = "folder"
  c.data.data_dir = {data_dir!r}
  c.data.resize_size = 36
  c.data.val_fraction = 0.25
  common.quick_run(c, steps=1, batch=8)
  c.checkpoint_every_steps = 1
  return c
'''


def _run(*args):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.pop("XLA_FLAGS", None)
  env.pop("JAX_NUM_CPU_DEVICES", None)
  return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def _files(source) -> set:
  return {source.parent.files[i] for i in source.indices}


def test_two_rounds_on_a_folder_dataset(tmp_path, caplog):
  fake = fx.make_fake_folder(tmp_path / "data", per_class=6, eval_dirs=("test",))
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text(CONFIG.format(data_dir=fake.data_dir))
  import importlib.util
  spec = importlib.util.spec_from_file_location("pl_cfg", cfg_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  w1, w2 = tmp_path / "round1", tmp_path / "round2"
  trainer.train_and_evaluate(module.get_config(), str(w1))

  # round 1 -> pseudo-labels of the test folder, from the command line (every image: 0.0)
  proc = _run("--mode=pseudo_label", f"--workdir={w1}", f"--images={fake.data_dir}/test",
              "--threshold=0.0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  csv_path = w1 / "pseudo_labels.csv"
  test_files = sorted(os.path.join(fake.data_dir, r) for _, _, r in fake.splits["test"])
  rows = pl.read(csv_path, fake.class_names)
  assert sorted(r.image for r in rows) == test_files  # 10 images, notes.txt skipped

  # the same through the dataset split, with a cap of 1 per class
  out = modes.pseudo_label(str(w1), split="test", output=str(tmp_path / "capped.csv"),
                           threshold=0.0, max_per_class=1)
  capped = pl.read(tmp_path / "capped.csv", fake.class_names)
  assert out["num_images"] == len(test_files) and len(capped) == len(out["per_class"]) <= 3
  assert {r.image for r in capped} <= set(test_files)

  # round 2: train + the pseudo-labelled images; validation is the same labelled hold-out
  cfg1 = module.get_config()
  cfg2 = module.get_config()
  cfg2.data.pseudo_labels = str(csv_path)
  train1, val1, test1 = setup.get_sources(cfg1)
  train2, val2, test2 = setup.get_sources(cfg2)
  assert len(train2) == len(train1) + len(test_files)
  assert val2.ids.tolist() == val1.ids.tolist() and _files(val2) == _files(val1)
  pseudo_files = {r.image for r in rows}
  assert not _files(val2) & pseudo_files and not set(val2.ids.tolist()) & set(
      train2.ids[len(train1):].tolist())
  assert len(set(train2.ids.tolist())) == len(train2) and len(test2) == len(test1)
  with caplog.at_level(logging.INFO, logger="fgjax"):
    result = trainer.train_and_evaluate(cfg2, str(w2))
  assert f"added {len(test_files)} pseudo-labelled images" in caplog.text
  assert "metrics are transductive" in caplog.text
  assert result["transductive"]["test_images_trained_on"] == len(test_files)
  assert result["val"]["num_examples"] == len(val1)
  saved = json.loads((w2 / "config.json").read_text())
  assert saved["data"]["pseudo_labels"] == str(csv_path)
  assert saved["pseudo_labels_sha256_resolved"] == pl.file_digest(str(csv_path))

  # errors: one line, exit 2, naming the file
  bad = tmp_path / "bad.csv"
  bad.write_text("image,class,prob\n" + test_files[0] + ",eagle,0.9\n")
  proc = _run(f"--config={cfg_file}", f"--workdir={tmp_path / 'round3'}",
              f"--config.data.pseudo_labels={bad}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert f"error: data.pseudo_labels={bad} line 2: unknown class 'eagle'" in proc.stderr
  assert "Traceback" not in proc.stderr and not (tmp_path / "round3" / "checkpoints").exists()
  os.remove(test_files[0])
  with pytest.raises(FileNotFoundError, match=f"{csv_path} line .*: image file .* not found"):
    setup.get_sources(cfg2)
  with pytest.raises(ValueError, match="exactly one of --images"):
    modes.pseudo_label(str(w1))

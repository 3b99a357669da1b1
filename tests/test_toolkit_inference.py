"""Test-time augmentation, folder predictions into a submission CSV and eval's error analysis
(issue 19; fgjax.toolkit.tta / submission / analysis, fgjax.train.evaluation, run.py).

The end-to-end checks share one tiny run (tests/tiny_config.py, 4 steps, trained with
eval.tta=flip so the training run's evaluations run TTA too), trained once per module."""
import csv
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import data_fixtures as fx
import tiny_config
from fgjax import data as fgdata
from fgjax import models
from fgjax.methods import get_method
from fgjax.toolkit import analysis, submission, tta
from fgjax.train import evaluation, modes, setup, sharding

ROOT = fx.ROOT


_run = fx.run_py
_ok = fx.check_ok


# ----------------------------------------------------------------------------- TTA


@functools.lru_cache(maxsize=None)
def _tiny(preset="flip", model_name="cnn_small", **kw):
  """(config, model, method, variables, images) of a tiny randomly initialised model (cached:
  the checks share its compilation)."""
  cfg = tiny_config.get_config()
  with cfg.unlocked():
    cfg.model.name = model_name
    cfg.model.kwargs.update(kw)
    cfg.eval.tta = preset
  model, method = setup.build(cfg, 4)
  x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
  variables = jax.jit(method.init_variables)(jax.random.key(1), {"image": jnp.asarray(x[:1])})
  rng = np.random.default_rng(2)  # the heads start at zero: perturb every parameter
  variables = dict(variables, params=jax.tree.map(
      lambda a: np.asarray(a) + 0.2 * rng.normal(size=a.shape).astype(np.float32),
      variables["params"]))
  return cfg, model, method, variables, x


def _probs(method, variables, x, preset=None):
  heads, _ = jax.jit(tta.eval_outputs(method, preset))(variables, {"image": jnp.asarray(x)})
  return {k: np.asarray(jax.nn.softmax(v, -1)) for k, v in heads.items()}


def test_flip_tta_is_the_mean_of_the_model_on_x_and_its_mirror():
  cfg, model, method, variables, x = _tiny("flip")
  got = _probs(method, variables, x)["logits"]  # the preset from config.eval.tta
  apply = jax.jit(lambda v, a: jax.nn.softmax(model.apply(v, a)[0], -1))
  p = lambda a: np.asarray(apply(variables, jnp.asarray(a)))  # noqa: E731
  want = (p(x) + p(np.ascontiguousarray(x[:, :, ::-1]))) / 2
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert not np.allclose(got, p(x), atol=1e-4)  # the flip changed something
  # The eval step under the preset ranks by the averaged probabilities.
  step = jax.jit(evaluation.make_eval_step(method))
  res = step(variables, {"image": jnp.asarray(x * 58 + 120), "label": jnp.zeros(8, jnp.int32),
                         "mask": jnp.ones(8, bool)})
  assert res["pred"].shape == (8,)


def test_every_preset_gives_probabilities_of_the_batch_shape():
  _, model, method, variables, x = _tiny("flip")
  base = _probs(method, variables, x, "none")["logits"]
  for preset in tta.PRESETS:
    got = _probs(method, variables, x, preset)["logits"]
    assert got.shape == (8, 4), preset
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    if preset != "none":
      assert not np.allclose(got, base, atol=1e-5), preset
  xs = jnp.asarray(x)
  for preset in ("none", "flip", "multicrop", "multiscale"):
    views = tta.geometric_views(xs, preset)
    assert len(views) == tta.NUM_VIEWS[preset]
    assert all(v.shape == xs.shape for v in views)
    np.testing.assert_array_equal(views[0], xs)
  ms = tta.geometric_views(xs, "multiscale")
  np.testing.assert_array_equal(ms[1], xs[:, :, ::-1])  # scale 1 and its flip
  c = round(0.75 * 32)
  o = (32 - c) // 2
  want = jax.image.resize(xs[:, o:o + c, o:o + c], xs.shape, "bilinear")
  np.testing.assert_allclose(ms[4], want, atol=1e-6)  # the 0.75 crop, zoomed to 32
  mc = tta.geometric_views(xs, "multicrop")
  c = round(0.875 * 32)
  want = jax.image.resize(xs[:, 32 - c:, 32 - c:], xs.shape, "bilinear")  # bottom-right
  np.testing.assert_allclose(mc[8], want, atol=1e-6)


def test_cal8_on_a_cal_model_is_its_eight_view_test():
  cfg, model, method, variables, x = _tiny("cal8", "cal_cnn_small", widths=(8, 16),
                                           num_attentions=4, test_views="raw")
  with cfg.unlocked():
    cfg.method = "cal"
  method = get_method(cfg, model, 4)
  got = _probs(method, variables, x)["logits"]
  eight = model.clone(test_views="eight")
  want = np.asarray(jax.jit(lambda v, a: jax.nn.softmax(eight.apply(v, a)[0], -1))(
      variables, jnp.asarray(x)))
  np.testing.assert_allclose(got, want, atol=1e-6)
  raw = np.asarray(jax.jit(lambda v, a: jax.nn.softmax(model.apply(v, a)[0], -1))(
      variables, jnp.asarray(x)))
  assert not np.allclose(got, raw, atol=1e-4)


def test_cal8_refuses_a_vit_and_unknown_presets_name_the_key():
  cfg = tiny_config.get_config()
  vit = models.create("deit_tiny_distilled_patch16", 4, img_size=32)
  method = get_method(cfg, vit, 4)
  with pytest.raises(ValueError, match=r"config\.eval\.tta='cal8'.*ViT"):
    tta.eval_outputs(method, "cal8")
  with pytest.raises(ValueError, match=r"config\.eval\.tta='tencrop' is not"):
    tta.eval_outputs(method, "tencrop")


# ----------------------------------------------------------------------------- error analysis


def test_per_class_numbers_and_confused_pairs_on_a_known_case():
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
  preds = np.array([0, 1, 1, 1, 0, 2, 2, 0, 2, 3])
  cm = analysis.confusion_matrix(labels, preds, 5)
  rows = analysis.per_class(cm, ["a", "b", "c", "d", "e"])
  got = [(r["index"], r["name"], r["count"], r["correct"], r["accuracy"]) for r in rows]
  assert got == [(0, "a", 3, 1, 1 / 3), (1, "b", 2, 1, 0.5), (2, "c", 4, 3, 0.75),
                 (3, "d", 1, 1, 1.0), (4, "e", 0, 0, None)]
  pairs = analysis.confused_pairs(cm, None)
  assert [(p["class_a"], p["class_b"], p["count"], p["a_as_b"], p["b_as_a"]) for p in pairs] \
      == [(0, 1, 3, 2, 1), (0, 2, 1, 0, 1)]


def test_class_order_puts_confused_pairs_side_by_side():
  rng = np.random.default_rng(0)
  C = 12
  labels = np.repeat(np.arange(C), 20)
  preds = labels.copy()
  for a, b, n in ((0, 7, 8), (3, 10, 6), (5, 1, 5)):  # three confused pairs
    preds[np.flatnonzero(labels == a)[:n]] = b
    preds[np.flatnonzero(labels == b)[:n // 2]] = a
  noise = rng.choice(len(labels), 6, replace=False)
  preds[noise] = rng.integers(0, C, 6)
  order = list(analysis.class_order(analysis.confusion_matrix(labels, preds, C)))
  assert sorted(order) == list(range(C))
  for a, b in ((0, 7), (3, 10), (5, 1)):
    assert abs(order.index(a) - order.index(b)) == 1, (a, b, order)


def test_confusion_png_sizes(tmp_path):
  assert analysis.png_size(200) == (816, 828)  # 4-pixel cells, no labels
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 200, 2000)
  preds = np.where(rng.random(2000) < 0.7, labels, rng.integers(0, 200, 2000))
  path = analysis.confusion_png(analysis.confusion_matrix(labels, preds, 200),
                                str(tmp_path / "c.png"))
  assert Image.open(path).size == (816, 828)
  names = [f"class {i}" for i in range(10)]
  cm = analysis.confusion_matrix(np.arange(10), np.arange(10)[::-1], 10)
  img = Image.open(analysis.confusion_png(cm, str(tmp_path / "d.png"), names))
  assert img.size == (8 + 110 + 240 + 8, 20 + 110 + 240 + 8)  # 24-pixel cells with labels


# ----------------------------------------------------------------------------- submissions


def test_list_images_of_a_folder_and_of_a_list_file(tmp_path):
  d = tmp_path / "imgs"
  fx.write_image(d / "b.jpg")
  fx.write_image(d / "sub" / "a.PNG", "png")
  fx.write_image(d / "a.jpeg")
  (d / "notes.txt").write_text("not an image")
  got = submission.list_images(str(d))
  assert [n for n, _ in got] == ["a.jpeg", "b.jpg", "sub/a.PNG"]
  assert got[2][1] == os.path.join(str(d), "sub", "a.PNG")
  lst = tmp_path / "list.txt"
  lst.write_text("# test images\nimgs/b.jpg\n\nimgs/sub/a.PNG\n")
  got = submission.list_images(str(lst))
  assert got == [("imgs/b.jpg", str(tmp_path / "imgs/b.jpg")),
                 ("imgs/sub/a.PNG", str(tmp_path / "imgs/sub/a.PNG"))]
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no image files"):
    submission.list_images(str(tmp_path / "empty"))
  assert submission.header(3) == ["filename", "class", "class_2", "class_3", "prob_1",
                                  "prob_2", "prob_3"]
  with pytest.raises(ValueError, match="an image file, not a directory"):
    submission.list_images(str(d / "b.jpg"))


def test_submission_top_k_beyond_the_classes_and_negative(tmp_path):
  """--top_k above the class count gives as many columns as classes, each row as long as the
  header; a negative one is refused."""
  probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
  path = submission.write_csv(tmp_path / "s.csv", ["x.jpg", "y.jpg"], probs, ["a", "b", "c"],
                              top_k=6)
  with open(path) as f:
    lines = list(csv.reader(f))
  assert lines[0] == submission.header(3)
  assert lines[1] == ["x.jpg", "b", "c", "a", "0.500000", "0.300000", "0.200000"]
  assert all(len(row) == len(lines[0]) for row in lines)
  with pytest.raises(ValueError, match="--top_k=-1"):
    submission.write_csv(tmp_path / "t.csv", ["x.jpg"], probs[:1], None, top_k=-1)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  w = tmp_path_factory.mktemp("toolkit") / "w"
  _ok(_run("--config=tests/tiny_config.py:steps=4", f"--workdir={w}", "--config.eval.tta=flip"))
  return w


def test_eval_writes_tta_and_the_error_analysis(run_dir, tmp_path):
  out = tmp_path / "analysis"
  _ok(_run("--mode=eval", f"--workdir={run_dir}", f"--output={out}"))
  metrics = json.loads((run_dir / "eval_metrics.json").read_text())["test"]
  assert metrics["tta"] == "flip"  # the run's own preset
  rows = list(csv.DictReader(open(out / "per_class.csv")))
  names = json.loads((run_dir / "config.json").read_text())["class_names_resolved"]
  assert [r["name"] for r in rows] == names and [int(r["index"]) for r in rows] == [0, 1, 2, 3]
  count = sum(int(r["count"]) for r in rows)
  assert count == metrics["num_examples"] == 64
  assert sum(int(r["correct"]) for r in rows) / count == pytest.approx(metrics["top1"])
  pairs = list(csv.DictReader(open(out / "confused_pairs.csv")))
  assert sum(int(p["count"]) for p in pairs) == count - sum(int(r["correct"]) for r in rows)
  assert Image.open(out / "confusion.png").size == analysis.png_size(4) == (222, 234)

  proc = _run("--mode=eval", f"--workdir={run_dir}", "--tta=tencrop")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "error: config.eval.tta='tencrop' is not a test-time augmentation preset" \
      in proc.stderr


def test_predict_folder_writes_the_submission(run_dir, tmp_path):
  d = tmp_path / "unlabeled"
  src = fgdata.get_source("synthetic", "test", num_classes=4, num_examples=5, image_size=40)
  rel = ["x0.jpg", "x1.jpg", "deep/x2.jpg", "deep/er/x3.jpg", "x4.png"]
  for i, r in enumerate(rel):
    os.makedirs(os.path.dirname(d / r), exist_ok=True)
    Image.fromarray(src[i]["image"]).save(d / r, quality=95)
  fx.write_image(d / "broken.jpg", "truncated")
  sub = tmp_path / "submission.csv"
  proc = _ok(_run("--mode=predict", f"--workdir={run_dir}", f"--images={d}",
                  f"--output={sub}", "--top_k=2"))
  assert f"skipped {d / 'broken.jpg'}" in proc.stderr
  assert "predict 6/6" in proc.stderr  # the progress bar's last line
  rows = list(csv.reader(open(sub)))
  assert rows[0] == ["filename", "class", "class_2", "prob_1", "prob_2"]
  assert [r[0] for r in rows[1:]] == sorted(rel)
  # The same predictions as predict's own results (in-process, on 8 devices).
  want = modes.predict(str(run_dir), [str(d / r) for r in sorted(rel)], top_k=2)
  for row, w in zip(rows[1:], want):
    assert row[1:3] == [t["class"] for t in w["top"]]
    np.testing.assert_allclose([float(v) for v in row[3:]], [t["prob"] for t in w["top"]],
                               atol=1e-4)
  assert float(rows[1][3]) >= float(rows[1][4])

  (tmp_path / "empty").mkdir()
  proc = _run("--mode=predict", f"--workdir={run_dir}", f"--images={tmp_path / 'empty'}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "holds no image files" in proc.stderr


def test_predict_files_skips_what_it_cannot_read(run_dir, tmp_path):
  cfg, _, method, variables, _ = setup.restore_model(str(run_dir))
  good = fx.write_image(tmp_path / "ok.jpg", size=(40, 40))
  bad = fx.write_image(tmp_path / "bad.jpg", "garbage")
  mesh = sharding.make_mesh(cfg)
  kept, logits = evaluation.predict_files(cfg, method, variables, [bad, good], mesh)
  assert kept == [good] and logits.shape == (1, 4)
  np.testing.assert_allclose(logits, evaluation.predict_images(cfg, method, variables, [good],
                                                               mesh), atol=1e-6)
  with pytest.raises(OSError):
    evaluation.predict_images(cfg, method, variables, [bad], mesh)

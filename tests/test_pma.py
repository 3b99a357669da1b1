"""PMA end to end: text in the batches, the `pma` and `distill` methods, every mode with and
without text, the vocabulary kept with the run, and the CUB-layout configs through run.py."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import data_fixtures as fx
from configs import pma_student_cub, pma_synthetic, pma_vgg16_cub
from fgjax import data as fgdata
from fgjax import methods, models, text as fgtext
from fgjax.methods import distill, pma as pma_method
from fgjax.train import modes, setup, trainer


def _synthetic(arg="runlocal", **over):
  cfg = pma_synthetic.get_config(arg)
  with cfg.unlocked():
    return fx.set_keys(cfg, over)


# ----------------------------------------------------------------------------- batches


def test_text_fields_in_batches_leave_the_images_unchanged():
  cfg = _synthetic()
  src = setup.get_source(cfg, "train")
  assert src.has_text
  vocab = fgtext.Vocabulary.build(src.texts(i) for i in range(len(src)))
  enc = fgtext.TextEncoder(vocab, 16, 6, train_sentences="sample", eval_sentences="all")
  with_text = next(iter(setup.make_train_iter(cfg, src, text=enc)))
  plain = next(iter(setup.make_train_iter(cfg, src)))
  np.testing.assert_array_equal(with_text["image"], plain["image"])
  assert with_text["phrases"].shape == (16, 16, 6) and with_text["phrases"].dtype == np.int32
  assert with_text["phrase_mask"].shape == (16, 16) and with_text["phrase_mask"].dtype == bool
  assert "phrases" not in plain
  # Training samples one sentence per example with the example's own rng: deterministic.
  again = next(iter(setup.make_train_iter(cfg, src, text=enc)))
  np.testing.assert_array_equal(again["phrases"], with_text["phrases"])
  # Each row is the encoding of one of that example's sentences.
  order = {int(i): k for k, i in enumerate(src.ids)}
  for row in range(4):
    sents = src.texts(order[int(with_text["id"][row])])
    options = [enc.encode(s)[0] for s in sents]
    assert any((o == with_text["phrases"][row]).all() for o in options)
  # Evaluation: all sentences concatenated, or the first.
  ev = next(iter(setup.make_eval_iter(cfg, src, batch_size=8, text=enc)))
  first = fgtext.TextEncoder(vocab, 16, 6, eval_sentences="first")
  ev1 = next(iter(setup.make_eval_iter(cfg, src, batch_size=8, text=first)))
  assert ev["phrase_mask"].sum() > ev1["phrase_mask"].sum()
  np.testing.assert_array_equal(ev1["phrases"][0], first.encode(src.texts(0)[0])[0])


def test_text_fields_do_not_depend_on_processes_or_workers():
  """Each process's rows (and a grain worker's batches, with the pickled encoder) carry the
  phrases the single-process loader gives the same examples."""
  cfg = _synthetic()
  src = setup.get_source(cfg, "train")
  vocab = fgtext.Vocabulary.build(src.texts(i) for i in range(len(src)))
  enc = fgtext.TextEncoder(vocab, 16, 6, train_sentences="sample")
  kw = dict(global_batch_size=16, image_size=64, resize_size=72, seed=3, text=enc)
  one = next(iter(fgdata.make_train_loader(src, **kw)))
  by_id = {int(i): (p, m) for i, p, m in zip(one["id"], one["phrases"], one["phrase_mask"])}
  for p in range(2):
    part = next(iter(fgdata.make_train_loader(src, shard_index=p, shard_count=2, **kw)))
    for i, ph, m in zip(part["id"], part["phrases"], part["phrase_mask"]):
      np.testing.assert_array_equal(ph, by_id[int(i)][0])
      np.testing.assert_array_equal(m, by_id[int(i)][1])
  with fgdata.make_train_loader(src, worker_count=1, **kw) as loader:
    worker = next(iter(loader))
  np.testing.assert_array_equal(worker["phrases"], one["phrases"])
  np.testing.assert_array_equal(worker["image"], one["image"])


def test_a_source_without_text_is_refused_naming_the_key(tmp_path):
  fake = fx.make_fake_folder(tmp_path / "f")
  src = fgdata.get_source("folder", "train", fake.data_dir)
  enc = fgtext.TextEncoder(fgtext.Vocabulary.build(["a red bird"]), 4, 4)
  with pytest.raises(ValueError, match="data.text.enabled"):
    fgdata.make_train_loader(src, global_batch_size=8, image_size=32, text=enc)


# ----------------------------------------------------------------------------- the method


def _method(cfg, vocab_size=30):
  model = models.create(cfg.model.name, 20, cfg.model.img_size, vocab_size=vocab_size,
                        **cfg.model.kwargs)
  return methods.get_method(cfg, model, 20)


def test_pma_method_inputs_and_part_hits_against_chance():
  cfg = _synthetic()
  m = _method(cfg)
  b = 4
  batch = {"image": jnp.zeros((b, 64, 64, 3)), "label": jnp.zeros((b,), jnp.int32),
           "phrases": jnp.ones((b, 16, 6), jnp.int32),
           "phrase_mask": jnp.ones((b, 16), bool)}
  (inputs,) = m.model_inputs(batch)
  assert set(inputs) == {"image", "phrases", "phrase_mask"}
  (alone,) = m.model_inputs({"image": batch["image"]})
  assert set(alone) == {"image"}
  variables = m.init_variables(jax.random.key(0), {"image": batch["image"][:1]})
  assert "word_embed" in variables["params"]  # text parameters even from an image-only example
  grid = m.model.block_grid()
  boxes = pma_method.all_block_boxes(m.model)
  assert boxes.shape == (grid[0] * grid[1], 4) and boxes.max() <= 64
  # One part centred in block 0 of every example, one in the last block.
  parts = np.full((b, 3, 4), -1, np.float32)
  parts[:, 0] = [boxes[0][0] + 1, boxes[0][1] + 1, boxes[0][0] + 3, boxes[0][1] + 3]
  parts[:, 1] = [boxes[-1][0] + 1, boxes[-1][1] + 1, boxes[-1][0] + 3, boxes[-1][1] + 3]
  batch["part_boxes"] = jnp.asarray(parts)
  _, values = m.eval_outputs(variables, batch)
  n = grid[0] * grid[1]
  np.testing.assert_allclose(values["located_hit_chance"], 2 / n, rtol=1e-6)
  _, aux = m.model.apply(variables, inputs, train=False)
  located = np.asarray(aux["located"])
  expect = np.isin(located, [0, n - 1]).mean(-1)
  np.testing.assert_allclose(values["located_hit"], expect)
  out = m.summarize({k: np.asarray(v) for k, v in values.items()})
  assert out["located_part_hits_chance"] == pytest.approx(2 / n)
  assert set(out) >= {"located_part_hits", "located_part_hits_stage1",
                      "located_part_hits_stage3"}


def test_pma_method_refuses_other_models():
  cfg = _synthetic()
  with pytest.raises(ValueError, match="needs a PMA model"):
    methods.get_method(cfg, models.create("cnn_small", 20, 64), 20)


def test_kl_divergence_is_zero_at_the_teacher_and_matches_numpy():
  z = jnp.asarray([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
  for t in (1.0, 4.0):
    p = distill.soft_targets(z, t)
    assert float(distill.kl_divergence(p, z, t)) == pytest.approx(0.0, abs=1e-6)
  s = jnp.asarray([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
  p = np.asarray(distill.soft_targets(z, 2.0))
  q = np.exp(np.asarray(s) / 2) / np.exp(np.asarray(s) / 2).sum(-1, keepdims=True)
  ref = 4.0 * np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
  assert float(distill.kl_divergence(jnp.asarray(p), s, 2.0)) == pytest.approx(ref, rel=1e-5)


def test_vocabulary_map_between_runs():
  a = fgtext.Vocabulary.build(["a red beak", "a blue crest"])
  b = fgtext.Vocabulary.build(["a blue crest", "a green throat"])
  table = distill.vocabulary_map(a, b)
  for w in a.words[2:]:
    assert b.words[table[a.id(w)]] == (w if w in b.words else "<unk>")
  assert table[0] == 0


def test_distill_needs_a_teacher():
  cfg = pma_synthetic.get_config("runlocal,student=True")
  with cfg.unlocked():
    cfg.teacher.checkpoint = ""
  with pytest.raises(ValueError, match="config.teacher"):
    setup.build(cfg, 20)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def bimodal_run(tmp_path_factory):
  w = tmp_path_factory.mktemp("pma") / "bimodal"
  result = trainer.train_and_evaluate(_synthetic(), str(w))
  return w, result


@pytest.mark.slow
def test_bimodal_run_keeps_its_vocabulary_and_every_mode_works_with_and_without_text(
    bimodal_run, tmp_path):
  w, result = bimodal_run
  assert "located_part_hits" in result["test"] and "located_part_hits_chance" in result["test"]
  vocab = fgtext.Vocabulary.load(str(w / "vocab.txt"))
  saved = json.loads((w / "config.json").read_text())
  assert saved["vocab_sha256_resolved"] == vocab.sha256()
  assert saved["vocab_size_resolved"] == len(vocab)
  # eval with and without text
  with_text = modes.evaluate_checkpoint(str(w))
  assert with_text["text"] == "with"
  without = modes.evaluate_checkpoint(str(w), without_text=True)
  assert without["text"] == "without" and "located_part_hits" in without
  # predict: --text for every image, a .txt beside the image, or nothing
  src = fgdata.get_source("synthetic", "test", num_classes=20, image_size=72, num_examples=3,
                          text="hard")
  from PIL import Image
  paths = []
  for i in range(3):
    p = tmp_path / f"bird{i}.png"
    Image.fromarray(src[i]["image"]).save(p)
    paths.append(str(p))
  (tmp_path / "bird0.txt").write_text("\n".join(src.texts(0)) + "\n")
  _, m, variables = _restored(w)
  texts = modes.texts_for(m, paths)
  assert texts[0] == src.texts(0) and texts[1] is None
  given = modes.texts_for(m, paths, "a bird with a red beak")
  assert given == [["a bird with a red beak"]] * 3
  rows = modes.predict(str(w), paths, text="a bird with a red beak")
  rows_beside = modes.predict(str(w), paths)
  rows_none = modes.predict(str(w), paths, without_text=True)
  assert len(rows) == len(rows_beside) == len(rows_none) == 3
  # The text changes the prediction's probabilities (the model reads it).
  probs = lambda rs: [r["top"][0]["prob"] for r in rs]
  assert probs(rows) != probs(rows_none)
  assert probs(rows_beside)[1:] == pytest.approx(probs(rows_none)[1:], abs=1e-6)
  # visualize: the three located blocks and the phrases
  written = modes.visualize(str(w), paths[:1], output=str(tmp_path / "vis"))
  assert written and written[0].endswith("_pma.png")
  written = modes.visualize(str(w), [], output=str(tmp_path / "vis2"), num_images=2)
  assert len(written) == 2
  # export_teacher writes logits and probabilities
  out = modes.export_teacher(str(w), output=str(tmp_path / "t.npz"))
  with np.load(out) as f:
    np.testing.assert_allclose(f["probabilities"].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(f["probabilities"],
                               np.asarray(jax.nn.softmax(f["logits"], -1)), atol=1e-6)


def _restored(w):
  cfg, _, m, variables, _ = setup.restore_model(str(w))
  return cfg, m, variables


@pytest.mark.slow
def test_a_resumed_run_reads_its_vocabulary_and_refuses_a_lost_one(bimodal_run, tmp_path):
  import shutil
  w, _ = bimodal_run
  copy = tmp_path / "resumed"
  shutil.copytree(w, copy)
  before = (copy / "vocab.txt").read_text()
  cfg = _synthetic(**{"total_steps": 3, "eval_every_steps": 3})
  trainer.train_and_evaluate(cfg, str(copy))
  steps = [json.loads(x)["step"] for x in open(copy / "metrics.jsonl")]
  assert max(steps) == 3 and steps.count(1) == 1  # resumed at 2, not trained again from 0
  assert (copy / "vocab.txt").read_text() == before
  assert json.loads((copy / "config.json").read_text())["total_steps"] == 3
  os.remove(copy / "vocab.txt")
  with pytest.raises(FileNotFoundError, match="vocab.txt not found"):
    trainer.train_and_evaluate(_synthetic(**{"total_steps": 4}), str(copy))
  with pytest.raises(FileNotFoundError, match="vocab.txt not found"):
    setup.restore_model(str(copy))


@pytest.mark.slow
def test_a_changed_vocabulary_is_refused(bimodal_run, tmp_path):
  import shutil
  w, _ = bimodal_run
  copy = tmp_path / "copy"
  shutil.copytree(w, copy)
  with open(copy / "vocab.txt", "a") as f:
    f.write("zebra\n")
  with pytest.raises(ValueError, match="vocab.txt was changed"):
    setup.restore_model(str(copy))


@pytest.mark.slow
def test_students_learn_from_the_teacher_online_and_from_exported_predictions(
    bimodal_run, tmp_path):
  w, _ = bimodal_run
  online = _synthetic("runlocal,student=True", **{"teacher.checkpoint": str(w)})
  res = trainer.train_and_evaluate(online, str(tmp_path / "online"))
  assert res["test"]["num_examples"] == 32
  rows = [json.loads(x) for x in open(tmp_path / "online" / "metrics.jsonl")]
  train_rows = [r for r in rows if r.get("split") == "train"]
  assert train_rows and "kl" in train_rows[-1] and "ce" not in train_rows[-1]
  preds = modes.export_teacher(str(w), output=str(tmp_path / "t.npz"))
  offline = _synthetic("runlocal,student=True", **{"teacher.checkpoint": "",
                                                   "teacher.predictions": preds,
                                                   "data.text.enabled": False,
                                                   "distill.ce_weight": 0.5})
  res = trainer.train_and_evaluate(offline, str(tmp_path / "offline"))
  rows = [json.loads(x) for x in open(tmp_path / "offline" / "metrics.jsonl")]
  train_rows = [r for r in rows if r.get("split") == "train"]
  assert "kl" in train_rows[-1] and "ce" in train_rows[-1]


@pytest.mark.slow
def test_online_text_teacher_needs_text_in_the_student_batches(bimodal_run, tmp_path):
  w, _ = bimodal_run
  cfg = _synthetic("runlocal,student=True", **{"teacher.checkpoint": str(w),
                                               "data.text.enabled": False})
  with pytest.raises(ValueError, match="data.text.enabled"):
    trainer.train_and_evaluate(cfg, str(tmp_path / "s"))
  assert not (tmp_path / "s" / "config.json").exists()


@pytest.mark.slow
def test_image_only_and_text_only_variants_train(tmp_path):
  res = trainer.train_and_evaluate(_synthetic("runlocal,modality=image"), str(tmp_path / "i"))
  assert not (tmp_path / "i" / "vocab.txt").exists()
  assert "located_part_hits" in res["test"]
  res = trainer.train_and_evaluate(_synthetic("runlocal,modality=text"), str(tmp_path / "t"))
  assert (tmp_path / "t" / "vocab.txt").exists() and "located_part_hits" not in res["test"]


@pytest.mark.slow
def test_cub_layout_with_descriptions_through_run_py(tmp_path):
  """The CUB recipe's runlocal on a CUB folder with text_c10/, then its student from it."""
  fake = fx.make_fake_cub(tmp_path / "data", num_classes=3, per_class=4, text=True)
  teacher = tmp_path / "teacher"
  fx.check_ok(fx.run_py("--config=configs/pma_vgg16_cub.py:runlocal", f"--workdir={teacher}",
                        f"--config.data.data_dir={fake.data_dir}"))
  assert (teacher / "vocab.txt").exists()
  assert list((teacher / "visualize").glob("*_pma.png"))
  student = tmp_path / "student"
  fx.check_ok(fx.run_py("--config=configs/pma_student_cub.py:runlocal", f"--workdir={student}",
                        f"--config.data.data_dir={fake.data_dir}",
                        f"--config.teacher.checkpoint={teacher}"))
  assert (student / "final_metrics.json").exists()
  # Without the descriptions: the student needs none, the teacher runs image-only.
  import shutil
  shutil.rmtree(fake.text_dir)
  fx.check_ok(fx.run_py("--mode=eval", f"--workdir={student}"))
  fx.check_ok(fx.run_py("--mode=eval", f"--workdir={teacher}", "--without_text",
                        "--config=configs/pma_vgg16_cub.py:runlocal",
                        f"--config.data.data_dir={fake.data_dir}"))
  assert (teacher / "eval_metrics_without_text.json").exists()
  assert (teacher / "without_text" / "per_class.csv").exists()
  proc = fx.run_py("--mode=eval", f"--workdir={teacher}")
  assert proc.returncode == 2 and "text" in proc.stderr and "Traceback" not in proc.stderr
  img = fake.files[0] if hasattr(fake, "files") else None
  if img is None:
    img = next(str(p) for p in (tmp_path / "data").rglob("*.jpg"))
  proc = fx.check_ok(fx.run_py("--mode=predict", f"--workdir={teacher}", img,
                               "--text=this bird has a red crown"))
  assert "%" in proc.stdout


@pytest.mark.slow
def test_synthetic_through_run_py_with_and_without_text(tmp_path):
  w = tmp_path / "w"
  fx.check_ok(fx.run_py("--config=configs/pma_synthetic.py:runlocal", f"--workdir={w}"))
  proc = fx.check_ok(fx.run_py("--mode=eval", f"--workdir={w}", "--without_text"))
  assert '"text": "without"' in proc.stdout
  proc = fx.check_ok(fx.run_py("--mode=visualize", f"--workdir={w}", "--num_images=1"))
  assert list((w / "visualize").glob("*_pma.png"))


def test_pma_configs_build():
  for module, arg in ((pma_vgg16_cub, None), (pma_vgg16_cub, "image_only"),
                      (pma_student_cub, None), (pma_student_cub, "teacher=predictions"),
                      (pma_synthetic, None), (pma_synthetic, "modality=text")):
    cfg = module.get_config(arg)
    assert isinstance(cfg, ml_collections.ConfigDict)
  assert not pma_vgg16_cub.get_config("image_only").data.text.enabled
  assert pma_student_cub.get_config("teacher=predictions").teacher.predictions.endswith(
      "teacher_predictions.npz")
  assert os.path.basename(pma_student_cub.get_config(None).teacher.checkpoint) == \
      "pma_resnet50_cub"

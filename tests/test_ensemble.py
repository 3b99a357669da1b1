"""`python -m fgjax.tools.ensemble`: weighted ensembles of three tiny trained runs (the small CNN
on 32/36 px synthetic birds, 2 steps, different seeds; the third with its own image size), on
the test split and on a folder of images, by probabilities and by embeddings."""
import csv
import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

import tiny_config
from fgjax import data as fgdata
from fgjax.tools import ensemble
from fgjax.train import evaluation, modes, setup, trainer


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("ens")
  out = []
  for seed in range(3):
    c = tiny_config.get_config("steps=2,val=False")
    with c.unlocked():
      c.seed = seed
      c.checkpoint_every_steps = 2
      if seed == 2:  # its own evaluation preprocessing
        c.model.img_size = 36
        c.data.resize_size = 40
    w = str(root / f"seed{seed}")
    trainer.train_and_evaluate(c, w)
    out.append(w)
  return out


@pytest.fixture(scope="module")
def members(workdirs):
  return ensemble.load_members(workdirs, "last")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
  """Five synthetic birds as files (two in a sub-folder), a text file and a hidden file."""
  root = tmp_path_factory.mktemp("images")
  src = fgdata.get_source("synthetic", "test", num_classes=4, num_examples=5, image_size=40)
  os.makedirs(root / "sub")
  for i in range(5):
    Image.fromarray(src[i]["image"]).save(root / ("sub" if i >= 3 else "") / f"b{i}.png")
  (root / "notes.txt").write_text("not an image\n")
  (root / ".hidden.png").write_text("hidden\n")
  return str(root)


def test_probabilities_are_the_weighted_mean_of_each_members_predict(workdirs, members,
                                                                      image_dir, tmp_path):
  rel = ["b0.png", "b1.png", "b2.png", "sub/b3.png", "sub/b4.png"]
  paths = [os.path.join(image_dir, r) for r in rel]
  own = []
  for w in workdirs:  # each member's own run.py predict, all 4 classes
    rows = modes.predict(w, paths, which="last", top_k=4)
    p = np.zeros((len(paths), 4))
    for i, row in enumerate(rows):
      for t in row["top"]:
        p[i, t["index"]] = t["prob"]
    own.append(p)
  assert not np.allclose(own[0], own[1], atol=1e-4)  # the seeds give different members
  expected = (2 * own[0] + own[1] + own[2]) / 4
  kept, got = ensemble.predict_scores(members, paths, [2, 1, 1])
  assert kept == paths
  np.testing.assert_allclose(got, expected, atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(ensemble.predict_scores(members, paths, [0.5, 0.25, 0.25])[1],
                             got, atol=1e-12)  # weights are normalised
  np.testing.assert_allclose(ensemble.predict_scores(members, paths, [0, 1, 0])[1], own[1],
                             atol=1e-6)

  # The folder on the command line: the CSV of run.py's predict (a text file, a hidden file
  # left out; a broken image skipped with a warning).
  out = tmp_path / "sub" / "submission.csv"
  broken = os.path.join(image_dir, "sub", "broken.jpg")
  with open(broken, "wb") as f:
    f.write(b"not a jpeg")
  try:
    assert ensemble.main([*workdirs, "--weights=2,1,1", f"--images={image_dir}",
                          f"--output={out}", "--checkpoint=last", "--top_k=2"]) == 0
  finally:
    os.remove(broken)
  with open(out, newline="") as f:
    table = list(csv.reader(f))
  names = members[0].class_names
  assert table[0] == ["filename", "class", "class_2", "prob_1", "prob_2"]
  assert [row[:2] for row in table[1:]] == [[r, names[int(k)]]
                                            for r, k in zip(rel, expected.argmax(-1))]
  np.testing.assert_allclose([float(row[3]) for row in table[1:]], expected.max(-1), atol=2e-6)

  # By embeddings: cosine similarities; a member of weight 1 alone ranks as its own centroids.
  kept, cos = ensemble.predict_scores(members, paths, [1, 1, 1], on="embeddings")
  assert kept == paths and cos.shape == (5, 4) and np.all(np.abs(cos) <= 1 + 1e-9)
  _, alone = ensemble.predict_scores(members, paths, [0, 0, 1], on="embeddings")
  labels, train_e = ensemble.train_embeddings(members[2:])
  _, emb = ensemble.image_embeddings(members[2], paths)
  np.testing.assert_allclose(alone, ensemble.cosine_scores(
      emb, ensemble.fit_centroids(ensemble.l2_normalize(train_e[0]), labels, 4)), atol=1e-6)
  assert ensemble.main([*workdirs, "--on=embeddings", f"--images={image_dir}",
                        f"--output={out}", "--checkpoint=last"]) == 0
  with open(out, newline="") as f:
    assert list(csv.reader(f))[1:] == [[r, names[int(k)]] for r, k in zip(rel, cos.argmax(-1))]


def test_evaluate_on_logits_against_the_members_and_by_hand(workdirs, members, tmp_path):
  out = tmp_path / "report.json"
  assert ensemble.main([*workdirs, "--weights", "1,1,2", "--output", str(out),
                        "--checkpoint", "last"]) == 0
  report = json.loads(out.read_text())
  assert report["on"] == "logits" and report["num_examples"] == 64
  assert [r["weight"] for r in report["members"]] == [0.25, 0.25, 0.5]
  for w, row in zip(workdirs, report["members"]):  # each member's own numbers as it reported
    with open(os.path.join(w, "final_metrics.json")) as f:
      final = json.load(f)["test"]
    for k in ("top1", "top5", "mean_per_class"):
      assert row["softmax"][k] == pytest.approx(final[k], abs=1e-9), (w, k)
  # The ensemble's numbers from the members' test logits, recomputed here.
  probs, labels = [], None
  for m in members:
    src = setup.get_source(m.config, "test")
    res = evaluation.predict_source(m.config, m.method, m.variables, src, m.mesh)
    order = np.argsort(res["id"])
    z = res["logits"][order].astype(np.float64)
    probs.append(np.exp(z) / np.exp(z).sum(-1, keepdims=True))
    labels = np.asarray(src.labels)[np.searchsorted(np.asarray(src.ids), res["id"][order])]
  mean = 0.25 * probs[0] + 0.25 * probs[1] + 0.5 * probs[2]
  correct = mean.argmax(-1) == labels
  assert report["ensemble"]["top1"] == pytest.approx(correct.mean())
  per_class = [correct[labels == c].mean() for c in range(4)]
  assert report["ensemble"]["mean_per_class"] == pytest.approx(np.mean(per_class))
  top5 = np.argsort(-mean, -1)[:, :5]
  assert report["ensemble"]["top5"] == pytest.approx((top5 == labels[:, None]).any(-1).mean())


def test_weighted_embeddings_and_centroids_by_hand():
  # member A: 2-d, member B: 1-d embeddings of three train images (labels 0, 1, 1).
  a = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
  b = np.array([[-2.0], [5.0], [0.5]])
  w = ensemble.normalize_weights([9, 16], 2)
  np.testing.assert_allclose(w, [0.36, 0.64])
  e = ensemble.weighted_embeddings([a, b], w)  # sqrt(w) = 0.6, 0.8 times the unit vectors
  r = np.sqrt(0.5)
  np.testing.assert_allclose(e, [[0.6, 0, -0.8], [0, 0.6, 0.8], [0.6 * r, 0.6 * r, 0.8]])
  # Weights are linear in the dot product: sum_i w_i cos_i (not w_i squared).
  np.testing.assert_allclose(e[0] @ e[2], 0.36 * r + 0.64 * -1.0)
  cents = ensemble.fit_centroids(e, np.array([0, 1, 1]), 3)
  m1 = np.array([0.3 * r, 0.3 + 0.3 * r, 0.8])
  np.testing.assert_allclose(cents, [[0.6, 0, -0.8], m1 / np.linalg.norm(m1), [0, 0, 0]])
  q = np.array([[1.0, 0.0, 1.0]])  # cosine to each centroid; class 2 has none: -1
  s = ensemble.cosine_scores(q, cents)
  np.testing.assert_allclose(s[0, :2], [(0.6 - 0.8) / np.sqrt(2),
                                        (m1[0] + m1[2]) / np.linalg.norm(m1) / np.sqrt(2)])
  assert s[0, 2] == -1.0
  for bad in ([1, 2, 3], [1, -1], [0, 0], [np.nan, 1]):
    with pytest.raises(ensemble.EnsembleError, match="--weights"):
      ensemble.normalize_weights(bad, 2)


def test_evaluate_on_embeddings_fits_on_train_only(members, monkeypatch):
  m = members[0]
  test_src = setup.get_source(m.config, "test")
  emb = ensemble.source_embeddings(m, test_src)
  assert emb["embedding"].shape == (64, 16)  # cnn_small's last width
  # They are the pre-logits: the head applied to them gives the run's own test logits.
  res = evaluation.predict_source(m.config, m.method, m.variables, test_src, m.mesh)
  head = m.variables["params"]["head"]
  np.testing.assert_array_equal(emb["id"], res["id"])
  np.testing.assert_allclose(emb["embedding"] @ head["kernel"] + head["bias"], res["logits"],
                             rtol=1e-5, atol=1e-5)

  class NoEmbedding:  # a model whose aux has no pre_logits (RA-CNN's)
    num_classes = 4
    text = None  # the method protocol's text encoder: this one reads no text

    def model_inputs(self, batch):
      return (batch["image"],)

    class model:
      @staticmethod
      def apply(variables, x, train):
        return x.mean((1, 2, 3))[:, None], {}

  with pytest.raises(ensemble.EnsembleError, match=f"{m.workdir}: model cnn_small returns no"):
    ensemble.source_embeddings(dataclasses.replace(m, method=NoEmbedding()), test_src)

  fits = []
  orig = ensemble.fit_centroids

  def spy(e, labels, n):
    fits.append((np.asarray(e).shape, np.asarray(labels)))
    return orig(e, labels, n)

  monkeypatch.setattr(ensemble, "fit_centroids", spy)
  report = ensemble.evaluate(members, [1, 1, 1], on="embeddings")
  train = setup.get_source(m.config, "train")
  train_labels = np.asarray(train.labels)[np.argsort(np.asarray(train.ids))]
  assert len(fits) == 4  # one per member (its own numbers), one for the ensemble
  for shape, labels in fits:
    np.testing.assert_array_equal(labels, train_labels)  # the train split, never the test
  assert [s for s, _ in fits] == [(64, 16)] * 3 + [(64, 48)]
  assert report["num_train_examples"] == 64 and report["num_examples"] == 64
  assert all("centroid" in r and r["embedding_dim"] == 16 for r in report["members"])
  for k in ("top1", "top5", "mean_per_class"):
    assert 0.0 <= report["ensemble"][k] <= 1.0
  table = ensemble.format_table(report)
  rules = [line.split()[2] for line in table.splitlines()[2:-1]]
  assert rules == ["softmax", "centroid"] * 3 + ["centroid"]  # the members, the ensemble


def test_bad_members_and_options_are_exit_2(workdirs, tmp_path, capsys):
  with open(os.path.join(workdirs[0], "config.json")) as f:
    saved = json.load(f)
  renamed = dict(saved, class_names_resolved=["a"] + saved["class_names_resolved"][1:])
  fewer = dict(saved, class_names_resolved=saved["class_names_resolved"][:3],
               num_classes_resolved=3)
  cases = []
  for name, cfg in (("renamed", renamed), ("fewer", fewer)):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    cases.append(([workdirs[0], str(tmp_path / name)], [str(tmp_path / name), "config.json"]))
  cases += [([*workdirs[:2], "--weights=1,2,3"], ["--weights", "3 weights for 2"]),
            ([*workdirs[:2], "--weights=1,x"], ["--weights"]),
            ([workdirs[0], str(tmp_path / "nowhere")], ["nowhere"]),
            ([workdirs[0], f"--images={tmp_path}"], ["--output"]),
            ([workdirs[0], f"--images={tmp_path}", f"--output={tmp_path / 's.csv'}",
              "--on=embeddings", "--top_k=2"], ["--top_k", "--on logits"]),
            ([workdirs[0], "--tta=sideways"], ["sideways"])]
  for argv, needles in cases:
    assert ensemble.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
      assert needle in err, (needle, err)
  assert "class 0 is 'a'" in _err_of([workdirs[0], str(tmp_path / "renamed")], capsys)
  assert "3 classes, not 4" in _err_of([workdirs[0], str(tmp_path / "fewer")], capsys)


def _err_of(argv, capsys):
  assert ensemble.main(argv) == 2
  return capsys.readouterr().err

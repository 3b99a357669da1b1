"""run.py as users run it: every mode once (subprocesses), the CUB/Cars/Dogs configs' quick
variants for one step on fake datasets in their real layouts, and the missing-dataset exit."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import data_fixtures as fx
from configs import demo, trs_deit_cars, trs_deit_cub, trs_deit_dogs
from fgjax import data as fgdata
from fgjax import teachers
from fgjax.train import hostmem, logs, trainer

ROOT = fx.ROOT


_run = fx.run_py
_ok = fx.check_ok


@pytest.mark.parametrize("config,needle", [
    ("configs/trs_deit_cub.py", "CUB"),
    ("configs/trs_deit_cars.py", "Cars"),
    ("configs/trs_deit_dogs.py", "Dogs"),
])
def test_missing_dataset_is_a_short_message_and_exit_2(tmp_path, config, needle):
  proc = _run(f"--config={config}", f"--workdir={tmp_path / 'w'}",
              f"--config.data.data_dir={tmp_path / 'nowhere'}", timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  err = proc.stderr
  assert "Traceback" not in err
  assert needle.lower() in err.lower() and "data.data_dir" in err
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_unknown_config_key_is_exit_2_naming_the_key(tmp_path):
  proc = _run("--config=configs/demo.py:runlocal", f"--workdir={tmp_path / 'w'}",
              "--config.optim.nme=adamw", timeout=300)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert 'error: --config.optim.nme: the config has no key \'nme\'. Did you mean "name"' \
      in proc.stderr


@pytest.mark.slow
def test_demo_runlocal_every_mode(tmp_path):
  """train (teacher phase + TRS-DeiT), eval, predict, visualize, export_teacher."""
  w = tmp_path / "demo"
  proc = _ok(_run("--config=configs/demo.py:runlocal", f"--workdir={w}"))
  assert (w / "teacher").is_dir() and (w / "checkpoints").is_dir()
  rows = logs.read_metrics(str(w))
  test_rows = [r for r in rows if r.get("split") == "test"]
  assert test_rows and 0 <= test_rows[-1]["part_hit_rate"] <= 1
  assert 0 < test_rows[-1]["part_hit_chance"] < 0.5
  assert list((w / "visualize").glob("*_regions.png")), "the demo writes region PNGs"
  assert "teacher" in proc.stderr + proc.stdout
  if hostmem.has_glibc():
    assert "host memory: freed memory is kept" in proc.stderr  # --host_memory=auto on the CPU

  _ok(_run("--mode=eval", f"--workdir={w}"))
  metrics = json.loads((w / "eval_metrics.json").read_text())["test"]
  assert {"top1", "top5", "mean_per_class", "num_examples"} <= set(metrics)
  assert metrics["num_examples"] == 32  # every runlocal test example, once

  # predict and visualize on image files a user has.
  src = fgdata.get_source("synthetic", "test", num_classes=20, num_examples=2, image_size=112)
  paths = []
  for i in range(2):
    p = tmp_path / f"bird{i}.jpg"
    Image.fromarray(src[i]["image"]).save(p, quality=95)
    paths.append(str(p))
  proc = _ok(_run("--mode=predict", f"--workdir={w}", *paths))
  for p in paths:
    assert p in proc.stdout
  assert proc.stdout.count("%") == 2 * 5  # top-5 per image

  out = tmp_path / "regions"
  missing = str(tmp_path / "no_such_bird.jpg")  # skipped with a warning, the others drawn
  proc = _ok(_run("--mode=visualize", f"--workdir={w}", f"--output={out}", *paths, missing))
  assert f"skipped {missing}: no such file" in proc.stderr
  pngs = sorted(out.glob("*_regions.png"))
  assert [p.name for p in pngs] == ["bird0_regions.png", "bird1_regions.png"]
  proc = _run("--mode=visualize", f"--workdir={w}", f"--output={out}", missing)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "none of the 1 files given could be read" in proc.stderr
  assert Image.open(pngs[0]).size == (2 * 96 + 4, 96)

  npz = tmp_path / "teacher_preds.npz"
  _ok(_run("--mode=export_teacher", f"--workdir={w / 'teacher'}", f"--output={npz}"))
  ids, logits, meta = teachers.load_predictions(str(npz))
  assert sorted(np.asarray(ids).tolist()) == list(range(64))  # every training example once
  assert logits.shape == (64, 20) and meta["model"] == "cnn_small"

  proc = _run("--mode=predict", f"--workdir={w}", str(tmp_path / "missing.jpg"))
  assert proc.returncode == 2 and "missing.jpg" in proc.stderr


def _quick(module, data_dir, **over):
  cfg = module.get_config("runlocal")
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.data.data_dir = data_dir
    cfg.total_steps = 1
    cfg.eval_every_steps = 1
    cfg.visualize_examples = 0
    for k, v in over.items():
      cfg[k] = v
  return cfg


def part_hit_chance_on_test(cfg) -> float:
  """The part-hit chance a ViT-family run of `cfg` must report on CUB's test split, recomputed
  in numpy from the eval batches' `part_locs`: per example with a visible part, the share of
  the model's patches [c*s, c*s+p) x [r*s, r*s+p) that contain one; the mean of those."""
  from fgjax import models
  from fgjax.train import setup
  model = models.create(cfg.model.name, 3, int(cfg.model.img_size), **cfg.model.kwargs)
  (gh, gw), p = model.grid, model.patch_size
  s = model.patch_stride or p
  x0 = np.tile(np.arange(gw) * s, gh)[:, None]
  y0 = np.repeat(np.arange(gh) * s, gw)[:, None]
  shares = []
  for batch in setup.make_eval_iter(cfg, setup.get_source(cfg, "test")):
    for locs, real in zip(batch["part_locs"], batch["mask"]):
      vis = locs[:, 2] > 0
      if real and vis.any():
        x, y = locs[vis, 0][None], locs[vis, 1][None]
        inside = (x >= x0) & (x < x0 + p) & (y >= y0) & (y < y0 + p)
        shares.append(inside.any(1).mean())
  return float(np.mean(shares))


@pytest.mark.parametrize("name", ["cub", "cars", "dogs"])
def test_quick_config_trains_one_step_on_fake_data(tmp_path, name):
  if name == "cub":
    fake, module = fx.make_fake_cub(tmp_path / "data", num_classes=3, per_class=4), trs_deit_cub
  elif name == "cars":
    fake, module = fx.make_fake_cars(tmp_path / "data", num_classes=3, per_class=4), \
        trs_deit_cars
  else:
    fake, module = fx.make_fake_dogs(tmp_path / "data", num_classes=3, per_class=4), \
        trs_deit_dogs
  cfg = _quick(module, fake.data_dir)
  result = trainer.train_and_evaluate(cfg, str(tmp_path / "w"))
  test = result["test"]
  assert test["num_examples"] == len(fake.splits["test"])
  assert np.isfinite(test["top1"])
  rows = [r for r in logs.read_metrics(str(tmp_path / "w")) if r.get("split") == "train"]
  assert rows and np.isfinite(rows[-1]["loss"]) and rows[-1]["step"] == 1
  if name == "cub":  # CUB's part locations: TRS's selected patches against chance
    assert 0 <= test["part_hit_rate"] <= 1 and test["part_hit_chance"] > 0
    assert test["part_hit_chance"] == pytest.approx(part_hit_chance_on_test(cfg), abs=1e-6)
  else:
    assert "part_hit_rate" not in test


@pytest.mark.slow
def test_demo_student_learns_and_selects_the_parts(tmp_path):
  """The demo's student (here without the teacher phase) as run.py runs it, cut to 150 steps:
  it learns the 20 classes far above chance (5%; the full demo: about 90%) and TRS selects
  patches on a part box far more often than patches picked at random would be."""
  w = tmp_path / "short"
  _ok(_run("--config=configs/demo.py:teacher=none", f"--workdir={w}",
           "--config.total_steps=150", "--config.eval_every_steps=150",
           "--config.checkpoint_every_steps=150", "--config.optim.warmup_steps=15",
           "--config.visualize_examples=0"))
  test = json.loads((w / "final_metrics.json").read_text())["test"]
  assert test["top1"] > 0.35, test  # measured: 60%
  assert test["part_hit_rate"] > 3 * test["part_hit_chance"] > 0, test  # 64.8% vs 10.9%


def test_demo_config_quick_variant_trains_one_step(tmp_path):
  cfg = _quick(demo, None)
  with cfg.unlocked():
    cfg.teacher.train_first.total_steps = 1
    cfg.teacher.train_first.eval_every_steps = 1
  result = trainer.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert result["test"]["num_examples"] == 32
  assert 0 <= result["test"]["part_hit_rate"] <= 1

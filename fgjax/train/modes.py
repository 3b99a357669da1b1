"""run.py's non-training modes: eval, predict, visualize, export_teacher.

Each restores the model of a workdir (best validation checkpoint when the run has one, else
the last; `which="last"` forces the last) from its saved `config.json`, through the set-up's
`restore_model`; none of them imports the training loop.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from fgjax import data as fgdata
from fgjax import teachers
from fgjax.train import evaluation, setup, sharding

log = logging.getLogger("fgjax")


def _restore(workdir, which, config=None):
  cfg, model, method, variables, info = setup.restore_model(workdir, prefer=which)
  if config is not None:  # a config given on the command line overrides data settings
    with cfg.unlocked():
      cfg.data = config.data
  log.info("restored %s (%s checkpoint, step %d)", cfg.model.name, info["checkpoint"],
           info["step"])
  return cfg, model, method, variables, info


def evaluate_checkpoint(workdir: str, config=None, which: str = "best") -> dict:
  """Evaluates a checkpoint on the test split; writes `eval_metrics.json`."""
  cfg, model, method, variables, info = _restore(workdir, which, config)
  mesh = sharding.make_mesh(cfg)
  _, _, test_src = setup.get_sources(cfg)
  eval_step = jax.jit(evaluation.make_eval_step(method))
  metrics = evaluation.evaluate(eval_step, variables, iter(setup.make_eval_iter(cfg, test_src)),
                                mesh, model.num_classes, method)
  metrics.update({"checkpoint": info["checkpoint"], "step": info["step"]})
  print(json.dumps({"test": metrics}, indent=2))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval_metrics.json"), "w") as f:
      json.dump({"test": metrics}, f, indent=2)
  return metrics


class NoReadableImagesError(ValueError):
  """None of the image files given to predict or visualize could be read."""


def readable_images(paths) -> list[str]:
  """The files of `paths` that exist and decode as images; a warning names each other one.
  Raises `NoReadableImagesError` when none is left."""
  kept = []
  for path in paths:
    try:
      fgdata.load_image(path)
    except FileNotFoundError:
      log.warning("skipped %s: no such file", path)
    except IsADirectoryError:
      log.warning("skipped %s: a directory, not an image file", path)
    except OSError as e:  # BadImageError: not an image, truncated, unreadable
      log.warning("skipped %s: %s", path, str(e).splitlines()[0] if str(e) else "unreadable")
    else:
      kept.append(path)
  if paths and not kept:
    raise NoReadableImagesError(f"none of the {len(paths)} files given could be read as an "
                                f"image ({', '.join(map(str, paths[:3]))}"
                                f"{', ...' if len(paths) > 3 else ''})")
  return kept


def predict(workdir: str, paths, which: str = "best", top_k: int = 5) -> list[dict]:
  """Top-k class names with probabilities for each image file that can be read (the others
  are named in a warning and skipped)."""
  if not paths:
    raise ValueError("predict needs image files: run.py --mode=predict --workdir=W a.jpg b.jpg")
  cfg, _, method, variables, _ = _restore(workdir, which)
  paths = readable_images(list(paths))
  names = list(cfg.get("class_names_resolved", []) or [])
  logits = evaluation.predict_images(cfg, method, variables, list(paths),
                                     sharding.make_mesh(cfg))
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  results = []
  for path, p in zip(paths, probs):
    top = np.argsort(-p)[:top_k]
    row = {"image": path, "top": [{"class": names[i] if i < len(names) else str(i),
                                   "index": int(i), "prob": float(p[i])} for i in top]}
    results.append(row)
    print(path)
    for r in row["top"]:
      print(f"  {r['prob']:7.2%}  {r['class']}")
  return results


def visualize(workdir: str, paths, output: str | None = None, which: str = "best",
              config=None, num_images: int = 8, required: bool = True) -> list[str]:
  """Writes one PNG per image of what the run's method draws (for the ViT methods: the
  selected patches and the rollout heat-map; CAL: the attention map and crop). A method that
  draws nothing is an error, or with `required=False` (run.py after training) a log line."""
  saved = setup.load_config(workdir)
  if not required and not setup.build(saved, int(saved.num_classes_resolved))[1].draws:
    log.info("visualize: %s with %s draws nothing", saved.get("method", "classifier"),
             saved.model.name)
    return []
  cfg, model, method, variables, _ = _restore(workdir, which, config)
  if not method.draws:
    raise ValueError(f"visualize: config.method={cfg.get('method', 'classifier')!r} with "
                     f"{cfg.model.name} draws nothing (ViT-family models and CAL draw)")
  output = output or os.path.join(workdir, "visualize")
  os.makedirs(output, exist_ok=True)
  if paths:
    paths = readable_images(list(paths))
    x = evaluation.load_images(cfg, paths)
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  else:
    _, _, test_src = setup.get_sources(cfg)
    batch = next(iter(setup.make_eval_iter(cfg, test_src, max(num_images, 1))))
    n = int(np.asarray(batch["mask"]).sum())
    x = np.asarray(batch["image"])[:n]
    names = [f"test_{int(i)}" for i in np.asarray(batch["id"])[:n]]
  written = []
  normalize = setup.normalize_kind(cfg)
  if x.dtype == np.uint8:  # what render draws on: the images the model saw
    x = fgdata.Normalizer(normalize)(x)
  for name, img in zip(names, method.render(variables, x, normalize)):
    path = os.path.join(output, f"{name}_{method.picture}.png")
    img.save(path)
    written.append(path)
  log.info("wrote %d images to %s", len(written), output)
  return written


def export_teacher(workdir: str, output: str | None = None, which: str = "best",
                   config=None) -> str:
  """Writes the model's logits for every training example, keyed by example id."""
  cfg, model, method, variables, info = _restore(workdir, which, config)
  mesh = sharding.make_mesh(cfg)
  train_src = setup.get_source(cfg, "train")
  out = evaluation.predict_source(cfg, method, variables, train_src, mesh)
  ids, logits = out["id"], out["logits"]
  output = output or os.path.join(workdir, "teacher_predictions.npz")
  if jax.process_index() == 0:
    teachers.save_predictions(output, ids, logits, {
        "model": cfg.model.name, "workdir": os.path.abspath(workdir), "step": info["step"],
        "checkpoint": info["checkpoint"], "dataset": cfg.data.name,
        "num_classes": model.num_classes})
  lookup = dict(zip(np.asarray(train_src.ids).tolist(), np.asarray(train_src.labels).tolist()))
  acc = float((logits.argmax(-1) == np.array([lookup[int(i)] for i in ids])).mean())
  log.info("wrote teacher predictions for %d training examples to %s (train accuracy %.4f)",
           len(ids), output, acc)
  return output

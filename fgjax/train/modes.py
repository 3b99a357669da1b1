"""run.py's non-training modes: eval, predict, visualize, export_teacher.

Each restores the model of a workdir (best validation checkpoint when the run has one, else
the last; `which="last"` forces the last) from its saved `config.json`.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image, ImageDraw

from fgjax import data as fgdata
from fgjax import teachers
from fgjax.models import rollout
from fgjax.train import trainer

log = logging.getLogger("fgjax")


def _restore(workdir, which, config=None):
  cfg, model, method, variables, info = trainer.restore_model(workdir, prefer=which)
  if config is not None:  # a config given on the command line overrides data settings
    with cfg.unlocked():
      cfg.data = config.data
  log.info("restored %s (%s checkpoint, step %d)", cfg.model.name, info["checkpoint"],
           info["step"])
  return cfg, model, method, variables, info


def evaluate_checkpoint(workdir: str, config=None, which: str = "best") -> dict:
  """Evaluates a checkpoint on the test split; writes `eval_metrics.json`."""
  cfg, model, method, variables, info = _restore(workdir, which, config)
  mesh = trainer.make_mesh(cfg)
  _, _, test_src = trainer.get_sources(cfg)
  eval_step = jax.jit(trainer.make_eval_step(method, model))
  batches = trainer.make_eval_iter(cfg, test_src, int(cfg.get("eval_batch_size", cfg.batch_size)))
  metrics = trainer.evaluate(eval_step, variables, iter(batches), mesh, model.num_classes)
  metrics.update({"checkpoint": info["checkpoint"], "step": info["step"]})
  print(json.dumps({"test": metrics}, indent=2))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval_metrics.json"), "w") as f:
      json.dump({"test": metrics}, f, indent=2)
  return metrics


def _preprocess(cfg, paths):
  out = []
  for p in paths:
    img = fgdata.load_image(p)
    out.append(fgdata.eval_transform(img, image_size=int(cfg.model.img_size),
                                     resize_size=int(cfg.data.get("resize_size",
                                                                  cfg.model.img_size)),
                                     resize_mode=cfg.data.get("resize_mode", "shorter"),
                                     interpolation=cfg.data.get("interpolation", "bilinear"),
                                     normalize=cfg.data.get("normalize", "imagenet")))
  return np.stack(out)


def predict(workdir: str, paths, which: str = "best", top_k: int = 5) -> list[dict]:
  """Top-k class names with probabilities for each image file."""
  if not paths:
    raise ValueError("predict needs image files: run.py --mode=predict --workdir=W a.jpg b.jpg")
  cfg, model, _, variables, _ = _restore(workdir, which)
  names = list(cfg.get("class_names_resolved", []) or [])
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  results = []
  for path in paths:
    x = _preprocess(cfg, [path])
    probs = np.asarray(jax.nn.softmax(apply(variables, jnp.asarray(x))))[0]
    top = np.argsort(-probs)[:top_k]
    row = {"image": path, "top": [{"class": names[i] if i < len(names) else str(i),
                                   "index": int(i), "prob": float(probs[i])} for i in top]}
    results.append(row)
    print(path)
    for r in row["top"]:
      print(f"  {r['prob']:7.2%}  {r['class']}")
  return results


def _heat_colors(v: np.ndarray) -> np.ndarray:
  """A jet-like colormap for values in [0, 1]: (..., 3) uint8."""
  v = np.clip(v, 0, 1)[..., None]
  r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
  g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
  b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
  return (np.concatenate([r, g, b], -1) * 255).astype(np.uint8)


def _denormalize(x: np.ndarray, normalize: str) -> np.ndarray:
  if normalize == "imagenet":
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  else:
    mean, std = np.array([0.5, 0.5, 0.5]), np.array([0.5, 0.5, 0.5])
  return (np.clip(x * std + mean, 0, 1) * 255).astype(np.uint8)


def render_regions(image_u8: np.ndarray, scores: np.ndarray, selected: np.ndarray, grid,
                   patch_size: int, stride: int) -> Image.Image:
  """[image with the selected patches | rollout heat-map overlay] side by side."""
  h, w = image_u8.shape[:2]
  s = scores / np.maximum(scores.max(-1, keepdims=True), 1e-30)  # per head, max = 1
  heat = s.mean(0).reshape(grid)
  heat = (heat - heat.min()) / max(heat.max() - heat.min(), 1e-12)
  heat_img = Image.fromarray((heat * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
  overlay = (0.5 * image_u8 + 0.5 * _heat_colors(np.asarray(heat_img) / 255.0)).astype(np.uint8)
  boxes = Image.fromarray(image_u8).convert("RGB")
  draw = ImageDraw.Draw(boxes)
  gw = grid[1]
  for k, idx in enumerate(selected):
    r, c = divmod(int(idx), gw)
    x0, y0 = c * stride, r * stride
    draw.rectangle([x0, y0, x0 + patch_size - 1, y0 + patch_size - 1], outline=(255, 40, 40),
                   width=max(1, w // 150))
    draw.text((x0 + 1, y0), str(k), fill=(255, 255, 0))
  canvas = Image.new("RGB", (2 * w + 4, h), (255, 255, 255))
  canvas.paste(boxes, (0, 0))
  canvas.paste(Image.fromarray(overlay), (w + 4, 0))
  return canvas


def visualize(workdir: str, paths, output: str | None = None, which: str = "best",
              config=None, num_images: int = 8) -> list[str]:
  """Writes one PNG per image: selected patches and the rollout heat-map."""
  cfg, model, _, variables, _ = _restore(workdir, which, config)
  if not hasattr(model, "grid"):
    raise ValueError(f"visualize needs a ViT-family model, {cfg.model.name} has no patch grid")
  output = output or os.path.join(workdir, "visualize")
  os.makedirs(output, exist_ok=True)
  normalize = cfg.data.get("normalize", "imagenet")
  if paths:
    x = _preprocess(cfg, paths)
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  else:
    _, _, test_src = trainer.get_sources(cfg)
    batch = next(iter(trainer.make_eval_iter(cfg, test_src, max(num_images, 1))))
    n = int(np.asarray(batch["mask"]).sum())
    x = np.asarray(batch["image"])[:n]
    names = [f"test_{int(i)}" for i in np.asarray(batch["id"])[:n]]
  prefix = model.num_prefix_tokens

  @jax.jit
  def run(v, x):
    logits, aux = model.apply(v, x, train=False, return_attention=True)
    if "rollout" in aux:
      return aux["rollout"], aux["selected"], logits
    scores = rollout.trs_scores(aux["attention"][:-1], prefix)
    return scores, rollout.select_per_head(scores), logits

  written = []
  stride = model.patch_stride or model.patch_size
  for i in range(len(x)):
    scores, sel, _ = jax.device_get(run(variables, jnp.asarray(x[i:i + 1])))
    img = render_regions(_denormalize(x[i], normalize), scores[0], sel[0], model.grid,
                         model.patch_size, stride)
    path = os.path.join(output, f"{names[i]}_regions.png")
    img.save(path)
    written.append(path)
  log.info("wrote %d region images to %s", len(written), output)
  return written


def export_teacher(workdir: str, output: str | None = None, which: str = "best",
                   config=None) -> str:
  """Writes the model's logits for every training example, keyed by example id."""
  cfg, model, method, variables, info = _restore(workdir, which, config)
  mesh = trainer.make_mesh(cfg)
  dcfg = cfg.data
  train_src = trainer.get_source(cfg, "train")
  bs = int(cfg.get("eval_batch_size", cfg.batch_size))

  @jax.jit
  def logits_fn(v, batch):
    return {"logits": model.apply(v, batch["image"], train=False)[0], "id": batch["id"],
            "mask": batch["mask"]}

  ids, logits = [], []
  for batch in trainer.make_eval_iter(cfg, train_src, bs):
    out = logits_fn(variables, fgdata.to_global_batch(batch, mesh))
    out = multihost_utils.process_allgather(out, tiled=True)
    m = np.asarray(out["mask"]).astype(bool)
    ids.append(np.asarray(out["id"])[m])
    logits.append(np.asarray(out["logits"])[m])
  ids, logits = np.concatenate(ids), np.concatenate(logits)
  output = output or os.path.join(workdir, "teacher_predictions.npz")
  if jax.process_index() == 0:
    teachers.save_predictions(output, ids, logits, {
        "model": cfg.model.name, "workdir": os.path.abspath(workdir), "step": info["step"],
        "checkpoint": info["checkpoint"], "dataset": dcfg.name, "num_classes": model.num_classes})
  acc = float((logits.argmax(-1) == _labels_for(train_src, ids)).mean()) \
      if hasattr(train_src, "labels") else float("nan")
  log.info("wrote teacher predictions for %d training examples to %s (train accuracy %.4f)",
           len(ids), output, acc)
  return output


def _labels_for(source, ids):
  lookup = dict(zip(np.asarray(source.ids).tolist(), np.asarray(source.labels).tolist()))
  return np.array([lookup[int(i)] for i in ids])

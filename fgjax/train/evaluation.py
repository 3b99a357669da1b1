"""Evaluation and prediction on all devices.

- `make_eval_step(method)`: per example, the top-1 prediction and top-5 hit of every head the
  method reports (`Method.eval_outputs`: "logits" plus e.g. PMG's "combined", CAL's "raw") and
  the method's per-example values (e.g. part hits).
- `evaluate(...)`: top-1, top-5 and mean per-class accuracy per head over a padded eval loader
  (every example counted once), plus the method's own metrics (`Method.summarize`).
- `predict_batches` / `predict_source` / `predict_images`: the method's "logits" head for the
  batches of a loader, a whole source or image files, sharded over every device (the
  toolkit's entry points: TTA, ensembles, pseudo-labels, submissions).
"""
from __future__ import annotations

from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from fgjax import data as fgdata
from fgjax.train.setup import TrainingError, make_eval_iter, normalize_kind, pipeline_kwargs
from fgjax.train import sharding


def _normalized(method, batch):
  return fgdata.normalize_batch(batch, normalize_kind(method.config))


def make_eval_step(method):
  def eval_step(variables, batch):
    heads, values = method.eval_outputs(variables, _normalized(method, batch))
    labels = batch["label"]
    res = {"mask": batch["mask"], "label": labels, "values": dict(values)}
    for name, logits in heads.items():
      key = "" if name == "logits" else name + "_"
      top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
      res[key + "pred"] = top5[:, 0]
      res[key + "correct5"] = (top5 == labels[:, None]).any(-1)
    return res
  return eval_step


def summarize_eval(results: dict, num_classes: int, method=None) -> dict[str, float]:
  """top-1, top-5, mean per-class accuracy per head (+ the method's metrics of its per-example
  `values`, padding removed)."""
  mask = results["mask"].astype(bool)
  labels = results["label"][mask]
  out = {"num_examples": int(mask.sum())}
  for key in [k for k in results if k.endswith("pred")]:
    prefix = key[: -len("pred")]
    pred = results[key][mask]
    correct = pred == labels
    out[prefix + "top1"] = float(correct.mean()) if correct.size else float("nan")
    out[prefix + "top5"] = float(results[prefix + "correct5"][mask].mean()) if correct.size \
        else float("nan")
    per_class = [correct[labels == c].mean() for c in range(num_classes) if (labels == c).any()]
    out[prefix + "mean_per_class"] = float(np.mean(per_class)) if per_class else float("nan")
  values = {k: np.asarray(v)[mask] for k, v in (results.get("values") or {}).items()}
  if method is not None and values:
    out.update(method.summarize(values))
  return out


def _gather(batches: Iterator, fn, variables, mesh) -> dict:
  """`fn(variables, global batch)` over every batch, gathered from all processes and
  concatenated along the batch axis ({} for no batches)."""
  results = []
  for batch in batches:
    res = fn(variables, fgdata.to_global_batch(batch, mesh))
    results.append(jax.tree.map(np.asarray,
                                multihost_utils.process_allgather(res, tiled=True)))
  if not results:
    return {}
  return jax.tree.map(lambda *xs: np.concatenate(xs), *results)


def evaluate(eval_step_jit, variables, batches: Iterator, mesh, num_classes: int,
             method=None) -> dict:
  results = _gather(batches, eval_step_jit, variables, mesh)
  if not results:
    raise TrainingError("evaluation split is empty")
  return summarize_eval(results, num_classes, method)


def predict_batches(method, variables, batches: Iterator, mesh) -> dict[str, np.ndarray]:
  """{"logits" (N, C), "id" (N,)} of the real (unpadded) examples of an eval loader's batches."""
  @jax.jit
  def fn(v, batch):
    heads, _ = method.eval_outputs(v, _normalized(method, batch))
    return {"logits": heads["logits"], "id": batch["id"], "mask": batch["mask"]}

  out = _gather(batches, fn, variables, mesh)
  if not out:
    return {"logits": np.zeros((0, method.num_classes), np.float32),
            "id": np.zeros((0,), np.int32)}
  m = out.pop("mask").astype(bool)
  return {k: v[m] for k, v in out.items()}


def predict_source(config, method, variables, source, mesh) -> dict[str, np.ndarray]:
  """`predict_batches` over one ordered pass of `source` with the run's eval transform."""
  return predict_batches(method, variables, iter(make_eval_iter(config, source)), mesh)


def load_images(config, paths) -> np.ndarray:
  """Image files as one uint8 batch, preprocessed as the run's evaluation (resize, centre
  crop; the steps normalise on the device)."""
  kw = pipeline_kwargs(config, train=False)
  for k in ("worker_count", "prefetch", "normalize"):
    kw.pop(k)
  min_size = kw["resize_size"] if kw.pop("draft") else None
  return np.stack([fgdata.transforms.eval_crop(
      fgdata.read_image(p, min_size, decoder=kw["backend"]), **kw)[0] for p in paths])


def predict_images(config, method, variables, paths, mesh, batch_size: int | None = None):
  """(N, C) logits of the method's "logits" head for image files (`load_images`), in batches
  padded to the device count (one process: every image is read by this one)."""
  n_dev = mesh.devices.size
  bs = int(batch_size or config.get("eval_batch_size", config.batch_size))
  bs = max(n_dev, -(-bs // n_dev) * n_dev)
  fn = jax.jit(lambda v, b: method.eval_outputs(v, _normalized(method, b))[0]["logits"],
               out_shardings=sharding.replicated(mesh))
  out = []
  for start in range(0, len(paths), bs):
    chunk = list(paths[start:start + bs])
    x = load_images(config, chunk)
    pad = -len(x) % n_dev
    if pad:
      x = np.concatenate([x, np.repeat(x[:1], pad, axis=0)])
    batch = jax.device_put({"image": x}, sharding.batch_sharding(mesh))
    out.append(np.asarray(fn(variables, batch))[:len(chunk)])
  return np.concatenate(out) if out else np.zeros((0, method.num_classes), np.float32)

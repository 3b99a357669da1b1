"""Evaluation and prediction on all devices.

- `make_eval_step(method)`: per example, the top-1 prediction and top-5 hit of every head the
  method reports (`Method.eval_outputs`: "logits" plus e.g. PMG's "combined", CAL's "raw") and
  the method's per-example values (e.g. part hits).
- `evaluate(...)`: top-1, top-5 and mean per-class accuracy per head over a padded eval loader
  (every example counted once), plus the method's own metrics (`Method.summarize`).
- `predict_batches` / `predict_source` / `predict_images` / `predict_files`: the method's
  "logits" head for the batches of a loader, a whole source or image files, sharded over every
  device (the toolkit's entry points: TTA, ensembles, pseudo-labels, submissions).

Every step runs the method under the test-time augmentation of `config.eval.tta`
(`fgjax.toolkit.tta`; "none" is the method's own `eval_outputs`), or the `tta` argument: with
a preset, each head is the log of its probabilities averaged over the views.
"""
from __future__ import annotations

import logging
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from fgjax import data as fgdata
from fgjax.toolkit import tta as tta_lib
from fgjax.train.setup import TrainingError, make_eval_iter, normalize_kind, pipeline_kwargs
from fgjax.train import sharding


def _normalized(method, batch):
  return fgdata.normalize_batch(batch, normalize_kind(method.config))


def make_eval_step(method, tta: str | None = None):
  """The per-example evaluation of `method` under TTA `tta` (default `config.eval.tta`)."""
  outputs = tta_lib.eval_outputs(method, tta)

  def eval_step(variables, batch):
    heads, values = outputs(variables, _normalized(method, batch))
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


def eval_results(eval_step_jit, variables, batches: Iterator, mesh) -> dict:
  """The eval step's per-example outputs over every batch ("mask", "label", "pred", ...;
  padding rows included, `mask` says which are real); raises when there are none."""
  results = _gather(batches, eval_step_jit, variables, mesh)
  if not results:
    raise TrainingError("evaluation split is empty")
  return results


def evaluate(eval_step_jit, variables, batches: Iterator, mesh, num_classes: int,
             method=None) -> dict:
  results = eval_results(eval_step_jit, variables, batches, mesh)
  return summarize_eval(results, num_classes, method)


def predict_batches(method, variables, batches: Iterator, mesh,
                    tta: str | None = None) -> dict[str, np.ndarray]:
  """{"logits" (N, C), "id" (N,)} of the real (unpadded) examples of an eval loader's batches."""
  outputs = tta_lib.eval_outputs(method, tta)

  @jax.jit
  def fn(v, batch):
    heads, _ = outputs(v, _normalized(method, batch))
    return {"logits": heads["logits"], "id": batch["id"], "mask": batch["mask"]}

  out = _gather(batches, fn, variables, mesh)
  if not out:
    return {"logits": np.zeros((0, method.num_classes), np.float32),
            "id": np.zeros((0,), np.int32)}
  m = out.pop("mask").astype(bool)
  return {k: v[m] for k, v in out.items()}


def predict_source(config, method, variables, source, mesh,
                   tta: str | None = None) -> dict[str, np.ndarray]:
  """`predict_batches` over one ordered pass of `source` with the run's eval transform."""
  return predict_batches(method, variables,
                         iter(make_eval_iter(config, source, text=method.text)), mesh, tta)


def _image_kwargs(config) -> tuple[dict, int | None]:
  """(eval_crop keyword arguments, decode min_size) of the run's evaluation transform."""
  kw = pipeline_kwargs(config, train=False)
  for k in ("worker_count", "prefetch", "normalize"):
    kw.pop(k)
  return kw, (kw["resize_size"] if kw.pop("draft") else None)


def _load_one(path, kw, min_size) -> np.ndarray:
  return fgdata.transforms.eval_crop(fgdata.read_image(path, min_size, decoder=kw["backend"]),
                                     **kw)[0]


def load_images(config, paths) -> np.ndarray:
  """Image files as one uint8 batch, preprocessed as the run's evaluation (resize, centre
  crop; the steps normalise on the device)."""
  kw, min_size = _image_kwargs(config)
  return np.stack([_load_one(p, kw, min_size) for p in paths])


def _load_or_skip(path, kw, min_size):
  """The eval crop of `path`, or None with a warning naming the file when it cannot be read."""
  try:
    return _load_one(path, kw, min_size)
  except FileNotFoundError:
    why = "no such file"
  except IsADirectoryError:
    why = "a directory, not an image file"
  except OSError as e:  # BadImageError: not an image, truncated, unreadable
    why = str(e).splitlines()[0] if str(e) else "unreadable"
  logging.getLogger("fgjax").warning("skipped %s: %s", path, why)
  return None


def text_fields(method, texts) -> dict:
  """{"phrases", "phrase_mask"} of `texts` (one str, list of sentences or None per image)
  through the method's text encoder (evaluation's sentence choice); {} when the run reads no
  text."""
  if method.text is None:
    return {}
  rows = [method.text.encode(t) for t in texts]
  return {"phrases": np.stack([r[0] for r in rows]),
          "phrase_mask": np.stack([r[1] for r in rows])}


def predict_files(config, method, variables, paths, mesh, batch_size: int | None = None,
                  tta: str | None = None, progress: bool = False, skip_bad: bool = True,
                  texts=None):
  """(paths read, (N, C) "logits" head) for image files, each decoded once, in batches of
  `eval_batch_size` padded to the device count and sharded over every device (one process:
  every image is read by this one). A file that cannot be read is skipped with a warning
  (`skip_bad=False`: the error is raised). `progress`: a progress bar on stderr
  (`fgjax.train.logs.ProgressBar`). With a TTA preset the rows are log mean probabilities.
  `texts` (one per path: a sentence, a list of sentences or None) go with the images when the
  run reads text (`method.text`); without them every image gets an empty text."""
  n_dev = mesh.devices.size
  bs = int(batch_size or config.get("eval_batch_size", config.batch_size))
  bs = max(n_dev, -(-bs // n_dev) * n_dev)
  outputs = tta_lib.eval_outputs(method, tta)
  fn = jax.jit(lambda v, b: outputs(v, _normalized(method, b))[0]["logits"],
               out_shardings=sharding.replicated(mesh))
  kw, min_size = _image_kwargs(config)
  bar = None
  if progress:
    from fgjax.train import logs
    bar = logs.ProgressBar(len(paths), desc="predict")
  n_batches = -(-len(paths) // bs)
  kept, out = [], []
  text_of = dict(zip(map(str, paths), texts)) if texts is not None else {}
  for b, start in enumerate(range(0, len(paths), bs)):
    chunk = list(paths[start:start + bs])
    if skip_bad:
      loaded = [(p, _load_or_skip(p, kw, min_size)) for p in chunk]
      loaded = [(p, x) for p, x in loaded if x is not None]
    else:
      loaded = [(p, _load_one(p, kw, min_size)) for p in chunk]
    if loaded:
      x = np.stack([a for _, a in loaded])
      fields = {"image": x, **text_fields(method, [text_of.get(str(p)) for p, _ in loaded])}
      pad = -len(x) % n_dev
      if pad:
        fields = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)])
                  for k, v in fields.items()}
      batch = jax.device_put(fields, sharding.batch_sharding(mesh))
      out.append(np.asarray(fn(variables, batch))[:len(loaded)])
      kept.extend(p for p, _ in loaded)
    if bar is not None:
      last = b + 1 == n_batches
      bar.update(start + len(chunk), force=last or b % max(n_batches // 10, 1) == 0)
  if bar is not None:
    bar.close()
  logits = np.concatenate(out) if out else np.zeros((0, method.num_classes), np.float32)
  return kept, logits


def predict_images(config, method, variables, paths, mesh, batch_size: int | None = None,
                   tta: str | None = None, progress: bool = False):
  """(N, C) logits of the method's "logits" head for image files (`load_images`), in batches
  padded to the device count (one process: every image is read by this one); a file that
  cannot be read raises (`predict_files` skips it)."""
  return predict_files(config, method, variables, list(paths), mesh, batch_size, tta,
                       progress, skip_bad=False)[1]

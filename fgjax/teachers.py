"""Teachers for hard distillation (DeiT / TRS-DeiT): online or offline.

The frozen helper of the `trs_deit` method (`fgjax.methods.trs_deit.TeacherHelper`) builds
its teacher here (after `teacher.train_first`, if set, has trained into `<workdir>/teacher`
and stands as the checkpoint). `config.teacher` options (the first that is set wins):
  checkpoint:  an fgjax workdir (its best, else last, checkpoint) or an fgjax params `.npz`
               (`python -m fgjax.tools.convert`, with its metadata). The teacher runs frozen
               inside the jitted train step on the student's (augmented) batch; its argmax is
               y_t. Its input size may differ: images are resized on device.
  predictions: a file written by `run.py --mode=export_teacher` (npz with `ids` and `logits`):
               y_t is looked up by example id; every training id must be present.
  (neither):   no teacher (the method then has no helper; the distillation head is trained
               on the ground truth, logged).

Offline predictions are computed on un-augmented training images, so they are an
approximation of online hard distillation (DeiT computes y_t on the augmented image); they
cost nothing at training time.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fgjax import convert, models

log = logging.getLogger("fgjax")


class TeacherError(ValueError):
  """A teacher checkpoint or prediction file that does not fit the student's data."""


def save_predictions(path: str, ids: np.ndarray, logits: np.ndarray, meta: dict):
  """Writes teacher predictions (one row per training example id: `logits` and their softmax
  `probabilities`, the soft targets of `distill`) atomically."""
  tmp = path + ".tmp.npz"
  logits = np.asarray(logits, np.float32)
  z = logits - logits.max(-1, keepdims=True)
  probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  np.savez(tmp, ids=np.asarray(ids, np.int64), logits=logits, probabilities=probs,
           meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
  os.replace(tmp, path)


def load_predictions(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.teacher.predictions: {path} not found (write it with "
                            f"`python run.py --mode=export_teacher --workdir=<teacher run>`)")
  with np.load(path, allow_pickle=False) as f:
    if "ids" not in f.files or "logits" not in f.files:
      raise TeacherError(f"{path}: not a teacher-prediction file (needs 'ids' and 'logits')")
    meta = json.loads(f["meta"].tobytes().decode()) if "meta" in f.files else {}
    return f["ids"], f["logits"], meta


def resize_for(images, size):
  """`images` (B, H, W, C) resized on the device to a teacher's square input `size`."""
  if images.shape[1:3] == (size, size):
    return images
  return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bilinear")


def make_teacher(tcfg, mesh, train_source, restore):
  """Returns (fn(teacher_inputs, batch) -> labels, teacher_inputs, description).

  `restore(workdir, mesh=...)` -> (config, model, method, variables, info) restores a teacher
  workdir (the set-up's `restore_model`, passed in by the caller)."""
  repl = NamedSharding(mesh, P())
  num_classes = int(train_source.num_classes)
  ckpt = tcfg.get("checkpoint")
  preds = tcfg.get("predictions")
  if ckpt:
    model, variables, desc = load_teacher_model(ckpt, num_classes, mesh, restore)
    size = int(model.img_size if isinstance(model.img_size, int) else model.img_size[0])

    def fn(variables, batch):
      logits, _ = model.apply(variables, resize_for(batch["image"], size), train=False)
      return jnp.argmax(logits, -1).astype(jnp.int32)
    return fn, jax.device_put(variables, repl), desc
  if preds:
    ids, logits, meta, size = predictions_for(preds, train_source)
    table = np.full(size, -1, np.int32)
    table[ids] = np.argmax(logits, -1)

    def fn(table, batch):
      return table[batch["id"]]
    return fn, jax.device_put(jnp.asarray(table), repl), \
        f"predictions from {preds} ({meta.get('model', '?')})"
  raise TeacherError("config.teacher: set checkpoint or predictions")


def predictions_for(path: str, train_source):
  """(ids, logits, meta, table size) of an export_teacher file checked against the training
  data: the same number of classes, every training id present; a table indexed by example id
  needs `table size` rows."""
  num_classes = int(train_source.num_classes)
  ids, logits, meta = load_predictions(path)
  if logits.shape[-1] != num_classes:
    raise TeacherError(f"config.teacher.predictions: {path} has {logits.shape[-1]} classes, "
                       f"the training data has {num_classes}")
  train_ids = np.asarray(train_source.ids, np.int64)
  missing = np.setdiff1d(train_ids, ids)
  if missing.size:
    raise TeacherError(f"config.teacher.predictions: {path} lacks {missing.size} of the "
                       f"{train_ids.size} training ids (e.g. {missing[:5].tolist()}); export it "
                       f"from the same dataset and split")
  return ids, logits, meta, int(max(ids.max(), train_ids.max())) + 1


def restore_teacher(path: str, num_classes: int, mesh, restore):
  """(model, method, variables, description) of a teacher workdir (through `restore`), its
  class count checked against the training data."""
  cfg, model, method, variables, info = restore(path, mesh=mesh)
  if model.num_classes != num_classes:
    raise TeacherError(f"config.teacher.checkpoint: {path} has {model.num_classes} classes, "
                       f"the training data has {num_classes}")
  return model, method, variables, (f"{cfg.model.name} ({cfg.get('method', 'classifier')}) "
                                    f"from {path} ({info['checkpoint']} checkpoint, step "
                                    f"{info['step']})")


def load_teacher_model(path: str, num_classes: int, mesh, restore):
  """(model, variables, description) from an fgjax workdir (through `restore`) or an fgjax
  params `.npz`."""
  if os.path.isdir(path):
    model, _, variables, desc = restore_teacher(path, num_classes, mesh, restore)
    return model, variables, desc
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.teacher.checkpoint: {path} not found")
  meta = convert.read_meta(path) if path.endswith(".npz") else {}
  if not meta:
    raise TeacherError(f"config.teacher.checkpoint: {path} is neither an fgjax workdir nor an "
                       f"fgjax params .npz (python -m fgjax.tools.convert writes one)")
  model = models.create(meta["model"], meta["num_classes"], meta["img_size"],
                        **dict(meta.get("model_kwargs", {})))
  variables = convert.load_checkpoint(path, meta["model"], meta["img_size"],
                                      meta["num_classes"], model_kwargs=meta.get("model_kwargs"),
                                      with_collections=True)
  if meta["num_classes"] != num_classes:
    raise TeacherError(f"config.teacher.checkpoint: {path} has {meta['num_classes']} classes, "
                       f"the training data has {num_classes}")
  return model, variables, f"{meta['model']} from {path}"

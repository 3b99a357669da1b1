"""`distill`: an image-only student trained on a teacher's soft probabilities (PMA's distiller).

PMA (Song et al. 2020, section III-E, eq. 11) compresses the bi-modal teacher into a student
that reads images alone by training the student on the teacher's output probabilities, without
the labels (Hinton et al.'s knowledge distillation):

    L = kl_weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + ce_weight * CE(z_s, y)

with temperature T (`distill.temperature`; the paper's loss is T = 1 and ce_weight = 0, the
defaults). The student is any fgjax image model (`resnet50`, `deit_small_patch16`,
`trs_deit_small_patch16`, `cnn_small`, ...): its logits are what is distilled. The teacher is
the method's frozen helper "teacher":
  teacher.checkpoint   a teacher workdir (e.g. a `pma` run), run frozen inside the jitted step on
                       the student's augmented batch; a teacher that reads text gets the batch's
                       phrases (the student config sets `data.text.enabled=True`), its word ids
                       mapped from the student's vocabulary to the teacher's (`vocab.txt`).
  teacher.predictions  a file of `run.py --mode=export_teacher` (ids, logits, probabilities),
                       looked up by example id: the teacher's predictions on the un-augmented
                       training images (with their text), which cost nothing at training time.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fgjax import losses, teachers
from fgjax.methods.base import Helper, HelperEnv, Method

log = logging.getLogger("fgjax")


def soft_targets(logits, temperature: float):
  return jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def kl_divergence(teacher_probs, student_logits, temperature: float):
  """Mean over the batch of T^2 KL(p_t || softmax(z_s / T))."""
  log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  p_t = teacher_probs.astype(jnp.float32)
  kl = jnp.sum(jnp.where(p_t > 0, p_t * (jnp.log(jnp.maximum(p_t, 1e-30)) - log_ps), 0.0), -1)
  return (temperature ** 2) * kl.mean()


def vocabulary_map(student_vocab, teacher_vocab) -> np.ndarray:
  """int32 table: student word id -> the teacher's id of the same word (its <unk> if absent)."""
  return np.asarray([teacher_vocab.id(w) for w in student_vocab.words], np.int32)


class SoftTeacher(Helper):
  """The frozen teacher: (B, C) probabilities at the distillation temperature for a batch."""

  def __init__(self, tcfg, temperature: float):
    self.tcfg = dict(tcfg)
    self.temperature = float(temperature)

  def build(self, env: HelperEnv):
    t = self.temperature
    repl = NamedSharding(env.mesh, P())
    num_classes = int(env.train_source.num_classes)
    ckpt, preds = self.tcfg.get("checkpoint"), self.tcfg.get("predictions")
    if ckpt:
      method = None
      if os.path.isdir(ckpt):
        model, method, variables, desc = teachers.restore_teacher(ckpt, num_classes, env.mesh,
                                                                  env.restore)
      else:
        from fgjax import convert
        meta = convert.read_meta(ckpt) if ckpt.endswith(".npz") and os.path.exists(ckpt) else {}
        if str(meta.get("model", "")).startswith("pma_"):
          raise ValueError(f"config.teacher.checkpoint: {ckpt} is a params file of a model that "
                           f"reads text ({meta['model']}) without its vocabulary: give the "
                           f"teacher's workdir (it holds vocab.txt)")
        model, variables, desc = teachers.load_teacher_model(ckpt, num_classes, env.mesh,
                                                             env.restore)
      size = int(model.img_size if isinstance(model.img_size, int) else model.img_size[0])
      remap = None
      if method is not None and method.text is not None:
        if env.text is None:
          raise ValueError(f"config.data.text.enabled: the teacher {ckpt} reads text "
                           f"({type(model).__name__}); the student's batches must carry it "
                           f"(data.text.enabled=True, the teacher's data.text_dir)")
        remap = vocabulary_map(env.text.vocab, method.text.vocab)
        desc += f", text through its {len(method.text.vocab)}-word vocabulary"

      def fn(inputs, batch):
        variables, table = inputs
        b = dict(batch, image=teachers.resize_for(batch["image"], size))
        if table is not None and "phrases" in b:
          b["phrases"] = table[b["phrases"]]
        else:
          b.pop("phrases", None)
          b.pop("phrase_mask", None)
        args = method.model_inputs(b) if method is not None else (b["image"],)
        logits, _ = model.apply(variables, *args, train=False)
        return soft_targets(logits, t)
      table = None if remap is None else jnp.asarray(remap)
      return fn, jax.device_put((variables, table), repl), desc + f", T={t:g}"
    if preds:
      ids, logits, meta, size = teachers.predictions_for(preds, env.train_source)
      table = np.zeros((size, num_classes), np.float32)
      table[ids] = np.asarray(soft_targets(jnp.asarray(logits), t))

      def fn(table, batch):
        return table[batch["id"]]
      return fn, jax.device_put(jnp.asarray(table), repl), \
          f"soft predictions from {preds} ({meta.get('model', '?')}), T={t:g}"
    raise teachers.TeacherError("config.teacher: set checkpoint (a teacher workdir) or "
                                "predictions (a run.py --mode=export_teacher file)")


class Distill(Method):
  """Knowledge distillation into an image-only student; see the module docstring."""
  name = "distill"
  sections = {
      "distill": dict(temperature=1.0, kl_weight=1.0, ce_weight=0.0),
      # checkpoint: a teacher workdir (or fgjax params .npz); predictions: an export_teacher file
      "teacher": dict(checkpoint="", predictions=""),
  }

  def __init__(self, config, model, num_classes):
    super().__init__(config, model, num_classes)
    d = self.section("distill")
    self.temperature = float(d["temperature"])
    self.kl_weight, self.ce_weight = float(d["kl_weight"]), float(d["ce_weight"])
    if self.temperature <= 0:
      raise ValueError(f"config.distill.temperature must be > 0, got {self.temperature}")
    if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
      raise ValueError(f"config.distill: kl_weight={self.kl_weight} and "
                       f"ce_weight={self.ce_weight} must be >= 0, not both 0")
    tcfg = self.section("teacher")
    if not (tcfg.get("checkpoint") or tcfg.get("predictions")) and self.kl_weight > 0:
      raise ValueError("config.teacher: the distill method needs teacher.checkpoint (a teacher "
                       "workdir) or teacher.predictions (run.py --mode=export_teacher)")

  def helpers(self):
    if self.kl_weight == 0:
      return {}
    return {"teacher": SoftTeacher(self.section("teacher"), self.temperature)}

  def loss(self, params, extra, ctx):
    logits, _, new_vars = self.apply_train(params, extra, *self.model_inputs(ctx.batch),
                                           rng=ctx.rng)
    y = ctx.batch["label"]
    loss = jnp.zeros((), jnp.float32)
    metrics = {"accuracy": (jnp.argmax(logits, -1) == y).mean()}
    if self.kl_weight > 0:
      p_t = ctx.helpers["teacher"]
      kl = kl_divergence(p_t, logits, self.temperature)
      loss = loss + self.kl_weight * kl
      metrics["kl"] = kl
      metrics["teacher_accuracy"] = (jnp.argmax(p_t, -1) == y).mean()
      metrics["teacher_agreement"] = (jnp.argmax(p_t, -1) == jnp.argmax(logits, -1)).mean()
    if self.ce_weight > 0:
      ce = losses.cross_entropy(logits, y, self.label_smoothing)
      loss = loss + self.ce_weight * ce
      metrics["ce"] = ce
    metrics["loss"] = loss
    return loss, (metrics, new_vars)

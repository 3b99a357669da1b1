"""`trs_deit`: TRS-DeiT's hard distillation and contrastive objective (spec section 2).

    L_dist = (1 - alpha) CE(head(z_cls), y) + alpha CE(head_dist(z_dist), y_t)
    L_con  = (1 - alpha) L_con(z_cls) + alpha L_con(z_dist),     L = L_dist + L_con

y_t = argmax teacher(x), from the method's frozen helper "teacher" (`fgjax.teachers`): a
teacher checkpoint run inside the jitted step on the student's augmented batch
(`teacher.checkpoint`), a teacher-prediction file looked up by example id
(`teacher.predictions`), or a teacher config trained first into `<workdir>/teacher`
(`teacher.train_first`, the demo's two phases). Without a teacher the distillation head learns
the ground truth (logged). Works with region selection on or off (`trs_deit_*` models,
`region_selection=None` is plain DeiT).
"""
from __future__ import annotations

import logging
import os

import jax.numpy as jnp
import ml_collections

from fgjax import losses, teachers
from fgjax.methods.base import Helper, HelperEnv, HelperStopped, Method
from fgjax.models import vit

log = logging.getLogger("fgjax")


class TeacherHelper(Helper):
  """The frozen teacher of hard distillation: labels (B,) int32 for a batch."""

  def __init__(self, tcfg):
    self.tcfg = tcfg

  def build(self, env: HelperEnv):
    tcfg = ml_collections.ConfigDict(dict(self.tcfg))
    if tcfg.get("train_first") is not None:
      # Phase 1 of a two-phase config: the teacher trains into <workdir>/teacher (resumable
      # like any run), then runs frozen as the checkpoint teacher.
      teacher_dir = os.path.join(env.workdir, "teacher")
      first = tcfg.train_first
      if not os.path.exists(os.path.join(teacher_dir, "final_metrics.json")):
        log.info("phase 1: training the teacher (%s) in %s", first.model.name, teacher_dir)
        result = env.train(first, teacher_dir)
        if "stopped_at" in result:  # SIGTERM in phase 1: no student from a partial teacher
          raise HelperStopped("teacher", result["stopped_at"])
      log.info("phase 2: training %s with the teacher from %s", env.config.model.name,
               teacher_dir)
      tcfg.checkpoint = teacher_dir
      self.resolve_config(env.config, env.workdir)
    return teachers.make_teacher(tcfg, env.mesh, env.train_source, env.restore)

  def runs_first(self, config, workdir: str) -> list:
    first = config.teacher.get("train_first")
    return [] if first is None else [(first, os.path.join(workdir, "teacher"))]

  def resolve_config(self, config, workdir: str) -> None:
    # The student's saved config names the teacher it used (its checkpoint).
    if config.teacher.get("train_first") is not None:
      with config.unlocked():
        config.teacher.checkpoint = os.path.join(workdir, "teacher")
        config.teacher.train_first = None


class TRSDeiT(Method):
  """TRS-DeiT's distillation + contrastive objective; see the module docstring."""
  name = "trs_deit"
  sections = {
      "trs": dict(alpha=0.5, beta=0.4, contrastive=True),
      # checkpoint: an fgjax workdir or params .npz; predictions: an export_teacher file;
      # train_first: a teacher config trained into <workdir>/teacher before the student.
      "teacher": dict(checkpoint="", predictions="", train_first=None),
  }

  def __init__(self, config, model, num_classes):
    super().__init__(config, model, num_classes)
    if not isinstance(model, vit.VisionTransformer) or not model.distilled:
      raise ValueError(f"config.method='trs_deit' needs a distilled model (with a dist token); "
                       f"config.model.name={config.model.name!r} has none")
    trs = self.section("trs")
    self.alpha = float(trs["alpha"])
    self.beta = float(trs["beta"])
    self.contrastive = bool(trs["contrastive"])
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"config.trs.alpha must be in [0, 1], got {self.alpha}")

  def helpers(self):
    tcfg = self.section("teacher")
    if tcfg.get("checkpoint") or tcfg.get("predictions") or tcfg.get("train_first") is not None:
      return {"teacher": TeacherHelper(tcfg)}
    log.warning("no teacher configured (config.teacher.checkpoint / .predictions): the "
                "distillation head is trained on the ground-truth labels")
    return {}

  def loss(self, params, extra, ctx):
    logits, aux, new_vars = self.apply_train(params, extra, *self.model_inputs(ctx.batch),
                                             rng=ctx.rng)
    y = ctx.batch["label"]
    y_t = ctx.helpers.get("teacher", y)
    a = self.alpha
    ce_cls = losses.cross_entropy(aux["cls_logits"], y, self.label_smoothing)
    ce_dist = losses.cross_entropy(aux["dist_logits"], y_t, self.label_smoothing)
    loss = (1 - a) * ce_cls + a * ce_dist
    metrics = {"ce_cls": ce_cls, "ce_dist": ce_dist}
    if self.contrastive:
      con_cls = losses.contrastive_loss(aux["cls_features"], y, self.beta)
      con_dist = losses.contrastive_loss(aux["dist_features"], y, self.beta)
      l_con = (1 - a) * con_cls + a * con_dist
      loss = loss + l_con
      metrics["con"] = l_con
    metrics["loss"] = loss
    metrics["accuracy"] = (jnp.argmax(logits, -1) == y).mean()
    metrics["teacher_agreement"] = (y_t == y).mean()
    return loss, (metrics, new_vars)

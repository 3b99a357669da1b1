"""Training methods: what a step optimises and what evaluation reads from the model.

A method turns (params, batch, rng) into a loss. The trainer (`fgjax.train.trainer`) owns
the rest: sharding, optimizer, checkpoints, evaluation loop.

- `classifier`: cross-entropy on the model's logits (teachers, baselines, plain DeiT).
- `trs_deit`: TRS-DeiT (spec section 2): hard distillation
      L_dist = (1 - alpha) CE(head(z_cls), y) + alpha CE(head_dist(z_dist), y_t)
  plus the contrastive loss on the final cls and dist tokens
      L_con = (1 - alpha) L_con(z_cls) + alpha L_con(z_dist),   L = L_dist + L_con.
  y_t = argmax teacher(x): from a frozen teacher run inside the jitted step, from a
  teacher-prediction file (looked up by example id), or, without a teacher, the ground truth.
- `pmg`: PMG's progressive training (spec section 5): each batch is used S + 1 times, in order
  jigsaw 8 -> CE(y^3), jigsaw 4 -> CE(y^4), jigsaw 2 -> CE(y^5), original -> 2 CE(y^concat),
  each its own forward, backward and optimizer update (`stage_losses`; the trainer runs them in
  sequence inside one jitted step, BatchNorm statistics updated by each). Parameters a loss does
  not use get a zero gradient in that update (momentum and weight decay still apply to them, as
  with the reference's zeroed gradients). Evaluation reports
  the concat head (`top1`) and the sum of the four (`combined_top1`).
- `cal`: CAL (spec section 4; raoyongming/CAL `train_distributed.py`): per image, two of the
  M attention maps drawn with probabilities proportional to sqrt(map sum) make an attention
  crop (threshold U(0.4, 0.6) of the map's maximum, padding 10%, resized back) and an
  attention drop (threshold U(0.2, 0.5)); the crops and drops go through the model as a second
  batch (BatchNorm statistics updated by both passes), and
      L = CE(y_raw)/3 + CE([effect_raw, effect_aug]) + 2/3 CE(y_aug) + centre loss,
  centre loss = sum ||f - normalise(c_y)||^2 / B; then c_y += beta (f - normalise(c_y)) with
  beta = `config.cal.center_beta` (5e-2). Evaluation: `top1` = the model's multi-view logits
  (raw + attention crop), also `raw_top1` and `effect_top1`.
- `transfg`: TransFG (spec section 3): CE(part-layer cls logits, y) (optional label smoothing)
  + L_con(z_cls) on the final cls token with margin `config.transfg.margin` (0.4), weight 1.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from fgjax import losses

log = logging.getLogger(__name__)


class Method:
  """Base class: single loss, single update per step."""
  name = "base"
  uses_teacher = False

  def __init__(self, config, model, num_classes: int):
    self.config = config
    self.model = model
    self.num_classes = num_classes
    self.label_smoothing = float(config.get("label_smoothing", 0.0))

  # Mutable collections the model keeps besides params (e.g. 'batch_stats').
  mutable: tuple[str, ...] = ()

  def apply_train(self, params, extra_vars, images, rng, **kw):
    variables = {"params": params, **(extra_vars or {})}
    # Collections the model keeps besides params (BatchNorm's batch_stats) are updated in
    # train mode, whatever the method.
    mutable = tuple(self.mutable) or tuple(extra_vars or ())
    if mutable:
      (logits, aux), new_vars = self.model.apply(
          variables, images, train=True, rngs={"dropout": rng}, mutable=list(mutable), **kw)
      return logits, aux, dict(new_vars)
    logits, aux = self.model.apply(variables, images, train=True, rngs={"dropout": rng}, **kw)
    return logits, aux, extra_vars

  def loss(self, params, extra_vars, batch, rng, teacher_labels=None):
    """Returns (loss, (metrics dict, updated extra vars))."""
    raise NotImplementedError

  def eval_outputs(self, variables, batch, need_selection: bool = False) -> dict:
    """Per-example outputs for evaluation: at least {"logits": (B, C)}."""
    logits, aux = self.model.apply(variables, batch["image"], train=False,
                                   return_attention=need_selection and
                                   getattr(self.model, "region_selection", "x") is None)
    out = {"logits": logits}
    if need_selection:
      sel = selection_from_aux(self.model, aux)
      if sel is not None:
        out["selected"] = sel
    return out


def selection_from_aux(model, aux) -> jax.Array | None:
  """Selected patches: the model's own selection, or (for a plain ViT/DeiT) the argmax of the
  TRS rollout score computed from its attention, for the part-hit metric."""
  if "selected" in aux:
    return aux["selected"]
  if "attention" in aux and len(aux["attention"]) > 1:
    from fgjax.models import rollout
    prefix = getattr(model, "num_prefix_tokens", 1)
    return rollout.select_per_head(rollout.trs_scores(aux["attention"][:-1], prefix))
  return None


class Classifier(Method):
  name = "classifier"

  def loss(self, params, extra_vars, batch, rng, teacher_labels=None):
    logits, aux, new_vars = self.apply_train(params, extra_vars, batch["image"], rng)
    loss = losses.cross_entropy(logits, batch["label"], self.label_smoothing)
    acc = (jnp.argmax(logits, -1) == batch["label"]).mean()
    return loss, ({"loss": loss, "ce": loss, "accuracy": acc}, new_vars)


class TRSDeiT(Method):
  """TRS-DeiT's distillation + contrastive objective (works with region selection on or off)."""
  name = "trs_deit"
  uses_teacher = True

  def __init__(self, config, model, num_classes):
    super().__init__(config, model, num_classes)
    if not getattr(model, "distilled", False):
      raise ValueError(f"config.method='trs_deit' needs a distilled model (with a dist token); "
                       f"config.model.name={config.model.name!r} has none")
    trs = config.get("trs", {})
    self.alpha = float(trs.get("alpha", 0.5))
    self.beta = float(trs.get("beta", 0.4))
    self.contrastive = bool(trs.get("contrastive", True))
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"config.trs.alpha must be in [0, 1], got {self.alpha}")

  def loss(self, params, extra_vars, batch, rng, teacher_labels=None):
    logits, aux, new_vars = self.apply_train(params, extra_vars, batch["image"], rng)
    y = batch["label"]
    y_t = y if teacher_labels is None else teacher_labels
    a = self.alpha
    ce_cls = losses.cross_entropy(aux["cls_logits"], y, self.label_smoothing)
    ce_dist = losses.cross_entropy(aux["dist_logits"], y_t, self.label_smoothing)
    l_dist = (1 - a) * ce_cls + a * ce_dist
    metrics = {"ce_cls": ce_cls, "ce_dist": ce_dist}
    loss = l_dist
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


class TransFG(Method):
  """TransFG's objective: cross-entropy on the part layer's cls logits plus the contrastive
  loss on its final cls token (TACJu/TransFG `part_loss + con_loss`)."""
  name = "transfg"

  def __init__(self, config, model, num_classes):
    super().__init__(config, model, num_classes)
    if getattr(model, "distilled", False) or getattr(model, "region_selection", None) is None:
      raise ValueError(f"config.method='transfg' needs a ViT with part selection and no dist "
                       f"token (e.g. transfg_base_patch16); got config.model.name="
                       f"{config.model.name!r}")
    tcfg = config.get("transfg", {}) or {}
    self.margin = float(tcfg.get("margin", 0.4))
    self.contrastive = bool(tcfg.get("contrastive", True))

  def loss(self, params, extra_vars, batch, rng, teacher_labels=None):
    logits, aux, new_vars = self.apply_train(params, extra_vars, batch["image"], rng)
    y = batch["label"]
    ce = losses.cross_entropy(logits, y, self.label_smoothing)
    metrics = {"ce": ce}
    loss = ce
    if self.contrastive:
      con = losses.contrastive_loss(aux["cls_features"], y, self.margin)
      loss = loss + con
      metrics["con"] = con
    metrics["loss"] = loss
    metrics["accuracy"] = (jnp.argmax(logits, -1) == y).mean()
    return loss, (metrics, new_vars)


class PMG(Method):
  """PMG's progressive multi-granularity objective; see the module docstring."""
  name = "pmg"
  mutable = ("batch_stats",)

  def __init__(self, config, model, num_classes):
    super().__init__(config, model, num_classes)
    from fgjax.jigsaw import check_jigsaw_size
    if not hasattr(model, "stage_maps"):
      raise ValueError(f"config.method='pmg' needs a PMG model (pmg_resnet50, pmg_deit_base, "
                       f"...); got config.model.name={config.model.name!r}")
    pcfg = config.get("pmg", {}) or {}
    self.granularities = tuple(int(n) for n in pcfg.get("jigsaw", (8, 4, 2)))
    self.concat_weight = float(pcfg.get("concat_weight", 2.0))
    if len(self.granularities) != 3:
      raise ValueError(f"config.pmg.jigsaw must give 3 granularities (one per stage head), got "
                       f"{self.granularities}")
    self.patch_size = model.patch_size  # None for CNN backbones
    size = int(config.model.img_size)
    for n in self.granularities:
      try:
        check_jigsaw_size(size, size, n, self.patch_size)
      except ValueError as e:
        raise ValueError(f"config.model.img_size={size} with config.pmg.jigsaw="
                         f"{self.granularities}: {e}") from None

  @property
  def updates_per_step(self) -> int:
    return len(self.granularities) + 1

  def stage_losses(self):
    """The S + 1 losses of one batch, in order: fn(params, extra, batch, rng) -> (loss,
    (metrics, new extra vars))."""
    from fgjax.jigsaw import jigsaw

    def jigsaw_loss(k, n):
      def fn(params, extra, batch, rng):
        r_jig, r_drop = jax.random.split(rng)
        x = jigsaw(batch["image"], n, r_jig, patch_size=self.patch_size)
        _, aux, new = self.apply_train(params, extra, x, r_drop)
        loss = losses.cross_entropy(aux["stage_logits"][k], batch["label"],
                                    self.label_smoothing)
        return loss, ({f"loss_jigsaw{n}": loss}, new)
      return fn

    def concat_loss(params, extra, batch, rng):
      logits, aux, new = self.apply_train(params, extra, batch["image"], rng)
      ce = losses.cross_entropy(aux["concat_logits"], batch["label"], self.label_smoothing)
      loss = self.concat_weight * ce
      acc = (jnp.argmax(aux["concat_logits"], -1) == batch["label"]).mean()
      return loss, ({"loss_concat": loss, "accuracy": acc}, new)

    return [jigsaw_loss(k, n) for k, n in enumerate(self.granularities)] + [concat_loss]

  def loss(self, params, extra_vars, batch, rng, teacher_labels=None):
    """The last of the S + 1 losses (the trainer runs all of them, see `stage_losses`)."""
    return self.stage_losses()[-1](params, extra_vars, batch, rng)

  def eval_outputs(self, variables, batch, need_selection: bool = False) -> dict:
    _, aux = self.model.apply(variables, batch["image"], train=False)
    return {"logits": aux["concat_logits"], "combined": aux["combined_logits"]}


class CAL(Method):
  """CAL's four-term objective with attention crop/drop augmentation; see the module
  docstring."""
  name = "cal"

  def __init__(self, config, model, num_classes):
    super().__init__(config, model, num_classes)
    if not hasattr(model, "num_attentions"):
      raise ValueError(f"config.method='cal' needs a CAL model (cal_resnet50, cal_resnet101, "
                       f"...); got config.model.name={config.model.name!r}")
    ccfg = config.get("cal", {}) or {}
    self.center_beta = float(ccfg.get("center_beta", 5e-2))
    self.crop_theta = tuple(float(t) for t in ccfg.get("crop_theta", (0.4, 0.6)))
    self.drop_theta = tuple(float(t) for t in ccfg.get("drop_theta", (0.2, 0.5)))
    self.crop_padding = float(ccfg.get("crop_padding", 0.1))
    for key, t in (("crop_theta", self.crop_theta), ("drop_theta", self.drop_theta)):
      if len(t) != 2 or not 0.0 <= t[0] <= t[1] <= 1.0:
        raise ValueError(f"config.cal.{key} must be (low, high) with 0 <= low <= high <= 1, "
                         f"got {t}")

  def augment(self, images, attention_maps, rng):
    """The reference's crop + drop views: returns (crops, drops, crop boxes, drop keep mask)."""
    from fgjax.models import cal as cal_lib
    att = jax.lax.stop_gradient(attention_maps)
    B = att.shape[0]
    r_pick, r_crop, r_drop = jax.random.split(rng, 3)
    weights = jnp.sqrt(att.sum(axis=(1, 2)) + cal_lib.EPSILON)  # (B, M)
    probs = weights / weights.sum(-1, keepdims=True)
    k = jax.random.categorical(r_pick, jnp.log(probs), axis=-1, shape=(2, B)).T  # (B, 2)
    chosen = jnp.take_along_axis(att, k[:, None, None, :], axis=-1)  # (B, h, w, 2)
    theta_c = jax.random.uniform(r_crop, (B,), minval=self.crop_theta[0],
                                 maxval=self.crop_theta[1])
    theta_d = jax.random.uniform(r_drop, (B,), minval=self.drop_theta[0],
                                 maxval=self.drop_theta[1])
    images = jax.lax.stop_gradient(images)
    crops, boxes = cal_lib.attention_crop(images, chosen[..., 0], theta_c, self.crop_padding)
    drops, keep = cal_lib.attention_drop(images, chosen[..., 1], theta_d)
    return crops, drops, boxes, keep

  def loss(self, params, extra_vars, batch, rng, teacher_labels=None):
    r_raw, r_aug, r_views = jax.random.split(rng, 3)
    x, y = batch["image"], batch["label"]
    logits, aux, new_vars = self.apply_train(params, extra_vars, x, r_raw)
    crops, drops, _, _ = self.augment(x, aux["attention_maps"], r_views)
    y2 = jnp.concatenate([y, y])
    logits_aug, aux_aug, new_vars = self.apply_train(
        params, new_vars, jnp.concatenate([crops, drops]), r_aug)
    ls = self.label_smoothing
    ce_raw = losses.cross_entropy(logits, y, ls)
    ce_effect = losses.cross_entropy(
        jnp.concatenate([aux["effect_logits"], aux_aug["effect_logits"]]),
        jnp.concatenate([y, y2]), ls)
    ce_aug = losses.cross_entropy(logits_aug, y2, ls)
    centers = extra_vars["centers"]["feature_center"]
    f = aux["features"]
    c_y = centers[y]
    c_y = c_y / jnp.maximum(jnp.linalg.norm(c_y, axis=-1, keepdims=True), 1e-12)
    center = jnp.sum((f - c_y) ** 2) / f.shape[0]
    loss = ce_raw / 3.0 + ce_effect + ce_aug * 2.0 / 3.0 + center
    new_vars = dict(new_vars)
    new_vars["centers"] = {"feature_center": centers.at[y].add(
        self.center_beta * (jax.lax.stop_gradient(f) - c_y))}
    metrics = {"loss": loss, "ce_raw": ce_raw, "ce_effect": ce_effect, "ce_aug": ce_aug,
               "center": center, "accuracy": (jnp.argmax(logits, -1) == y).mean(),
               "aug_accuracy": (jnp.argmax(logits_aug, -1) == y2).mean()}
    return loss, (metrics, new_vars)

  def eval_outputs(self, variables, batch, need_selection: bool = False) -> dict:
    logits, aux = self.model.apply(variables, batch["image"], train=False)
    return {"logits": logits, "raw": aux["raw_logits"], "effect": aux["effect_logits"]}


METHODS: dict[str, type[Method]] = {"classifier": Classifier, "trs_deit": TRSDeiT,
                                    "transfg": TransFG, "pmg": PMG, "cal": CAL}


def get_method(config, model, num_classes) -> Method:
  name = config.get("method", "classifier")
  if name not in METHODS:
    raise ValueError(f"config.method: unknown method {name!r}; available: {sorted(METHODS)}")
  return METHODS[name](config, model, num_classes)

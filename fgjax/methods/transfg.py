"""`transfg`: TransFG's objective (spec section 3; TACJu/TransFG `part_loss + con_loss`).

CE(part-layer cls logits, y) (optional label smoothing) + the contrastive loss on the final
cls token with margin `config.transfg.margin` (0.4), weight 1. Needs a ViT with part
selection and no distillation token (`transfg_*_patch16`).
"""
from __future__ import annotations

import jax.numpy as jnp

from fgjax import losses
from fgjax.methods.base import Method
from fgjax.models import vit


class TransFG(Method):
  name = "transfg"
  sections = {"transfg": dict(margin=0.4, contrastive=True)}

  def __init__(self, config, model, num_classes):
    super().__init__(config, model, num_classes)
    if (not isinstance(model, vit.VisionTransformer) or model.distilled
        or model.region_selection is None):
      raise ValueError(f"config.method='transfg' needs a ViT with part selection and no dist "
                       f"token (e.g. transfg_base_patch16); got config.model.name="
                       f"{config.model.name!r}")
    tcfg = self.section("transfg")
    self.margin = float(tcfg["margin"])
    self.contrastive = bool(tcfg["contrastive"])

  def loss(self, params, extra, ctx):
    logits, aux, new_vars = self.apply_train(params, extra, *self.model_inputs(ctx.batch),
                                             rng=ctx.rng)
    y = ctx.batch["label"]
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

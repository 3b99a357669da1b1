"""`transfg`: TransFG's objective (spec section 3; TACJu/TransFG `part_loss + con_loss`).

CE(part-layer cls logits, y) (optional label smoothing) + the contrastive loss on the final
cls token with margin `config.transfg.margin` (0.4), weight 1. Needs a ViT with part
selection and no distillation token (`transfg_*_patch16`).

`config.transfg.part_layer_init`: "random" (default, the reference's `load_from`, which skips
`part*`): with `init_from`, the last block (the part layer) keeps its fresh initialisation and
only the blocks before it, the embeddings and the final norm (the reference's `part_norm`, from
`Transformer/encoder_norm`) load; "pretrained" loads the checkpoint's last block into it too.
"""
from __future__ import annotations

import jax.numpy as jnp

from fgjax import losses
from fgjax.methods.base import Method
from fgjax.models import vit


class TransFG(Method):
  name = "transfg"
  sections = {"transfg": dict(margin=0.4, contrastive=True, part_layer_init="random")}

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
    self.part_layer_init = str(tcfg["part_layer_init"])
    if self.part_layer_init not in ("random", "pretrained"):
      raise ValueError(f"config.transfg.part_layer_init must be 'random' or 'pretrained', got "
                       f"{self.part_layer_init!r}")

  def load_pretrained(self, path, dont_load=()):
    """The checkpoint without its last block when the part layer starts from random weights."""
    if self.part_layer_init == "random":
      dont_load = tuple(dont_load) + (f"blocks_{self.model.depth - 1}/.*",)
    return super().load_pretrained(path, dont_load)

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

"""`pmg`: PMG's progressive multi-granularity training (spec section 5).

Each batch is used S + 1 times, in order jigsaw 8 -> CE(y^3), jigsaw 4 -> CE(y^4), jigsaw 2 ->
CE(y^5), original -> 2 CE(y^concat): one phase of S + 1 updates of the one shared optimizer,
each its own forward, backward and update inside one jitted step, BatchNorm statistics updated
by each. Parameters a loss does not use get a zero gradient in that update (momentum and weight
decay still apply to them, as with the reference's zeroed gradients). Evaluation reports the
concat head (`top1`) and the sum of the four (`combined_top1`). Config section `pmg`:
`jigsaw` (the S = 3 granularities), `concat_weight`, `jigsaw_permutation` ("cycle": the
reference's, every cell moves; "uniform": any permutation) and `jigsaw_per_image` (False: one
puzzle order for the batch, as the reference; fgjax.jigsaw).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fgjax import losses
from fgjax.jigsaw import check_jigsaw_size, check_permutation, jigsaw
from fgjax.methods.base import Method, Phase, Update
from fgjax.models import pmg as pmg_model


class PMG(Method):
  name = "pmg"
  sections = {"pmg": dict(jigsaw=(8, 4, 2), concat_weight=2.0, jigsaw_permutation="cycle",
                          jigsaw_per_image=False)}

  def __init__(self, config, model, num_classes):
    super().__init__(config, model, num_classes)
    if not isinstance(model, pmg_model.PMG):
      raise ValueError(f"config.method='pmg' needs a PMG model (pmg_resnet50, pmg_deit_base, "
                       f"...); got config.model.name={config.model.name!r}")
    pcfg = self.section("pmg")
    self.granularities = tuple(int(n) for n in pcfg["jigsaw"])
    self.concat_weight = float(pcfg["concat_weight"])
    self.permutation = check_permutation(str(pcfg["jigsaw_permutation"]))
    self.per_image = bool(pcfg["jigsaw_per_image"])
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

  def jigsaw_loss(self, k: int, n: int):
    """The update of stage head k on n x n jigsaw puzzles of the batch."""
    def fn(params, extra, ctx):
      r_jig, r_drop = jax.random.split(ctx.rng)
      x = jigsaw(ctx.batch["image"], n, r_jig, patch_size=self.patch_size,
                 permutation=self.permutation, per_image=self.per_image)
      _, aux, new = self.apply_train(params, extra, x, rng=r_drop)
      loss = losses.cross_entropy(aux["stage_logits"][k], ctx.batch["label"],
                                  self.label_smoothing)
      return loss, ({f"loss_jigsaw{n}": loss}, new)
    return fn

  def loss(self, params, extra, ctx):
    """The last update: the original images, `concat_weight` x CE on the concat head."""
    y = ctx.batch["label"]
    _, aux, new = self.apply_train(params, extra, *self.model_inputs(ctx.batch), rng=ctx.rng)
    ce = losses.cross_entropy(aux["concat_logits"], y, self.label_smoothing)
    loss = self.concat_weight * ce
    acc = (jnp.argmax(aux["concat_logits"], -1) == y).mean()
    return loss, ({"loss_concat": loss, "accuracy": acc}, new)

  def phases(self):
    updates = [Update(self.jigsaw_loss(k, n)) for k, n in enumerate(self.granularities)]
    return (Phase(tuple(updates) + (Update(self.loss),)),)

  def eval_outputs(self, variables, batch):
    _, aux = self.model.apply(variables, *self.model_inputs(batch), train=False)
    return {"logits": aux["concat_logits"], "combined": aux["combined_logits"]}, {}

"""`classifier`: cross-entropy on the model's logits (teachers, baselines, plain ViT/DeiT).

Optional label smoothing (`config.label_smoothing`). On a ViT-family model evaluation also
reports the part-hit rate of the TRS rollout selection (`fgjax.methods.regions`).
"""
from __future__ import annotations

import jax.numpy as jnp

from fgjax import losses
from fgjax.methods.base import Method


class Classifier(Method):
  name = "classifier"

  def loss(self, params, extra, ctx):
    logits, _, new_vars = self.apply_train(params, extra, *self.model_inputs(ctx.batch),
                                           rng=ctx.rng)
    y = ctx.batch["label"]
    loss = losses.cross_entropy(logits, y, self.label_smoothing)
    acc = (jnp.argmax(logits, -1) == y).mean()
    return loss, ({"loss": loss, "ce": loss, "accuracy": acc}, new_vars)

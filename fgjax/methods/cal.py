"""`cal`: CAL, counterfactual attention learning on WS-DAN (spec section 4; raoyongming/CAL
`train_distributed.py`).

Per image, two of the M attention maps drawn with probabilities proportional to sqrt(map sum)
make an attention crop (threshold U(0.4, 0.6) of the map's maximum, padding 10%, resized back)
and an attention drop (threshold U(0.2, 0.5)); the crops and drops go through the model as a
second batch (BatchNorm statistics updated by both passes), and
    L = CE(y_raw)/3 + CE([effect_raw, effect_aug]) + 2/3 CE(y_aug) + centre loss,
centre loss = sum ||f - normalise(c_y)||^2 / B; then c_y += beta (f - normalise(c_y)) with
beta = `config.cal.center_beta` (5e-2), the centres living in the model's `centers`
collection. `config.cal.center_update`: "last" (the default, the reference's
`feature_center[y] += ...`, an indexed assignment: with several images of one class in the
batch, one write lands, here the last image's) or "sum" (every image of the class adds its
step). The reference keeps one centre table per GPU, each updated from its own 4 images;
fgjax keeps one table, updated from the global batch. Evaluation: `top1` = the model's test
views (`model.kwargs.test_views`, by default the reference's eight views of `infer.py`), also
`raw_top1` (the single raw view) and `effect_top1`. Visualisation: the mean attention map and
the evaluation crop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fgjax import losses
from fgjax.methods.base import Method
from fgjax.models import cal as cal_lib


class CAL(Method):
  name = "cal"
  sections = {"cal": dict(center_beta=5e-2, crop_theta=(0.4, 0.6), drop_theta=(0.2, 0.5),
                          crop_padding=0.1, center_update="last")}

  def __init__(self, config, model, num_classes):
    super().__init__(config, model, num_classes)
    if not isinstance(model, cal_lib.CAL):
      raise ValueError(f"config.method='cal' needs a CAL model (cal_resnet50, cal_resnet101, "
                       f"...); got config.model.name={config.model.name!r}")
    ccfg = self.section("cal")
    self.center_beta = float(ccfg["center_beta"])
    self.crop_theta = tuple(float(t) for t in ccfg["crop_theta"])
    self.drop_theta = tuple(float(t) for t in ccfg["drop_theta"])
    self.crop_padding = float(ccfg["crop_padding"])
    self.center_update = str(ccfg["center_update"])
    if self.center_update not in ("last", "sum"):
      raise ValueError(f"config.cal.center_update must be 'last' or 'sum', "
                       f"got {self.center_update!r}")
    for key, t in (("crop_theta", self.crop_theta), ("drop_theta", self.drop_theta)):
      if len(t) != 2 or not 0.0 <= t[0] <= t[1] <= 1.0:
        raise ValueError(f"config.cal.{key} must be (low, high) with 0 <= low <= high <= 1, "
                         f"got {t}")

  def augment(self, images, attention_maps, rng):
    """The reference's crop + drop views: returns (crops, drops, crop boxes, drop keep mask)."""
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

  def loss(self, params, extra, ctx):
    r_raw, r_aug, r_views = jax.random.split(ctx.rng, 3)
    x, y = ctx.batch["image"], ctx.batch["label"]
    logits, aux, new_vars = self.apply_train(params, extra, *self.model_inputs(ctx.batch),
                                             rng=r_raw)
    crops, drops, _, _ = self.augment(x, aux["attention_maps"], r_views)
    y2 = jnp.concatenate([y, y])
    logits_aug, aux_aug, new_vars = self.apply_train(
        params, new_vars, jnp.concatenate([crops, drops]), rng=r_aug)
    ls = self.label_smoothing
    ce_raw = losses.cross_entropy(logits, y, ls)
    ce_effect = losses.cross_entropy(
        jnp.concatenate([aux["effect_logits"], aux_aug["effect_logits"]]),
        jnp.concatenate([y, y2]), ls)
    ce_aug = losses.cross_entropy(logits_aug, y2, ls)
    centers = extra["centers"]["feature_center"]
    f = aux["features"]
    c_y = centers[y]
    c_y = c_y / jnp.maximum(jnp.linalg.norm(c_y, axis=-1, keepdims=True), 1e-12)
    center = jnp.sum((f - c_y) ** 2) / f.shape[0]
    loss = ce_raw / 3.0 + ce_effect + ce_aug * 2.0 / 3.0 + center
    new_vars = dict(new_vars)
    step = self.center_beta * (jax.lax.stop_gradient(f) - c_y)
    if self.center_update == "last":  # one write per class: the class's last image in the batch
      rows = jnp.arange(y.shape[0])
      last = jnp.full(centers.shape[0], -1).at[y].max(rows)
      step = jnp.where((last[y] == rows)[:, None], step, 0.0)
    new_vars["centers"] = {"feature_center": centers.at[y].add(step)}
    metrics = {"loss": loss, "ce_raw": ce_raw, "ce_effect": ce_effect, "ce_aug": ce_aug,
               "center": center, "accuracy": (jnp.argmax(logits, -1) == y).mean(),
               "aug_accuracy": (jnp.argmax(logits_aug, -1) == y2).mean()}
    return loss, (metrics, new_vars)

  def eval_outputs(self, variables, batch):
    logits, aux = self.model.apply(variables, *self.model_inputs(batch), train=False)
    return {"logits": logits, "raw": aux["raw_logits"], "effect": aux["effect_logits"]}, {}

  picture = "attention"

  @property
  def draws(self) -> bool:
    return True

  def render(self, variables, images, normalize, text_inputs=None):
    """[image with the evaluation crop box | mean attention map] per image."""
    from fgjax.methods import drawing
    fn = jax.jit(lambda v, x: self.model.apply(v, x, train=False)[1])
    out = []
    for i in range(len(images)):
      aux = jax.device_get(fn(variables, jnp.asarray(images[i:i + 1])))
      box = aux["crop_boxes"][0] if "crop_boxes" in aux else None
      out.append(drawing.render_attention(drawing.denormalize(images[i], normalize),
                                          aux["attention_maps"][0], box))
    return out

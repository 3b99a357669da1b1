"""`racnn`: RA-CNN's training (Fu, Zheng and Mei, CVPR 2017; spec section 6), on the protocol.

Two optimizers: "classifiers" over the three scale networks (`scale1..3`, `config.optim`) and
"apn" over the two attention proposal networks (`apn1`, `apn2`; `config.optim` with
`backbone_lr_mult` reset to 1, every APN parameter being new, and `config.racnn.apn_optim` on
top). The phases, in order:

1. `classifier_pretrain_steps` (once; default 0, for classifiers that `init_from` gives
   already trained on the task; the recipes set 10 epochs on ImageNet weights): the
   classifier update below on the APNs' initial squares (`pretrain_squares="apn"`: all
   centred, sigmoids 0.5), or with "random" on squares drawn uniformly (each sigmoid uniform
   in [0, 1]: every allowed side and position; the APNs unused). Random squares teach the
   scale-2 and scale-3 networks every region, at the price of slower learning (measured in
   docs/demo.md).
2. `apn_pretrain_steps` (once): the APNs regress, with smooth-L1 on (tx, ty, tl) in pixels,
   the square centred on the strongest response of the channel mean of their input conv map,
   of side `pretrain_side_frac` of the input side (the paper: half). The target's sigmoids are
   kept within [0.1, 0.9] (a target at a bound would train the APN into saturation; with the
   default `min_side_frac` = 1/3 the half-side square is below the smallest allowed one, so the
   target is the smallest square 10% of the range above it).
3. Then, cycling, `alternate_every` steps of each:
   classifiers: sum over the scales of cross-entropy, each scale's network on its own input
     (the squares under stop_gradient, the APNs frozen), in train mode (BatchNorm statistics,
     dropout);
   apn: the ranking loss L_rank(p1, p2) + L_rank(p2, p3) (`fgjax.losses.pairwise_ranking_loss`,
     margin `margin`), on softmax probabilities of the true class, the coarser scale of each
     pair the reference (stop_gradient), the classifier networks frozen in eval mode.

Metrics (and TensorBoard) of every phase: per square s = 2, 3 (the input of scale s) the mean
and spread of its centre and side as fractions of its scale's input side (`box{s}_cx_mean`,
`_cx_std`, `_cy_mean`, `_cy_std`, `_side_mean`, `_side_std`) and the share of squares with a
sigmoid within 0.02 of 0 or 1 (`box{s}_at_bound`): a collapse to a corner or to the smallest
square shows up as it happens.

Evaluation: `top1` = the three scales' softmax averaged ("scale 1+2+3"), `scale{1,2,3}_top1`;
the zoom-hit rate: the share of scale-3 squares that contain a visible annotated part (CUB's
part locations, `part_locs`), or the centre of a part box (the synthetic birds), or else lie
inside the object box (bounding boxes of datasets without parts), beside its chance level (a
square of the same size at a uniformly random position inside the image); and the mean side
of each square. Visualisation: the scale-2 (red) and scale-3 (yellow) squares on the image
beside the scale-3 input.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fgjax import losses
from fgjax.methods.base import Method, OptimizerSpec, Phase, Update
from fgjax.models import racnn as racnn_model

BOUND = 0.02  # a sigmoid this close to 0 or 1 counts as "at its bound"
CHANCE_GRID = 32  # centres per axis of the uniformly placed squares of the chance level


def box_stats(boxes, sigmoids, sides) -> dict:
  """Metrics of the squares (B, 2, 3) (in their own inputs' pixels, sides (2,))."""
  out = {}
  for j, s in enumerate((2, 3)):
    b = boxes[:, j] / sides[j]
    for name, v in (("cx", b[:, 0]), ("cy", b[:, 1]), ("side", 2.0 * b[:, 2])):
      out[f"box{s}_{name}_mean"] = v.mean()
      out[f"box{s}_{name}_std"] = v.std()
    sg = sigmoids[:, j]
    out[f"box{s}_at_bound"] = ((sg < BOUND) | (sg > 1 - BOUND)).any(-1).astype(
        jnp.float32).mean()
  return out


def zoom_hits(square, part_boxes, object_box, side: float, part_locs=None):
  """Per example (hit, chance, has_boxes) of a square (B, 3) in input pixels: with part
  locations (B, P, 3) (x, y, visible; CUB's annotated points) a hit = the square holds a
  visible one; else with part boxes (B, P, 4) (rows with x1 <= x0 are padding) a hit = the
  square holds a part box's centre; without either, with an object box (B, 4) (x1 <= x0: none)
  a hit = the square lies inside it. The chance is the hit rate of the same square at
  CHANCE_GRID^2 positions spread uniformly over the centres that keep it inside the image."""
  tx, ty, tl = square[:, 0], square[:, 1], square[:, 2]
  g = (jnp.arange(CHANCE_GRID, dtype=jnp.float32) + 0.5) / CHANCE_GRID
  free = jnp.maximum(side - 2.0 * tl, 0.0)[:, None]
  grid = tl[:, None] + free * g  # (B, G) centres along either axis
  B = square.shape[0]
  has_parts = jnp.zeros((B,), bool)
  part_hit = part_chance = jnp.zeros((B,), jnp.float32)
  if part_locs is not None or part_boxes is not None:
    if part_locs is not None:
      valid = part_locs[..., 2] > 0  # (B, P)
      pcx, pcy = part_locs[..., 0], part_locs[..., 1]
    else:
      valid = part_boxes[..., 2] > part_boxes[..., 0]
      pcx = 0.5 * (part_boxes[..., 0] + part_boxes[..., 2])
      pcy = 0.5 * (part_boxes[..., 1] + part_boxes[..., 3])
    has_parts = valid.any(-1)
    inside = (jnp.abs(tx[:, None] - pcx) <= tl[:, None]) & \
        (jnp.abs(ty[:, None] - pcy) <= tl[:, None]) & valid
    part_hit = inside.any(-1).astype(jnp.float32)
    lim = tl[:, None, None]
    in_x = jnp.abs(grid[:, :, None] - pcx[:, None, :]) <= lim  # (B, G, P)
    in_y = jnp.abs(grid[:, :, None] - pcy[:, None, :]) <= lim
    both = in_y[:, :, None, :] & in_x[:, None, :, :] & valid[:, None, None, :]
    part_chance = both.any(-1).astype(jnp.float32).mean((1, 2))
  has_obj = jnp.zeros((B,), bool)
  obj_hit = obj_chance = jnp.zeros((B,), jnp.float32)
  if object_box is not None:
    x0, y0, x1, y1 = (object_box[:, i] for i in range(4))
    has_obj = x1 > x0
    obj_hit = ((tx - tl >= x0) & (tx + tl <= x1) & (ty - tl >= y0) & (ty + tl <= y1)).astype(
        jnp.float32)
    fx = ((grid - tl[:, None] >= x0[:, None]) & (grid + tl[:, None] <= x1[:, None])).mean(-1)
    fy = ((grid - tl[:, None] >= y0[:, None]) & (grid + tl[:, None] <= y1[:, None])).mean(-1)
    obj_chance = fx * fy
  hit = jnp.where(has_parts, part_hit, obj_hit)
  chance = jnp.where(has_parts, part_chance, obj_chance)
  return hit, chance, has_parts | has_obj


def pretrain_targets(fmap, side: float, min_side_frac: float, side_frac: float):
  """APN pre-training squares (B, 3) in pixels of a side-`side` input: centred on the argmax
  of the channel mean of `fmap` (B, h, w, C), side `side_frac` of the input side, with every
  sigmoid of the target within [0.1, 0.9] (see the module docstring)."""
  m = fmap.astype(jnp.float32).mean(-1)
  B, h, w = m.shape
  idx = jnp.argmax(m.reshape(B, -1), -1)
  cy = (idx // w + 0.5) * side / h
  cx = (idx % w + 0.5) * side / w
  lo, hi = min_side_frac * side, side / 2.0
  s_l = jnp.clip((side_frac * side / 2.0 - lo) / max(hi - lo, 1e-6), 0.1, 0.9)
  tl = jnp.full((B,), lo + (hi - lo) * s_l)
  free = side - 2.0 * tl
  sx = jnp.clip((cx - tl) / jnp.maximum(free, 1e-6), 0.1, 0.9)
  sy = jnp.clip((cy - tl) / jnp.maximum(free, 1e-6), 0.1, 0.9)
  return jnp.stack([tl + free * sx, tl + free * sy, tl], -1)


def smooth_l1(d):
  a = jnp.abs(d)
  return jnp.where(a < 1.0, 0.5 * d * d, a - 0.5)


class RACNN(Method):
  name = "racnn"
  sections = {"racnn": dict(alternate_every=200, classifier_pretrain_steps=0,
                            pretrain_squares="apn", apn_pretrain_steps=200,
                            pretrain_side_frac=0.5, margin=0.05, apn_optim={})}

  def __init__(self, config, model, num_classes):
    super().__init__(config, model, num_classes)
    if not isinstance(model, racnn_model.RACNN):
      raise ValueError(f"config.method='racnn' needs an RA-CNN model (racnn_vgg19, "
                       f"racnn_resnet50, racnn_cnn_small); got "
                       f"config.model.name={config.model.name!r}")
    rc = self.section("racnn")
    every = rc["alternate_every"]
    every = tuple(every) if isinstance(every, (tuple, list)) else (every, every)
    if len(every) != 2 or min(int(e) for e in every) < 1:
      raise ValueError(f"config.racnn.alternate_every must be a step count >= 1 or a pair "
                       f"(classifier steps, APN steps), got {rc['alternate_every']!r}")
    self.alternate = tuple(int(e) for e in every)
    self.cls_pretrain = int(rc["classifier_pretrain_steps"])
    self.apn_pretrain = int(rc["apn_pretrain_steps"])
    for key in ("classifier_pretrain_steps", "apn_pretrain_steps"):
      if int(rc[key]) < 0:
        raise ValueError(f"config.racnn.{key} must be >= 0, got {rc[key]}")
    self.pretrain_squares = rc["pretrain_squares"]
    if self.pretrain_squares not in ("random", "apn"):
      raise ValueError(f"config.racnn.pretrain_squares must be 'random' or 'apn', got "
                       f"{self.pretrain_squares!r}")
    self.side_frac = float(rc["pretrain_side_frac"])
    if not 0.0 < self.side_frac <= 1.0:
      raise ValueError(f"config.racnn.pretrain_side_frac must be in (0, 1], got "
                       f"{self.side_frac}")
    self.margin = float(rc["margin"])
    self.apn_optim = dict(rc["apn_optim"] or {})
    self.sides = (float(config.model.img_size), float(model.crop_size))

  # ------------------------------------------------------------------ training
  def optimizers(self):
    apn = dict(self.config.optim)
    apn["backbone_lr_mult"] = 1.0  # every APN parameter is new
    apn.update(self.apn_optim)
    return {"classifiers": OptimizerSpec(self.config.optim, (r"scale\d/.*",)),
            "apn": OptimizerSpec(apn, (r"apn\d/.*",))}

  def phases(self):
    cls = Update(self.classifier_loss, "classifiers")
    out = []
    if self.cls_pretrain:
      pre = cls if self.pretrain_squares == "apn" else Update(self.classifier_pretrain_loss,
                                                              "classifiers")
      out.append(Phase((pre,), self.cls_pretrain, once=True))
    if self.apn_pretrain:
      out.append(Phase((Update(self.apn_pretrain_loss, "apn"),), self.apn_pretrain, once=True))
    out += [Phase((cls,), self.alternate[0]),
            Phase((Update(self.ranking_loss, "apn"),), self.alternate[1])]
    return tuple(out)

  def _frozen(self, params, extra, batch, box_gradients):
    variables = {"params": params, **(extra or {})}
    return self.model.apply(variables, *self.model_inputs(batch), train=False,
                            box_gradients=box_gradients)

  def _stats(self, aux):
    return box_stats(aux["boxes"], aux["box_sigmoid"], self.sides)

  def classifier_pretrain_loss(self, params, extra, ctx):
    """The classifier update on uniformly random squares (`pretrain_squares="random"`)."""
    rng, box_rng = jax.random.split(ctx.rng)
    n = ctx.batch["label"].shape[0]
    sig = jax.random.uniform(box_rng, (n, 2, 3), jnp.float32)
    return self.classifier_loss(params, extra, dataclasses.replace(ctx, rng=rng),
                                box_sigmoid=sig)

  def classifier_loss(self, params, extra, ctx, box_sigmoid=None):
    _, aux, new = self.apply_train(params, extra, *self.model_inputs(ctx.batch), rng=ctx.rng,
                                   box_gradients=False, box_sigmoid=box_sigmoid)
    y = ctx.batch["label"]
    metrics, loss = {}, 0.0
    for s, logits in enumerate(aux["scale_logits"], 1):
      ce = losses.cross_entropy(logits, y, self.label_smoothing)
      loss = loss + ce
      metrics[f"ce_scale{s}"] = ce
      metrics[f"accuracy_scale{s}"] = (jnp.argmax(logits, -1) == y).mean()
    metrics["loss_classifiers"] = loss
    metrics.update(self._stats(aux))
    return loss, (metrics, new)

  def ranking_loss(self, params, extra, ctx):
    _, aux = self._frozen(params, extra, ctx.batch, box_gradients=True)
    y = ctx.batch["label"]
    p = [jax.nn.softmax(l) for l in aux["scale_logits"]]
    r12 = losses.pairwise_ranking_loss(jax.lax.stop_gradient(p[0]), p[1], y, self.margin)
    r23 = losses.pairwise_ranking_loss(jax.lax.stop_gradient(p[1]), p[2], y, self.margin)
    loss = r12 + r23
    metrics = {"rank_12": r12, "rank_23": r23, "loss_apn": loss}
    for s, ps in enumerate(p, 1):
      metrics[f"p_true_scale{s}"] = jnp.take_along_axis(ps, y[:, None], -1).mean()
    metrics.update(self._stats(aux))
    return loss, (metrics, extra)

  def apn_pretrain_loss(self, params, extra, ctx):
    _, aux = self._frozen(params, extra, ctx.batch, box_gradients=False)
    loss = 0.0
    for j, fmap in enumerate(aux["apn_inputs"]):
      target = pretrain_targets(jax.lax.stop_gradient(fmap), self.sides[j],
                                self.model.min_side_frac, self.side_frac)
      loss = loss + smooth_l1(aux["boxes"][:, j] - target).sum(-1).mean()
    metrics = {"apn_pretrain": loss}
    metrics.update(self._stats(aux))
    return loss, (metrics, extra)

  # ------------------------------------------------------------------ evaluation
  def eval_outputs(self, variables, batch):
    logits, aux = self.model.apply(variables, *self.model_inputs(batch), train=False)
    heads = {"logits": logits}
    for s, l in enumerate(aux["scale_logits"], 1):
      heads[f"scale{s}"] = l
    square = aux["boxes_in_image"][:, 1]
    hit, chance, has = zoom_hits(square, batch.get("part_boxes"), batch.get("object_box"),
                                 self.sides[0], batch.get("part_locs"))
    values = {"zoom_hit": hit, "zoom_chance": chance, "has_boxes": has,
              "box2_side": 2.0 * aux["boxes"][:, 0, 2] / self.sides[0],
              "box3_side": 2.0 * aux["boxes"][:, 1, 2] / self.sides[1],
              "box3_side_in_image": 2.0 * square[:, 2] / self.sides[0]}
    return heads, values

  def summarize(self, values):
    out = {k + "_mean": float(np.mean(values[k]))
           for k in ("box2_side", "box3_side", "box3_side_in_image") if k in values}
    has = np.asarray(values.get("has_boxes", []), bool)
    if has.any():
      out["zoom_hit_rate"] = float(values["zoom_hit"][has].mean())
      out["zoom_hit_chance"] = float(values["zoom_chance"][has].mean())
    return out

  # ------------------------------------------------------------------ visualisation
  picture = "zoom"

  @property
  def draws(self) -> bool:
    return True

  def render(self, variables, images, normalize, text_inputs=None):
    """[image with the scale-2 (red) and scale-3 (yellow) squares | the scale-3 input]."""
    from PIL import Image, ImageDraw

    from fgjax.methods import drawing
    fn = jax.jit(lambda v, x: self.model.apply(v, x, train=False)[1])
    out = []
    for i in range(len(images)):
      aux = jax.device_get(fn(variables, jnp.asarray(images[i:i + 1])))
      img = Image.fromarray(drawing.denormalize(images[i], normalize)).convert("RGB")
      draw = ImageDraw.Draw(img)
      width = max(1, img.size[0] // 120)
      for (tx, ty, tl), colour in zip(aux["boxes_in_image"][0], ((255, 40, 40), (255, 230, 0))):
        draw.rectangle([tx - tl, ty - tl, tx + tl - 1, ty + tl - 1], outline=colour, width=width)
      zoom = Image.fromarray(drawing.denormalize(np.asarray(aux["crops"][1][0]), normalize))
      out.append(drawing.side_by_side(img, zoom.resize(img.size, Image.BILINEAR)))
    return out

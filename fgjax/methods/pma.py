"""`pma`: bi-modal progressive mask attention (Song et al., IEEE TIP 2020; spec section 7).

The model (`fgjax.models.pma`: `pma_vgg16`, `pma_resnet50`, `pma_cnn_small`) reads the image
and, with `config.data.text.enabled`, each example's noun phrases (`fgjax.text`; the batch's
"phrases" / "phrase_mask"); it is trained with cross-entropy on its final classifier, as the
paper does. Without text in the batches (text off, or a missing description: every phrase
masked) the same model runs image-only. Three stages each locate one 2x2 block of the last
conv map (`aux["located"]`); evaluation reports how often a located block holds a part
(synthetic birds' part boxes, CUB's part locations) beside the chance rate of a block drawn
uniformly from the grid. `render` draws the three located blocks, numbered by stage, with the
phrases' QRM weights listed beside the image.

The image-only student taught by a PMA teacher is the `distill` method
(`fgjax.methods.distill`).
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from fgjax import losses
from fgjax.methods.base import Method

log = logging.getLogger("fgjax")


def _part_points(batch):
  """(points (B, Q, 2) x, y in input pixels, valid (B, Q)) of the batch's part annotations:
  the centres of "part_boxes" and the visible "part_locs"; None when the batch has neither."""
  pts, valid = [], []
  if "part_boxes" in batch:
    b = batch["part_boxes"]
    pts.append(jnp.stack([(b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2], -1))
    valid.append(b[..., 2] > b[..., 0])
  if "part_locs" in batch:
    p = batch["part_locs"]
    pts.append(p[..., :2])
    valid.append(p[..., 2] > 0)
  if not pts:
    return None
  return jnp.concatenate(pts, 1), jnp.concatenate(valid, 1)


def box_hits(boxes, points, valid):
  """(B, K) whether box k of example b (x0, y0, x1, y1) contains a valid point of b."""
  x, y = points[:, None, :, 0], points[:, None, :, 1]
  inside = ((x >= boxes[..., 0:1]) & (x < boxes[..., 2:3]) & (y >= boxes[..., 1:2])
            & (y < boxes[..., 3:4]) & valid[:, None, :])
  return inside.any(-1)


def all_block_boxes(model) -> np.ndarray:
  """(h * w, 4) x0, y0, x1, y1 in input pixels of every block of the model's grid (row-major, as
  `aux["located"]` counts them), the same boxes as `aux["located_boxes"]`."""
  from fgjax.models import pma as pma_model
  h, w = model.block_grid()
  s = model.img_size if isinstance(model.img_size, int) else model.img_size[0]
  return np.asarray(pma_model.block_boxes(jnp.arange(h * w), model.map_size(), (s, s)))


class PMA(Method):
  """Cross-entropy on PMA's final classifier; see the module docstring."""
  name = "pma"
  reads_text = True
  picture = "pma"

  def __init__(self, config, model, num_classes):
    super().__init__(config, model, num_classes)
    from fgjax.models import pma as pma_model
    if not isinstance(model, pma_model.PMA):
      raise ValueError(f"config.method='pma' needs a PMA model (pma_vgg16, pma_resnet50, "
                       f"pma_cnn_small); config.model.name={config.model.name!r} is not one")
    self.text_model = model.modality == "text"
    self.image_model = not self.text_model
    self._blocks = all_block_boxes(model) if self.image_model else None
    if model.vocab_size == 0 and self.text_model:
      raise ValueError("config.model.kwargs.modality='text' reads text only: set "
                       "config.data.text.enabled=True")

  @property
  def draws(self) -> bool:
    return self.image_model

  # ------------------------------------------------------------------ inputs
  def model_inputs(self, batch) -> tuple:
    inputs = {"image": batch["image"]}
    if "phrases" in batch and self.model.vocab_size:
      inputs["phrases"] = batch["phrases"]
      inputs["phrase_mask"] = batch["phrase_mask"]
    return (inputs,)

  def init_variables(self, rng, example) -> dict:
    """The variables, with the text branch's parameters whenever the model has a vocabulary
    (an example without text fields gets an empty text of the configured shape)."""
    (inputs,) = self.model_inputs(example)
    if self.model.vocab_size and "phrases" not in inputs:
      tcfg = self.config.data.get("text") or {}
      p, w = int(tcfg.get("max_phrases", 4)), int(tcfg.get("max_words", 4))
      n = inputs["image"].shape[0]
      inputs = dict(inputs, phrases=jnp.zeros((n, p, w), jnp.int32),
                    phrase_mask=jnp.ones((n, p), bool))
    return dict(self.model.init({"params": rng, "dropout": rng}, inputs, train=False))

  # ------------------------------------------------------------------ training
  def loss(self, params, extra, ctx):
    logits, aux, new_vars = self.apply_train(params, extra, *self.model_inputs(ctx.batch),
                                             rng=ctx.rng)
    y = ctx.batch["label"]
    loss = losses.cross_entropy(logits, y, self.label_smoothing)
    metrics = {"loss": loss, "ce": loss, "accuracy": (jnp.argmax(logits, -1) == y).mean()}
    if "phrase_mask" in ctx.batch:
      metrics["phrases_per_example"] = ctx.batch["phrase_mask"].sum(-1).mean()
    return loss, (metrics, new_vars)

  # ------------------------------------------------------------------ evaluation
  def eval_outputs(self, variables, batch):
    logits, aux = self.model.apply(variables, *self.model_inputs(batch), train=False)
    values = {}
    parts = _part_points(batch) if self.image_model else None
    if parts is not None:
      points, valid = parts
      hits = box_hits(aux["located_boxes"], points, valid).astype(jnp.float32)  # (B, K)
      blocks = jnp.asarray(self._blocks)
      chance = box_hits(jnp.broadcast_to(blocks, (points.shape[0],) + blocks.shape), points,
                        valid).astype(jnp.float32).mean(-1)
      values["has_parts"] = valid.any(-1)
      for k in range(hits.shape[1]):
        values[f"located_hit_stage{k + 1}"] = hits[:, k]
      values["located_hit"] = hits.mean(-1)
      values["located_hit_chance"] = chance
    return {"logits": logits}, values

  def summarize(self, values):
    """located_part_hits (mean over stages and over the examples with part annotations), per
    stage, and the chance rate of a uniformly drawn block."""
    if "has_parts" not in values:
      return {}
    keep = np.asarray(values["has_parts"], bool)
    if not keep.any():
      return {}
    out = {"located_part_hits": float(np.mean(values["located_hit"][keep])),
           "located_part_hits_chance": float(np.mean(values["located_hit_chance"][keep]))}
    for k in sorted(v for v in values if v.startswith("located_hit_stage")):
      out[k.replace("located_hit_stage", "located_part_hits_stage")] = \
          float(np.mean(values[k][keep]))
    return out

  # ------------------------------------------------------------------ visualisation
  def render(self, variables, images, normalize, text_inputs=None):
    """[image with the three located blocks, numbered by stage | each stage's phrases with
    their QRM weights] per image; `text_inputs` {"phrases", "phrase_mask"} (one row per image)
    or None (image-only: no phrases listed)."""
    from fgjax.methods import drawing

    def fwd(v, x, t):
      batch = {"image": x, **(t or {})}
      return self.model.apply(v, *self.model_inputs(batch), train=False)

    fn = jax.jit(fwd)
    out = []
    for i in range(len(images)):
      t = None if text_inputs is None else {k: jnp.asarray(v[i:i + 1])
                                            for k, v in text_inputs.items()}
      logits, aux = jax.device_get(fn(variables, jnp.asarray(images[i:i + 1]), t))
      lines = []
      if t is not None and self.text is not None:
        names = self.text.decode(np.asarray(text_inputs["phrases"][i]),
                                 np.asarray(text_inputs["phrase_mask"][i]))
        for k in range(aux["located"].shape[1]):
          w = aux["phrase_weights"][0, k, :len(names)]
          top = np.argsort(-w, kind="stable")[:3]
          listed = "; ".join(f"{names[j]} {w[j]:.2f}" for j in top if w[j] > 0)
          lines.append(f"stage {k + 1}: {listed or '-'}")
      else:
        lines.append("no text: image-only")
      lines.append(f"class {int(np.argmax(logits[0]))}")
      out.append(drawing.render_blocks(drawing.denormalize(images[i], normalize),
                                       aux["located_boxes"][0], lines))
    return out

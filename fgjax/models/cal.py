"""CAL: counterfactual attention learning on WS-DAN (Rao et al. 2021; spec section 4).

Reference: raoyongming/CAL `fgvc/models/cal.py` (WSDAN_CAL, BAP, batch_augment) and
`fgvc/train_distributed.py`.

- Features F: the backbone's last stage map (ResNet-101 layer4: (B, h, w, 2048)).
- Attention maps A: M = 32 maps from a 1x1 conv without bias + BatchNorm (eps 1e-3) + ReLU
  (the reference's BasicConv2d).
- Bilinear attention pooling (BAP): f = vec(A^T F) / (h w) (M x C), signed square root
  sign(f) sqrt(|f| + 1e-6), L2 normalisation over all M C values.
- Counterfactual attention: the same pooling with random maps A' ~ U(0, 2) in training and
  A' = 1 at test time; counterfactual features f'.
- Logits: fc(100 f) (a linear layer without bias), effect logits fc(100 f) - fc(100 f').
- Test (`multiview=True`, the default): the logits average the raw view and a second view
  cropped around the mean attention map (threshold 0.1 of its maximum, padding 5%), as the
  reference's `validate`. Train: the raw view only (the method makes the augmented views).

`__call__(images, train=False)` returns `(logits, aux)`: aux["raw_logits"] (single view),
aux["effect_logits"], aux["features"] (f, (B, M C)), aux["counterfactual_features"],
aux["attention_maps"] ((B, h, w, M)), aux["stages"] (the backbone's). The class centres of the
centre loss live in the `centers` collection (`feature_center`, (num_classes, M C)), updated by
the `cal` method (`fgjax.methods.cal`), so they are checkpointed and resumed with the run.

Augmentation helpers (jittable, per image, all under `stop_gradient` in training):
`attention_crop_boxes`, `crop_and_resize`, `attention_crop`, `attention_drop`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
EPSILON = 1e-6


# ----------------------------------------------------------------------------- augmentation


def _interp_matrix(out_size: int, start, stop, in_size: int) -> jax.Array:
  """(out_size, in_size) bilinear weights sampling the source pixels [start, stop) onto
  out_size pixels with aligned corners (torch's `upsample_bilinear`): output i reads source
  position start + i (stop - start - 1) / (out_size - 1)."""
  start = jnp.asarray(start, jnp.float32)
  stop = jnp.asarray(stop, jnp.float32)
  span = jnp.maximum(stop - start - 1.0, 0.0)
  i = jnp.arange(out_size, dtype=jnp.float32)
  pos = start + i * (span / max(out_size - 1, 1))
  lo = jnp.clip(jnp.floor(pos), 0, in_size - 1)
  frac = pos - lo
  hi = jnp.clip(lo + 1, 0, in_size - 1)
  src = jnp.arange(in_size, dtype=jnp.float32)
  return ((1.0 - frac)[:, None] * (src[None, :] == lo[:, None])
          + frac[:, None] * (src[None, :] == hi[:, None]))


def upsample_maps(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(B, h, w) maps -> (B, H, W), bilinear with aligned corners."""
  h, w = maps.shape[1:3]
  wy = _interp_matrix(size[0], 0, h, h)
  wx = _interp_matrix(size[1], 0, w, w)
  return jnp.einsum("ih,bhw,jw->bij", wy, maps.astype(jnp.float32), wx)


def attention_crop_boxes(maps: jax.Array, image_size: tuple[int, int], theta,
                         padding_ratio: float) -> jax.Array:
  """Per image, the box (y0, x0, y1, x1; end exclusive, in pixels) around the pixels where the
  upsampled attention map is >= theta * the map's maximum, widened by padding_ratio * the image size
  and clipped to the image (the reference's `batch_augment(mode='crop')`).

  maps: (B, h, w); theta: scalar or (B,) fractions of each map's maximum.
  """
  H, W = image_size
  up = upsample_maps(maps, (H, W))
  thr = jnp.broadcast_to(jnp.asarray(theta, jnp.float32), up.shape[:1])
  # The threshold is relative to the maximum of the map itself (not of its upsampled copy).
  mask = up >= (thr * maps.max(axis=(1, 2)))[:, None, None]
  rows, cols = mask.any(axis=2), mask.any(axis=1)

  def span(m, n):
    idx = jnp.arange(n)
    first = jnp.min(jnp.where(m, idx, n), axis=1)
    last = jnp.max(jnp.where(m, idx, -1), axis=1)
    return first, last

  r0, r1 = span(rows, H)
  c0, c1 = span(cols, W)
  # int() truncates toward zero, as in the reference.
  y0 = jnp.maximum(jnp.trunc(r0 - padding_ratio * H), 0)
  y1 = jnp.minimum(jnp.trunc(r1 + padding_ratio * H), H)
  x0 = jnp.maximum(jnp.trunc(c0 - padding_ratio * W), 0)
  x1 = jnp.minimum(jnp.trunc(c1 + padding_ratio * W), W)
  # An empty box (a degenerate map) falls back to the whole image.
  empty = (y1 <= y0) | (x1 <= x0)
  box = jnp.stack([y0, x0, y1, x1], axis=-1).astype(jnp.int32)
  full = jnp.array([0, 0, H, W], jnp.int32)
  return jnp.where(empty[:, None], full, box)


def crop_and_resize(images: jax.Array, boxes: jax.Array) -> jax.Array:
  """Crops each image to its box (y0, x0, y1, x1; end exclusive) and resizes the crop back to
  the image size, bilinear with aligned corners."""
  B, H, W, _ = images.shape
  boxes = boxes.astype(jnp.float32)
  wy = jax.vmap(lambda a, b: _interp_matrix(H, a, b, H))(boxes[:, 0], boxes[:, 2])
  wx = jax.vmap(lambda a, b: _interp_matrix(W, a, b, W))(boxes[:, 1], boxes[:, 3])
  out = jnp.einsum("bih,bhwc,bjw->bijc", wy, images.astype(jnp.float32), wx)
  return out.astype(images.dtype)


def attention_crop(images, maps, theta, padding_ratio):
  """Attention-guided crop: see `attention_crop_boxes`. Returns (crops, boxes)."""
  boxes = attention_crop_boxes(maps, images.shape[1:3], theta, padding_ratio)
  return crop_and_resize(images, boxes), boxes


def attention_drop(images, maps, theta):
  """Attention-guided drop: zeroes the pixels where the upsampled map is >= theta * its
  maximum (the reference's `batch_augment(mode='drop')`). Returns (images, keep mask)."""
  up = upsample_maps(maps, images.shape[1:3])
  thr = jnp.broadcast_to(jnp.asarray(theta, jnp.float32), up.shape[:1])
  keep = up < (thr * maps.max(axis=(1, 2)))[:, None, None]
  return images * keep[..., None].astype(images.dtype), keep


# ----------------------------------------------------------------------------- model


def bilinear_attention_pooling(features, attention):
  """(B, h, w, C), (B, h, w, M) -> signed-sqrt, L2-normalised (B, M C), as WS-DAN's BAP."""
  h, w = features.shape[1:3]
  f = jnp.einsum("bhwm,bhwc->bmc", attention.astype(jnp.float32),
                 features.astype(jnp.float32)) / float(h * w)
  f = f.reshape(f.shape[0], -1)
  f = jnp.sign(f) * jnp.sqrt(jnp.abs(f) + EPSILON)
  return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


class CAL(nn.Module):
  """WS-DAN with counterfactual attention; see the module docstring."""
  num_classes: int
  backbone: nn.Module  # a CNN whose aux["stages"][-1] is the map to pool (its `feature_dim`)
  num_attentions: int = 32
  multiview: bool = True
  eval_crop_theta: float = 0.1
  eval_crop_padding: float = 0.05
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def img_size(self):
    return self.backbone.img_size

  def checkpoint_parts(self) -> dict:
    """A pretrained checkpoint (an ImageNet ResNet) loads into the backbone."""
    return {"backbone": self.backbone}

  def setup(self):
    d, p = self.dtype, self.param_dtype
    self.attention_conv = nn.Conv(self.num_attentions, (1, 1), use_bias=False, dtype=d,
                                  param_dtype=p)
    self.attention_bn = nn.BatchNorm(momentum=0.9, epsilon=1e-3, dtype=d, param_dtype=p)
    self.fc = nn.Dense(self.num_classes, use_bias=False, dtype=jnp.float32, param_dtype=p,
                       kernel_init=nn.initializers.lecun_normal())
    # The class centres are training state: created at init, optional at inference.
    if (self.is_initializing() or self.is_mutable_collection("centers")
        or self.has_variable("centers", "feature_center")):
      self.feature_center = self.variable(
          "centers", "feature_center", jnp.zeros,
          (self.num_classes, self.num_attentions * self.backbone.feature_dim), jnp.float32)

  def view(self, images, train: bool):
    """One view: (logits, effect logits, f, f', attention maps, backbone aux)."""
    _, baux = self.backbone(images, train=train)
    feats = baux["stages"][-1]
    att = nn.relu(self.attention_bn(self.attention_conv(feats), use_running_average=not train))
    f = bilinear_attention_pooling(feats, att)
    if train:
      fake = jax.random.uniform(self.make_rng("dropout"), att.shape, jnp.float32, 0.0, 2.0)
    else:
      fake = jnp.ones(att.shape, jnp.float32)
    f_cf = bilinear_attention_pooling(feats, fake)
    logits = self.fc(f * 100.0)
    effect = logits - self.fc(f_cf * 100.0)
    return logits, effect, f, f_cf, att.astype(jnp.float32), baux

  def __call__(self, images, *, train: bool = False, return_attention: bool = False):
    del return_attention  # uniform model interface; CAL's maps are always in aux
    logits, effect, f, f_cf, att, baux = self.view(images, train)
    aux = {"raw_logits": logits, "effect_logits": effect, "features": f,
           "counterfactual_features": f_cf, "attention_maps": att, "stages": baux["stages"],
           "pre_logits": f}
    if not train and self.multiview:
      crops, boxes = attention_crop(jax.lax.stop_gradient(images), att.mean(-1),
                                    self.eval_crop_theta, self.eval_crop_padding)
      logits_c, effect_c, *_ = self.view(crops, False)
      logits = (logits + logits_c) / 2.0
      aux["effect_logits"] = (effect + effect_c) / 2.0
      aux["crop_logits"] = logits_c
      aux["crop_boxes"] = boxes
    return logits, aux

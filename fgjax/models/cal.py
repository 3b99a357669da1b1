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
- Test views (`test_views`; train: the raw view only, the method makes the augmented views):
  "eight" (the default; the reference's `infer.py`, where the paper's numbers come from): the
  image and its horizontal flip, each as the raw view and three crops around that view's mean
  attention map (threshold 0.3 of its maximum with padding 10%, 0.2 with 10%, 0.1 with 5%);
  the logits (and effect logits) are the mean of the eight. "two": the raw view and the crop
  at 0.1 / 5% (the reference's `validate` during training). "raw": the raw view alone.

`__call__(images, train=False)` returns `(logits, aux)`: aux["raw_logits"] (single view),
aux["view_logits"] ((V, B, C), every test view, in the order above: raw, crops; then the flip's),
aux["crop_boxes"] ((B, 4), the 0.1-threshold crop of the unflipped image; not with "raw"),
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

# The test-time crops (threshold of the map's maximum, padding ratio) of each test-view preset.
TEST_VIEW_CROPS = {"raw": (), "two": ((0.1, 0.05),),
                   "eight": ((0.3, 0.1), (0.2, 0.1), (0.1, 0.05))}


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
  test_views: str = "eight"
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
    if self.test_views not in TEST_VIEW_CROPS:
      raise ValueError(f"CAL test_views must be one of {sorted(TEST_VIEW_CROPS)}, "
                       f"got {self.test_views!r}")
    B = images.shape[0]
    flip = not train and self.test_views == "eight"
    x = jnp.concatenate([images, images[:, :, ::-1]]) if flip else images
    logits, effect, f, f_cf, att, baux = self.view(x, train)
    first = lambda a: a[:B]  # noqa: E731  (the unflipped images' rows)
    aux = {"raw_logits": first(logits), "effect_logits": first(effect), "features": first(f),
           "counterfactual_features": first(f_cf), "attention_maps": first(att),
           "stages": [first(s) for s in baux["stages"]], "pre_logits": first(f)}
    crops_spec = () if train else TEST_VIEW_CROPS[self.test_views]
    if not crops_spec:
      return aux["raw_logits"], aux
    # Every crop of every (flipped) view through one more forward pass.
    x = jax.lax.stop_gradient(x)
    mean_map = att.mean(-1)
    crops = []
    for theta, padding in crops_spec:
      c, boxes = attention_crop(x, mean_map, theta, padding)
      crops.append(c)
    logits_c, effect_c, *_ = self.view(jnp.concatenate(crops), False)

    def per_view(raw, cropped):
      """(F B, C) raw and (K F B, C) crop rows -> (F (1 + K), B, C) views, ordered raw, crops
      of the image, then raw, crops of its flip."""
      v = jnp.concatenate([raw[None], cropped.reshape(len(crops), *raw.shape)])
      v = v.reshape(v.shape[0], -1, B, v.shape[-1])  # (1 + K, F, B, C)
      return v.transpose(1, 0, 2, 3).reshape(-1, B, v.shape[-1])

    view_logits = per_view(logits, logits_c)
    aux["view_logits"] = view_logits
    aux["effect_logits"] = per_view(effect, effect_c).mean(0)
    aux["crop_boxes"] = boxes[:B]  # the last crop's: threshold 0.1
    return view_logits.mean(0), aux

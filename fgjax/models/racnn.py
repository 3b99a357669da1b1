"""RA-CNN (Fu, Zheng and Mei, CVPR 2017, "Look Closer to See Better"; spec section 6).

Three scales, each its own classifier network (VGG-19 in the paper; `backbone` is the scale-1
network, and scales 2 and 3 are clones of it at `crop_size`, named `scale1`, `scale2`,
`scale3`; `share_weights=True` applies `scale1` at every scale). Between two scales an
attention proposal network (APN, `apn1`, `apn2`) reads the last conv map of the coarser scale
(max-pool 2x2, FC `hidden`, tanh, FC 3, sigmoid; both FCs N(0, 0.001) as in the released Caffe
deploy file) and proposes a square (tx, ty, tl) in pixels of that scale's input: tx the
column centre, ty the row centre, tl the half side, with

    tl = lo + (S/2 - lo) s_l,   lo = min_side_frac * S,
    tx = tl + (S - 2 tl) s_x,   ty = tl + (S - 2 tl) s_y      (s = the three sigmoids),

so the side is at least `min_side_frac` of the input side times two and the square always lies
inside the image (no clipping, hence no dead gradient at a bound). `attention_crop` cuts the
square out with the boxcar mask and zooms it to `crop_size` by bilinear sampling; the crop is
the next scale's input.

`__call__(images, train=False, box_gradients=True)` -> (logits, aux):
  logits   log of the three scales' softmax averaged (the paper's "scale 1+2+3")
  aux["scale_logits"]  [(B, C)] * 3, one per scale
  aux["boxes"]         (B, 2, 3) the APNs' squares, each in pixels of its own input
  aux["boxes_in_image"] (B, 2, 3) the same squares in pixels of the scale-1 input
  aux["box_sigmoid"]   (B, 2, 3) the sigmoids (s_x, s_y, s_l): near 0 or 1 = at a bound
  aux["apn_inputs"]    [scale-1 map, scale-2 map] (what APN pre-training targets are read from)
  aux["crops"]         [scale-2 input, scale-3 input]
`box_gradients=False` stops the gradient at the squares before cropping (the classifier phase
and APN pre-training: a scale's cross-entropy trains only its own network). `box_sigmoid`
(B, 2, 3), when given, replaces the APNs' sigmoids: the squares are those, and the APNs are
not applied (the method's random-square classifier pre-training).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _tent(pos, n: int):
  """Bilinear weights (B, out, n) of sampling index coordinates `pos` (B, out) on n pixels,
  positions clamped to the pixel centres at the border (replicate padding). Written with the
  floor and the fraction (not as relu(1 - |p - i|), whose gradient vanishes when a sample
  sits exactly on a pixel centre, as the APNs' initial centred squares make many do)."""
  pos = jnp.clip(pos, 0.0, n - 1.0)
  i0 = jax.lax.stop_gradient(jnp.floor(pos))
  frac = (pos - i0)[..., None]
  i0 = i0.astype(jnp.int32)
  return (1.0 - frac) * jax.nn.one_hot(i0, n, dtype=pos.dtype) + \
      frac * jax.nn.one_hot(i0 + 1, n, dtype=pos.dtype)


def _boxcar(v, lo, hi, k: float):
  """h(v - lo) - h(v - hi), h(v) = 1 / (1 + exp(-k v)), for positions v (B, n), lo/hi (B,)."""
  return jax.nn.sigmoid(k * (v - lo[:, None])) - jax.nn.sigmoid(k * (v - hi[:, None]))


def attention_crop(images, boxes, out_size: int, k: float = 10.0):
  """RA-CNN's differentiable attention crop.

  images (B, H, W, C); boxes (B, 3) = (tx, ty, tl): tx the horizontal (column) centre, ty the
  vertical (row) centre and tl the half side, in input pixels (continuous coordinates: pixel
  (i, j) covers [j, j + 1) x [i, i + 1)). Returns (B, out_size, out_size, C): the square
  [ty - tl, ty + tl] x [tx - tl, tx + tl] zoomed by bilinear sampling at the centres of an
  out_size x out_size grid over it (align_corners=False, the image border replicated), each
  sample weighted by the boxcar mask M = [h(x - x_tl) - h(x - x_br)] [h(y - y_tl) - h(y - y_br)],
  h(v) = 1 / (1 + exp(-k v)), at its position. A square with integer corners and side
  out_size gives the pixels themselves, times M at their centres. Differentiable in the box
  through the mask and through the sampling positions. Mask and sampling are separable, so
  the crop is two matrix products per image (no gather).
  """
  B, H, W, _ = images.shape
  boxes = boxes.astype(jnp.float32)
  tx, ty, tl = boxes[:, 0], boxes[:, 1], boxes[:, 2]
  x0, x1, y0, y1 = tx - tl, tx + tl, ty - tl, ty + tl
  u = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) / out_size  # (out,)
  sx = x0[:, None] + u * (2 * tl[:, None])  # sampling positions, continuous (B, out)
  sy = y0[:, None] + u * (2 * tl[:, None])
  mx = _boxcar(sx, x0, x1, k)  # the mask at the sampling positions (B, out)
  my = _boxcar(sy, y0, y1, k)
  wx = (_tent(sx - 0.5, W) * mx[..., None]).astype(images.dtype)  # (B, out, W)
  wy = (_tent(sy - 0.5, H) * my[..., None]).astype(images.dtype)  # (B, out, H)
  rows = jnp.einsum("bvj,bijc->bivc", wx, images)
  return jnp.einsum("bui,bivc->buvc", wy, rows)


def squares(z, side: float, min_side_frac: float):
  """(boxes (B, 3) = (tx, ty, tl) in pixels of a side-`side` input, sigmoids (B, 3)) from the
  APN's pre-sigmoid outputs z (B, 3); see the module docstring."""
  s = jax.nn.sigmoid(z.astype(jnp.float32))
  return squares_from_sigmoids(s, side, min_side_frac), s


def squares_from_sigmoids(s, side: float, min_side_frac: float):
  """Squares (B, 3) = (tx, ty, tl) in pixels of a side-`side` input from sigmoids
  (s_x, s_y, s_l) (B, 3) in [0, 1]."""
  lo = min_side_frac * side
  tl = lo + (side / 2.0 - lo) * s[:, 2]
  free = side - 2.0 * tl
  return jnp.stack([tl + free * s[:, 0], tl + free * s[:, 1], tl], -1)


def in_parent(box, parent, crop_size: int):
  """A square in pixels of a crop (`crop_size` wide) of the square `parent`, both (B, 3), in
  the parent's input pixels."""
  scale = 2.0 * parent[:, 2:3] / crop_size
  origin = parent[:, :2] - parent[:, 2:3]
  return jnp.concatenate([origin + box[:, :2] * scale, box[:, 2:3] * scale], -1)


class APN(nn.Module):
  """Attention proposal network: max-pool 2x2, FC `hidden`, tanh, FC 3 -> pre-sigmoid (B, 3)."""
  hidden: int = 1024
  init_std: float = 0.001
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, fmap):
    x = nn.max_pool(fmap.astype(self.dtype), (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    init = nn.initializers.normal(self.init_std)
    x = jnp.tanh(nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=init, name="fc1")(x))
    return nn.Dense(3, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init,
                    name="fc2")(x).astype(jnp.float32)


class RACNN(nn.Module):
  """Three-scale RA-CNN around a classifier network (see the module docstring).

  `backbone`: the scale-1 classifier (any fgjax CNN classifier with `num_classes` outputs whose
  aux["stages"][-1] is its last conv map: VGG with the "gap" head, ResNet, cnn_small).
  """
  num_classes: int
  backbone: nn.Module
  img_size: int = 448
  crop_size: int = 224
  min_side_frac: float = 1.0 / 3.0
  k: float = 10.0
  share_weights: bool = False
  apn_hidden: int = 1024
  apn_init_std: float = 0.001
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  num_scales = 3

  def _check(self):
    if not 0.0 < self.min_side_frac <= 0.5:
      raise ValueError(f"RA-CNN min_side_frac must be in (0, 0.5] (tl at least that share of "
                       f"the input side; 0.5 = the whole image), got {self.min_side_frac}")

  def checkpoint_parts(self) -> dict:
    """A classifier checkpoint (timm/torchvision VGG or ResNet, an fgjax classifier) loads into
    every scale's network (the paper initialises all three from the same ImageNet VGG)."""
    names = ("scale1",) if self.share_weights else ("scale1", "scale2", "scale3")
    return {n: self.backbone.clone(img_size=self.img_size if n == "scale1" else self.crop_size)
            for n in names}

  def _net(self, s: int):
    if self.share_weights or s == 1:
      return self.backbone.clone(parent=self, name="scale1")
    return self.backbone.clone(parent=self, name=f"scale{s}", img_size=self.crop_size)

  @nn.compact
  def __call__(self, images, *, train: bool = False, box_gradients: bool = True,
               box_sigmoid=None, return_attention: bool = False):
    del return_attention  # a CNN has no attention maps; the squares are in aux
    self._check()
    nets = [self._net(1)]
    if not self.share_weights:
      nets += [self._net(2), self._net(3)]
    net = lambda s: nets[0] if self.share_weights else nets[s - 1]
    apns = [APN(self.apn_hidden, self.apn_init_std, self.dtype, self.param_dtype,
                name=f"apn{s}") for s in (1, 2)]
    x = images
    side = float(images.shape[1])
    scale_logits, boxes, sig, maps, crops = [], [], [], [], []
    for s in (1, 2, 3):
      logits, aux = net(s)(x, train=train)
      scale_logits.append(logits.astype(jnp.float32))
      if s == 3:
        break
      fmap = aux["stages"][-1]
      maps.append(fmap)
      if box_sigmoid is None:
        box, sg = squares(apns[s - 1](fmap), side, self.min_side_frac)
      else:  # given squares (random-square pre-training of the classifiers); APNs unused
        sg = jnp.asarray(box_sigmoid[:, s - 1], jnp.float32)
        box = squares_from_sigmoids(sg, side, self.min_side_frac)
      boxes.append(box)
      sig.append(sg)
      use = box if box_gradients else jax.lax.stop_gradient(box)
      x = attention_crop(x, use, self.crop_size, self.k).astype(x.dtype)
      crops.append(x)
      side = float(self.crop_size)
    probs = jnp.mean(jnp.stack([jax.nn.softmax(l) for l in scale_logits]), 0)
    combined = jnp.log(jnp.maximum(probs, 1e-30))
    in_image = [boxes[0], in_parent(boxes[1], boxes[0], self.crop_size)]
    aux = {"scale_logits": scale_logits, "boxes": jnp.stack(boxes, 1),
           "boxes_in_image": jnp.stack(in_image, 1), "box_sigmoid": jnp.stack(sig, 1),
           "apn_inputs": maps, "crops": crops}
    return combined, aux

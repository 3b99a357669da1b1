"""VGG-11/13/16/19 (optionally with BatchNorm) in Flax Linen, laid out like torchvision's `VGG`.

Module names are torchvision's state-dict indices, so a checkpoint converts by renaming
(`fgjax.convert.timm_vgg_to_variables`): the convs (and BatchNorms) of `features` are
`features_{i}`, the classifier's Linears `classifier_0`, `classifier_3`, `classifier_6`.

`classifier`:
  "torchvision": AdaptiveAvgPool2d(7) (torch's bins, any input size) -> flatten in torch's
    (C, H, W) order -> Linear 4096 -> ReLU -> Dropout -> Linear 4096 -> ReLU -> Dropout ->
    Linear num_classes; logits equal torchvision's (tests/test_vgg.py).
  "gap": the last conv stage's map (conv5_x before pool5) averaged over space -> one Dense
    `head` (RA-CNN's classifier: conv5_4 average-pooled, then fc).
`num_classes=0`: no classifier (a feature extractor; the pooled conv5 map is returned).

`__call__(images, train=False)` -> (logits, aux): aux["stages"] = the five conv stages' maps
(NHWC), each after its last conv + ReLU and before its max-pool (conv5_4 of VGG-19 is 28 x 28
at 448), aux["pre_logits"] = what the last Linear reads. BatchNorm (the `_bn` variants) keeps
running statistics in `batch_stats` (torch defaults: momentum 0.1, eps 1e-5).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fgjax.models.resnet import BN_EPS, BN_MOMENTUM

Dtype = Any

CONFIGS = {  # torchvision's cfgs A, B, D, E: channels per conv, "M" = max-pool
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"),
}
CLASSIFIERS = ("torchvision", "gap")

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision
_linear_init = nn.initializers.normal(0.01)


def adaptive_avg_pool(x, out: int = 7):
  """torch's AdaptiveAvgPool2d((out, out)) on NHWC: bin i spans [floor(i H / out),
  ceil((i + 1) H / out))."""
  _, h, w, _ = x.shape

  def bins(n):
    return [(i * n // out, -(-(i + 1) * n // out)) for i in range(out)]

  rows = jnp.stack([x[:, a:b].mean(1) for a, b in bins(h)], 1)  # (B, out, W, C)
  return jnp.stack([rows[:, :, a:b].mean(2) for a, b in bins(w)], 2)


class VGG(nn.Module):
  """VGG classifier or feature extractor; see the module docstring."""
  num_classes: int
  depth: int = 16
  batch_norm: bool = False
  img_size: int = 224
  classifier: str = "torchvision"
  drop_rate: float = 0.5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def feature_dim(self) -> int:
    return 512

  def checkpoint_parts(self) -> dict:
    """A torchvision/timm VGG checkpoint loads into the whole model."""
    return {"": self}

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_attention: bool = False):
    del return_attention  # a CNN has no attention maps
    if self.depth not in CONFIGS:
      raise ValueError(f"VGG depth must be one of {sorted(CONFIGS)}, got {self.depth}")
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f"VGG classifier must be one of {CLASSIFIERS}, got {self.classifier!r}")
    d, p = self.dtype, self.param_dtype
    x = images.astype(d)
    stages, i = [], 0
    for v in CONFIGS[self.depth]:
      if v == "M":
        stages.append(x)
        x = nn.max_pool(x, (2, 2), (2, 2))
        i += 1
        continue
      x = nn.Conv(v, (3, 3), padding=((1, 1), (1, 1)), dtype=d, param_dtype=p,
                  kernel_init=_conv_init, name=f"features_{i}")(x)
      i += 1
      if self.batch_norm:
        x = nn.BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=d, param_dtype=p,
                         name=f"features_{i}")(x, use_running_average=not train)
        i += 1
      x = nn.relu(x)
      i += 1
    gap = stages[-1].astype(jnp.float32).mean(axis=(1, 2))
    aux = {"stages": stages}
    if self.num_classes == 0:
      aux["pre_logits"] = gap
      return gap, aux
    if self.classifier == "gap":
      aux["pre_logits"] = gap
      logits = nn.Dense(self.num_classes, dtype=d, param_dtype=p, name="head")(gap.astype(d))
      return logits.astype(jnp.float32), aux
    h = adaptive_avg_pool(x, 7)
    h = h.reshape(h.shape[0], -1)  # (H, W, C) order; the converter permutes torch's (C, H, W)
    for j, name in ((0, "classifier_0"), (1, "classifier_3")):
      h = nn.Dense(4096, dtype=d, param_dtype=p, kernel_init=_linear_init, name=name)(h)
      h = nn.Dropout(self.drop_rate, name=f"dropout_{j}")(nn.relu(h), deterministic=not train)
    aux["pre_logits"] = h
    logits = nn.Dense(self.num_classes, dtype=d, param_dtype=p, kernel_init=_linear_init,
                      name="classifier_6")(h)
    return logits.astype(jnp.float32), aux

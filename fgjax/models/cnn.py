"""A small plain CNN (VGG-style stages, optional GroupNorm) for CPU demos and tests.

Used as the demo's teacher: a convolutional teacher gives the student the CNN inductive bias
that DeiT's hard distillation is meant to transfer (Touvron et al. 2021, section 5.1).
`__call__(images, train=False)` returns `(logits, aux)` with aux["pre_logits"] (pooled
features) and aux["stages"] (the feature map after each stage); with num_classes=0 it is a
feature extractor (`pmg_cnn_small`: PMG heads on its last three stages).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


class SmallCNN(nn.Module):
  num_classes: int
  img_size: int = 64
  widths: Sequence[int] = (32, 64, 128, 256)
  convs_per_stage: int = 2
  stem_stride: int = 1  # 2: the first conv halves the resolution (cheaper on CPU)
  norm: bool = False  # GroupNorm(8) after every conv (modules stage{s}_norm{j})
  pool: str = "mean"  # global pooling of the last map: "mean" or "max"
  drop_rate: float = 0.0
  head_zeroinit: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def feature_dim(self) -> int:
    """Channels of the last stage map."""
    return self.widths[-1]

  def checkpoint_parts(self) -> dict:
    """An fgjax params file of this CNN loads into the whole model."""
    return {"": self}

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_attention: bool = False):
    del return_attention  # no attention maps in a CNN
    x = images.astype(self.dtype)
    stages = []
    for s, w in enumerate(self.widths):
      for j in range(self.convs_per_stage):
        stride = self.stem_stride if (s == 0 and j == 0) else 1
        x = nn.Conv(w, (3, 3), strides=(stride, stride), padding="SAME", dtype=self.dtype,
                    param_dtype=self.param_dtype, kernel_init=nn.initializers.he_normal(),
                    name=f"stage{s}_conv{j}")(x)
        if self.norm:
          x = nn.GroupNorm(num_groups=min(8, w), dtype=self.dtype, param_dtype=self.param_dtype,
                           name=f"stage{s}_norm{j}")(x)
        x = nn.relu(x)
      stages.append(x)
      if s < len(self.widths) - 1:
        x = nn.max_pool(x, (2, 2), (2, 2))
    if self.pool not in ("mean", "max"):
      raise ValueError(f"SmallCNN pool must be 'mean' or 'max', got {self.pool!r}")
    # Max pooling keeps a small part's evidence that averaging dilutes over the whole map.
    feat = x.max(axis=(1, 2)) if self.pool == "max" else x.mean(axis=(1, 2))
    feat = nn.Dropout(self.drop_rate)(feat, deterministic=not train)
    if self.num_classes == 0:  # a feature extractor (PMG heads): no classifier
      return feat, {"pre_logits": feat, "stages": stages}
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=nn.initializers.zeros if self.head_zeroinit else
                      nn.initializers.lecun_normal(), name="head")(feat)
    return logits.astype(jnp.float32), {"pre_logits": feat, "stages": stages}

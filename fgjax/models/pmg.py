"""PMG heads (Du et al. 2020; spec section 5) on any backbone's three stage maps.

For each of the last S = 3 stages: a conv block (1x1 conv -> 512, 3x3 conv -> 1024, each
without bias + BatchNorm (torch momentum 0.01, as the reference's BasicConv) + ReLU), global max
pooling -> V^l (1024-d), and a classifier BatchNorm1d -> Linear(1024, 512) -> BatchNorm1d -> ELU
-> Linear(512, C). The concatenation of the three V^l (3072-d) gets the same classifier shape.

Backbones (`backbone` = an fgjax model name, built without its classifier):
- a ResNet: the outputs of layer2, layer3, layer4 (512 / 1024 / 2048 channels for ResNet-50);
- a ViT/DeiT: the patch tokens after three depths (default blocks L/3, 2L/3, L, e.g. 4, 8, 12),
  reshaped to the patch grid: PMG on a transformer.

`__call__(images, train=False)` returns `(concat_logits, aux)` with aux["stage_logits"] = [y^3,
y^4, y^5], aux["concat_logits"], aux["combined_logits"] = y^3 + y^4 + y^5 + y^concat. Parameters:
`backbone/...` (the backbone's own names, so its pretrained weights load there:
`checkpoint_parts`), conv_block{1,2,3}, classifier{1,2,3},
classifier_concat.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


class ConvBNReLU(nn.Module):
  features: int
  kernel: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    pad = self.kernel // 2
    x = nn.Conv(self.features, (self.kernel, self.kernel), padding=((pad, pad), (pad, pad)),
                use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-5,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x)
    return nn.relu(x)


class Classifier(nn.Module):
  """BatchNorm1d -> Linear(hidden) -> BatchNorm1d -> ELU -> Linear(num_classes)."""
  num_classes: int
  hidden: int = 512
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                   dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    x = bn("bn1")(x)
    x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
    x = nn.elu(bn("bn2")(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="fc2")(x)
    return x.astype(jnp.float32)


class PMG(nn.Module):
  """A backbone + PMG heads; see the module docstring."""
  num_classes: int
  backbone: nn.Module
  feature_size: int = 512
  stage_features: int = 1024
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def img_size(self):
    return self.backbone.img_size

  def checkpoint_parts(self) -> dict:
    """A pretrained checkpoint (an ImageNet ResNet or DeiT) loads into the backbone."""
    return {"backbone": self.backbone}

  @property
  def patch_size(self):
    return getattr(self.backbone, "patch_size", None)

  def stage_maps(self, images, train: bool) -> Sequence:
    _, aux = self.backbone(images, train=train)
    if "stages" in aux:  # ResNet: layer2..layer4
      return aux["stages"][-3:]
    gh, gw = self.backbone.grid
    return [t.reshape(t.shape[0], gh, gw, t.shape[-1]) for t in aux["block_tokens"]]

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_attention: bool = False):
    del return_attention
    maps = self.stage_maps(images, train)
    if len(maps) != 3:
      raise ValueError(f"PMG needs 3 stage maps from the backbone, got {len(maps)}")
    pooled, stage_logits = [], []
    for k, m in enumerate(maps, start=1):
      v = ConvBNReLU(self.feature_size, 1, self.dtype, self.param_dtype,
                     name=f"conv_block{k}_0")(m.astype(self.dtype), train)
      v = ConvBNReLU(self.stage_features, 3, self.dtype, self.param_dtype,
                     name=f"conv_block{k}_1")(v, train)
      v = v.max(axis=(1, 2))  # global max pooling -> V^l
      pooled.append(v)
      stage_logits.append(Classifier(self.num_classes, self.feature_size, self.dtype,
                                     self.param_dtype, name=f"classifier{k}")(v, train))
    concat = Classifier(self.num_classes, self.feature_size, self.dtype, self.param_dtype,
                        name="classifier_concat")(jnp.concatenate(pooled, -1), train)
    aux = {"stage_logits": stage_logits, "concat_logits": concat,
           "combined_logits": sum(stage_logits) + concat,
           "pre_logits": jnp.concatenate(pooled, -1)}
    return concat, aux

"""ResNet-18/34/50/101 in Flax Linen, laid out like timm's `ResNet` (v1.5: the stride sits on the
3x3 conv of a bottleneck), for PMG and CAL backbones.

BatchNorm keeps running statistics in the `batch_stats` collection (torch defaults: momentum 0.1
= flax momentum 0.9, eps 1e-5); under `jax.jit` over a data mesh the batch statistics of a train
step are those of the global batch (XLA reduces across devices), i.e. synchronised BatchNorm.
Call with `train=True, mutable=["batch_stats"]` to train; `train=False` uses the running
statistics.

`__call__(images, train=False)` returns `(logits, aux)` (`num_classes=0`: no `fc`, the pooled
features instead of logits): aux["stages"] = the outputs of layer1 ..
layer4 (NHWC; 256/512/1024/2048 channels for ResNet-50), aux["pre_logits"] = the globally
average-pooled last map.

`output_stride` (32, 16 or 8): the stride of the last map. Below 32 the last stage(s) run at
stride 1; with `dilate=True` (timm's `output_stride`) their 3x3 convs are dilated by the
stride they lost, which keeps the receptive field (a stage's first block keeps the previous
dilation on its strided conv, as timm); with `dilate=False` the stride is simply dropped (the
CAL reference's `ResNet(stride=1)`: layer4 at stride 1, no dilation, 28 x 28 maps at 448). The
parameters are the same either way, so an ImageNet checkpoint loads into any output stride.

`attn` adds attention to every block (`fgjax.models.channel_attention`; None, the default,
leaves the network and its parameters as they were):
- "se" (Squeeze-and-Excitation, timm's `seresnet*`), "cbam" (channel then spatial attention;
  timm's ResNet with `block_args=dict(attn_layer="cbam")`) and "ge" (Gather-Excite, global
  extent) sit as the module `se` after the block's last BatchNorm, before the residual sum,
  where timm's `create_attn(attn_layer, outplanes)` puts `self.se`;
- "sk" (Selective Kernel, timm's `skresnet*`) replaces the block's 3x3 conv and its BN + ReLU
  by a `SelectiveKernel` of two 3x3 paths (dilation 1 and 2, half the input channels each):
  `conv1` of a basic block (attention width C / 8 to a multiple of 16, as timm's skresnet18/34),
  `conv2` of a bottleneck (C / 16 to a multiple of 8, as timm's skresnet50).

Parameter names mirror timm's state dict (`fgjax.convert.timm_resnet_to_variables`):
  conv1, bn1, layer{1-4}_{j}/{conv1,bn1,conv2,bn2[,conv3,bn3][,downsample_conv,downsample_bn]}, fc;
  with attn: layer{s}_{j}/se/... (timm's `layer{s}.{j}.se.*`; `fc1`, `fc2`, `channel/fc1`,
  `spatial/conv/{conv,bn}`, `mlp/fc1`, ...) or, for "sk", layer{s}_{j}/conv1 (basic) or /conv2
  (bottleneck) = {paths_0,paths_1}/{conv,bn}, attn/{fc_reduce,bn,fc_select} (timm's
  `conv1.paths.0.conv`, ...); the other convs of a timm skresnet block (`conv{n}.conv`,
  `conv{n}.bn`: timm's ConvNormAct) map to fgjax's `conv{n}`, `bn{n}`.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from fgjax.models.channel_attention import BLOCK_ATTENTION, SelectiveKernel

Dtype = Any

BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # torch momentum 0.1

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # timm / torchvision

ATTN_KINDS = ("se", "cbam", "sk", "ge")
# timm's sk_kwargs: skresnet18/34 (basic blocks) and skresnet50 (bottlenecks); split_input both.
SK_KWARGS = {"basic": dict(rd_ratio=1 / 8, rd_divisor=16), "bottleneck": dict(rd_ratio=1 / 16,
                                                                              rd_divisor=8)}

DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


def check_attn(attn) -> None:
  """Raises a ValueError naming the config key for an unknown `attn`."""
  if attn is not None and attn not in ATTN_KINDS:
    raise ValueError(f"model.kwargs.attn must be None or one of "
                     f"{', '.join(repr(a) for a in ATTN_KINDS)}; got {attn!r}")


def _conv(features, kernel, stride, dtype, param_dtype, name, dilation=1):
  pad = dilation * (kernel // 2)
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), kernel_dilation=(dilation, dilation),
                 use_bias=False, dtype=dtype,
                 param_dtype=param_dtype, kernel_init=_conv_init, name=name)


def _bn(dtype, param_dtype, name, zero_scale=False):
  return nn.BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=dtype,
                      param_dtype=param_dtype, name=name,
                      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones)


class Block(nn.Module):
  """A basic (two 3x3) or bottleneck (1x1, 3x3 with the stride, 1x1 x4) residual block;
  `first_dilation` dilates the block's first 3x3 conv, `dilation` a basic block's second;
  `attn` as in the module docstring."""
  kind: str
  width: int
  stride: int = 1
  dilation: int = 1
  first_dilation: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attn: str | None = None

  def __post_init__(self):
    check_attn(self.attn)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    ura = not train
    d, p = self.dtype, self.param_dtype
    sk = self.attn == "sk"
    sk_conv = lambda name: SelectiveKernel(self.width, stride=self.stride,
                                           dilation=self.first_dilation,
                                           **SK_KWARGS[self.kind], dtype=d, param_dtype=p,
                                           name=name)
    if self.kind == "basic":
      out_ch = self.width
      if sk:  # the paths hold the BN + ReLU
        y = sk_conv("conv1")(x, train)
      else:
        y = _conv(self.width, 3, self.stride, d, p, "conv1", self.first_dilation)(x)
        y = nn.relu(_bn(d, p, "bn1")(y, use_running_average=ura))
      y = _conv(self.width, 3, 1, d, p, "conv2", self.dilation)(y)
      y = _bn(d, p, "bn2")(y, use_running_average=ura)
    else:
      out_ch = self.width * 4
      y = _conv(self.width, 1, 1, d, p, "conv1")(x)
      y = nn.relu(_bn(d, p, "bn1")(y, use_running_average=ura))
      if sk:
        y = sk_conv("conv2")(y, train)
      else:
        y = _conv(self.width, 3, self.stride, d, p, "conv2", self.first_dilation)(y)
        y = nn.relu(_bn(d, p, "bn2")(y, use_running_average=ura))
      y = _conv(out_ch, 1, 1, d, p, "conv3")(y)
      y = _bn(d, p, "bn3")(y, use_running_average=ura)
    if self.attn in BLOCK_ATTENTION:
      y = BLOCK_ATTENTION[self.attn](dtype=d, param_dtype=p, name="se")(y, train)
    if self.stride != 1 or x.shape[-1] != out_ch:
      x = _conv(out_ch, 1, self.stride, d, p, "downsample_conv")(x)
      x = _bn(d, p, "downsample_bn")(x, use_running_average=ura)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet classifier; see the module docstring."""
  num_classes: int
  depth: int = 50
  img_size: int = 224
  widths: Sequence[int] = (64, 128, 256, 512)
  output_stride: int = 32
  dilate: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attn: str | None = None  # None, "se", "cbam", "sk" or "ge" in every block

  def __post_init__(self):
    check_attn(self.attn)
    super().__post_init__()

  def stage_strides(self) -> list[tuple[int, int, int]]:
    """Per stage (stride, dilation, first-block dilation), as timm's `make_blocks`."""
    if self.output_stride not in (8, 16, 32):
      raise ValueError(f"ResNet output_stride must be 8, 16 or 32, got {self.output_stride}")
    out, net_stride, dilation = [], 4, 1
    for s in range(4):
      stride, prev = (1 if s == 0 else 2), dilation
      if net_stride >= self.output_stride:
        if self.dilate:
          dilation *= stride
        stride = 1
      else:
        net_stride *= stride
      out.append((stride, dilation, prev))
    return out

  @property
  def feature_dim(self) -> int:
    """Channels of the last stage map (what a CAL head pools)."""
    if self.depth not in DEPTHS:
      raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {self.depth}")
    return self.widths[-1] * (4 if DEPTHS[self.depth][0] == "bottleneck" else 1)

  def checkpoint_parts(self) -> dict:
    """A timm/torchvision ResNet checkpoint loads into the whole model ("" = all of it)."""
    return {"": self}

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_attention: bool = False):
    del return_attention  # accepted for a uniform model interface; a CNN has none
    if self.depth not in DEPTHS:
      raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {self.depth}")
    kind, layers = DEPTHS[self.depth]
    d, p = self.dtype, self.param_dtype
    x = _conv(64, 7, 2, d, p, "conv1")(images.astype(d))
    x = nn.relu(_bn(d, p, "bn1")(x, use_running_average=not train))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    stages = []
    for s, ((width, n), (stride, dil, first)) in enumerate(
        zip(zip(self.widths, layers), self.stage_strides())):
      for j in range(n):
        x = Block(kind, width, stride if j == 0 else 1, dil, first if j == 0 else dil, d, p,
                  attn=self.attn, name=f"layer{s + 1}_{j}")(x, train)
      stages.append(x)
    feat = x.astype(jnp.float32).mean(axis=(1, 2))
    aux = {"stages": stages, "pre_logits": feat}
    if self.num_classes == 0:  # a feature extractor (PMG, CAL): no classifier
      return feat, aux
    logits = nn.Dense(self.num_classes, dtype=d, param_dtype=p, name="fc")(feat)
    return logits.astype(jnp.float32), aux

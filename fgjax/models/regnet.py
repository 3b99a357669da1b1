"""RegNetY (Radosavovic et al. 2020, "Designing Network Design Spaces", arXiv:2003.13678) in
Flax Linen, laid out like timm's `models/regnet.py` so that timm state dicts load by name
(`fgjax.convert.timm_regnet_to_variables`): RegNetY-1.6GF, -3.2GF and -16GF (`regnety_016`,
`regnety_032`, `regnety_160`; the last is the FGVC9 Sorghum-100 backbone of spec section 8).

The network: `stem` (3x3 conv stride 2, 32 channels, BN, ReLU), four stages `s1`..`s4` of
blocks `b1`..`bN` (the first block of a stage has stride 2), global average pool, dropout
(`drop_rate`), `head/fc`. A block (timm's `Bottleneck`, bottleneck ratio 1):
  conv1 (1x1, BN, ReLU) -> conv2 (3x3 grouped conv, `group_size` channels per group, the
  stride, BN, ReLU) -> se (Squeeze-and-Excitation: `fgjax.models.channel_attention.
  SqueezeExcite` with fc1 of round(0.25 x the block's INPUT channels) units, biases, ReLU,
  sigmoid) -> conv3 (1x1, BN, no activation) -> + shortcut -> ReLU,
where the shortcut is `downsample` (1x1 conv with the stride + BN) when the channels or the
stride change, else the identity. Every conv + BN is a `ConvBN` (`conv`, `bn`).

Widths and depths come from the design-space parameters (w0, wa, wm, depth, group_size) as in
the paper and timm: block j gets the linear width u_j = w0 + wa * j, snapped to the nearest
power of wm times w0 (w0 * wm ** round(log(u_j / w0) / log(wm))) and rounded to a multiple of 8
(float32 arithmetic, as timm computes it); runs of equal widths form the stages; each stage's
group width is min(group_size, width) and its width is rounded to a multiple of it.
`stage_specs(...)` gives (width, depth, group width) per stage: regnety_016: (48, 2, 24),
(120, 6, 24), (336, 17, 24), (888, 2, 24); regnety_160: (224, 2, 112), (448, 4, 112),
(1232, 11, 112), (3024, 1, 112).

BatchNorm (torch defaults: momentum 0.1, eps 1e-5) keeps its running statistics in the
`batch_stats` collection: call with `train=True, mutable=["batch_stats"]` (and a "dropout" rng
when `drop_rate` > 0) to train. `__call__(images, train=False)` returns `(logits, aux)`:
aux["stages"] = the NHWC outputs of s1..s4, aux["pre_logits"] = the pooled last map (float32,
before the dropout); `num_classes=0` gives no head and the pooled features instead of logits.
`output_stride` 16 or 8 moves the last stages' strides into dilation as timm's
`output_stride=`. `remat=True` recomputes each block in the backward pass (`nn.remat`: the same
function and parameters, less activation memory; for 960 px inputs). `dtype` is the compute
dtype (bf16 works; pooling and the SE squeeze run in float32), `param_dtype` that of the
parameters. timm's drop-path and zero-initialised last BN are not implemented (the last BN
starts at scale 1; fine-tuning from a checkpoint is unaffected).

Parameter tree: stem/{conv,bn}, s{i}/b{j}/{conv1,conv2,conv3,downsample}/{conv,bn},
s{i}/b{j}/se/{fc1,fc2}, head/fc (timm's `stem.conv.weight`, `s1.b1.se.fc1.weight`, ...).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from fgjax.models.channel_attention import ConvBN, SqueezeExcite

Dtype = Any

# timm's model_cfgs (design-space parameters of the RegNetY models, pycls' published values).
VARIANTS = {
    "regnety_016": dict(w0=48, wa=20.71, wm=2.65, group_size=24, depth=27, se_ratio=0.25),
    "regnety_032": dict(w0=80, wa=42.63, wm=2.66, group_size=24, depth=21, se_ratio=0.25),
    "regnety_160": dict(w0=200, wa=106.23, wm=2.48, group_size=112, depth=18, se_ratio=0.25),
}
WIDTH_QUANTUM = 8


def decode_variant(name: str) -> dict:
  """The design-space parameters of a RegNetY variant ('regnety_016', ...)."""
  if name not in VARIANTS:
    raise ValueError(f"unknown RegNet variant {name!r}; known: {', '.join(VARIANTS)}")
  return dict(VARIANTS[name])


def block_widths(w0: int, wa: float, wm: float, depth: int,
                 quantum: int = WIDTH_QUANTUM) -> list[int]:
  """Per-block widths of the RegNet design space (see the module docstring), in float32."""
  f32 = np.float32
  linear = np.arange(depth, dtype=f32) * f32(wa) + f32(w0)
  steps = np.round(np.log(linear / f32(w0)) / f32(math.log(wm)))
  snapped = f32(w0) * np.power(f32(wm), steps)
  return [int(w) for w in np.round(snapped / f32(quantum)) * quantum]


def stage_specs(w0: int, wa: float, wm: float, depth: int, group_size: int,
                bottle_ratio: float = 1.0) -> list[tuple[int, int, int]]:
  """(width, blocks, group width) per stage: runs of equal block widths, each width made
  divisible by its group width (whose bottleneck width it rounds to a multiple of)."""
  out = []
  for width, run in itertools.groupby(block_widths(w0, wa, wm, depth)):
    inner = int(width * bottle_ratio)
    group = min(group_size, inner)
    inner = int(round(inner / group) * group)
    out.append((int(inner / bottle_ratio), len(list(run)), group))
  return out


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


class Bottleneck(nn.Module):
  """A RegNetY block (timm's `Bottleneck`); see the module docstring. `dilation` =
  (conv2's dilation, the stage's dilation)."""
  features: int
  group_width: int
  stride: int = 1
  dilation: tuple[int, int] = (1, 1)
  bottle_ratio: float = 1.0
  se_ratio: float = 0.25
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    dt = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    in_ch = x.shape[-1]
    inner = int(round(self.features * self.bottle_ratio))
    y = ConvBN(inner, 1, **dt, name="conv1")(x, train)
    y = ConvBN(inner, 3, self.stride, self.dilation[0], groups=inner // self.group_width, **dt,
               name="conv2")(y, train)
    if self.se_ratio:
      y = SqueezeExcite(rd_channels=int(round(in_ch * self.se_ratio)), **dt, name="se")(y)
    y = ConvBN(self.features, 1, act=False, **dt, name="conv3")(y, train)
    if in_ch != self.features or self.stride != 1 or self.dilation[0] != self.dilation[1]:
      x = ConvBN(self.features, 1, self.stride, act=False, **dt, name="downsample")(x, train)
    return nn.relu(y + x)


class RegStage(nn.Module):
  """Blocks b1..bN of one stage (timm's `RegStage`); the first has the stride."""
  features: int
  num_blocks: int
  group_width: int
  stride: int
  dilation: int
  bottle_ratio: float = 1.0
  se_ratio: float = 0.25
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    # static_argnums counts the module as 0: (x=1, train=2).
    block_cls = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat else Bottleneck
    first = 1 if self.dilation in (1, 2) else 2  # timm's first_dilation
    for j in range(self.num_blocks):
      x = block_cls(self.features, self.group_width, self.stride if j == 0 else 1,
                    (first if j == 0 else self.dilation, self.dilation), self.bottle_ratio,
                    self.se_ratio, self.dtype, self.param_dtype, name=f"b{j + 1}")(x, train)
    return x


class RegNet(nn.Module):
  """RegNet(Y) classifier; see the module docstring. The design-space fields default to
  RegNetY-1.6GF (`decode_variant` gives the others)."""
  num_classes: int
  img_size: int = 224
  w0: int = 48
  wa: float = 20.71
  wm: float = 2.65
  depth: int = 27
  group_size: int = 24
  se_ratio: float = 0.25
  bottle_ratio: float = 1.0
  stem_width: int = 32
  output_stride: int = 32
  drop_rate: float = 0.0
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    self.check()
    super().__post_init__()

  def check(self) -> None:
    """Raises a ValueError naming the `model.kwargs` key of an invalid setting."""
    bad = None
    if not (_is_int(self.w0) and self.w0 > 0 and self.w0 % WIDTH_QUANTUM == 0):
      bad = f"w0 must be a positive multiple of {WIDTH_QUANTUM}, got {self.w0!r}"
    elif not self.wa >= 0:
      bad = f"wa must be >= 0, got {self.wa!r}"
    elif not self.wm > 1:
      bad = f"wm must be > 1, got {self.wm!r}"
    elif not (_is_int(self.depth) and self.depth >= 1):
      bad = f"depth must be an integer >= 1, got {self.depth!r}"
    elif not (_is_int(self.group_size) and self.group_size >= 1):
      bad = f"group_size must be an integer >= 1, got {self.group_size!r}"
    elif not 0 <= self.se_ratio <= 1:
      bad = f"se_ratio must be in [0, 1], got {self.se_ratio!r}"
    elif not self.bottle_ratio > 0:
      bad = f"bottle_ratio must be > 0, got {self.bottle_ratio!r}"
    elif self.output_stride not in (8, 16, 32):
      bad = f"output_stride must be 8, 16 or 32, got {self.output_stride!r}"
    elif not 0 <= self.drop_rate < 1:
      bad = f"drop_rate must be in [0, 1), got {self.drop_rate!r}"
    if bad is None and len(self.stages()) != 4:
      bad = (f"w0={self.w0}, wa={self.wa}, wm={self.wm}, depth={self.depth} give "
             f"{len(self.stages())} stages; a RegNet needs 4")
    if bad is not None:
      raise ValueError(f"model.kwargs.{bad}")

  def stages(self) -> list[tuple[int, int, int]]:
    """(width, blocks, group width) per stage (`stage_specs`)."""
    return stage_specs(self.w0, self.wa, self.wm, self.depth, self.group_size,
                       self.bottle_ratio)

  def stage_strides(self) -> list[tuple[int, int]]:
    """(stride, dilation) per stage, as timm's `_get_stage_args` (stem stride 2)."""
    out, net_stride, dilation = [], 2, 1
    for _ in self.stages():
      if net_stride >= self.output_stride:
        dilation, stride = dilation * 2, 1
      else:
        stride, net_stride = 2, net_stride * 2
      out.append((stride, dilation))
    return out

  @property
  def feature_dim(self) -> int:
    """Channels of the last stage map (the pooled features' width)."""
    return self.stages()[-1][0]

  def checkpoint_parts(self) -> dict:
    """A timm RegNet checkpoint loads into the whole model ("" = all of it)."""
    return {"": self}

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_attention: bool = False):
    del return_attention  # accepted for a uniform model interface; a CNN has none
    d, p = self.dtype, self.param_dtype
    x = ConvBN(self.stem_width, 3, 2, dtype=d, param_dtype=p, name="stem")(images.astype(d),
                                                                         train)
    stages = []
    for i, ((width, n, group), (stride, dilation)) in enumerate(
        zip(self.stages(), self.stage_strides())):
      x = RegStage(width, n, group, stride, dilation, self.bottle_ratio, self.se_ratio,
                   self.remat, d, p, name=f"s{i + 1}")(x, train)
      stages.append(x)
    feat = x.astype(jnp.float32).mean(axis=(1, 2))
    aux = {"stages": stages, "pre_logits": feat}
    if self.num_classes == 0:  # a feature extractor: no classifier
      return feat, aux
    logits = ClassifierHead(self.num_classes, self.drop_rate, d, p, name="head")(feat, train)
    return logits.astype(jnp.float32), aux


class ClassifierHead(nn.Module):
  """timm's `ClassifierHead` after the pool: dropout (`drop_rate`, train only), then `fc`."""
  num_classes: int
  drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feat, train: bool = False):
    y = nn.Dropout(self.drop_rate)(feat, deterministic=not train)
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=nn.initializers.normal(0.01), name="fc")(y.astype(self.dtype))


FIELDS = tuple(f.name for f in dataclasses.fields(RegNet) if f.name not in ("parent", "name"))


def create(variant: str, num_classes: int, img_size=224, **kw) -> RegNet:
  """`RegNet` of `variant` (`VARIANTS`) with keyword overrides; an unknown keyword is a
  ValueError naming `model.kwargs`."""
  unknown = sorted(set(kw) - set(FIELDS))
  if unknown:
    raise ValueError(f"model.kwargs: unknown RegNet option(s) {', '.join(unknown)}; known: "
                     f"{', '.join(f for f in FIELDS if f not in ('num_classes', 'img_size'))}")
  return RegNet(num_classes=num_classes, img_size=img_size, **{**decode_variant(variant), **kw})

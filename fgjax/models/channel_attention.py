"""Channel and spatial attention modules for CNN blocks, in Flax Linen, laid out like timm's
modules so that their state dicts import by name (`fgjax.convert.timm_attn_to_variables` for a
module alone, `fgjax.convert.timm_resnet_to_variables` inside a ResNet).

- `SqueezeExcite`: Squeeze-and-Excitation (Hu et al. 2018, arXiv:1709.01507), timm's
  `SEModule`. The global average pool goes through `fc1` (bias) -> ReLU -> `fc2` (bias) ->
  sigmoid, which scales the channels. The reduction is `make_divisible(C / 16, 8,
  round_limit=0)`.
- `CBAM`: Convolutional Block Attention Module (Woo et al. 2018, arXiv:1807.06521), timm's
  `CbamModule`. Channel attention (`channel`) first: one bias-free MLP `fc1` -> ReLU -> `fc2`
  is applied to the average- and to the max-pooled vector, the two results are summed, and
  a sigmoid scales the channels (reduction `make_divisible(C / 16, 1, round_limit=0)`). Then
  spatial attention (`spatial`): [mean, max] over the channels -> 7x7 conv without bias +
  BatchNorm, no activation (`spatial/conv/{conv,bn}`) -> sigmoid, which scales the positions.
- `SelectiveKernel`: Selective Kernel convolution (Li et al. 2019, arXiv:1903.06586), timm's
  `SelectiveKernel` with `SelectiveKernelAttn`. Paths `paths_{i}` are conv + BN + ReLU
  (`paths_{i}/{conv,bn}`), one per kernel size (3 and 5 by default). With `keep_3x3` (timm's
  default) every path is a 3x3 conv and a kernel k becomes dilation (k - 1) / 2, so the 5x5
  path is a 3x3 conv at dilation 2. With `split_input` each path reads its own slice of the
  input channels. The attention (`attn`) sums the paths and pools them globally, then
  `fc_reduce` (no bias) -> BN -> ReLU -> `fc_select` (no bias) -> softmax over the paths. The
  output is the paths summed with those weights. The attention width is
  `make_divisible(C * rd_ratio, rd_divisor)` (timm's round_limit 0.9).
- `GatherExcite`: Gather-Excite (Hu et al. 2018, arXiv:1810.12348), timm's `GatherExcite`
  without extra parameters (GE-theta-minus). The gather is a global average for `extent=0`,
  else an average pool of kernel 2e - 1 and stride e (padding e - 1, padded cells not
  counted). Optionally half of it is replaced by the same max pool (`add_maxpool`). The
  excite is `mlp/fc1` (bias) -> ReLU -> `mlp/fc2` (bias) (`use_mlp`), upsampled to the input
  size by nearest neighbour (as torch's `F.interpolate`), then a sigmoid gate. timm's
  `extra_params=True` (depthwise-conv gather) is not implemented.

`SqueezeExcite`, `CBAM` and `GatherExcite` keep the input's shape, and a ResNet block puts them
where timm's `create_attn(attn_layer, outplanes)` puts `self.se`: after the last BatchNorm,
before the residual sum. `SelectiveKernel` replaces a block's 3x3 conv, as timm's `skresnet*`
do (`fgjax.models.resnet`).

NHWC throughout. Every module is called as `(x, train=False)`, and its BatchNorms use running
statistics (`batch_stats`) unless `train`. The 1x1 convolutions on pooled vectors (`fc1`,
`fc2`, `fc_reduce`, `fc_select`) are `nn.Dense` layers: the kernel (C_in, C_out) is torch's
(C_out, C_in, 1, 1) weight transposed. `dtype` is the compute dtype (bf16 works), `param_dtype`
that of the parameters. Pooling, softmax and the GE average pool run in float32.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

Dtype = Any

BN_EPS = 1e-5  # torch defaults, as fgjax.models.resnet
BN_MOMENTUM = 0.9  # torch momentum 0.1

_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # timm's ResNet init


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.9) -> int:
  """timm's `make_divisible`: `v` rounded to the nearest multiple of `divisor` (at least
  `min_value`, by default `divisor`), plus one `divisor` if rounding lost more than
  1 - `round_limit` of `v`."""
  min_value = min_value or divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < round_limit * v:
    new_v += divisor
  return new_v


def _dense(features, use_bias, dtype, param_dtype, name):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=_init, name=name)


def _bn(dtype, param_dtype, name):
  return nn.BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=dtype,
                      param_dtype=param_dtype, name=name)


def _mean(x, axis):
  return x.astype(jnp.float32).mean(axis=axis, keepdims=True)


class ConvBN(nn.Module):
  """timm's `ConvNormAct`: `conv` (no bias, timm's symmetric padding; `groups` > 1: a grouped
  conv, initialised with timm's fan-out / groups) -> BatchNorm `bn` [-> ReLU]."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  dilation: int = 1
  act: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    k, s, dil = self.kernel_size, self.stride, self.dilation
    pad = ((s - 1) + dil * (k - 1)) // 2  # timm's get_padding
    init = _init if self.groups == 1 else nn.initializers.variance_scaling(
        2.0 * self.groups, "fan_out", "normal")  # N(0, 2 / (k * k * features / groups))
    y = nn.Conv(self.features, (k, k), strides=(s, s), padding=((pad, pad), (pad, pad)),
                kernel_dilation=(dil, dil), feature_group_count=self.groups, use_bias=False,
                dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init,
                name="conv")(x)
    y = _bn(self.dtype, self.param_dtype, "bn")(y, use_running_average=not train)
    return nn.relu(y) if self.act else y


class Mlp(nn.Module):
  """timm's `ConvMlp` on the last axis: `fc1` -> ReLU -> `fc2` (both with bias)."""
  hidden: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d, p = self.dtype, self.param_dtype
    return _dense(self.features, True, d, p, "fc2")(nn.relu(_dense(self.hidden, True, d, p,
                                                                   "fc1")(x)))


class SqueezeExcite(nn.Module):
  """Squeeze-and-Excitation (timm's `SEModule`); see the module docstring."""
  rd_ratio: float = 1 / 16
  rd_channels: int | None = None
  rd_divisor: int = 8
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm
    c = x.shape[-1]
    rd = self.rd_channels or make_divisible(c * self.rd_ratio, self.rd_divisor, round_limit=0.)
    d, p = self.dtype, self.param_dtype
    s = _mean(x, (1, 2)).astype(d)
    s = nn.relu(_dense(rd, self.use_bias, d, p, "fc1")(s))
    s = _dense(c, self.use_bias, d, p, "fc2")(s)
    return x * nn.sigmoid(s).astype(x.dtype)


class ChannelAttention(nn.Module):
  """CBAM's channel attention (timm's `ChannelAttn`): one MLP on the average- and on the
  max-pooled vector, summed, sigmoid."""
  rd_ratio: float = 1 / 16
  rd_channels: int | None = None
  rd_divisor: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    c = x.shape[-1]
    rd = self.rd_channels or make_divisible(c * self.rd_ratio, self.rd_divisor, round_limit=0.)
    d, p = self.dtype, self.param_dtype
    pooled = jnp.stack([_mean(x, (1, 2)).astype(d), x.max(axis=(1, 2), keepdims=True).astype(d)])
    a = _dense(c, self.use_bias, d, p, "fc2")(nn.relu(_dense(rd, self.use_bias, d, p,
                                                             "fc1")(pooled)))
    return x * nn.sigmoid(a[0] + a[1]).astype(x.dtype)


class SpatialAttention(nn.Module):
  """CBAM's spatial attention (timm's `SpatialAttn`): [mean, max] over the channels -> conv +
  BN (`conv/{conv,bn}`) -> sigmoid."""
  kernel_size: int = 7
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    d = self.dtype
    m = jnp.concatenate([_mean(x, -1).astype(d), x.max(axis=-1, keepdims=True).astype(d)], -1)
    a = ConvBN(1, self.kernel_size, act=False, dtype=d, param_dtype=self.param_dtype,
               name="conv")(m, train)
    return x * nn.sigmoid(a).astype(x.dtype)


class CBAM(nn.Module):
  """CBAM (timm's `CbamModule`): `channel` then `spatial` attention."""
  rd_ratio: float = 1 / 16
  rd_channels: int | None = None
  rd_divisor: int = 1
  spatial_kernel_size: int = 7
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    dt = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    x = ChannelAttention(self.rd_ratio, self.rd_channels, self.rd_divisor, self.use_bias, **dt,
                         name="channel")(x, train)
    return SpatialAttention(self.spatial_kernel_size, **dt, name="spatial")(x, train)


class SelectiveKernelAttention(nn.Module):
  """timm's `SelectiveKernelAttn`: the per-path, per-channel softmax weights (B, paths, C)."""
  attn_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, paths: Sequence[jnp.ndarray], train: bool = False):
    d, p = self.dtype, self.param_dtype
    n, c = len(paths), paths[0].shape[-1]
    s = sum(y.astype(jnp.float32) for y in paths).mean(axis=(1, 2)).astype(d)  # (B, C)
    s = _dense(self.attn_channels, False, d, p, "fc_reduce")(s)
    s = nn.relu(_bn(d, p, "bn")(s, use_running_average=not train))
    s = _dense(c * n, False, d, p, "fc_select")(s)  # torch's channel j = path * C + c
    return nn.softmax(s.astype(jnp.float32).reshape(s.shape[0], n, c), axis=1)


class SelectiveKernel(nn.Module):
  """Selective Kernel convolution (timm's `SelectiveKernel`); see the module docstring.
  `features`: output channels; `stride` and `dilation` apply to every path."""
  features: int
  kernel_sizes: Sequence[int] = (3, 5)
  stride: int = 1
  dilation: int = 1
  rd_ratio: float = 1 / 16
  rd_channels: int | None = None
  rd_divisor: int = 8
  keep_3x3: bool = True
  split_input: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    ks = list(self.kernel_sizes)
    if any(k < 3 or k % 2 == 0 for k in ks):
      raise ValueError(f"SelectiveKernel kernel sizes must be odd and >= 3, got {ks}")
    if self.keep_3x3:
      dils, ks = [self.dilation * (k - 1) // 2 for k in ks], [3] * len(ks)
    else:
      dils = [self.dilation] * len(ks)
    n = len(ks)
    if self.split_input:
      if x.shape[-1] % n:
        raise ValueError(f"SelectiveKernel split_input: {x.shape[-1]} input channels do not "
                         f"split into {n} paths")
      xs = jnp.split(x, n, axis=-1)
    else:
      xs = [x] * n
    dt = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    ys = [ConvBN(self.features, k, self.stride, dil, **dt, name=f"paths_{i}")(xi, train)
          for i, (k, dil, xi) in enumerate(zip(ks, dils, xs))]
    attn_ch = self.rd_channels or make_divisible(self.features * self.rd_ratio, self.rd_divisor)
    w = SelectiveKernelAttention(attn_ch, **dt, name="attn")(ys, train).astype(ys[0].dtype)
    return sum(w[:, i, None, None, :] * y for i, y in enumerate(ys))


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
  """Source rows of torch's `F.interpolate(mode="nearest", size=n_out)`: floor(i * in / out)
  in float32, clipped."""
  scale = np.float32(n_in) / np.float32(n_out)
  idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, n_in - 1)


class GatherExcite(nn.Module):
  """Gather-Excite without extra parameters (timm's `GatherExcite(extra_params=False)`); see
  the module docstring. `extent`: 0 = global gather, else an even number."""
  extent: int = 0
  use_mlp: bool = True
  rd_ratio: float = 1 / 16
  rd_channels: int | None = None
  rd_divisor: int = 1
  add_maxpool: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    _, h, w, c = x.shape
    if self.extent == 0:
      g = _mean(x, (1, 2))
      if self.add_maxpool:
        g = 0.5 * g + 0.5 * x.max(axis=(1, 2), keepdims=True).astype(jnp.float32)
    else:
      if self.extent < 0 or self.extent % 2:
        raise ValueError(f"GatherExcite extent must be 0 or even, got {self.extent}")
      k, s = 2 * self.extent - 1, self.extent
      pad = ((k // 2, k // 2),) * 2
      xf = x.astype(jnp.float32)
      g = nn.avg_pool(xf, (k, k), (s, s), pad, count_include_pad=False)
      if self.add_maxpool:
        g = 0.5 * g + 0.5 * nn.max_pool(xf, (k, k), (s, s), pad)
    g = g.astype(self.dtype)
    if self.use_mlp:
      rd = self.rd_channels or make_divisible(c * self.rd_ratio, self.rd_divisor,
                                              round_limit=0.)
      g = Mlp(rd, c, self.dtype, self.param_dtype, name="mlp")(g)
    if g.shape[1:3] != (1, 1):
      g = g[:, _nearest_index(g.shape[1], h)][:, :, _nearest_index(g.shape[2], w)]
    return x * nn.sigmoid(g).astype(x.dtype)


BLOCK_ATTENTION = {"se": SqueezeExcite, "cbam": CBAM, "ge": GatherExcite}
"""The `attn` kinds that sit after a ResNet block's last BatchNorm (timm's `self.se`)."""

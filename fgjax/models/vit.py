"""Vision Transformer / DeiT backbone in Flax Linen.

Implements ViT (Dosovitskiy et al. 2021) and DeiT with a distillation token (Touvron et al. 2021)
as in timm's `VisionTransformer` / `VisionTransformerDistilled`, so that timm and DeiT
checkpoints import with exact logits parity (see `fgjax.convert`):

- patch embedding: conv with kernel `patch_size` and stride `patch_stride` (16 = standard,
  12 = TransFG's overlapping split, 37x37 tokens at 448), VALID padding;
- token order `[cls, dist, patch_0 ... patch_{N-1}]` (DeiT) or `[cls, patch...]` (ViT); the
  learned position embedding (N + prefix rows) is added after concatenating the prefix tokens;
- pre-norm blocks: LayerNorm (eps 1e-6) -> MHSA -> residual, LayerNorm -> MLP with exact erf GELU
  -> residual; dropout and stochastic depth (drop-path) are active only under `train=True`;
- final LayerNorm, `head` on the cls token and `head_dist` on the dist token.

Attention runs on a memory-efficient path (`fgjax.models.attention`): no block keeps its
(B, heads, T, T) probabilities for the backward pass, and the region selection sweeps the
rollout from the blocks' queries and keys (`fgjax.models.rollout.*_from_qk`).

`__call__(images, train=False, return_attention=False, return_rollout=False)` returns
`(logits, aux)`:
  logits: (B, num_classes). For a distilled model this is `(cls_logits + dist_logits) / 2`
    in train and eval mode alike (timm's inference output); the per-token logits, which the
    training losses need, are in `aux`.
  aux["cls_logits"], aux["dist_logits"] (distilled only),
  aux["pre_logits"]: the pooled pre-logit features ((cls + dist) / 2 for DeiT, cls for ViT),
  aux["cls_features"], aux["dist_features"] (distilled only): final normed tokens,
  aux["tokens"]: the final normed token sequence (B, T, D),
  aux["attention"] (when `return_attention=True`): list of per-block post-softmax attention
    probabilities, each (B, heads, T, T) in float32.
  aux["selected"], aux["rollout"] (with `region_selection`): (B, heads) selected patch
    indices, 0-based over patches, and the (B, heads, N) rollout scores they maximise. The last
    block then sees only `[prefix tokens, selected patches]`, so its attention entry is
    (B, heads, prefix + heads, prefix + heads). With `return_rollout` a plain ViT/DeiT
    reports the same two entries for the TRS score over its blocks before the last, its
    forward pass unchanged.

Parameter names (what checkpoints depend on; `tests/test_vit.py` pins them):
  patch_embed/{kernel,bias}, cls_token, dist_token, pos_embed,
  blocks_{i}/{norm1, attn/{qkv, proj}, norm2, mlp/{fc1, fc2}}, norm, head, head_dist.
They mirror timm's state-dict names so that conversion is a transparent rename.

`dtype` is the compute dtype (float32 or bfloat16); parameters are stored in `param_dtype`
(float32). Softmax and LayerNorm statistics are computed in float32.

On a single CPU device the blocks run as two independent chains over the batch
(`batch_chains`, `batch_chains_for`): same function and parameters, both cores kept busy.

Head splits/merges and the patch-grid flatten are written with `einops.rearrange` (it lowers
to the same reshape/transpose ops). `_flat`, the MLP's reshape back and the batch-chain
split/merge stay plain reshapes: they are rank-generic flattenings kept for XLA:CPU speed and
an interleaved batch split, which an axis pattern would describe no better.
"""
from __future__ import annotations

import dataclasses
import operator
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from fgjax.models import attention, rollout

Dtype = Any

LN_EPS = 1e-6

# Initialisers as in timm's ViT (`init_weights`): trunc-normal(0.02) for linear layers and
# embeddings, zeros for biases; the class heads start at zero (big_vision's `head_zeroinit`),
# which is what fine-tuning from pretrained weights wants.
_dense_init = nn.initializers.truncated_normal(stddev=0.02)
_zeros = nn.initializers.zeros


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@jax.custom_vjp
def gelu_exact(x):
  """GELU with the exact erf formulation (timm/PyTorch default; jax's default is tanh).

  The backward pass reuses the forward's normal CDF and needs one exp per element
  (d/dx x*Phi(x) = Phi(x) + x*phi(x)); autodiff through `erf` costs ~10% more of a ViT train
  step on XLA:CPU. Same values and gradients.
  """
  return x * _normal_cdf(x)


def _normal_cdf(x):
  return 0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype))


def _gelu_fwd(x):
  cdf = _normal_cdf(x)
  return x * cdf, (x, cdf)


def _gelu_bwd(res, g):
  x, cdf = res
  pdf = jnp.exp(-0.5 * x * x) * jnp.asarray(_INV_SQRT_2PI, x.dtype)
  return (g * (cdf + x * pdf),)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)


def drop_path(x, rate: float, deterministic: bool, rng_module: nn.Module):
  """Stochastic depth: drops the whole residual branch per sample with probability `rate`."""
  if deterministic or rate == 0.0:
    return x
  keep = 1.0 - rate
  rng = rng_module.make_rng("dropout")
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


def _flat(x):
  """(..., D) -> (N, D). XLA:CPU runs a dense layer and its weight gradient markedly faster on
  a 2-D input than with two batch dimensions (one contracting dimension in the backward)."""
  return x.reshape(-1, x.shape[-1])


class _QKV(nn.Module):
  """The fused qkv projection, timm's `qkv` Linear (kernel (D, 3D), bias (3D,), output order
  q|k|v, heads major within each), computed straight into the head-major layout
  (3, heads, B, T, head_dim) that the attention products use without transposes."""
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    h = self.num_heads
    kernel = self.param("kernel", _dense_init, (d, 3 * d), self.param_dtype)
    bias = self.param("bias", _zeros, (3 * d,), self.param_dtype)
    kernel = rearrange(kernel.astype(self.dtype), "d (qkv h hd) -> d qkv h hd", qkv=3, h=h)
    out = jnp.einsum("nd,dshk->shnk", _flat(x).astype(self.dtype), kernel)
    # A plain reshape: rearrange's "-> qkv h 1 hd" would lower to two reshapes.
    out = out + bias.astype(self.dtype).reshape(3, h, 1, d // h)
    return rearrange(out, "qkv h (b t) hd -> qkv h b t hd", b=b)


class _Proj(nn.Module):
  """The output projection, timm's `proj` Linear (kernel (D, D), bias (D,)), reading the
  head-major layout (heads, B, T, head_dim); returns (B, T, D)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h, b, t, hd = x.shape
    d = h * hd
    kernel = self.param("kernel", _dense_init, (d, d), self.param_dtype).astype(self.dtype)
    bias = self.param("bias", _zeros, (d,), self.param_dtype).astype(self.dtype)
    out = jnp.einsum("hnk,hkd->nd",
                     rearrange(x, "h b t hd -> h (b t) hd").astype(self.dtype),
                     rearrange(kernel, "(h hd) d -> h hd d", h=h))
    return rearrange(out + bias, "(b t) d -> b t d", b=b)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (timm `Attention`).

  Returns `(out, probs, qk)`. The attention runs on a memory-efficient path that keeps no
  (B, heads, T, T) array (`fgjax.models.attention`: chunked with a recomputing VJP on the
  CPU, cuDNN flash attention on a GPU in bf16, the Pallas flash kernel on a TPU; chosen by
  `implementation`, "auto" by default). The probabilities are formed and kept only for
  `return_attention` (then `probs` is (B, heads, T, T) float32, else None), for attention
  dropout in training, or with `implementation="materialized"`. `qk` (with `return_qk`) is
  the scaled queries and keys (heads, B, T, head_dim) under stop-gradient, what the streamed
  rollout reads (`fgjax.models.rollout.*_from_qk`); else None.

  Parameters `qkv/{kernel,bias}` and `proj/{kernel,bias}` have the shapes of timm's Linear
  layers (transposed kernels), so checkpoints convert by renaming.
  """
  num_heads: int
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str = "auto"
  chunk: Optional[int] = None

  @nn.compact
  def __call__(self, x, *, train: bool = False, return_attention: bool = False,
               return_qk: bool = False):
    b, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
    scale = (d // self.num_heads) ** -0.5
    q, k, v = _QKV(self.num_heads, self.dtype, self.param_dtype, name="qkv")(x)
    impl = attention.resolve(self.implementation, self.dtype)
    probs = None
    if return_attention or (train and self.attn_drop_rate > 0) or impl == "materialized":
      # Head-major (heads, B, T, head_dim) products: ~10% faster on XLA:CPU than (B, heads, ..)
      # behind the transposes it would need.
      probs = attention.probs_block(q * jnp.asarray(scale, q.dtype), k)
      weights = nn.Dropout(self.attn_drop_rate, name="Dropout_0")(probs,
                                                                  deterministic=not train)
      out = jnp.einsum("hbqk,hbkd->hbqd", weights.astype(v.dtype), v)
    else:
      out = attention.attend(q, k, v, scale, implementation=impl, chunk=self.chunk)
    out = _Proj(self.dtype, self.param_dtype, name="proj")(out)
    # The dropout modules' names fix their rng streams whichever path ran (the names Linen
    # gave them when both always existed on the CPU): the same masks on every path, and as
    # before on the CPU. (Earlier GPU/TPU runs without probabilities drew the proj dropout
    # from the stream now named Dropout_0.)
    out = nn.Dropout(self.proj_drop_rate, name="Dropout_1")(out, deterministic=not train)
    qk = None
    if return_qk:
      qk = (jax.lax.stop_gradient(q * jnp.asarray(scale, q.dtype)), jax.lax.stop_gradient(k))
    if return_attention:
      probs = rearrange(probs, "h b q k -> b h q k")
    else:
      probs = None
    return out, probs, qk


class Mlp(nn.Module):
  """Two-layer MLP with exact GELU (timm `Mlp`)."""
  hidden_dim: int
  drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    shape = x.shape
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=_dense_init, bias_init=_zeros, name="fc1")(_flat(x))
    x = gelu_exact(x)
    x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
    x = nn.Dense(shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=_dense_init, bias_init=_zeros, name="fc2")(x)
    return nn.Dropout(self.drop_rate)(x, deterministic=not train).reshape(shape)


class Block(nn.Module):
  """Pre-norm transformer block: x + DropPath(Attn(LN(x))), x + DropPath(MLP(LN(x)))."""
  num_heads: int
  mlp_dim: int
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  attention_chunk: Optional[int] = None
  proj_drop_rate: Optional[float] = None  # dropout after the attention projection; None = drop_rate

  @nn.compact
  def __call__(self, x, train: bool = False, return_attention: bool = False,
               return_qk: bool = False):
    """-> (x, probs, qk): `Attention`'s probabilities and (q, k), None unless asked for."""
    norm = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    proj_drop = self.drop_rate if self.proj_drop_rate is None else self.proj_drop_rate
    y, probs, qk = Attention(self.num_heads, self.attn_drop_rate, proj_drop, self.dtype,
                             self.param_dtype, self.attention_impl, self.attention_chunk,
                             name="attn")(norm("norm1")(x), train=train,
                                          return_attention=return_attention,
                                          return_qk=return_qk)
    x = x + drop_path(y, self.drop_path_rate, not train, self)
    y = Mlp(self.mlp_dim, self.drop_rate, self.dtype, self.param_dtype, name="mlp")(
        norm("norm2")(x), train=train)
    x = x + drop_path(y, self.drop_path_rate, not train, self)
    return x, probs, qk


def grid_size(img_size: int | Sequence[int], patch_size: int, patch_stride: int):
  """Token grid (rows, cols) of a VALID conv patch embedding; raises for sizes that don't fit."""
  hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
  out = []
  for s in hw:
    if s < patch_size or (s - patch_size) % patch_stride:
      raise ValueError(
          f"image size {s} does not divide into patches of {patch_size} with stride "
          f"{patch_stride}: (size - patch) must be a multiple of the stride "
          f"(e.g. {patch_size + patch_stride * ((s - patch_size) // patch_stride)})")
    out.append((s - patch_size) // patch_stride + 1)
  return tuple(out)


def _usable_cpus() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):  # not Linux
    return os.cpu_count() or 1


def batch_chains_for(requested: Optional[int], batch: int) -> int:
  """How many independent chains `VisionTransformer` runs its blocks as, for `batch` examples.

  `requested` None (auto): 2 on XLA:CPU with a single device, at least 2 usable cores and an
  even batch, else 1. An int n >= 1 is used when it divides the batch, else 1 (e.g. `init` on
  one example). See `VisionTransformer.batch_chains`.
  """
  if requested is None:
    auto = (jax.default_backend() == "cpu" and jax.device_count() == 1
            and _usable_cpus() >= 2)
    n = 2 if auto else 1
  else:
    try:
      n = operator.index(requested) if not isinstance(requested, bool) else 0
    except TypeError:
      n = 0
    if n < 1:
      raise ValueError(f"batch_chains must be None (auto) or an int >= 1, got {requested!r}")
  return n if batch % n == 0 else 1


def _split_chains(x, n: int):
  """(B, ...) -> n arrays (B/n, ...): chain j takes examples j, j + n, ... (interleaved, so a
  batch sharded over devices in contiguous blocks whose size n divides stays on its devices)."""
  x = x.reshape(x.shape[0] // n, n, *x.shape[1:])
  return [x[:, j] for j in range(n)]


def _merge_chains(*xs):
  """Inverse of `_split_chains`."""
  return jnp.stack(xs, axis=1).reshape(-1, *xs[0].shape[1:])


class VisionTransformer(nn.Module):
  """ViT / DeiT classifier. See the module docstring for inputs, outputs and names."""
  num_classes: int
  img_size: int | tuple[int, int] = 224
  patch_size: int = 16
  patch_stride: Optional[int] = None  # None = patch_size (non-overlapping)
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  distilled: bool = False
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  # Dropout after each attention projection; None = drop_rate (timm). TransFG's reference
  # drops after the embedding and in the MLPs only (0.1), not after the projection.
  proj_drop_rate: Optional[float] = None
  head_zeroinit: bool = True
  # Region selection before the last block (TRS-DeiT spec section 2, TransFG section 3):
  # None = plain ViT/DeiT; "trs" = TRS-DeiT's four rollout vectors; "cls_row" = TransFG's
  # part selection from the cls row of the rollout.
  region_selection: Optional[str] = None
  # Blocks (0-based) whose output patch tokens are returned as aux["block_tokens"] (B, N, D),
  # e.g. for PMG heads reading three depths.
  feature_blocks: Sequence[int] = ()
  # Rematerialise every block (jax.checkpoint): activations are recomputed in the backward
  # pass instead of stored, trading ~30% more compute for much less memory. Same parameters.
  remat: bool = False
  # The blocks run as this many independent chains over interleaved slices of the batch, each
  # example in exactly one chain (same function: outputs and gradients equal up to float
  # summation order; in training, dropout and drop-path draw other random masks per chain).
  # On XLA:CPU this keeps both cores busy where single ops do not: the attention's
  # (T, T) x (T, head_dim) products run on one core, and the other chain's work fills the
  # other (DeiT-Ti train step 6-7% faster on 2 cores). None = auto: 2 on the CPU with one
  # device and 2+ cores (`batch_chains_for`), 1 elsewhere (GPU/TPU kernels gain nothing).
  batch_chains: Optional[int] = None
  # How each block computes attention (`fgjax.models.attention`): "auto" (a memory-efficient
  # path for the backend: chunked on the CPU, cuDNN flash in bf16 on a GPU, Pallas flash on a
  # TPU), "chunked", "cudnn", "tpu_flash", or "materialized" (the probabilities formed and
  # kept for the backward pass: the memory of earlier fgjax versions). Same function.
  attention_impl: str = "auto"
  # Query rows per block of the chunked attention and the streamed rollout (None = auto:
  # one block up to 512 tokens, blocks of about 256 rows beyond).
  attention_chunk: Optional[int] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def num_prefix_tokens(self) -> int:
    return 2 if self.distilled else 1

  @property
  def grid(self) -> tuple[int, int]:
    return grid_size(self.img_size, self.patch_size, self.patch_stride or self.patch_size)

  def checkpoint_parts(self) -> dict:
    """A timm/DeiT/Google ViT checkpoint loads into the whole model ("" = all of it)."""
    return {"": self}

  def embed(self, images, *, train: bool):
    """Patch embedding + prefix tokens + position embedding -> (B, T, D)."""
    gh, gw = self.grid
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected NHWC images with 3 channels, got shape {images.shape}")
    stride = self.patch_stride or self.patch_size
    expect = ((gh - 1) * stride + self.patch_size, (gw - 1) * stride + self.patch_size)
    if tuple(images.shape[1:3]) != expect:
      raise ValueError(f"model built for img_size={self.img_size} got images of size "
                       f"{tuple(images.shape[1:3])}")
    x = nn.Conv(self.width, (self.patch_size, self.patch_size), strides=(stride, stride),
                padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=_dense_init, bias_init=_zeros, name="patch_embed")(
                    images.astype(self.dtype))
    b = x.shape[0]
    x = rearrange(x, "b gh gw d -> b (gh gw) d")  # patches in row-major grid order
    prefix = [self.param("cls_token", _dense_init, (1, 1, self.width), self.param_dtype)]
    if self.distilled:
      prefix.append(self.param("dist_token", _dense_init, (1, 1, self.width), self.param_dtype))
    prefix = [jnp.broadcast_to(p.astype(self.dtype), (b, 1, self.width)) for p in prefix]
    x = jnp.concatenate(prefix + [x], axis=1)
    pos = self.param("pos_embed", _dense_init, (1, x.shape[1], self.width), self.param_dtype)
    x = x + pos.astype(self.dtype)
    return nn.Dropout(self.drop_rate)(x, deterministic=not train)

  def make_block(self, i: int) -> Block:
    # Linearly increasing stochastic depth as in timm.
    dpr = self.drop_path_rate * i / max(self.depth - 1, 1)
    # static_argnums counts the module as 0: (x=1, train=2, return_attention=3, return_qk=4).
    block_cls = nn.remat(Block, static_argnums=(2, 3, 4)) if self.remat else Block
    return block_cls(self.num_heads, int(self.width * self.mlp_ratio), self.drop_rate,
                     self.attn_drop_rate, dpr, self.dtype, self.param_dtype,
                     self.attention_impl, self.attention_chunk, self.proj_drop_rate,
                     name=f"blocks_{i}")

  def classify(self, x, aux: dict):
    """Final norm + heads on the prefix tokens of `x`; fills `aux`, returns logits."""
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="norm")(x)
    head_init = _zeros if self.head_zeroinit else _dense_init
    dense = lambda name: nn.Dense(self.num_classes, dtype=self.dtype,
                                  param_dtype=self.param_dtype, kernel_init=head_init,
                                  bias_init=_zeros, name=name)
    aux["tokens"] = x
    cls_feat = x[:, 0]
    if self.num_classes == 0:  # a feature extractor: no heads
      aux["pre_logits"] = cls_feat
      return cls_feat
    cls_logits = dense("head")(cls_feat).astype(jnp.float32)
    aux["cls_features"] = cls_feat
    aux["cls_logits"] = cls_logits
    if self.distilled:
      dist_feat = x[:, 1]
      dist_logits = dense("head_dist")(dist_feat).astype(jnp.float32)
      aux["dist_features"] = dist_feat
      aux["dist_logits"] = dist_logits
      aux["pre_logits"] = (cls_feat + dist_feat) / 2
      return (cls_logits + dist_logits) / 2
    aux["pre_logits"] = cls_feat
    return cls_logits

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_attention: bool = False,
               return_rollout: bool = False):
    if self.region_selection not in (None, "trs", "cls_row"):
      raise ValueError(f"region_selection must be None, 'trs' or 'cls_row', got "
                       f"{self.region_selection!r}")
    attention.check_implementation(self.attention_impl)
    x = self.embed(images, train=train)
    blocks = [self.make_block(i) for i in range(self.depth)]
    n = batch_chains_for(self.batch_chains, x.shape[0])
    run = lambda x: self.run_blocks(blocks, x, train, return_attention, return_rollout)
    if n == 1:
      x, aux = run(x)
    else:
      outs = [run(c) for c in _split_chains(x, n)]
      x = _merge_chains(*[o[0] for o in outs])
      aux = jax.tree.map(_merge_chains, *[o[1] for o in outs])
    logits = self.classify(x, aux)
    return logits, aux

  def run_blocks(self, blocks, x, train: bool, return_attention: bool,
                 return_rollout: bool = False):
    """The blocks (with region selection before the last) on tokens `x` -> (x, aux).

    The blocks before the last hand their (q, k) to the selection (`region_selection`) or,
    with `return_rollout` on a plain ViT/DeiT, to the TRS rollout score that `aux["rollout"]`
    and `aux["selected"]` then report without changing the forward pass.
    """
    aux: dict[str, Any] = {}
    attentions, qks = [], []
    select = self.region_selection is not None
    if return_rollout and not select and self.depth < 2:
      raise ValueError("return_rollout needs at least 2 blocks")
    for i, block in enumerate(blocks):
      if select and i == self.depth - 1:
        x = self.select_regions(x, qks, aux)
      need_qk = (select or return_rollout) and i < self.depth - 1
      x, probs, qk = block(x, train, return_attention, need_qk)
      if return_attention:
        attentions.append(probs)
      if need_qk:
        qks.append(qk)
      if i in self.feature_blocks:
        aux.setdefault("block_tokens", []).append(x[:, self.num_prefix_tokens:])
    if return_rollout and not select:
      scores = rollout.trs_scores_from_qk(qks, self.num_prefix_tokens, self.attention_chunk)
      aux["rollout"] = scores
      aux["selected"] = rollout.select_per_head(scores)
    if return_attention:
      aux["attention"] = attentions
    return x, aux

  def select_regions(self, x, qks, aux):
    """Keeps the prefix tokens and one patch per head (argmax of the rollout score).

    The score is swept from the earlier blocks' (q, k) (stop-gradient: the selection is not
    differentiated), never from stored attention matrices (`fgjax.models.rollout`).
    Fills aux["selected"] (B, heads) patch indices (0-based over patches) and
    aux["rollout"] (B, heads, N) the scores they were chosen from.
    """
    if len(qks) < 1:
      raise ValueError("region selection needs at least 2 blocks")
    prefix = self.num_prefix_tokens
    if self.region_selection == "trs":
      scores = rollout.trs_scores_from_qk(qks, prefix, self.attention_chunk)
    else:
      scores = rollout.cls_row_scores_from_qk(qks, prefix, self.attention_chunk)
    selected = rollout.select_per_head(scores)
    aux["selected"] = selected
    aux["rollout"] = scores
    return rollout.gather_tokens(x, selected, prefix)


@dataclasses.dataclass(frozen=True)
class Variant:
  width: int
  depth: int
  num_heads: int
  patch_size: int = 16
  mlp_ratio: float = 4.0


VARIANTS = {
    "tiny": Variant(192, 12, 3),
    "small": Variant(384, 12, 6),
    "base": Variant(768, 12, 12),
    "large": Variant(1024, 24, 16),
    "huge": Variant(1280, 32, 16, patch_size=14),
}


def decode_variant(variant: str) -> dict:
  """'base' / 'B/16' / 'S/16' -> keyword arguments of `VisionTransformer`."""
  short = {"Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}
  if "/" in variant:
    size, patch = variant.split("/")
    v = VARIANTS[short.get(size, size)]
    return dict(width=v.width, depth=v.depth, num_heads=v.num_heads, mlp_ratio=v.mlp_ratio,
                patch_size=int(patch))
  v = VARIANTS[short.get(variant, variant)]
  return dict(width=v.width, depth=v.depth, num_heads=v.num_heads, mlp_ratio=v.mlp_ratio,
              patch_size=v.patch_size)

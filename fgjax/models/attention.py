"""Softmax attention that never keeps the (B, heads, T, T) probabilities.

A ViT block's attention `softmax(q k^T / sqrt(d)) v` costs T x T memory per head if its
probabilities are a residual of the backward pass: at 448 px a DeiT-B's 786 tokens make 30 MB
per block and image, TransFG-B's 1,370 tokens 90 MB, more than all the block's other
activations together. Four implementations, one meaning (`attend`):

- "chunked" (the CPU and portable path): Rabe and Staats 2021, "Self-attention does not need
  O(n^2) memory". The queries are split into blocks of `chunk` rows; each block's probabilities
  are full softmax rows (over all keys, computed exactly as the materialised path computes
  them), used and dropped. A custom VJP keeps only q, k and v and recomputes each block's
  probabilities in the backward pass (dq per block; dk and dv accumulated in float32). Only
  the current block's (heads, B, chunk, T) arrays are alive (the probabilities in the forward;
  the probabilities, their cotangent and the softmax's in the backward); with T <= `chunk` it
  is one block and the forward's arithmetic is the materialised path's, op for op.
- "cudnn": cuDNN's flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16).
- "tpu_flash": the Pallas TPU flash-attention kernel (`jax.experimental.pallas.ops.tpu`), the
  token axis padded to its 128-row tiles and the padding masked by segment ids.
- "materialized": probabilities formed and kept, as before; what `return_attention=True` and
  attention dropout use.

"auto" picks cuDNN on a GPU with a half-precision compute dtype, the TPU kernel on a TPU, and
the chunked path elsewhere (float32 on a GPU included: cuDNN's flash attention needs
half precision). A fused kernel that rejects a shape at trace time falls back to "chunked".

Inputs are head-major (heads, B, T, head_dim), the layout `vit._QKV` produces; the chunked
path multiplies q by the scale before the products (the materialised path's order), the
fused kernels take the scale as their argument.

`probs_block(q, k)` is the one definition of a block of probabilities, shared with the
streamed rollout (`fgjax.models.rollout`), and `over_query_blocks`/`sum_over_query_blocks`
are its loops.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "chunked", "materialized", "cudnn", "tpu_flash")
# Query rows per block in "auto" chunking: a sequence up to AUTO_CHUNK_MAX tokens is one block
# (DeiT at 224: 198 tokens, no loop); longer ones split into blocks of about AUTO_CHUNK rows.
AUTO_CHUNK = 256
AUTO_CHUNK_MAX = 512
_TPU_TILE = 128


def check_implementation(implementation: str) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl must be one of {', '.join(IMPLEMENTATIONS)}, got "
                     f"{implementation!r}")
  return implementation


def resolve(implementation: str, dtype) -> str:
  """The implementation "auto" stands for on this backend with this compute dtype."""
  check_implementation(implementation)
  if implementation != "auto":
    return implementation
  backend = jax.default_backend()
  if backend == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return "cudnn"
  if backend == "tpu":
    return "tpu_flash"
  return "chunked"


def block_rows(t: int, chunk: Optional[int]) -> int:
  """Query rows per block for a sequence of `t` tokens (`chunk` None = auto)."""
  if chunk is None:
    if t <= AUTO_CHUNK_MAX:
      return t
    n = math.ceil(t / AUTO_CHUNK)
    return math.ceil(t / n)  # even blocks: the least padding
  if int(chunk) < 1:
    raise ValueError(f"attention_chunk must be None (auto) or >= 1, got {chunk!r}")
  return min(int(chunk), t)


def probs_block(q, k):
  """Softmax probabilities (heads, B, rows, T) float32 of query rows `q` against all keys:
  the logits in the compute dtype, the softmax in float32 (as the materialised path)."""
  logits = jnp.einsum("hbqd,hbkd->hbqk", q, k)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def _split(x, rows: int):
  """(H, B, T, ...) -> (n, H, B, rows, ...): query blocks along a leading axis (zero-padded)."""
  t = x.shape[2]
  n = -(-t // rows)
  pad = n * rows - t
  if pad:
    x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
  x = x.reshape(x.shape[:2] + (n, rows) + x.shape[3:])
  return jnp.moveaxis(x, 2, 0)


def _join(x, t: int):
  """Inverse of `_split`: (n, H, B, rows, ...) -> (H, B, t, ...)."""
  x = jnp.moveaxis(x, 0, 2)
  x = x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],) + x.shape[4:])
  return x[:, :, :t]


def over_query_blocks(fn: Callable, rows: int, *xs):
  """`fn(*blocks)` for each block of query rows of the (H, B, T, ...) arrays `xs`, outputs
  joined along the query axis; one call (no loop) when `rows` covers T."""
  t = xs[0].shape[2]
  if rows >= t:
    return fn(*xs)
  out = jax.lax.map(lambda blocks: fn(*blocks), tuple(_split(x, rows) for x in xs))
  return jax.tree.map(lambda o: _join(o, t), out)


def sum_over_query_blocks(fn: Callable, rows: int, init, *xs):
  """The sum of `fn(*blocks)` over the blocks of query rows of `xs` (padded rows are zeros),
  accumulated in `init`'s dtype, and `fn`'s second output per block joined along the query
  axis: `fn` returns `(summand, per_row)`; `per_row` may be None."""
  t = xs[0].shape[2]
  if rows >= t:
    summand, per_row = fn(*xs)
    return jax.tree.map(lambda a, s: s.astype(a.dtype), init, summand), per_row

  def body(acc, blocks):
    summand, per_row = fn(*blocks)
    acc = jax.tree.map(lambda a, s: a + s.astype(a.dtype), acc, summand)
    return acc, per_row

  total, per_row = jax.lax.scan(body, init, tuple(_split(x, rows) for x in xs))
  if per_row is not None:
    per_row = jax.tree.map(lambda o: _join(o, t), per_row)
  return total, per_row


# --- chunked attention with a recomputing VJP --------------------------------------------

def _forward_block(q, k, v):
  p = probs_block(q, k)
  return jnp.einsum("hbqk,hbkd->hbqd", p.astype(v.dtype), v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_attention(q, k, v, rows: int):
  """softmax(q k^T) v over blocks of `rows` query rows; head-major (H, B, T, hd); `q` scaled.

  Residuals of the backward pass: q, k and v only.
  """
  return over_query_blocks(lambda qb: _forward_block(qb, k, v), rows, q)


def _chunked_fwd(q, k, v, rows):
  return chunked_attention(q, k, v, rows), (q, k, v)


def _chunked_bwd(rows, res, g):
  q, k, v = res

  # One block: no accumulation, every product in the compute dtype (as autodiff of the
  # materialised path); several blocks accumulate dk and dv in float32.
  acc_dtype = k.dtype if rows >= q.shape[2] else jnp.float32

  def block(qb, gb):
    p = probs_block(qb, k)                                         # recomputed
    dp = jnp.einsum("hbqd,hbkd->hbqk", gb, v).astype(jnp.float32)
    ds = (p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))).astype(q.dtype)
    dk = jnp.einsum("hbqk,hbqd->hbkd", ds, qb, preferred_element_type=acc_dtype)
    dv = jnp.einsum("hbqk,hbqd->hbkd", p.astype(v.dtype), gb, preferred_element_type=acc_dtype)
    return (dk, dv), jnp.einsum("hbqk,hbkd->hbqd", ds, k)

  init = (jnp.zeros(k.shape, acc_dtype), jnp.zeros(v.shape, acc_dtype))
  (dk, dv), dq = sum_over_query_blocks(block, rows, init, q, g.astype(v.dtype))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


chunked_attention.defvjp(_chunked_fwd, _chunked_bwd)


# --- fused kernels -----------------------------------------------------------------------

def _cudnn(q, k, v, scale, implementation="cudnn"):
  """jax.nn.dot_product_attention on (B, T, heads, hd); `implementation` "xla" runs anywhere
  (the layout is what the tests check on the CPU)."""
  swap = lambda a: jnp.transpose(a, (1, 2, 0, 3))                 # (H,B,T,hd) -> (B,T,H,hd)
  out = jax.nn.dot_product_attention(swap(q), swap(k), swap(v), scale=scale,
                                     implementation=implementation)
  return jnp.transpose(out, (2, 0, 1, 3))


def _tpu_flash(q, k, v, scale, kernel=None):
  """The TPU flash-attention kernel on (B, heads, T, hd), T zero-padded to its 128-row tiles;
  segment ids 1 (tokens) and 0 (padding) keep the padding out of every token's softmax.
  `kernel(q, k, v, segment_ids (B, T'), sm_scale=)`: the Pallas kernel, or a reference in
  tests."""
  h, b, t, _ = q.shape
  padded = -(-t // _TPU_TILE) * _TPU_TILE
  bhtd = lambda a: jnp.pad(jnp.transpose(a, (1, 0, 2, 3)),
                           [(0, 0), (0, 0), (0, padded - t), (0, 0)])
  ids = jnp.broadcast_to((jnp.arange(padded) < t).astype(jnp.int32), (b, padded))
  out = (kernel or _pallas_flash)(bhtd(q), bhtd(k), bhtd(v), ids, sm_scale=scale)
  return jnp.transpose(out[:, :, :t], (1, 0, 2, 3))


def _pallas_flash(q, k, v, segment_ids, *, sm_scale):
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  return fa.flash_attention(q, k, v, segment_ids=fa.SegmentIds(segment_ids, segment_ids),
                            sm_scale=sm_scale)


_warned: set = set()


def attend(q, k, v, scale: float, *, implementation: str = "chunked",
           chunk: Optional[int] = None):
  """softmax(scale q k^T) v without keeping probabilities; head-major (H, B, T, hd).

  `implementation` is a resolved name (see `resolve`) other than "materialized"; `chunk` the
  query rows per block of the chunked path (None = auto, `block_rows`).
  """
  if implementation in ("cudnn", "tpu_flash"):
    try:
      if implementation == "cudnn":
        return _cudnn(q, k, v, scale)
      return _tpu_flash(q, k, v, scale)
    except (ValueError, NotImplementedError, TypeError, RuntimeError) as e:
      key = (implementation, q.shape[-1], str(q.dtype))
      if key not in _warned:
        _warned.add(key)
        warnings.warn(f"attention: {implementation} rejected head_dim={q.shape[-1]} "
                      f"dtype={q.dtype} ({e}); using the chunked attention")
  elif implementation != "chunked":
    raise ValueError(f"attend() takes a resolved memory-efficient implementation, got "
                     f"{implementation!r}")
  # q * scale before the products, in the compute dtype: the materialised path's order.
  return chunked_attention(q * jnp.asarray(scale, q.dtype), k, v,
                           block_rows(q.shape[2], chunk))

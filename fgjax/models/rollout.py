"""Attention rollout by vector sweeps, and the region selections built on it.

Rollout (Abnar & Zuidema 2020, as used by TransFG's `Part_Attention` and TRS-DeiT) multiplies
the per-head post-softmax attention matrices of blocks 1 .. L-1:

    R = A_{L-1} A_{L-2} ... A_1        (per head; no identity term, no re-normalisation)

TransFG forms R with L-2 full T x T products: O(L K T^3). The selections only need a few rows
and columns of R, so fgjax never forms it:

- rows  e_t^T R: a backward sweep of vector-matrix products  v <- v A_l,  l = L-1 .. 1;
- columns R e_t: a forward sweep of matrix-vector products   u <- A_l u,  l = 1 .. L-1.

That is O(L K T^2) per token, about 180x fewer FLOPs than the full product at 786 tokens.
The `*_scores`, `rollout_rows`/`rollout_cols` functions take the attention list in block order
(A_1 first) with shapes (B, K, T, T); the callers apply `stop_gradient` (selection is not
differentiated).

The models never hold those matrices (`fgjax.models.attention`): `streamed_rows`,
`streamed_cols` and the `*_scores_from_qk` functions run the same sweeps from each block's
(scaled) queries and keys, head-major (K, B, T, head_dim), forming one block of query rows of
A_l at a time (`attention.probs_block`, the definition the attention itself uses):

- a row sweep step v A_l = sum_i v_i A_l[i, :] sums over blocks of query rows i;
- a column sweep step A_l u is attention with the value u: each block of rows on its own.

Each step costs one more q k^T product and softmax per block (the attention's own were
dropped); memory stays at one block of rows, (K, B, rows, T).

There is no `einops` here: the sweeps are einsums and index gathers, with no reshape/transpose
chains that a rearrangement pattern would make clearer.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from fgjax.models import attention


def rollout_rows(attentions: Sequence[jax.Array], tokens: Sequence[int]) -> jax.Array:
  """Rows `R[t, :]` for each t in `tokens`: (B, K, len(tokens), T)."""
  v = attentions[-1][:, :, jnp.asarray(tokens), :]           # e_t^T A_{L-1}
  for a in reversed(attentions[:-1]):
    v = jnp.einsum("bkit,bktu->bkiu", v, a)                 # v <- v A_l
  return v


def rollout_cols(attentions: Sequence[jax.Array], tokens: Sequence[int]) -> jax.Array:
  """Columns `R[:, t]` for each t in `tokens`: (B, K, T, len(tokens))."""
  u = attentions[0][:, :, :, jnp.asarray(tokens)]           # A_1 e_t
  for a in attentions[1:]:
    u = jnp.einsum("bktu,bkui->bkti", a, u)                 # u <- A_l u
  return u


def full_rollout(attentions: Sequence[jax.Array]) -> jax.Array:
  """The full product R = A_{L-1} ... A_1 (B, K, T, T). Reference for tests only."""
  r = attentions[0]
  for a in attentions[1:]:
    r = jnp.einsum("bkij,bkjl->bkil", a, r)                 # last = A_i @ last (TransFG order)
  return r


def trs_scores(attentions: Sequence[jax.Array], num_prefix: int = 2) -> jax.Array:
  """TRS-DeiT's combined score per head over the patches: (B, K, N).

  `A_final = r_cls * r_dist * c_cls * c_dist`, each restricted to the N patch positions
  (spec section 2). With one prefix token (a ViT without a dist token) the score is
  `r_cls * c_cls`.
  """
  prefix = list(range(num_prefix))
  rows = rollout_rows(attentions, prefix)[..., num_prefix:]          # (B, K, P, N)
  cols = rollout_cols(attentions, prefix)[:, :, num_prefix:, :]      # (B, K, N, P)
  return jnp.prod(rows, axis=2) * jnp.prod(cols, axis=3)


def cls_row_scores(attentions: Sequence[jax.Array], num_prefix: int = 1) -> jax.Array:
  """TransFG's part score: the cls row of the rollout over the patches, (B, K, N)."""
  return rollout_rows(attentions, [0])[:, :, 0, num_prefix:]


def streamed_rows(qks: Sequence[tuple], tokens: Sequence[int],
                  chunk: int | None = None) -> jax.Array:
  """`rollout_rows` from the blocks' (q, k) pairs in block order: (B, K, len(tokens), T)."""
  q, k = qks[-1]
  v = attention.probs_block(q[:, :, jnp.asarray(tokens)], k)   # e_t^T A_{L-1}: (K, B, P, T)
  for q, k in reversed(qks[:-1]):                            # v <- v A_l
    def block(qb, vb, k=k):  # vb (K, B, rows, P): v's entries for these query rows
      return jnp.einsum("hbip,hbiu->hbpu", vb, attention.probs_block(qb, k)), None
    v, _ = attention.sum_over_query_blocks(
        block, attention.block_rows(q.shape[2], chunk), jnp.zeros(v.shape, jnp.float32), q,
        jnp.swapaxes(v, 2, 3))
  return jnp.transpose(v, (1, 0, 2, 3))


def streamed_cols(qks: Sequence[tuple], tokens: Sequence[int],
                  chunk: int | None = None) -> jax.Array:
  """`rollout_cols` from the blocks' (q, k) pairs in block order: (B, K, T, len(tokens))."""
  q, k = qks[0]
  rows = attention.block_rows(q.shape[2], chunk)
  idx = jnp.asarray(tokens)
  u = attention.over_query_blocks(                           # A_1 e_t: (K, B, T, P)
      lambda qb: attention.probs_block(qb, k)[..., idx], rows, q)
  for q, k in qks[1:]:                                       # u <- A_l u
    u = attention.over_query_blocks(
        lambda qb, k=k, u=u: jnp.einsum("hbqk,hbkp->hbqp", attention.probs_block(qb, k), u),
        rows, q)
  return jnp.transpose(u, (1, 0, 2, 3))


def trs_scores_from_qk(qks: Sequence[tuple], num_prefix: int = 2,
                       chunk: int | None = None) -> jax.Array:
  """`trs_scores` from the blocks' (q, k) pairs, no attention matrix held: (B, K, N)."""
  prefix = list(range(num_prefix))
  rows = streamed_rows(qks, prefix, chunk)[..., num_prefix:]
  cols = streamed_cols(qks, prefix, chunk)[:, :, num_prefix:, :]
  return jnp.prod(rows, axis=2) * jnp.prod(cols, axis=3)


def cls_row_scores_from_qk(qks: Sequence[tuple], num_prefix: int = 1,
                           chunk: int | None = None) -> jax.Array:
  """`cls_row_scores` from the blocks' (q, k) pairs, no attention matrix held: (B, K, N)."""
  return streamed_rows(qks, [0], chunk)[:, :, 0, num_prefix:]


def select_per_head(scores: jax.Array) -> jax.Array:
  """argmax over patches for each head: (B, K) int32 indices, 0-based over patches."""
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def gather_tokens(x: jax.Array, patch_indices: jax.Array, num_prefix: int) -> jax.Array:
  """`[prefix tokens, x[patch_indices]]` from a (B, T, D) sequence; (B, prefix + K, D).

  Gradients flow into the gathered hidden states; the indices are integers (no gradient).
  """
  picked = jnp.take_along_axis(x, (patch_indices + num_prefix)[:, :, None], axis=1)
  return jnp.concatenate([x[:, :num_prefix], picked], axis=1)

"""Loss functions shared by the fine-grained methods.

- `cross_entropy`: softmax cross-entropy with optional label smoothing (integer labels).
- `contrastive_loss`: TransFG's `con_loss` (He et al. 2022, eq. 9; TRS-DeiT spec section 2):
  on L2-normalised features z of a batch of B examples,
      L = 1/B^2 * sum_{i,j} [ y_i == y_j ? 1 - cos(z_i, z_j) : max(cos(z_i, z_j) - margin, 0) ].
  Under data-parallel jit the batch is the global batch (all devices), where the PyTorch
  reference computes it per GPU.
- `pairwise_ranking_loss`: RA-CNN's inter-scale ranking loss (Fu et al. 2017, eq. 8),
      L = mean_b max(0, p_coarse[b, y_b] - p_fine[b, y_b] + margin)
  on softmax probabilities of the true class: it asks the finer scale to be more confident in
  the right class than the coarser one by `margin`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0,
                  weights: jax.Array | None = None) -> jax.Array:
  """Mean softmax cross-entropy; `weights` (B,) masks or weights examples."""
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    onehot = optax.smooth_labels(onehot, label_smoothing)
  loss = optax.softmax_cross_entropy(logits, onehot)
  if weights is None:
    return loss.mean()
  weights = weights.astype(jnp.float32)
  return (loss * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def contrastive_loss(features: jax.Array, labels: jax.Array, margin: float = 0.4) -> jax.Array:
  """TransFG's contrastive loss on the (B, D) features; see the module docstring."""
  z = features.astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  cos = z @ z.T
  same = labels[:, None] == labels[None, :]
  per_pair = jnp.where(same, 1.0 - cos, jax.nn.relu(cos - margin))
  b = features.shape[0]
  return per_pair.sum() / (b * b)


def pairwise_ranking_loss(p_coarse: jax.Array, p_fine: jax.Array, labels: jax.Array,
                          margin: float = 0.05) -> jax.Array:
  """RA-CNN's ranking loss; see the module docstring.

  p_coarse, p_fine: (B, C) softmax probabilities of the coarser and the finer scale (not
  logits: the margin is in probability units), or (B,) probabilities of the true class
  already picked; labels (B,) integers. Both inputs get gradients; RA-CNN's method treats the
  coarser scale as the reference (`stop_gradient` on it, `fgjax.methods.racnn`).
  """
  def true_class(p):
    p = p.astype(jnp.float32)
    if p.ndim == 1:
      return p
    return jnp.take_along_axis(p, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return jax.nn.relu(true_class(p_coarse) - true_class(p_fine) + margin).mean()

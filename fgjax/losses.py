"""Loss functions shared by the fine-grained methods.

- `cross_entropy`: softmax cross-entropy with optional label smoothing (integer labels).
- `contrastive_loss`: TransFG's `con_loss` (He et al. 2022, eq. 9; TRS-DeiT spec section 2):
  on L2-normalised features z of a batch of B examples,
      L = 1/B^2 * sum_{i,j} [ y_i == y_j ? 1 - cos(z_i, z_j) : max(cos(z_i, z_j) - margin, 0) ].
  Under data-parallel jit the batch is the global batch (all devices), where the PyTorch
  reference computes it per GPU.
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

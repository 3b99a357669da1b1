"""PMA: bi-modal progressive mask attention (Song, Wei, Shu, Song, Lu, IEEE TIP 29, 2020; spec
section 7). No code was published; the equations below are the spec's.

Vision (per stage k = 0 .. num_stages-1):
- X = the backbone's last conv map (B, H, W, C) (VGG-16 conv5_3, ResNet-50 layer4, `cnn_small`'s
  last stage), 2x2 max-pooled (stride 2) into N = h w local descriptors x_i (B, N, C), each
  covering one 2x2 block of X, numbered row-major in the h x w block grid. A map with an odd H or
  W is padded with -inf to even before the max pool (so the padding never wins), and the edge
  blocks then cover 1 or 2 positions of X.
- SAM `vision_sam_{k}`: a_i = softmax_i(w^T relu(W x_i)) (W: C -> C // sam_ratio) over the
  positions not in the vision mask template; f_g = sum_i a_i x_i; the located block =
  argmax_i a_i over the unmasked positions (ties: the lowest index); f_l = the mean of X over the
  located block (the positions of the original map, gathered); v_k = [f_g; f_l] (2C). The
  located block joins the mask template, so a block is located at most once (N >= num_stages).
Text (vocab_size > 0 and phrases given): `phrases` (B, P, W) int32 word ids (0 = padding, the
words left-aligned; an id >= vocab_size embeds as NaN, jnp.take's fill), `phrase_mask` (B, P)
bool. Word embedding `word_embed` (vocab_size x embed_dim), an LSTM per phrase `phrase_lstm`
(flax `nn.RNN(nn.OptimizedLSTMCell(hidden_dim))` with seq_lengths = the number of non-zero
ids): q_j = its final hidden state. A phrase that is masked or has no word is invalid (q_j = 0).
- QRM `qrm_{k}`: b_j = softmax_j(w^T tanh(W_q f_l + W_k q_j)) over the valid phrases not in the
  text mask template; local text t_l = sum_j b_j q_j. In modality "text" the query is a learned
  vector `query_{k}` (hidden_dim) instead of f_l.
- Text mask update, after the local stream (`text_mask_update`): the phrases whose b_j is among
  the `text_mask_top` (3) largest and above `text_mask_threshold` (0.1) join the template.
- Global text SAM `text_sam_{k}` (tanh; hidden_dim // sam_ratio) over the valid phrases not in
  the updated template: c_j, t_g = sum_j c_j q_j. Text feature [t_g; t_l] (2 hidden_dim).
Every softmax is masked and computed in float32 (`masked_softmax`): masked positions get exactly
0, and a softmax over an empty set gives all-zero weights (zero features, finite gradients).
Stages and head: one shared `stage_fc` (Dense stage_dim, no activation: the paper's FC "for
dimension reduction") over [v_k; text_k] -> s_k. With vocab_size > 0 and an image-only input (no
`phrases`, or every phrase masked), text_k = 0, so one set of parameters serves both modes; with
vocab_size = 0 there is no text branch and `stage_fc` reads v_k alone. Final feature
[GAP(X); s_1; ...; s_K] (modality "text": the stage outputs only) -> dropout (`drop_rate`) ->
`head` (Dense num_classes); logits float32; trained with cross-entropy.

`__call__(inputs, train=False)`: `inputs` is an image (B, S, S, 3) or a dict {"image",
["phrases", "phrase_mask"]} (the image may be absent only in modality "text", where it is
ignored and no backbone runs). Returns (logits, aux):
  aux["located"] (B, K) int32 block indices; aux["located_boxes"] (B, K, 4) float32 x0, y0, x1,
  y1 of each located block in input pixels (the block's extent in X times the stride
  S / H); aux["attention"] (B, K, N) the vision weights a; aux["part_features"] (B, K, C) the
  f_l; aux["stages"] the backbone's maps (these four and "stages" only with an image);
  aux["phrase_weights"] (B, K, P) the QRM weights b; aux["text_attention"] (B, K, P) the global
  text weights c; aux["text_masked"] (B, K, P) bool, the text mask after each stage's update;
  aux["phrase_embeddings"] (B, P, hidden_dim) the q_j (the text entries only with vocab_size >
  0; P = 0 for an image-only input); aux["pre_logits"] the final feature.
`block_grid()` -> (h, w), the block grid at img_size (static, from the backbone's shapes).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
MODALITIES = ("bimodal", "text")


def masked_softmax(logits: jax.Array, valid: jax.Array) -> jax.Array:
  """Softmax over the last axis restricted to `valid` (bool, same shape), in float32.

  Invalid positions get exactly 0; a row without a valid position is all zeros. The invalid
  logits never enter an exp, so the gradients are finite everywhere."""
  logits = logits.astype(jnp.float32)
  any_valid = valid.any(axis=-1, keepdims=True)
  top = jnp.max(jnp.where(valid, logits, -jnp.inf), axis=-1, keepdims=True)
  top = jax.lax.stop_gradient(jnp.where(any_valid, top, 0.0))
  e = jnp.where(valid, jnp.exp(jnp.where(valid, logits - top, 0.0)), 0.0)
  total = e.sum(axis=-1, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)


def text_mask_update(weights: jax.Array, valid: jax.Array, top: int,
                     threshold: float) -> jax.Array:
  """(B, P) bool: the phrases that join the text mask, those among `valid` whose weight is one
  of the `top` largest of the valid ones (ties: the lower index first) and > `threshold`."""
  num = weights.shape[-1]
  k = min(int(top), num)
  if k <= 0:
    return jnp.zeros(weights.shape, bool)
  w = jnp.where(valid, weights.astype(jnp.float32), -jnp.inf)
  _, idx = jax.lax.top_k(w, k)
  in_top = jax.nn.one_hot(idx, num, dtype=jnp.int32).sum(axis=-2) > 0
  return in_top & valid & (w > threshold)


def pool_blocks(feature_map: jax.Array) -> tuple[jax.Array, jax.Array, tuple[int, int]]:
  """(B, H, W, C) -> (descriptors, block_means, (h, w)), float32.

  descriptors (B, N, C): the 2x2 max pool (stride 2) of the map, N = h w row-major; an odd H or
  W is padded with -inf to even first. block_means (B, N, C): the mean of the map's positions
  in each 2x2 block (1, 2 or 4 positions; the padding is not counted)."""
  B, H, W, C = feature_map.shape
  ph, pw = H % 2, W % 2
  h, w = (H + ph) // 2, (W + pw) // 2
  x = feature_map.astype(jnp.float32)
  pad = ((0, 0), (0, ph), (0, pw), (0, 0))
  maxed = jnp.pad(x, pad, constant_values=-jnp.inf).reshape(B, h, 2, w, 2, C).max(axis=(2, 4))
  sums = jnp.pad(x, pad).reshape(B, h, 2, w, 2, C).sum(axis=(2, 4))
  counts = np.pad(np.ones((H, W), np.float32), pad[1:3]).reshape(h, 2, w, 2).sum(axis=(1, 3))
  means = sums / jnp.asarray(counts)[None, :, :, None]
  return maxed.reshape(B, h * w, C), means.reshape(B, h * w, C), (h, w)


def block_boxes(located: jax.Array, map_hw: tuple[int, int],
                image_hw: tuple[int, int]) -> jax.Array:
  """(..., ) block indices (row-major in the block grid of an H x W map) -> (..., 4) float32
  x0, y0, x1, y1 in image pixels: the block's 2x2 extent in the map (clipped to the map on an
  odd edge) times the stride image / map."""
  H, W = map_hw
  sy, sx = image_hw[0] / H, image_hw[1] / W
  w = (W + 1) // 2
  r, c = located // w, located % w
  y0, x0 = 2 * r, 2 * c
  y1, x1 = jnp.minimum(y0 + 2, H), jnp.minimum(x0 + 2, W)
  return jnp.stack([x0 * sx, y0 * sy, x1 * sx, y1 * sy], axis=-1).astype(jnp.float32)


class SelfAttentionScore(nn.Module):
  """SAM scores w^T act(W x_i): (B, N, D) -> (B, N) float32 logits."""
  hidden: int
  activation: str = "relu"  # "relu" (vision) or "tanh" (text)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
    h = nn.relu(h) if self.activation == "relu" else jnp.tanh(h)
    s = nn.Dense(1, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="score")(h)
    return s[..., 0].astype(jnp.float32)


class QueryRelation(nn.Module):
  """QRM scores w^T tanh(W_q query + W_k q_j): (B, Dq), (B, P, Dk) -> (B, P) float32."""
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query, keys):
    d, p = self.dtype, self.param_dtype
    q = nn.Dense(self.dim, use_bias=False, dtype=d, param_dtype=p, name="query")(query)
    k = nn.Dense(self.dim, dtype=d, param_dtype=p, name="key")(keys)
    s = nn.Dense(1, use_bias=False, dtype=d, param_dtype=p, name="score")(
        jnp.tanh(q[:, None, :] + k))
    return s[..., 0].astype(jnp.float32)


class PMA(nn.Module):
  """Bi-modal progressive mask attention; see the module docstring."""
  num_classes: int
  backbone: nn.Module  # num_classes=0; aux["stages"][-1] is the map X
  img_size: int = 448
  vocab_size: int = 0  # 0: no text branch (an image-only model, no text parameters)
  modality: str = "bimodal"  # or "text": text only, the image is ignored
  embed_dim: int = 300
  hidden_dim: int = 512
  sam_ratio: int = 8
  qrm_dim: int = 512
  stage_dim: int = 512
  num_stages: int = 3
  text_mask_top: int = 3
  text_mask_threshold: float = 0.1
  drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def checkpoint_parts(self) -> dict:
    """An ImageNet checkpoint of the backbone (VGG, ResNet) loads into the backbone (modality
    "text" has none)."""
    return {} if self.modality == "text" else {"backbone": self.backbone}

  def map_size(self) -> tuple[int, int]:
    """(H, W) of the backbone's last map X at img_size (static)."""
    if self.modality == "text":
      raise ValueError("PMA modality 'text' reads no image and has no block grid")
    backbone = self.backbone.clone(parent=None)
    spec = jax.ShapeDtypeStruct((1, self.img_size, self.img_size, 3), jnp.float32)
    out, _ = jax.eval_shape(lambda x: backbone.init_with_output(jax.random.key(0), x), spec)
    _, H, W, _ = out[1]["stages"][-1].shape
    return int(H), int(W)

  def block_grid(self) -> tuple[int, int]:
    """(h, w) of the block grid at img_size: half the backbone's last map, rounded up."""
    H, W = self.map_size()
    return (H + 1) // 2, (W + 1) // 2

  def _check(self):
    if self.modality not in MODALITIES:
      raise ValueError(f"PMA modality must be one of {MODALITIES}, got {self.modality!r}")
    if self.modality == "text" and self.vocab_size <= 0:
      raise ValueError("PMA modality 'text' needs vocab_size > 0")
    if self.num_stages < 1:
      raise ValueError(f"PMA num_stages must be >= 1, got {self.num_stages}")

  def _inputs(self, inputs):
    """(image or None, phrases or None, phrase_mask or None) from an array or a dict."""
    if not isinstance(inputs, dict):
      image, phrases, mask = inputs, None, None
    else:
      unknown = sorted(set(inputs) - {"image", "phrases", "phrase_mask"})
      if unknown:
        raise ValueError(f"PMA inputs: unknown keys {unknown} (expected image, phrases, "
                         "phrase_mask)")
      image, phrases, mask = inputs.get("image"), inputs.get("phrases"), inputs.get("phrase_mask")
      if (phrases is None) != (mask is None):
        raise ValueError("PMA inputs: 'phrases' and 'phrase_mask' go together")
    if image is None and self.modality != "text":
      raise ValueError("PMA inputs: no 'image' (only modality 'text' reads none)")
    if phrases is not None:
      if phrases.ndim != 3 or mask.shape != phrases.shape[:2]:
        raise ValueError(f"PMA inputs: phrases must be (B, P, W) and phrase_mask (B, P), got "
                         f"{phrases.shape} and {mask.shape}")
      if self.vocab_size <= 0:
        phrases = mask = None  # an image-only model ignores the text
    if (self.modality == "text" and phrases is None
        and not (self.is_initializing() and image is not None)):
      raise ValueError("PMA modality 'text' needs inputs['phrases'] and inputs['phrase_mask']")
    return image, phrases, mask

  def encode_phrases(self, phrases, phrase_mask):
    """(B, P, W) ids, (B, P) mask -> q (B, P, hidden_dim) float32, valid (B, P) bool."""
    B, P, W = phrases.shape
    phrases = phrases.astype(jnp.int32)
    lengths = (phrases != 0).sum(axis=-1)
    valid = phrase_mask.astype(bool) & (lengths > 0)
    emb = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="word_embed")(phrases)
    cell = nn.OptimizedLSTMCell(self.hidden_dim, dtype=self.dtype,
                                param_dtype=self.param_dtype, parent=None)
    lstm = nn.RNN(cell, return_carry=True, name="phrase_lstm")
    (_, h), _ = lstm(emb.reshape(B * P, W, self.embed_dim),
                     seq_lengths=jnp.maximum(lengths.reshape(B * P), 1))
    q = h.reshape(B, P, self.hidden_dim).astype(jnp.float32)
    return jnp.where(valid[..., None], q, 0.0), valid

  @nn.compact
  def __call__(self, inputs, *, train: bool = False, return_attention: bool = False):
    del return_attention  # uniform model interface; PMA's weights are always in aux
    self._check()
    d, p = self.dtype, self.param_dtype
    K = self.num_stages
    image, phrases, phrase_mask = self._inputs(inputs)
    vision = self.modality != "text"
    use_text = self.vocab_size > 0
    B = (image if image is not None else phrases).shape[0]
    if use_text and phrases is None and self.is_initializing():
      # Image-only init: one empty phrase creates the text parameters (all-masked = image-only).
      phrases, phrase_mask = jnp.zeros((B, 1, 1), jnp.int32), jnp.zeros((B, 1), bool)
    text = use_text and phrases is not None
    aux = {}

    if vision:
      _, baux = self.backbone(image, train=train)
      fmap = baux["stages"][-1]
      desc, means, (h, w) = pool_blocks(fmap)
      N = h * w
      if N < K:
        raise ValueError(
            f"PMA: at img_size={self.img_size} the backbone's last map is {fmap.shape[1]}x"
            f"{fmap.shape[2]}, {h}x{w} = {N} blocks, fewer than num_stages={K}; use a larger "
            "img_size")
      vis_masked = jnp.zeros((B, N), bool)
      C = desc.shape[-1]
      sam_hidden = max(C // self.sam_ratio, 1)
    if text:
      q, valid = self.encode_phrases(phrases, phrase_mask)
      txt_masked = jnp.zeros(valid.shape, bool)
      text_hidden = max(self.hidden_dim // self.sam_ratio, 1)
    stage_fc = nn.Dense(self.stage_dim, dtype=d, param_dtype=p, name="stage_fc")

    rec = {k: [] for k in ("located", "attention", "part_features", "phrase_weights",
                           "text_attention", "text_masked")}
    stage_out = []
    for k in range(K):
      parts = []
      if vision:
        logits = SelfAttentionScore(sam_hidden, "relu", dtype=d, param_dtype=p,
                                    name=f"vision_sam_{k}")(desc.astype(d))
        a = masked_softmax(logits, ~vis_masked)
        f_g = jnp.einsum("bn,bnc->bc", a, desc)
        located = jnp.argmax(jnp.where(vis_masked, -1.0, a), axis=-1).astype(jnp.int32)
        f_l = jnp.take_along_axis(means, located[:, None, None], axis=1)[:, 0]
        vis_masked = vis_masked | jax.nn.one_hot(located, N, dtype=bool)
        parts.append(jnp.concatenate([f_g, f_l], axis=-1))
        rec["located"].append(located)
        rec["attention"].append(a)
        rec["part_features"].append(f_l)
      if text:
        if vision:
          query = f_l
        else:
          query = jnp.broadcast_to(
              self.param(f"query_{k}", nn.initializers.normal(1.0), (self.hidden_dim,), p),
              (B, self.hidden_dim))
        open_ = valid & ~txt_masked
        b = masked_softmax(QueryRelation(self.qrm_dim, dtype=d, param_dtype=p,
                                         name=f"qrm_{k}")(query.astype(d), q.astype(d)), open_)
        t_l = jnp.einsum("bp,bpd->bd", b, q)
        txt_masked = txt_masked | text_mask_update(b, open_, self.text_mask_top,
                                                   self.text_mask_threshold)
        c = masked_softmax(SelfAttentionScore(text_hidden, "tanh", dtype=d, param_dtype=p,
                                              name=f"text_sam_{k}")(q.astype(d)),
                           valid & ~txt_masked)
        t_g = jnp.einsum("bp,bpd->bd", c, q)
        parts.append(jnp.concatenate([t_g, t_l], axis=-1))
        rec["phrase_weights"].append(b)
        rec["text_attention"].append(c)
        rec["text_masked"].append(txt_masked)
      elif use_text:
        parts.append(jnp.zeros((B, 2 * self.hidden_dim), jnp.float32))
      stage_out.append(stage_fc(jnp.concatenate(parts, axis=-1).astype(d)).astype(jnp.float32))

    if vision:
      feats = [fmap.astype(jnp.float32).mean(axis=(1, 2))] + stage_out
      located = jnp.stack(rec["located"], axis=1)
      aux.update(located=located, attention=jnp.stack(rec["attention"], axis=1),
                 part_features=jnp.stack(rec["part_features"], axis=1),
                 located_boxes=block_boxes(located, fmap.shape[1:3], image.shape[1:3]),
                 stages=baux["stages"])
    else:
      feats = stage_out
    if use_text:
      if text:
        aux.update({n: jnp.stack(rec[n], axis=1)
                    for n in ("phrase_weights", "text_attention", "text_masked")})
        aux["phrase_embeddings"] = q
      else:  # image-only input: no phrases (P = 0)
        aux.update(phrase_weights=jnp.zeros((B, K, 0), jnp.float32),
                   text_attention=jnp.zeros((B, K, 0), jnp.float32),
                   text_masked=jnp.zeros((B, K, 0), bool),
                   phrase_embeddings=jnp.zeros((B, 0, self.hidden_dim), jnp.float32))
    feat = jnp.concatenate(feats, axis=-1)
    aux["pre_logits"] = feat
    feat = nn.Dropout(self.drop_rate, name="dropout")(feat, deterministic=not train)
    logits = nn.Dense(self.num_classes, dtype=d, param_dtype=p, name="head")(feat.astype(d))
    return logits.astype(jnp.float32), aux

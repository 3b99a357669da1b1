#!/usr/bin/env python
"""Train-step speed: fgjax (one jitted step) beside the PyTorch reference, same run and batch.

A train step = forward in train mode + loss + backward + AdamW update (lr 1e-4, wd 0.05).

  deit_ti224, deit_s224   plain DeiT (distilled) at 224: cross-entropy on (cls + dist) / 2;
                          reference: timm `deit_*_distilled_patch16_224`, torch.optim.AdamW.
  trs_ti224, trs_s224     TRS-DeiT at 224 with its loss (0.5 CE(cls) + 0.5 CE(dist) + the
                          contrastive loss on both tokens); fgjax selects patches with vector
                          sweeps, the reference forms the full T x T rollout product per head
                          (TransFG's Part_Attention) on the timm model's blocks, attention
                          probabilities computed explicitly.
  trs_b448                TRS-DeiT-B/16 at 448 (the paper's model; for a GPU).
  transfg_ti220, transfg_b448
                          TransFG (ViT, overlapping 16 px patches with stride 12) with its loss
                          (CE on the part layer's cls + contrastive loss); the reference runs
                          timm's ViT blocks on stride-12 patches and selects parts from the cls
                          row of the full T x T rollout product (TransFG's Part_Attention).
  pmg_r18_224, pmg_r50_448
                          PMG on a ResNet: one step = 4 updates (jigsaw 8, 4, 2 on the stage
                          heads, then the original image with 2 x CE on the concat head); the
                          reference: timm ResNet stages + the PMG heads in torch, 4 backward
                          passes and optimizer steps.
  racnn_v16_224_cls, racnn_v16_224_apn, racnn_v19_448_cls, racnn_v19_448_apn
                          RA-CNN (three VGG scale networks, crops at half the input size, two
                          APNs with 1024 hidden units), one row per phase of its alternation:
                          "cls" = CE at the three scales, squares under stop_gradient, the
                          classifiers' optimizer; "apn" = the ranking loss through the crops,
                          classifiers frozen in eval mode, the APNs' optimizer (each AdamW over
                          its own parameter group, both states held). The reference: torchvision
                          VGG features + a gap/fc head per scale, the APNs, the crop by
                          `grid_sample` of the square's sampling grid times the boxcar mask;
                          the frozen group has requires_grad off in the APN phase.

On a CPU the fgjax and PyTorch steps alternate (`--no-interleave` times one framework after the
other, the default on a GPU), so that a shared machine's drifting speed affects both alike.
Reported: ms per step (median of `--iters` after `--warmup`), images/s, ratio = reference time /
fgjax time (> 1: fgjax faster), the compiled step's FLOPs (XLA cost analysis) and the achieved
TFLOP/s; MFU = achieved / peak where the device's peak is known (`--peak-tflops`, or the table
below for GPUs; none on CPU). `--compile` runs the reference under torch.compile; `--dtype
bfloat16` uses bf16 compute in fgjax and AMP bf16 in torch.

Usage (repository root):
  PYTHONPATH=. python benchmarks/train_step.py                        # CPU defaults (small)
  PYTHONPATH=. python benchmarks/train_step.py --models trs_b448 --device gpu --dtype bfloat16
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

from benchmarks import common  # noqa: E402
from fgjax.train import hostmem  # noqa: E402  (no jax import: safe before the thread setup)

MODELS = {  # key: (label, fgjax name, timm name, img, kind, cpu batch, gpu batch)
    "deit_ti224": ("DeiT-Ti/16", "deit_tiny_distilled_patch16",
                   "deit_tiny_distilled_patch16_224", 224, "deit", 16, 256),
    "deit_s224": ("DeiT-S/16", "deit_small_distilled_patch16",
                  "deit_small_distilled_patch16_224", 224, "deit", 8, 128),
    "trs_ti224": ("TRS-DeiT-Ti/16", "trs_deit_tiny_patch16",
                  "deit_tiny_distilled_patch16_224", 224, "trs", 16, 256),
    "trs_s224": ("TRS-DeiT-S/16", "trs_deit_small_patch16",
                 "deit_small_distilled_patch16_224", 224, "trs", 8, 128),
    "trs_b448": ("TRS-DeiT-B/16", "trs_deit_base_patch16",
                 "deit_base_distilled_patch16_224", 448, "trs", 1, 32),
    "transfg_ti220": ("TransFG-Ti/16", "transfg_tiny_patch16", "vit_tiny_patch16_224", 220,
                      "transfg", 4, 128),
    "transfg_b448": ("TransFG-B/16", "transfg_base_patch16", "vit_base_patch16_224", 448,
                     "transfg", 1, 16),
    "pmg_r18_224": ("PMG-ResNet18", "pmg_resnet18", "resnet18", 224, "pmg", 8, 128),
    "pmg_r50_448": ("PMG-ResNet50", "pmg_resnet50", "resnet50", 448, "pmg", 1, 32),
    "racnn_v16_224_cls": ("RA-CNN-VGG16 cls", "racnn_vgg16", "vgg16", 224, "racnn_cls", 2, 32),
    "racnn_v16_224_apn": ("RA-CNN-VGG16 apn", "racnn_vgg16", "vgg16", 224, "racnn_apn", 2, 32),
    "racnn_v19_448_cls": ("RA-CNN-VGG19 cls", "racnn_vgg19", "vgg19", 448, "racnn_cls", 1, 16),
    "racnn_v19_448_apn": ("RA-CNN-VGG19 apn", "racnn_vgg19", "vgg19", 448, "racnn_apn", 1, 16),
}
PEAK_TFLOPS = {"H100": {"bfloat16": 989.0, "float32": 67.0},
               "H200": {"bfloat16": 989.0, "float32": 67.0},
               "A100": {"bfloat16": 312.0, "float32": 19.5}}
NUM_CLASSES = 200


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="deit_ti224,deit_s224,trs_ti224,trs_s224")
  p.add_argument("--batch", type=int, default=None, help="batch for every model")
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=None)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--compile", action="store_true", help="torch.compile the reference")
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                 help="alternate fgjax and torch steps (default: on for CPU, off for GPU)")
  p.add_argument("--peak-tflops", type=float, default=None)
  p.add_argument("--batch-chains", default="auto",
                 help="ViT models' batch_chains: 'auto' (the model default: 2 on one CPU "
                 "device, else 1) or a count; 1 turns the CPU chains off")
  p.add_argument("--attention", default="auto",
                 choices=("auto", "chunked", "materialized", "cudnn", "tpu_flash"),
                 help="ViT models' attention_impl (fgjax.models.attention): 'auto' keeps no "
                 "attention probabilities; 'materialized' is the path before 2026-12-02")
  p.add_argument("--host-memory", choices=hostmem.MODES, default="auto",
                 help="glibc malloc keeps XLA:CPU's freed step buffers ('auto': on the CPU, "
                 "as run.py does; applies to both frameworks in the process)")
  a = p.parse_args(argv)
  if a.batch_chains == "auto":
    a.batch_chains = None
  else:
    try:
      a.batch_chains = int(a.batch_chains)
    except ValueError:
      p.error(f"--batch-chains must be 'auto' or a count >= 1, got {a.batch_chains!r}")
    if a.batch_chains < 1:
      p.error(f"--batch-chains must be 'auto' or a count >= 1, got {a.batch_chains}")
  a.model_keys = [m for m in a.models.split(",") if m]
  for m in a.model_keys:
    if m not in MODELS:
      p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
  return a


# ------------------------------------------------------------------------------------ fgjax


class _Groups:
  """One optax transform per parameter group, as the trainer holds them: `init(params)` ->
  {optimizer: state over its group}."""

  def __init__(self, tx, masks):
    self.tx, self.masks = tx, masks

  def init(self, params):
    from fgjax.methods import base as protocol
    return {name: self.tx.init(protocol.select(params, m)) for name, m in self.masks.items()}


def make_fgjax_step(name: str, kind: str, img: int, dtype, model_kwargs=None):
  """(model, optimizer, step): step(params, opt, extra vars, batch, rng) -> (params, opt, extra
  vars, loss) runs one training step of `kind` ("deit": CE on the logits; "trs", "transfg",
  "pmg", "cal": the method's own loss, PMG's S + 1 updates in sequence as in the trainer;
  "racnn_cls", "racnn_apn": one phase of RA-CNN's alternation, on its optimizer's group) with
  AdamW (lr 1e-4, wd 0.05) over each of the method's parameter groups. `optimizer.init(params)`
  gives the states of every group."""
  import jax
  import jax.numpy as jnp
  import optax
  from configs import common as cfgs
  from fgjax import losses, methods, models
  from fgjax.methods import base as protocol
  from fgjax.train import setup, step as step_lib

  model = models.create(name, NUM_CLASSES, img, dtype=dtype, **(model_kwargs or {}))
  tx = optax.adamw(1e-4, weight_decay=0.05)
  specs = {"default": methods.OptimizerSpec({})}
  if kind == "deit":
    def ce(p, e, ctx):
      logits, _ = model.apply({"params": p}, ctx.batch["image"], train=True,
                              rngs={"dropout": ctx.rng})
      return losses.cross_entropy(logits, ctx.batch["label"]), ({}, e)
    updates = (methods.Update(ce),)
  else:
    method_name = {"trs": "trs_deit", "racnn_cls": "racnn", "racnn_apn": "racnn"}.get(kind, kind)
    cfg = cfgs.base_config(method_name)
    cfg.model.name, cfg.model.img_size = name, img
    phase = 0
    if method_name == "racnn":  # the alternation only: no pre-training phases
      cfg.racnn.classifier_pretrain_steps = cfg.racnn.apn_pretrain_steps = 0
      phase = 0 if kind == "racnn_cls" else 1
    method = methods.get_method(cfg, model, NUM_CLASSES)
    specs = method.optimizers()
    updates = method.phases()[phase].updates
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, img, img, 3), jnp.float32))["params"]
  masks = protocol.group_mask(specs, shapes)
  optimizers = {n: setup.BuiltOptimizer(tx, m, None) for n, m in masks.items()}

  def step(p, o, extra, batch, rng):  # the trainer's update loop (without its bookkeeping)
    p, o, extra, loss, _, _ = step_lib.apply_updates(updates, optimizers, p, o, extra, batch,
                                                     rng)
    return p, o, extra, loss

  return model, _Groups(tx, masks), step


def prepare_fgjax(key, images, labels, args):
  """The compiled fgjax step as (run, sync, info): run() does one step."""
  import jax
  import jax.numpy as jnp

  label, name, _, img, kind, _, _ = MODELS[key]
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  kw = None
  if kind in ("deit", "trs", "transfg"):
    kw = {"attention_impl": args.attention}
    if args.batch_chains is not None:
      kw["batch_chains"] = args.batch_chains
  model, tx, step = make_fgjax_step(name, kind, img, dtype, model_kwargs=kw)
  batch = {"image": jax.device_put(images), "label": jax.device_put(labels)}
  variables = dict(jax.jit(model.init)(jax.random.key(0), batch["image"][:1]))
  params = variables.pop("params")  # the rest: BatchNorm statistics (PMG)
  opt = jax.jit(tx.init)(params)
  jitted = jax.jit(step, donate_argnums=(0, 1, 2))
  rng = jax.random.key(1)
  compiled, compile_s = common.stopwatch(
      lambda: jitted.lower(params, opt, variables, batch, rng).compile())
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", 0.0)) or None
  state = {"p": params, "o": opt, "e": variables}

  def run():
    state["p"], state["o"], state["e"], loss = compiled(state["p"], state["o"], state["e"],
                                                        batch, rng)
    return loss

  return run, jax.block_until_ready, {"compile_s": compile_s, "flops": flops}


# ------------------------------------------------------------------------------------ torch


def _torch_blocks_with_probs(blocks, h):
  """timm ViT blocks with the attention probabilities computed explicitly and kept (detached)
  for the selection; returns (tokens, [probs per block])."""
  b, t, _ = h.shape
  attn_maps = []
  for blk in blocks:
    a = blk.attn
    y = blk.norm1(h)
    qkv = a.qkv(y).reshape(b, t, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    probs = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)
    attn_maps.append(probs.detach())
    out = (probs @ v).transpose(1, 2).reshape(b, t, -1)
    h = h + blk.ls1(a.proj(out))
    h = h + blk.ls2(blk.mlp(blk.norm2(h)))
  return h, attn_maps


def _torch_trs_forward(model, x, torch):
  """TRS-DeiT on timm's DeiT blocks with the full-matrix rollout (the reference's way)."""
  h = model._pos_embed(model.patch_embed(x))
  h, attn_maps = _torch_blocks_with_probs(model.blocks[:-1], h)
  with torch.no_grad():
    r = attn_maps[0]
    for m in attn_maps[1:]:
      r = m @ r  # full T x T products, as TransFG's Part_Attention
    score = r[:, :, 0, 2:] * r[:, :, 1, 2:] * r[:, :, 2:, 0] * r[:, :, 2:, 1]
    idx = score.argmax(-1) + 2  # (B, K) token indices
  picked = torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))
  h = torch.cat([h[:, :2], picked], 1)
  h = model.norm(model.blocks[-1](h))
  return model.head(h[:, 0]), model.head_dist(h[:, 1]), h[:, 0], h[:, 1]


def _torch_transfg_forward(model, patch_proj, pos_embed, x, torch):
  """TransFG on timm's ViT blocks: stride-12 patches, parts from the cls row of the full
  rollout product (TACJu/TransFG `Part_Attention`), part layer on [cls, parts]."""
  h = patch_proj(x).flatten(2).transpose(1, 2)
  h = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), h], 1) + pos_embed
  h, attn_maps = _torch_blocks_with_probs(model.blocks[:-1], h)
  with torch.no_grad():
    r = attn_maps[0]
    for m in attn_maps[1:]:
      r = m @ r
    idx = r[:, :, 0, 1:].argmax(-1) + 1
  picked = torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))
  h = model.norm(model.blocks[-1](torch.cat([h[:, :1], picked], 1)))
  return model.head(h[:, 0]), h[:, 0]


def _torch_pmg_parts(timm_name, num_classes, torch, dev):
  """The PMG model in torch (PRIS-CV PMG `model.py`: conv blocks, global max pooling, BN /
  Linear / BN / ELU / Linear classifiers) on timm ResNet stages 2-4."""
  import timm
  nn = torch.nn
  backbone = timm.create_model(timm_name, pretrained=False, features_only=True,
                               out_indices=(2, 3, 4))
  chans = backbone.feature_info.channels()

  def conv_block(cin):
    return nn.Sequential(nn.Conv2d(cin, 512, 1, bias=False), nn.BatchNorm2d(512, momentum=0.01),
                         nn.ReLU(), nn.Conv2d(512, 1024, 3, padding=1, bias=False),
                         nn.BatchNorm2d(1024, momentum=0.01), nn.ReLU())

  def classifier(cin):
    return nn.Sequential(nn.BatchNorm1d(cin), nn.Linear(cin, 512), nn.BatchNorm1d(512),
                         nn.ELU(inplace=True), nn.Linear(512, num_classes))

  mods = nn.ModuleDict({"backbone": backbone,
                        "blocks": nn.ModuleList([conv_block(c) for c in chans]),
                        "heads": nn.ModuleList([classifier(1024) for _ in chans]),
                        "concat": classifier(3072)}).to(dev).train()

  def forward(x):
    pooled = [blk(f).amax(dim=(2, 3)) for blk, f in zip(mods["blocks"], mods["backbone"](x))]
    return [hd(v) for hd, v in zip(mods["heads"], pooled)], mods["concat"](torch.cat(pooled, 1))
  return mods, forward


def _torch_jigsaw(x, n, torch):
  """A random permutation of the n x n cells of each image."""
  b, c, hgt, wid = x.shape
  ch, cw = hgt // n, wid // n
  cells = x.reshape(b, c, n, ch, n, cw).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, c, ch, cw)
  perm = torch.argsort(torch.rand(b, n * n, device=x.device), dim=1)
  cells = torch.gather(cells, 1, perm[:, :, None, None, None].expand_as(cells))
  return cells.reshape(b, n, n, c, ch, cw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hgt, wid)


def _torch_attention_crop(x, box, out, torch, k=10.0):
  """RA-CNN's crop in torch: the square's out x out sampling grid (pixel centres,
  align_corners=False) through `grid_sample`, times the boxcar mask at the samples."""
  F = torch.nn.functional
  _, _, hgt, wid = x.shape
  tx, ty, tl = box.unbind(1)
  u = (torch.arange(out, device=x.device, dtype=x.dtype) + 0.5) / out
  sx = (tx - tl)[:, None] + u * 2 * tl[:, None]
  sy = (ty - tl)[:, None] + u * 2 * tl[:, None]
  gx, gy = 2 * sx / wid - 1, 2 * sy / hgt - 1
  grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)
  out_x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
  mx = torch.sigmoid(k * (sx - (tx - tl)[:, None])) - torch.sigmoid(k * (sx - (tx + tl)[:, None]))
  my = torch.sigmoid(k * (sy - (ty - tl)[:, None])) - torch.sigmoid(k * (sy - (ty + tl)[:, None]))
  return out_x * my[:, None, :, None] * mx[:, None, None, :]


def _torch_racnn_parts(vgg_name, num_classes, img, torch, dev):
  """RA-CNN in torch: three torchvision VGG feature stacks (conv5 before pool5), a gap + fc
  head each, two APNs (max-pool 2x2, FC 1024, tanh, FC 3, sigmoid -> squares with tl >= 1/3
  of the side, inside the image). Returns (nets, apns, forward(x, box_grad) -> logits list)."""
  import torchvision
  nn = torch.nn
  crop = img // 2

  def scale_net():
    feats = getattr(torchvision.models, vgg_name)(weights=None).features[:-1]  # no pool5
    return nn.ModuleDict({"features": feats, "head": nn.Linear(512, num_classes)})

  def apn(side):
    return nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512 * (side // 32) ** 2, 1024),
                         nn.Tanh(), nn.Linear(1024, 3), nn.Sigmoid())

  nets = nn.ModuleList([scale_net() for _ in range(3)]).to(dev)
  apns = nn.ModuleList([apn(img), apn(crop)]).to(dev)

  def squares(s, side):
    lo = side / 3.0
    tl = lo + (side / 2.0 - lo) * s[:, 2]
    free = side - 2 * tl
    return torch.stack([tl + free * s[:, 0], tl + free * s[:, 1], tl], 1)

  def forward(x, box_grad):
    logits, side = [], float(img)
    for s in range(3):
      fmap = nets[s]["features"](x)
      logits.append(nets[s]["head"](fmap.mean((2, 3))))
      if s == 2:
        break
      box = squares(apns[s](fmap), side)
      x = _torch_attention_crop(x, box if box_grad else box.detach(), crop, torch)
      side = float(crop)
    return logits
  return nets, apns, forward


def _torch_con_loss(z, y, torch, margin=0.4):
  z = torch.nn.functional.normalize(z.float(), dim=-1)
  cos = z @ z.t()
  same = (y[:, None] == y[None, :]).float()
  loss = (same * (1 - cos)).sum() + ((1 - same) * (cos - margin).clamp(min=0)).sum()
  return loss / (z.shape[0] ** 2)


def prepare_torch(key, images_nchw, labels, args, device):
  """The PyTorch reference step as (step, sync): step() does one step."""
  import contextlib
  import timm
  import torch
  import torch.nn.functional as F

  _, _, timm_name, img, kind, _, _ = MODELS[key]
  torch.manual_seed(0)
  dev = torch.device(device)
  x = torch.from_numpy(images_nchw).to(dev)
  y = torch.from_numpy(labels).long().to(dev)
  if kind == "pmg":
    model, pmg_forward = _torch_pmg_parts(timm_name, NUM_CLASSES, torch, dev)
  elif kind.startswith("racnn"):
    nets, apns, racnn_forward = _torch_racnn_parts(timm_name, NUM_CLASSES, img, torch, dev)
    train_apn = kind == "racnn_apn"
    nets.train(not train_apn)
    for p in nets.parameters():  # the frozen group gets no gradients
      p.requires_grad_(not train_apn)
    for p in apns.parameters():
      p.requires_grad_(train_apn)
    model = apns if train_apn else nets
  else:
    model = timm.create_model(timm_name, pretrained=False, img_size=img,
                              num_classes=NUM_CLASSES).to(dev).train()
  if kind == "transfg":
    width = model.embed_dim
    patch_proj = torch.nn.Conv2d(3, width, 16, stride=12).to(dev)
    grid = (img - 16) // 12 + 1
    pos_embed = torch.nn.Parameter(torch.zeros(1, grid * grid + 1, width, device=dev))
    model.patch_embed = None  # replaced by the stride-12 projection
    params = list(model.parameters()) + list(patch_proj.parameters()) + [pos_embed]
  else:
    params = list(model.parameters())
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
  amp = (torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
         if args.dtype == "bfloat16" else contextlib.nullcontext())

  def loss_fn(jigsaw_n=0):
    if kind == "trs":
      cls, dist, zc, zd = _torch_trs_forward(model, x, torch)
      return (0.5 * F.cross_entropy(cls, y) + 0.5 * F.cross_entropy(dist, y)
              + 0.5 * _torch_con_loss(zc, y, torch) + 0.5 * _torch_con_loss(zd, y, torch))
    if kind == "transfg":
      logits, z = _torch_transfg_forward(model, patch_proj, pos_embed, x, torch)
      return F.cross_entropy(logits, y) + _torch_con_loss(z, y, torch)
    if kind.startswith("racnn"):
      logits = racnn_forward(x, kind == "racnn_apn")
      if kind == "racnn_cls":
        return sum(F.cross_entropy(lg, y) for lg in logits)
      p = [F.softmax(lg.float(), -1).gather(1, y[:, None])[:, 0] for lg in logits]
      return ((p[0].detach() - p[1] + 0.05).clamp(min=0).mean()
              + (p[1].detach() - p[2] + 0.05).clamp(min=0).mean())
    if kind == "pmg":
      if jigsaw_n:
        stage = {8: 0, 4: 1, 2: 2}[jigsaw_n]
        return F.cross_entropy(pmg_forward(_torch_jigsaw(x, jigsaw_n, torch))[0][stage], y)
      return 2 * F.cross_entropy(pmg_forward(x)[1], y)
    out = model(x)
    logits = (out[0] + out[1]) / 2 if isinstance(out, (tuple, list)) else out
    return F.cross_entropy(logits, y)

  fwd = torch.compile(loss_fn) if args.compile else loss_fn
  updates = (8, 4, 2, 0) if kind == "pmg" else (0,)

  def step():
    for n in updates:  # PMG: one backward pass and optimizer step per granularity
      opt.zero_grad(set_to_none=True)
      with amp:
        loss = fwd(n)
      loss.backward()
      opt.step()
    return loss

  sync = (lambda _: torch.cuda.synchronize()) if dev.type == "cuda" else None
  return step, sync


# ------------------------------------------------------------------------------------ main


def _peak(args, machine):
  if args.peak_tflops:
    return args.peak_tflops
  for dev in (machine.get("accelerators") or {}).get("jax_devices", []) or []:
    for k, v in PEAK_TFLOPS.items():
      if dev.startswith(("gpu:", "cuda:")) and k in dev:
        return v[args.dtype]
  return None


def main(argv=None):
  args = parse_args(argv)
  if args.device != "cpu":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  threads = common.configure_threads(args.threads,
                                     platform_name="cpu" if args.device == "cpu" else None)
  retained = hostmem.configure(args.host_memory)  # before jax creates its backend, as run.py
  import jax
  import numpy as np

  on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
  torch_device = None
  if not args.skip_torch:
    import torch
    common.set_torch_threads(threads.threads)
    torch_device = "cuda" if on_gpu and torch.cuda.is_available() else (
        None if on_gpu else "cpu")
  machine = common.describe_machine(threads=threads.threads)
  peak = _peak(args, machine)
  # On a CPU the two frameworks' steps alternate, so that a shared machine's drifting speed
  # hits both alike; on a GPU they run one after the other (two frameworks' memory pools).
  interleave = args.interleave if args.interleave is not None else not on_gpu
  print("# Train-step speed: fgjax (one jitted step) vs the PyTorch reference\n")
  print(common.format_machine(machine))
  from fgjax.models import vit
  chains = (f"auto ({vit.batch_chains_for(None, 2)} for an even batch)"
            if args.batch_chains is None else args.batch_chains)
  print(f"config:   dtype {args.dtype}, AdamW, {NUM_CLASSES} classes, median of {args.iters} "
        f"after {args.warmup} warm-up steps{' (steps interleaved)' if interleave else ''}, "
        f"threads {threads.threads}, ViT batch chains {chains}, ViT attention "
        f"{args.attention}, host memory "
        f"{'retained' if retained else 'system malloc'}, torch "
        f"{'compiled' if args.compile else 'eager'} on {torch_device or 'skipped'}\n", flush=True)
  rng = np.random.default_rng(0)
  rows = []
  for key in args.model_keys:
    label, _, _, img, _, b_cpu, b_gpu = MODELS[key]
    batch = args.batch or (b_gpu if on_gpu else b_cpu)
    images = rng.standard_normal((batch, 3, img, img), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=(batch,), dtype=np.int32)
    print(f"[{label} @ {img}, batch {batch}] fgjax ...", end="", flush=True)
    run, sync, fg = prepare_fgjax(key, np.ascontiguousarray(images.transpose(0, 2, 3, 1)),
                                  labels, args)
    tm = None
    if interleave and torch_device:
      print(" torch ...", end="", flush=True)
      timings = common.time_interleaved(
          {"fgjax": (run, sync), "torch": prepare_torch(key, images, labels, args, torch_device)},
          warmup=args.warmup, iters=args.iters)
      fg.update(timings["fgjax"].as_dict())
      tm = timings["torch"].as_dict()
      del run, sync, timings
    else:
      fg.update(common.time_fn(run, warmup=args.warmup, iters=args.iters, sync=sync).as_dict())
      del run, sync  # free fgjax's buffers before the reference allocates its own
      gc.collect()
      if torch_device:
        print(" torch ...", end="", flush=True)
        step, torch_sync = prepare_torch(key, images, labels, args, torch_device)
        tm = common.time_fn(step, warmup=args.warmup, iters=args.iters,
                            sync=torch_sync).as_dict()
        del step, torch_sync
    gc.collect()
    print(" done", flush=True)
    f_s = fg["median_s"]
    tflops = fg["flops"] / f_s / 1e12 if fg["flops"] else None
    rows.append([label, img, batch, f"{1e3 * f_s:.0f}", f"{batch / f_s:.1f}",
                 "-" if tm is None else f"{1e3 * tm['median_s']:.0f}",
                 "-" if tm is None else f"{batch / tm['median_s']:.1f}",
                 "-" if tm is None else f"{tm['median_s'] / f_s:.2f}x",
                 "-" if not fg["flops"] else f"{fg['flops'] / 1e9:.0f}",
                 "-" if tflops is None else f"{tflops:.3f}",
                 "-" if (tflops is None or not peak) else f"{100 * tflops / peak:.1f}%"])
  print()
  print(common.markdown_table(
      ["model", "img", "batch", "fgjax ms/step", "fgjax img/s", "torch ms/step", "torch img/s",
       "ratio", "GFLOP/step", "TFLOP/s", "MFU"], rows))
  print("\nratio = torch time / fgjax time (> 1: fgjax faster). FLOPs: XLA's cost analysis of "
        "the compiled fgjax step. MFU needs the device's peak (none for CPUs).")
  return 0


if __name__ == "__main__":
  sys.exit(main())

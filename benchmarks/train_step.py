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

MODELS = {  # key: (label, fgjax name, timm name, img, trs?, cpu batch, gpu batch)
    "deit_ti224": ("DeiT-Ti/16", "deit_tiny_distilled_patch16",
                   "deit_tiny_distilled_patch16_224", 224, False, 16, 256),
    "deit_s224": ("DeiT-S/16", "deit_small_distilled_patch16",
                  "deit_small_distilled_patch16_224", 224, False, 8, 128),
    "trs_ti224": ("TRS-DeiT-Ti/16", "trs_deit_tiny_patch16",
                  "deit_tiny_distilled_patch16_224", 224, True, 16, 256),
    "trs_s224": ("TRS-DeiT-S/16", "trs_deit_small_patch16",
                 "deit_small_distilled_patch16_224", 224, True, 8, 128),
    "trs_b448": ("TRS-DeiT-B/16", "trs_deit_base_patch16",
                 "deit_base_distilled_patch16_224", 448, True, 1, 32),
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
  p.add_argument("--peak-tflops", type=float, default=None)
  a = p.parse_args(argv)
  a.model_keys = [m for m in a.models.split(",") if m]
  for m in a.model_keys:
    if m not in MODELS:
      p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
  return a


# ------------------------------------------------------------------------------------ fgjax


def bench_fgjax(key, images, labels, args):
  import jax
  import jax.numpy as jnp
  import optax
  from configs import common as cfgs
  from fgjax import losses, methods, models

  label, name, _, img, trs, _, _ = MODELS[key]
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  model = models.create(name, NUM_CLASSES, img, dtype=dtype)
  x, y = jax.device_put(images), jax.device_put(labels)
  params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]
  tx = optax.adamw(1e-4, weight_decay=0.05)
  opt = jax.jit(tx.init)(params)
  if trs:
    cfg = cfgs.base_config()
    cfg.method, cfg.model.name = "trs_deit", name
    method = methods.get_method(cfg, model, NUM_CLASSES)

    def loss_fn(p, rng):
      return method.loss(p, {}, {"image": x, "label": y}, rng)[0]
  else:
    def loss_fn(p, rng):
      logits, _ = model.apply({"params": p}, x, train=True, rngs={"dropout": rng})
      return losses.cross_entropy(logits, y)

  def step(p, o, rng):
    loss, g = jax.value_and_grad(loss_fn)(p, rng)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  jitted = jax.jit(step, donate_argnums=(0, 1))
  rng = jax.random.key(1)
  compiled, compile_s = common.stopwatch(lambda: jitted.lower(params, opt, rng).compile())
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", 0.0)) or None
  state = {"p": params, "o": opt}

  def run():
    state["p"], state["o"], loss = compiled(state["p"], state["o"], rng)
    return loss

  timing = common.time_fn(run, warmup=args.warmup, iters=args.iters, sync=jax.block_until_ready)
  return {"compile_s": compile_s, "flops": flops, **timing.as_dict()}


# ------------------------------------------------------------------------------------ torch


def _torch_trs_forward(model, x, torch):
  """TRS-DeiT on timm's DeiT blocks with the full-matrix rollout (the reference's way)."""
  b = x.shape[0]
  h = model.patch_embed(x)
  h = model._pos_embed(h)
  attn_maps = []
  for blk in model.blocks[:-1]:
    a = blk.attn
    y = blk.norm1(h)
    qkv = a.qkv(y).reshape(b, y.shape[1], 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    probs = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)
    attn_maps.append(probs.detach())
    out = (probs @ v).transpose(1, 2).reshape(b, y.shape[1], -1)
    h = h + blk.ls1(a.proj(out))
    h = h + blk.ls2(blk.mlp(blk.norm2(h)))
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


def _torch_con_loss(z, y, torch, margin=0.4):
  z = torch.nn.functional.normalize(z.float(), dim=-1)
  cos = z @ z.t()
  same = (y[:, None] == y[None, :]).float()
  loss = (same * (1 - cos)).sum() + ((1 - same) * (cos - margin).clamp(min=0)).sum()
  return loss / (z.shape[0] ** 2)


def bench_torch(key, images_nchw, labels, args, device):
  import contextlib
  import timm
  import torch
  import torch.nn.functional as F

  _, _, timm_name, img, trs, _, _ = MODELS[key]
  torch.manual_seed(0)
  dev = torch.device(device)
  model = timm.create_model(timm_name, pretrained=False, img_size=img,
                            num_classes=NUM_CLASSES).to(dev).train()
  x = torch.from_numpy(images_nchw).to(dev)
  y = torch.from_numpy(labels).long().to(dev)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
  amp = (torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
         if args.dtype == "bfloat16" else contextlib.nullcontext())

  def loss_fn():
    if trs:
      cls, dist, zc, zd = _torch_trs_forward(model, x, torch)
      return (0.5 * F.cross_entropy(cls, y) + 0.5 * F.cross_entropy(dist, y)
              + 0.5 * _torch_con_loss(zc, y, torch) + 0.5 * _torch_con_loss(zd, y, torch))
    out = model(x)
    logits = (out[0] + out[1]) / 2 if isinstance(out, (tuple, list)) else out
    return F.cross_entropy(logits, y)

  fwd = torch.compile(loss_fn) if args.compile else loss_fn

  def step():
    opt.zero_grad(set_to_none=True)
    with amp:
      loss = fwd()
    loss.backward()
    opt.step()
    return loss

  sync = (lambda _: torch.cuda.synchronize()) if dev.type == "cuda" else None
  return common.time_fn(step, warmup=args.warmup, iters=args.iters, sync=sync).as_dict()


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
  print("# Train-step speed: fgjax (one jitted step) vs the PyTorch reference\n")
  print(common.format_machine(machine))
  print(f"config:   dtype {args.dtype}, AdamW, {NUM_CLASSES} classes, median of {args.iters} "
        f"after {args.warmup} warm-up steps, threads {threads.threads}, torch "
        f"{'compiled' if args.compile else 'eager'} on {torch_device or 'skipped'}\n", flush=True)
  rng = np.random.default_rng(0)
  rows = []
  for key in args.model_keys:
    label, _, _, img, trs, b_cpu, b_gpu = MODELS[key]
    batch = args.batch or (b_gpu if on_gpu else b_cpu)
    images = rng.standard_normal((batch, 3, img, img), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=(batch,), dtype=np.int32)
    print(f"[{label} @ {img}, batch {batch}] fgjax ...", end="", flush=True)
    fg = bench_fgjax(key, np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels, args)
    gc.collect()
    tm = None
    if torch_device:
      print(" torch ...", end="", flush=True)
      tm = bench_torch(key, images, labels, args, torch_device)
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

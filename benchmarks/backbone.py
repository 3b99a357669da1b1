#!/usr/bin/env python
"""Backbone speed: fgjax (jitted Flax) beside timm (eager PyTorch), same run, batch, threads.

For DeiT-S/16 at 224 px and DeiT-B/16 at 448 px (distilled variants: cls + dist tokens, two
heads, 200 classes = CUB-200-2011 by default) it measures

  fwd      inference forward: fgjax `model.apply(..., train=False)` under `jax.jit`;
           timm `model.eval()` under `torch.inference_mode()`;
  fwd+bwd  forward in train mode + backward of loss = cross-entropy of the mean of the two
           heads' logits (what both models return), no optimizer step: fgjax
           `jax.jit(jax.value_and_grad(loss))`, timm `loss.backward()` (grads reset to None
           before each step);

and prints ms/img and img/s from the median of `--iters` timed steps after `--warmup` untimed
ones, plus ratio = timm time / fgjax time (>1: fgjax is faster). JAX compilation is timed
separately (`lower().compile()`) and never counted in the step times. Inputs (random normal
images, random labels) are generated once and shared by both frameworks.

Threads: `--threads N` (default: all usable CPUs) is applied to both frameworks before either is
imported: torch.set_num_threads(N), OMP/MKL variables, XLA_FLAGS, and the process is pinned to N
CPUs, which is what limits XLA's CPU thread pool (see `benchmarks/common.py`).

Usage (from the repository root):
  PYTHONPATH=. python benchmarks/backbone.py                       # both models, CPU
  PYTHONPATH=. python benchmarks/backbone.py --quick               # smoke run, < 2 min
  PYTHONPATH=. python benchmarks/backbone.py --models deit_s224 --batch 16 --iters 20
  PYTHONPATH=. python benchmarks/backbone.py --dtype bfloat16 --json /tmp/backbone.json
  PYTHONPATH=. python benchmarks/backbone.py --device gpu           # needs jax[cuda] + CUDA torch
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import sys
from pathlib import Path
from typing import Optional

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

from benchmarks import common  # noqa: E402  (stdlib only: safe before the thread setup)
from fgjax.train import hostmem  # noqa: E402  (no jax import: safe before the thread setup)

# jax, torch, timm and fgjax are imported in `main` after `common.configure_threads`.


@dataclasses.dataclass(frozen=True)
class Spec:
  """One benchmarked backbone."""
  key: str            # CLI name
  label: str          # table name
  fgjax_name: str     # fgjax.models.create name
  timm_name: str      # timm.create_model name (img_size overridden)
  img_size: int
  batch_cpu: int      # default batch on CPU (keeps a 2-core run of the defaults < ~5 min)
  batch_gpu: int      # default batch on GPU
  batch_quick: int    # default batch with --quick on CPU (smoke run < ~2 min on 2 cores)


SPECS = {s.key: s for s in [
    Spec("deit_s224", "DeiT-S/16 dist", "deit_small_distilled_patch16",
         "deit_small_distilled_patch16_224", 224, batch_cpu=8, batch_gpu=128,
         batch_quick=4),
    Spec("deit_b448", "DeiT-B/16 dist", "deit_base_distilled_patch16",
         "deit_base_distilled_patch16_224", 448, batch_cpu=2, batch_gpu=32,
         batch_quick=1),
]}
PASSES = ("fwd", "fwd+bwd")
DEFAULT_WARMUP, DEFAULT_ITERS = 1, 5
QUICK_WARMUP, QUICK_ITERS = 1, 2


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=",".join(SPECS),
                 help=f"comma-separated subset of {', '.join(SPECS)} (default: all)")
  p.add_argument("--batch", default=None,
                 help="batch size for every model, or one per model in --models order "
                      "(default: " + ", ".join(f"{s.key} {s.batch_cpu}" for s in SPECS.values())
                      + " on CPU; " + ", ".join(f"{s.batch_gpu}" for s in SPECS.values())
                      + " on GPU; --quick on CPU: "
                      + ", ".join(f"{s.batch_quick}" for s in SPECS.values()) + ")")
  p.add_argument("--passes", default=",".join(PASSES),
                 help="comma-separated subset of fwd, fwd+bwd (default: both)")
  p.add_argument("--iters", type=int, default=None,
                 help=f"timed iterations, median reported (default {DEFAULT_ITERS}, "
                      f"--quick {QUICK_ITERS})")
  p.add_argument("--warmup", type=int, default=None,
                 help=f"untimed iterations after compilation (default {DEFAULT_WARMUP}, "
                      f"--quick {QUICK_WARMUP})")
  p.add_argument("--threads", type=int, default=None,
                 help="CPU threads for both frameworks (default: all usable CPUs, "
                      f"here {common.default_threads()})")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype: fgjax model dtype (params stay float32); timm runs "
                      "under torch.autocast(bfloat16) when bfloat16")
  p.add_argument("--device", choices=("cpu", "gpu", "auto"), default="cpu",
                 help="cpu (default): JAX_PLATFORMS=cpu, torch on CPU; gpu: jax's GPU backend "
                      "and torch on CUDA (error if jax has no GPU); auto: jax's default "
                      "backend, torch on CUDA when that is a GPU")
  p.add_argument("--num-classes", type=int, default=200,
                 help="classifier classes of both heads (default 200, CUB-200-2011)")
  p.add_argument("--skip-timm", action="store_true", help="time fgjax only")
  p.add_argument("--quick", action="store_true",
                 help="smoke run: tiny iteration counts and, on CPU, smaller batches "
                      "(explicit --iters/--warmup/--batch win)")
  p.add_argument("--json", metavar="OUT", default=None, help="also write results as JSON")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--host-memory", choices=hostmem.MODES, default="auto",
                 help="glibc malloc keeps XLA:CPU's freed step buffers ('auto': on the CPU, "
                 "as run.py does; applies to both frameworks in the process)")
  args = p.parse_args(argv)

  args.model_keys = [m.strip() for m in args.models.split(",") if m.strip()]
  bad = [m for m in args.model_keys if m not in SPECS]
  if bad or not args.model_keys:
    p.error(f"--models: unknown {bad}; choose from {', '.join(SPECS)}")
  args.pass_list = [x.strip() for x in args.passes.split(",") if x.strip()]
  bad = [x for x in args.pass_list if x not in PASSES]
  if bad or not args.pass_list:
    p.error(f"--passes: unknown {bad}; choose from {', '.join(PASSES)}")
  if args.batch is not None:
    try:
      batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
      p.error(f"--batch: expected integers, got {args.batch!r}")
    if len(batches) == 1:
      batches *= len(args.model_keys)
    if len(batches) != len(args.model_keys) or min(batches) < 1:
      p.error("--batch: give one positive size, or one per model in --models")
    args.batch_list = batches
  else:
    args.batch_list = None
  if args.iters is None:
    args.iters = QUICK_ITERS if args.quick else DEFAULT_ITERS
  if args.warmup is None:
    args.warmup = QUICK_WARMUP if args.quick else DEFAULT_WARMUP
  if args.iters < 1 or args.warmup < 0:
    p.error("--iters must be >= 1 and --warmup >= 0")
  if args.threads is not None and args.threads < 1:
    p.error("--threads must be >= 1")
  if args.num_classes < 1:
    p.error("--num-classes must be >= 1")
  return args


# --------------------------------------------------------------------------------------------
# fgjax
# --------------------------------------------------------------------------------------------


def bench_fgjax(spec: Spec, images_nhwc, labels, args) -> dict[str, dict]:
  """Times fgjax on `images_nhwc` (numpy float32 NHWC); returns {pass: result dict}."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from fgjax import models  # pylint: disable=import-outside-toplevel

  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  model = models.create(spec.fgjax_name, num_classes=args.num_classes, img_size=spec.img_size,
                        dtype=dtype)
  x = jax.device_put(images_nhwc)
  y = jax.device_put(labels)
  variables = jax.jit(model.init)(jax.random.key(args.seed), x[:1])
  jax.block_until_ready(variables)
  params = variables["params"]
  dropout_key = jax.random.key(args.seed + 1)

  def forward(variables, x):
    logits, _ = model.apply(variables, x, train=False)
    return logits

  def loss_fn(params, x, y):
    # `logits` is (cls + dist) / 2 in train mode too, the same tensor timm returns.
    logits, _ = model.apply({"params": params}, x, train=True, rngs={"dropout": dropout_key})
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

  out = {}
  for name in args.pass_list:
    if name == "fwd":
      jitted, call_args = jax.jit(forward), (variables, x)
    else:
      jitted, call_args = jax.jit(jax.value_and_grad(loss_fn)), (params, x, y)
    compiled, compile_s = common.stopwatch(lambda: jitted.lower(*call_args).compile())
    timing = common.time_fn(lambda: compiled(*call_args), warmup=args.warmup,
                            iters=args.iters, sync=jax.block_until_ready)
    out[name] = {"compile_s": compile_s, **timing.as_dict()}
    del compiled
  return out


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------


def bench_timm(spec: Spec, images_nchw, labels, args, device: str) -> dict[str, dict]:
  """Times timm on `images_nchw` (numpy float32 NCHW) on torch `device`."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  torch.manual_seed(args.seed)
  dev = torch.device(device)
  model = timm.create_model(spec.timm_name, pretrained=False, img_size=spec.img_size,
                            num_classes=args.num_classes).to(dev)
  x = torch.from_numpy(images_nchw).to(dev)
  y = torch.from_numpy(labels).long().to(dev)

  def autocast():
    if args.dtype == "bfloat16":
      return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

  def head_mean(out):
    # timm returns (cls + dist) / 2 unless `distilled_training` is set; handle both.
    return (out[0] + out[1]) / 2 if isinstance(out, (tuple, list)) else out

  def forward():
    with torch.inference_mode(), autocast():
      return head_mean(model(x))

  def forward_backward():
    model.zero_grad(set_to_none=True)
    with autocast():
      loss = F.cross_entropy(head_mean(model(x)), y)
    loss.backward()
    return loss

  sync = (lambda _: torch.cuda.synchronize()) if dev.type == "cuda" else None
  out = {}
  for name in args.pass_list:
    if name == "fwd":
      model.eval()
      fn = forward
    else:
      model.train()
      fn = forward_backward
    timing = common.time_fn(fn, warmup=args.warmup, iters=args.iters, sync=sync)
    out[name] = timing.as_dict()
  model.zero_grad(set_to_none=True)
  return out


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def _ms_per_img(res: Optional[dict], batch: int) -> Optional[float]:
  return None if res is None else 1e3 * res["median_s"] / batch


def _spread(res: Optional[dict]) -> str:
  """'min / median / max' step time in ms."""
  if res is None:
    return "-"
  return " / ".join(f"{1e3 * res[k]:.0f}" for k in ("min_s", "median_s", "max_s"))


def main(argv=None) -> int:
  args = parse_args(argv)
  platform_name = {"cpu": "cpu", "gpu": None, "auto": None}[args.device]
  if args.device != "cpu":
    # jax and torch share the GPU: don't let XLA grab 75% of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  threads = common.configure_threads(args.threads, platform_name=platform_name)
  args.threads = threads.threads
  retained = hostmem.configure(args.host_memory)  # before jax's backend, as run.py

  import jax  # noqa: E402  pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  backend = jax.default_backend()
  on_gpu = backend in ("gpu", "cuda", "rocm")
  if args.device == "gpu" and not on_gpu:
    print(f"error: --device gpu but jax's backend is {backend!r} (install jax[cuda] and "
          "check JAX_PLATFORMS)", file=sys.stderr)
    return 2

  notes = list(threads.warnings)
  torch_device = None
  if not args.skip_timm:
    try:
      import timm  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
      import torch  # pylint: disable=import-outside-toplevel
      common.set_torch_threads(threads.threads)
      if not on_gpu:
        torch_device = "cpu"
      elif torch.cuda.is_available():
        torch_device = "cuda"
      else:
        notes.append("jax runs on GPU but torch has no CUDA: timm skipped (a GPU vs CPU "
                     "ratio would mean nothing)")
    except ImportError as e:
      notes.append(f"timm/torch not importable ({e}): timm skipped")

  machine = common.describe_machine(threads=threads.threads)
  print("# Backbone speed: fgjax (jax.jit) vs timm (PyTorch eager)\n")
  print(common.format_machine(machine))
  pin = f", pinned to CPUs {threads.cpus}" if threads.cpus else ""
  print(f"config:   dtype {args.dtype}, {args.num_classes} classes, warmup {args.warmup}, "
        f"median of {args.iters} iters; threads: torch {threads.threads}, XLA "
        f"{threads.xla_threads}{pin}; jax on {backend}, timm on {torch_device or 'skipped'}; "
        f"host memory {'retained' if retained else 'system malloc'}")
  if args.dtype == "bfloat16" and not on_gpu:
    flags = common.cpu_flags()
    if flags and not flags & {"avx512_bf16", "amx_bf16", "bf16"}:
      notes.append("this CPU has no native bfloat16 arithmetic (avx512_bf16/amx_bf16): both "
                   "frameworks emulate it, torch's CPU autocast very slowly, so the bf16 ratio "
                   "compares emulation paths")
  load = (machine.get("loadavg") or [0.0])[0]
  if load > 0.5:
    notes.append(f"1-min load average {load:.2f} before start: other processes are running, "
                 "timings will be noisy")
  for n in notes:
    print(f"note:     {n}")
  print(flush=True)

  rng = np.random.default_rng(args.seed)
  results = []
  for i, key in enumerate(args.model_keys):
    spec = SPECS[key]
    if args.batch_list is not None:
      batch = args.batch_list[i]
    elif on_gpu:
      batch = spec.batch_gpu
    else:
      batch = spec.batch_quick if args.quick else spec.batch_cpu
    images = rng.standard_normal((batch, 3, spec.img_size, spec.img_size), dtype=np.float32)
    labels = rng.integers(0, args.num_classes, size=(batch,), dtype=np.int32)
    images_nhwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    print(f"[{spec.label} @ {spec.img_size}, batch {batch}] fgjax ...", end="", flush=True)
    fg = bench_fgjax(spec, images_nhwc, labels, args)
    gc.collect()
    tm = {}
    if torch_device is not None:
      print(" timm ...", end="", flush=True)
      tm = bench_timm(spec, images, labels, args, torch_device)
      gc.collect()
    print(" done", flush=True)
    for name in args.pass_list:
      f_res, t_res = fg[name], tm.get(name)
      ratio = None if t_res is None else t_res["median_s"] / f_res["median_s"]
      results.append({"model": key, "label": spec.label, "fgjax_name": spec.fgjax_name,
                      "timm_name": spec.timm_name, "img_size": spec.img_size, "batch": batch,
                      "pass": name, "fgjax": f_res, "timm": t_res, "ratio": ratio})

  headers = ["model", "img", "batch", "pass", "fgjax ms/img", "timm ms/img", "fgjax img/s",
             "timm img/s", "ratio"]
  rows = []
  for r in results:
    b = r["batch"]
    f_ms, t_ms = _ms_per_img(r["fgjax"], b), _ms_per_img(r["timm"], b)
    rows.append([r["label"], r["img_size"], b, r["pass"], common.fmt(f_ms), common.fmt(t_ms),
                 common.fmt(1e3 / f_ms), common.fmt(t_ms and 1e3 / t_ms),
                 "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"])
  print()
  print(common.markdown_table(headers, rows))
  print("\nratio = timm time / fgjax time (>1: fgjax faster). Per-step detail (ms per batch, "
        "min / median / max over the timed iterations; fgjax compile excluded):\n")
  detail = [[r["label"], r["pass"], f"{r['fgjax']['compile_s']:.1f}", _spread(r["fgjax"]),
             _spread(r["timm"])] for r in results]
  print(common.markdown_table(
      ["model", "pass", "fgjax compile s", "fgjax step ms", "timm step ms"], detail,
      align="llrrr"))

  if args.json:
    config = {k: v for k, v in vars(args).items() if k not in ("models", "passes", "batch")}
    common.write_json(args.json, {"benchmark": "backbone", "machine": machine,
                                  "threads": threads.as_dict(), "config": config,
                                  "jax_backend": backend, "torch_device": torch_device,
                                  "notes": notes, "results": results})
    print(f"\nwrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

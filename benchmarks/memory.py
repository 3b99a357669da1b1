#!/usr/bin/env python
"""Train-step memory: the largest batch per device at 448, with and without rematerialisation.

For each model the full jitted train step (forward, the method's loss, backward, AdamW update;
params, optimizer state and BatchNorm statistics donated, as in the trainer) is compiled for
two per-device batch sizes without running it, and XLA's memory analysis of the compiled step
gives the bytes it needs: arguments + temporaries + outputs not aliased to donated arguments.
That is fitted as fixed + per-image x batch; the largest batch is the one that fits into
`--device-gib` (a list: e.g. 16 GiB V100/T4-class, 80 GiB H100). Nothing is allocated for the
models (abstract shapes only), so ViT-L/16 at 448 is measured on a laptop.

The numbers come from the backend the script runs on: on a GPU they are what XLA:GPU will
allocate (plus the runtime's own reserve); on the CPU backend they estimate it (XLA:CPU fuses
and schedules differently). `--remat` rows use `remat=True` (every ViT block recomputed in the
backward pass; for RegNetY-16GF at 960 every block, `fgjax.models.regnet`); ResNet- and
VGG-based models have no remat option. RegNetY-16GF (the FGVC9 Sorghum backbone, spec
section 8) is trained with the `classifier` method (cross-entropy) at 512 and 960. RA-CNN has
two rows, one per phase of its alternation (the classifiers' cross-entropy at three scales with
the squares held fixed; the APNs' ranking loss through the crops), each with AdamW on its own group. `--attention` names the ViT
attention paths to compare (`fgjax.models.attention`): "materialized" keeps every block's
(B, heads, T, T) probabilities for the backward pass (fgjax before 2026-12-02), "auto" is the
default memory-efficient path (chunked with a recomputing VJP on the CPU, cuDNN flash attention
in bf16 on a GPU) with the rollout streamed from q and k.

Usage (repository root):
  PYTHONPATH=. python benchmarks/memory.py                       # all models, float32
  PYTHONPATH=. python benchmarks/memory.py --models trs_b448 --dtype bfloat16
  PYTHONPATH=. python benchmarks/memory.py --models transfg_l448 --attention auto --no-remat
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.train_step import make_fgjax_step  # noqa: E402

MODELS = {  # key: (label, fgjax name, kind, img, remat supported: a ViT)
    "trs_b448": ("TRS-DeiT-B/16", "trs_deit_base_patch16", "trs", 448, True),
    "transfg_b448": ("TransFG-B/16", "transfg_base_patch16", "transfg", 448, True),
    "transfg_l448": ("TransFG-L/16", "transfg_large_patch16", "transfg", 448, True),
    "pmg_r50_448": ("PMG-ResNet50", "pmg_resnet50", "pmg", 448, False),
    "cal_r101_448": ("CAL-ResNet101", "cal_resnet101", "cal", 448, False),
    "racnn_v19_448_cls": ("RA-CNN-VGG19 classifier phase", "racnn_vgg19", "racnn_cls", 448,
                          False),
    "racnn_v19_448_apn": ("RA-CNN-VGG19 APN phase", "racnn_vgg19", "racnn_apn", 448, False),
    "trs_ti224": ("TRS-DeiT-Ti/16", "trs_deit_tiny_patch16", "trs", 224, True),
    "regnety160_512": ("RegNetY-16GF", "regnety_160", "classifier", 512, False),
    "regnety160_960": ("RegNetY-16GF", "regnety_160", "classifier", 960, False),
}
REMAT_CNNS = ("regnety160_960",)  # CNN rows also measured with remat=True (each block)
GIB = 1024 ** 3


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="trs_b448,transfg_b448,transfg_l448,pmg_r50_448,"
                                     "cal_r101_448,racnn_v19_448_cls,racnn_v19_448_apn,"
                                     "regnety160_512,regnety160_960")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--batches", default="2,4", help="the two per-device batches to fit")
  p.add_argument("--device-gib", default="16,80")
  p.add_argument("--attention", default="materialized,auto",
                 help="ViT attention implementations to compare (attention_impl)")
  p.add_argument("--no-remat", action="store_true", help="skip the remat rows")
  a = p.parse_args(argv)
  a.attention_impls = [x for x in a.attention.split(",") if x]
  known = ("auto", "chunked", "materialized", "cudnn", "tpu_flash")  # fgjax.models.attention
  for impl in a.attention_impls:
    if impl not in known:  # (checked here: importing fgjax would import jax before threads)
      p.error(f"unknown --attention {impl!r}; choose from {', '.join(known)}")
  a.model_keys = [m for m in a.models.split(",") if m]
  for m in a.model_keys:
    if m not in MODELS:
      p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
  a.batch_pair = tuple(int(b) for b in a.batches.split(","))
  if len(a.batch_pair) != 2 or a.batch_pair[0] >= a.batch_pair[1]:
    p.error("--batches needs two increasing batch sizes, e.g. 2,4")
  a.gib = [float(g) for g in a.device_gib.split(",") if g]
  return a


def step_bytes(key: str, batch: int, remat: bool, dtype, attention_impl: str = "auto") -> dict:
  """Compiles the train step for `batch` (abstract inputs) and returns XLA's memory analysis."""
  import jax
  import jax.numpy as jnp

  _, name, kind, img, is_vit = MODELS[key]
  kwargs = {"remat": True} if remat else {}
  if is_vit:  # the accelerator's graph: one chain (two are the CPU default, fgjax.models.vit)
    kwargs["batch_chains"] = 1
    kwargs["attention_impl"] = attention_impl
  model, tx, step = make_fgjax_step(name, kind, img, dtype, kwargs)
  image = jax.ShapeDtypeStruct((batch, img, img, 3), jnp.float32)
  variables = dict(jax.eval_shape(model.init, jax.random.key(0),
                                  jax.ShapeDtypeStruct((1, img, img, 3), jnp.float32)))
  params = variables.pop("params")
  opt = jax.eval_shape(tx.init, params)
  batch_tree = {"image": image, "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(
      params, opt, variables, batch_tree, jax.random.key(1)).compile()
  ma = compiled.memory_analysis()
  total = (ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes
           - ma.alias_size_in_bytes)
  state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((params, opt, variables)))
  return {"total": total, "temp": ma.temp_size_in_bytes, "state": state}


def main(argv=None):
  args = parse_args(argv)
  threads = common.configure_threads(None, platform_name=None)
  import jax
  import jax.numpy as jnp

  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  machine = common.describe_machine(threads=threads.threads)
  print("# Train-step memory per device: the largest batch that fits\n")
  print(common.format_machine(machine))
  print(f"config:   compute {args.dtype} (params and AdamW state float32), memory from XLA's "
        f"analysis of the compiled step on {jax.default_backend()}, fitted from per-device "
        f"batches {args.batch_pair[0]} and {args.batch_pair[1]}\n", flush=True)
  rows = []
  b1, b2 = args.batch_pair
  for key in args.model_keys:
    label, _, _, img, is_vit = MODELS[key]
    has_remat = is_vit or key in REMAT_CNNS
    remats = (False,) if not has_remat or args.no_remat else (False, True)
    for impl in (args.attention_impls if is_vit else ["-"]):
      for remat in remats:
        print(f"[{label} @ {img} attention {impl}{' remat' if remat else ''}] ...", end="",
              flush=True)
        m1 = step_bytes(key, b1, remat, dtype, impl)
        m2 = step_bytes(key, b2, remat, dtype, impl)
        per_image = max((m2["total"] - m1["total"]) / (b2 - b1), 1.0)
        fixed = m1["total"] - per_image * b1
        fits = [max(int((g * GIB - fixed) // per_image), 0) for g in args.gib]
        print(" done", flush=True)
        rows.append([label, img, impl, "yes" if remat else "no", f"{m1['state'] / GIB:.2f}",
                     f"{per_image / 2 ** 20:.0f}", *[str(f) for f in fits]])
  print()
  print(common.markdown_table(
      ["model", "img", "attention", "remat", "params + AdamW GiB", "MiB per image",
       *[f"max batch @ {g:g} GiB" for g in args.gib]], rows))
  print("\nmax batch = (device memory - fixed) / per-image bytes, both fitted from the compiled "
        "step; data parallel (each device holds all parameters; `mesh.fsdp` shards them).")
  return 0


if __name__ == "__main__":
  sys.exit(main())

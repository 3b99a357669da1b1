"""Converts pretrained weights into an fgjax params file that a config's `init_from` can name.

    python -m fgjax.tools.convert deit_base_distilled_patch16_224-df68dfff.pth \
        deit_b_448_cub.npz --model deit_base_distilled_patch16 --img-size 448 --num-classes 200

Reads timm/DeiT `.pth`, `.safetensors` or Google ViT `.npz` (see `fgjax.convert`), resamples
the position embedding to `--img-size`, re-initialises the heads for `--num-classes`, and writes
an `.npz` with keys `params/<module path>` plus the model name, image size and class count as
metadata. Exits with status 2 and a one-paragraph message when the file does not fit the model.
"""
from __future__ import annotations

import argparse
import logging
import sys

import numpy as np


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fgjax.tools.convert",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("input", help="checkpoint: .pth, .safetensors or Google ViT .npz")
  parser.add_argument("output", help="output .npz params file")
  parser.add_argument("--model", required=True, help="fgjax model name, e.g. "
                      "deit_base_distilled_patch16")
  parser.add_argument("--img-size", type=int, default=224)
  parser.add_argument("--num-classes", type=int, default=1000)
  parser.add_argument("--patch-stride", type=int, default=None,
                      help="patch-embedding stride (12 = TransFG overlapping split)")
  parser.add_argument("--dont-load", action="append", default=[],
                      help="regex of parameter names to re-initialise (repeatable)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")

  from fgjax import convert
  kw = {}
  if args.patch_stride:
    kw["patch_stride"] = args.patch_stride
  try:
    variables = convert.load_checkpoint(args.input, args.model, img_size=args.img_size,
                                        num_classes=args.num_classes, dont_load=args.dont_load,
                                        model_kwargs=kw, with_collections=True)
  except (convert.CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  meta = dict(model=args.model, img_size=args.img_size, num_classes=args.num_classes,
              source=args.input, model_kwargs=kw)
  params = variables.pop("params")
  convert.save_params_npz(args.output, params, meta, collections=variables)
  n = sum(np.size(x) for x in __import__("jax").tree.leaves(params))
  print(f"wrote {args.output}: {args.model} @ {args.img_size}px, {args.num_classes} classes, "
        f"{n / 1e6:.2f}M parameters")
  return 0


if __name__ == "__main__":
  sys.exit(main())

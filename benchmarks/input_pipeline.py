#!/usr/bin/env python
"""Input-pipeline throughput: images/s of the full train transform, per worker.

Cases (each a `fgjax.data.make_train_loader` over a real source, batches of 32):
  jpeg      CUB-sized 500x375 JPEGs in a `folder` dataset written to a temporary directory
            (synthetic bird scenes, quality 90): decode (PIL, draft mode when it applies) ->
            resize shorter side to 512 -> random crop 448 -> flip -> sharpness -> normalise.
  jpeg+ra   the same plus RandAugment (2 ops, magnitude 9).
  synthetic the synthetic source rendered at 500 px on the fly, then the same transform.

`threads=1, worker_count=0` measures one core: the number to compare with the goal of 250
images/s per core. `--workers N` adds a row with N grain worker processes (total images/s).
The first batch (warm-up: process start, first decodes) is not timed; each case runs
`--repeats` times and the table shows the median (and the range) of images/s.

Usage (from the repository root):
  PYTHONPATH=. python benchmarks/input_pipeline.py
  PYTHONPATH=. python benchmarks/input_pipeline.py --batches 20 --workers 2
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from fgjax.data import get_source, make_train_loader  # noqa: E402


def write_jpeg_folder(root: Path, num_images: int, classes: int = 4) -> Path:
  """A `folder` dataset of 500x375 JPEGs (crops of synthetic 500 px scenes)."""
  scenes = get_source("synthetic", "train", num_classes=classes, num_examples=num_images,
                      image_size=500)
  for i in range(num_images):
    d = root / "train" / f"class_{i % classes}"
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(scenes[i]["image"][:375]).save(d / f"{i:05d}.jpg", quality=90)
  return root


def throughput(source, batches: int, batch_size: int, workers: int, threads: int,
               **augment) -> float:
  loader = make_train_loader(source, global_batch_size=batch_size, image_size=448,
                             resize_size=512, seed=0, flip=True, sharpness=0.5,
                             worker_count=workers, threads=threads, prefetch=2,
                             shard_index=0, shard_count=1, **augment)
  with loader:
    next(loader)  # warm-up
    t0 = time.perf_counter()
    for _ in range(batches):
      next(loader)
    dt = time.perf_counter() - t0
  return batches * batch_size / dt


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batches", type=int, default=8, help="timed batches per case")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--images", type=int, default=256, help="JPEGs written for the jpeg cases")
  p.add_argument("--repeats", type=int, default=3, help="runs per case (median reported)")
  p.add_argument("--workers", type=int, default=0,
                 help="also time this many grain worker processes (0: skip)")
  a = p.parse_args(argv)

  print("# Input pipeline: full train transform at 448 (resize 512, crop, flip, sharpness, "
        "normalise)")
  print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; "
        f"python {platform.python_version()}; batch {a.batch_size}, {a.batches} timed batches")
  with tempfile.TemporaryDirectory() as tmp:
    write_jpeg_folder(Path(tmp), a.images)
    jpegs = get_source("folder", "train", tmp)
    synth = get_source("synthetic", "train", num_classes=20, num_examples=4096, image_size=500)
    cases = [("jpeg 500x375", jpegs, {}),
             ("jpeg 500x375 + RandAugment(2, 9)", jpegs, {"randaugment": "2,9"}),
             ("synthetic 500 px (rendered on the fly)", synth, {})]
    rows = []
    settings = [("1 thread, no workers (one core)", 0)]
    if a.workers:
      settings.append((f"{a.workers} worker processes", a.workers))
    for name, src, aug in cases:
      for setting, workers in settings:
        runs = [throughput(src, a.batches, a.batch_size, workers, 1, **aug)
                for _ in range(a.repeats)]
        rows.append((name, setting, runs))
  print()
  print("| source | setting | images/s (median) | range |")
  print("|---|---|--:|--:|")
  for name, setting, runs in rows:
    print(f"| {name} | {setting} | {np.median(runs):.0f} | {min(runs):.0f}-{max(runs):.0f} |")


if __name__ == "__main__":
  main()

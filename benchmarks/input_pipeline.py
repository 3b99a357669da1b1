#!/usr/bin/env python
"""Input-pipeline throughput: fgjax's train loader beside the bare OpenCV transform.

Cases (JPEG `folder` datasets written to a temporary directory: synthetic bird scenes with a
photo's grain, so that the files decode like photographs, not like flat drawings):
  448  CUB-sized 500 x 375 JPEGs (quality 90): resize shorter side to 512 -> random crop 448
       -> flip -> sharpness 2 with p 0.5 (the TRS-DeiT recipe's transform).
  960  3000 x 2000 JPEGs (quality 90; a 6 MP camera photo): resize shorter side to 960 ->
       random crop 960 -> flip -> sharpness (the competition recipe's resolution).

Rows, each timed in the same process, interleaved over `--repeats` rounds (the table shows the
median images/s, the range, and the ratio to the bare OpenCV row of its case and setting):
  bare OpenCV            the transform written directly: read the file, cv2.imdecode,
                         cv2.resize, slice the crop, cv2.flip, cv2.filter2D + addWeighted,
                         uint8 out (no batching, no boxes, no resumable state)
  fgjax (opencv)         `make_train_loader` as the trainer runs it: uint8 batches, OpenCV
                         backend, draft decoding
  fgjax (opencv, no draft)   the same with `draft=False` (960 only: what draft decoding buys)
  fgjax (pil, host float32)  PIL backend with host normalisation: fgjax's loader before uint8
                         batches and the OpenCV backend
Settings: one thread without worker processes (one core), and `--workers` processes (grain
workers for fgjax; a multiprocessing pool for bare OpenCV).

Usage (from the repository root):
  PYTHONPATH=. python benchmarks/input_pipeline.py
  PYTHONPATH=. python benchmarks/input_pipeline.py --repeats 5 --workers 2
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from fgjax.data import get_source, images, make_train_loader  # noqa: E402

CASES = {  # name: (image (w, h), resize, crop, images written, batch size, batches timed)
    "448": ((500, 375), 512, 448, 1024, 32, 8),
    "960": ((3000, 2000), 960, 960, 32, 8, 4),
}
_SMOOTH = (np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float64) / 13).astype(np.float32)


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def write_jpeg_folder(root: Path, size, num_images: int, classes: int = 4) -> list[str]:
  """A `folder` dataset of `size` JPEGs: synthetic scenes (rendered at 500 px, scaled up for
  larger sizes) with a photo's grain; returns the file paths."""
  import cv2
  w, h = size
  scenes = get_source("synthetic", "train", num_classes=classes,
                      num_examples=num_images, image_size=500)
  rng = np.random.default_rng(0)
  paths = []
  for i in range(num_images):
    img = scenes[i]["image"][:375] if (w, h) == (500, 375) else cv2.resize(
        scenes[i]["image"], (w, h), interpolation=cv2.INTER_CUBIC)
    grain = cv2.GaussianBlur(rng.normal(0, 10, img.shape).astype(np.float32), (0, 0), 0.7)
    img = np.clip(img + grain, 0, 255).astype(np.uint8)
    d = root / "train" / f"class_{i % classes}"
    d.mkdir(parents=True, exist_ok=True)
    paths.append(str(d / f"{i:05d}.jpg"))
    Image.fromarray(img).save(paths[-1], quality=90)
  return paths


def bare_opencv(path: str, seed: int, resize: int, crop: int) -> np.ndarray:
  """The transform written directly in OpenCV (one image)."""
  import cv2
  rng = np.random.default_rng(seed)
  with open(path, "rb") as f:
    img = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR_RGB)
  h, w = img.shape[:2]
  s = resize / min(w, h)
  rw, rh = max(round(w * s), resize), max(round(h * s), resize)
  img = cv2.resize(img, (rw, rh), interpolation=cv2.INTER_LINEAR)
  x, y = rng.integers(0, rw - crop + 1), rng.integers(0, rh - crop + 1)
  out = img[y:y + crop, x:x + crop]
  if rng.random() < 0.5:
    out = cv2.flip(out, 1)
  if rng.random() < 0.5:
    out = cv2.addWeighted(out, 2.0, cv2.filter2D(out, -1, _SMOOTH), -1.0, 0)
  return np.ascontiguousarray(out)


def _bare_job(args):
  return bare_opencv(*args).shape


def _pool_init():
  images.opencv()  # one OpenCV thread per worker process


def time_bare(paths, n: int, resize: int, crop: int, workers: int, pool=None) -> float:
  jobs = [(paths[i % len(paths)], i, resize, crop) for i in range(n)]
  bare_opencv(*jobs[0])  # warm-up
  t0 = time.perf_counter()
  if workers:
    list(pool.imap(_bare_job, jobs, chunksize=8))
  else:
    for job in jobs:
      bare_opencv(*job)
  return n / (time.perf_counter() - t0)


def time_loader(source, resize: int, crop: int, batch: int, batches: int, workers: int,
                **kw) -> float:
  loader = make_train_loader(source, global_batch_size=batch, image_size=crop,
                             resize_size=resize, seed=0, flip=True, sharpness=2.0,
                             sharpness_p=0.5, worker_count=workers, threads=1, prefetch=2,
                             shard_index=0, shard_count=1, **kw)
  with loader:
    next(loader)  # warm-up: process start, first decodes
    t0 = time.perf_counter()
    for _ in range(batches):
      next(loader)
    dt = time.perf_counter() - t0
  return batches * batch / dt


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cases", default="448,960", help="comma-separated: 448, 960")
  p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median reported)")
  p.add_argument("--workers", type=int, default=2,
                 help="also time this many worker processes (0: one thread only)")
  p.add_argument("--images", type=int, default=None, help="JPEGs written per case")
  p.add_argument("--batch-size", type=int, default=None)
  p.add_argument("--batches", type=int, default=None, help="timed batches per row")
  a = p.parse_args(argv)
  images.opencv()  # OpenCV's own thread pool off, as in the loaders

  print("# Input pipeline: fgjax's train loader beside the bare OpenCV transform")
  print(f"cpu: {cpu_model()}, {os.cpu_count()} logical CPUs; python "
        f"{platform.python_version()}; {time.strftime('%Y-%m-%d')}")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for case in a.cases.split(","):
      size, resize, crop, n_img, batch, batches = CASES[case]
      n_img, batch, batches = a.images or n_img, a.batch_size or batch, a.batches or batches
      paths = write_jpeg_folder(Path(tmp) / case, size, n_img)
      kib = np.mean([os.path.getsize(q) for q in paths]) / 1024
      src = get_source("folder", "train", str(Path(tmp) / case))
      variants = [("fgjax (opencv)", {})]
      if case == "960":
        variants.append(("fgjax (opencv, no draft)", {"draft": False}))
      variants.append(("fgjax (pil, host float32)", {"backend": "pil", "host_normalize": True}))
      settings = [("1 thread", 0)] + ([(f"{a.workers} workers", a.workers)] if a.workers else [])
      for setting, workers in settings:
        pool = (multiprocessing.get_context("spawn").Pool(workers, initializer=_pool_init)
                if workers else None)
        runs = {"bare OpenCV": []}
        runs.update({name: [] for name, _ in variants})
        try:
          for _ in range(a.repeats):
            runs["bare OpenCV"].append(time_bare(paths, batch * batches, resize, crop,
                                                 workers, pool))
            for name, kw in variants:
              runs[name].append(time_loader(src, resize, crop, batch, batches, workers, **kw))
        finally:
          if pool is not None:
            pool.close()
            pool.join()
        base = float(np.median(runs["bare OpenCV"]))
        for name, r in runs.items():
          rows.append((f"{size[0]}x{size[1]} ({kib:.0f} KiB) -> {crop}", setting, name, r,
                       float(np.median(r)) / base))

  print()
  print("| images | setting | pipeline | images/s (median) | range | vs bare OpenCV |")
  print("|---|---|---|--:|--:|--:|")
  for case, setting, name, r, ratio in rows:
    print(f"| {case} | {setting} | {name} | {np.median(r):.0f} | {min(r):.0f}-{max(r):.0f} | "
          f"{ratio:.2f}x |")


if __name__ == "__main__":
  main()

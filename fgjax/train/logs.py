"""Metric logging: JSON lines, TensorBoard event files and a terminal progress bar.

Only process 0 writes files; every process may print its own errors.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np


def _scalar(v):
  if isinstance(v, (np.ndarray, jax.Array)):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  return v


class MetricWriter:
  """Appends `{"step": s, "split": ..., **metrics}` to `metrics.jsonl` and TensorBoard."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)
      except ImportError:  # TensorBoard output is optional
        self._tb = None

  def write(self, step: int, split: str, metrics: Mapping[str, Any]):
    if not self.enabled:
      return
    row = {"step": int(step), "split": split, "time": round(time.time(), 3)}
    row.update({k: _scalar(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k not in ("step", "split", "time") and isinstance(v, (int, float)) and \
            math.isfinite(v):
          self._tb.add_scalar(f"{split}/{k}", v, int(step))

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class ProgressBar:
  """One-line progress with ETA and images/s (a line per update when not on a terminal)."""

  def __init__(self, total: int, start: int = 0, desc: str = "train", batch_size: int = 1,
               enabled: bool | None = None, stream=None, min_interval: float = 0.5):
    self.total, self.start, self.desc, self.batch = total, start, desc, batch_size
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.t0 = time.time()
    self.last_print = 0.0
    self.min_interval = min_interval if self.tty else 0.0
    self.rate_t, self.rate_step = self.t0, start

  def update(self, step: int, info: str = "", force: bool = False):
    if not self.enabled:
      return
    now = time.time()
    if not force and (not self.tty or now - self.last_print < self.min_interval):
      return  # off a terminal, only the log points print a line
    done = step - self.start
    elapsed = now - self.t0
    speed = done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / speed if speed > 0 else float("nan")
    frac = step / max(self.total, 1)
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    line = (f"{self.desc} {step}/{self.total} [{bar}] {100 * frac:5.1f}% "
            f"{speed * self.batch:7.1f} img/s ETA {_fmt_time(eta) if math.isfinite(eta) else '?'}"
            f"{' | ' + info if info else ''}")
    if self.tty:
      self.stream.write("\r" + line[:200].ljust(120))
    else:
      self.stream.write(line + "\n")
    self.stream.flush()
    self.last_print = now

  def close(self):
    if self.enabled and self.tty:
      self.stream.write("\n")
      self.stream.flush()

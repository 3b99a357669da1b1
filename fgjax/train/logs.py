"""Metric logging: JSON lines, TensorBoard event files and a progress bar (tqdm).

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
from tqdm import tqdm


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
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
    except OSError as e:  # name the file (a failed write or close has no filename): run.py
      raise OSError(e.errno, e.strerror, self.path) from e  # reports it with the free space
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


class _NullFile:
  """Where the tqdm bar draws off a terminal: nowhere (`ProgressBar` writes the lines)."""

  def write(self, s):
    pass

  def flush(self):
    pass


class _Tqdm(tqdm):
  """tqdm with the fgjax fields: `img_rate` (steps/s x batch size), `eta_fmt` (e.g. 0m35s)
  and `info` (" | loss ..."), all from the average speed since `initial` (the resumed step)."""
  monitor_interval = 0  # no monitor thread: the training loop drives every redraw

  def __init__(self, *args, batch_size: int = 1, **kwargs):
    self.batch_size, self.info = batch_size, ""  # read by the first draw in __init__
    super().__init__(*args, **kwargs)

  @property
  def format_dict(self):
    return dict(super().format_dict, batch_size=self.batch_size, info=self.info)

  @staticmethod
  def format_meter(n, total, elapsed, rate=None, initial=0, batch_size=1, info="", **kwargs):
    if rate is None and elapsed:  # smoothing=0: the average over (n - initial) steps
      rate = (n - initial) / elapsed
    eta = _fmt_time((total - n) / rate) if rate and total else "?"
    return tqdm.format_meter(n, total, elapsed, rate=rate, initial=initial,
                             img_rate=(rate or 0.0) * batch_size, eta_fmt=eta,
                             info=f" | {info}" if info else "", **kwargs)


_BAR_FORMAT = ("{desc} {n_fmt}/{total_fmt} [{bar:20}] {percentage:5.1f}% "
               "{img_rate:7.1f} img/s ETA {eta_fmt}{info}")


class ProgressBar:
  """Training progress on tqdm: step/total, percent, images/s, ETA and an info text.

  On a terminal, one line redrawn in place at most every `min_interval` seconds (and at every
  `force=True` update); the last info text stays until replaced. Off a terminal (a file, CI
  logs) one plain line per `update(..., force=True)` (the log points) and nothing else, e.g.
  `train 150/400 [#######.............]  37.5%   456.3 img/s ETA 0m35s | loss 0.0184`.
  Speed and ETA are averages since `start`, so a resumed run does not count its skipped steps.
  Only process 0 draws unless `enabled` says otherwise.
  """

  def __init__(self, total: int, start: int = 0, desc: str = "train", batch_size: int = 1,
               enabled: bool | None = None, stream=None, min_interval: float = 0.5):
    self.total, self.start, self.desc, self.batch = total, start, desc, batch_size
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.min_interval = min_interval if self.tty else 0.0
    self._bar = None
    if self.enabled:
      self._bar = _Tqdm(total=total, initial=start, desc=desc, batch_size=batch_size,
                        file=self.stream if self.tty else _NullFile(), bar_format=_BAR_FORMAT,
                        ascii=".#", mininterval=self.min_interval, miniters=1, smoothing=0,
                        position=0, leave=True, dynamic_ncols=False)

  def update(self, step: int, info: str = "", force: bool = False):
    bar = self._bar
    if bar is None:
      return
    if not self.tty:
      if force:  # off a terminal, only the log points print a line
        bar.n, bar.info = step, info
        self.stream.write(str(bar) + "\n")
        self.stream.flush()
      return
    if info:
      bar.info = info
    if force:
      bar.n = step
      bar.refresh()
      bar.last_print_n, bar.last_print_t = step, bar._time()
    elif step != bar.n:
      bar.update(step - bar.n)  # tqdm redraws once min_interval has passed

  def close(self):
    if self._bar is not None:
      self._bar.close()  # on a terminal: the final line and a newline
      self._bar = None
      if self.tty:
        self.stream.flush()

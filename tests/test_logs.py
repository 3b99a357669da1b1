"""The tqdm progress bar: plain lines at the log points off a terminal, in-place redraws on
one, speed and ETA counted from the resumed step, drawing only where enabled."""
import io
import re

import jax
import pytest
import tqdm.std

from fgjax.train import logs


class _Clock:
  def __init__(self, t=1000.0):
    self.t = t

  def __call__(self):
    return self.t


@pytest.fixture
def clock(monkeypatch):
  """A fake clock for tqdm (its instances read `tqdm.std.time` when they are created)."""
  c = _Clock()
  monkeypatch.setattr(tqdm.std, "time", c)
  return c


class _TTY(io.StringIO):
  def isatty(self):
    return True


def test_file_mode_one_line_per_forced_update(clock):
  s = io.StringIO()
  bar = logs.ProgressBar(400, batch_size=8, stream=s, enabled=True)
  forced = 0
  for step in range(1, 401):
    clock.t += 0.05
    force = step % 50 == 0
    forced += force
    bar.update(step, f"loss {1 / step:.4f} lr 5.55e-03" if force else "", force=force)
  bar.close()
  out = s.getvalue()
  assert "\r" not in out
  lines = out.splitlines()
  assert len(lines) == forced == 8 and out.endswith("\n")
  for i, line in enumerate(lines, 1):
    step = 50 * i
    assert line.startswith(f"train {step}/400 [")
    assert "img/s" in line and "ETA" in line
    assert line.endswith(f" | loss {1 / step:.4f} lr 5.55e-03")
  # 20 steps/s x 8 images; 250 steps left at step 150 take 12.5 s.
  assert lines[2] == ("train 150/400 [#######.............]  37.5%   160.0 img/s ETA 0m12s"
                      " | loss 0.0067 lr 5.55e-03")
  assert lines[-1].startswith("train 400/400 [####################] 100.0%   160.0 img/s ETA 0m00s")


def test_file_mode_without_info_and_before_any_speed(clock):
  s = io.StringIO()
  bar = logs.ProgressBar(10, stream=s, enabled=True)
  bar.update(0, force=True)  # no time has passed: no speed, no ETA yet
  clock.t += 2.0
  bar.update(1)  # not a log point: prints nothing
  bar.update(2, force=True)
  bar.close()
  lines = s.getvalue().splitlines()
  assert lines == ["train 0/10 [....................]   0.0%     0.0 img/s ETA ?",
                   "train 2/10 [####................]  20.0%     1.0 img/s ETA 0m08s"]


def test_terminal_mode_redraws_in_place(clock):
  s = _TTY()
  bar = logs.ProgressBar(400, batch_size=8, stream=s, enabled=True, min_interval=0.5)
  assert bar.tty
  for step in range(1, 31):
    clock.t += 0.1
    bar.update(step)  # throttled: a redraw every 0.5 s
  clock.t += 0.1
  bar.update(31, "loss 0.0878 lr 5.55e-03", force=True)  # a log point draws at once
  clock.t += 0.1
  bar.update(32)  # within min_interval of the forced draw: no redraw
  out = s.getvalue()
  assert "\n" not in out  # one line, redrawn
  draws = out.split("\r")[1:]
  assert 6 <= len(draws) <= 8  # the first draw, one per 0.5 s of 3 s, the forced one
  assert all("/400 [" in d and "img/s" in d and "ETA" in d for d in draws)
  assert draws[-1].rstrip().endswith(" | loss 0.0878 lr 5.55e-03")
  assert draws[-1].startswith("train 31/400 [")
  assert "  80.0 img/s" in draws[-1]  # 10 steps/s x 8 images
  clock.t += 0.5
  bar.update(40)  # the info text stays on the redrawn line
  assert s.getvalue().split("\r")[-1].rstrip().endswith("| loss 0.0878 lr 5.55e-03")
  bar.close()
  out = s.getvalue()
  assert out.endswith("\n") and out.count("\n") == 1
  assert out.split("\r")[-1].startswith("train 40/400 [")


@pytest.mark.parametrize("tty", [False, True])
def test_resumed_run_counts_speed_and_eta_from_start(clock, tty):
  s = _TTY() if tty else io.StringIO()
  bar = logs.ProgressBar(2000, start=1000, batch_size=4, stream=s, enabled=True)
  clock.t += 10.0
  bar.update(1100, "loss 0.5", force=True)  # 100 steps in 10 s since the resume
  bar.close()
  line = [l for l in re.split(r"[\r\n]", s.getvalue()) if l.startswith("train 1100/")][0]
  # From step 0 it would read 110 steps/s (440 img/s) and an ETA of 8 s.
  assert "    40.0 img/s ETA 1m30s | loss 0.5" in line
  assert " 55.0%" in line


def test_only_process_zero_draws(monkeypatch):
  s = io.StringIO()
  bar = logs.ProgressBar(10, stream=s)
  assert bar.enabled == (jax.process_index() == 0)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  for stream in (io.StringIO(), _TTY()):
    bar = logs.ProgressBar(10, stream=stream)
    assert not bar.enabled
    bar.update(5, "loss 1", force=True)
    bar.close()
    assert stream.getvalue() == ""
  bar = logs.ProgressBar(10, stream=s, enabled=False)
  bar.update(5, force=True)
  bar.close()
  assert s.getvalue() == ""


def test_close_is_idempotent():
  s = _TTY()
  bar = logs.ProgressBar(5, stream=s, enabled=True)
  bar.update(5, force=True)
  bar.close()
  bar.close()
  bar.update(5, force=True)  # after close: nothing
  assert s.getvalue().count("\n") == 1

"""Multi-host: 2 processes x 2 CPU devices (gloo collectives over localhost) train to the same
parameters as 1 process x 4 devices; each process reads its own shard, only process 0 logs."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from fgjax.train import logs, setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = '''
from configs import common


def get_config(arg=None):
  c = common.base_config("trs_deit")
  c.model.name = "trs_deit_tiny_patch16"
  c.model.img_size = 32
  c.model.kwargs = dict(patch_size=8, depth=3, width=48, num_heads=3)
  c.data.name = "synthetic"
  c.data.resize_size = 36
  c.data.source_kwargs = dict(num_classes=4, num_examples=40, image_size=40)
  c.data.split_kwargs = {"test": dict(num_examples=13)}
  c.batch_size = 8
  c.eval_batch_size = 8
  c.total_steps = 3
  c.log_every_steps = 1
  c.checkpoint_every_steps = 3
  c.optim.warmup_steps = 1
  c.optim.lr = 1e-3
  return c
'''


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.pop("XLA_FLAGS", None)
  env["JAX_NUM_CPU_DEVICES"] = str(devices)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _run_py(args, env):
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(procs, timeout=600):
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append((p.returncode, out, err))
  for rc, out, err in outs:
    assert rc == 0, out[-2000:] + err[-6000:]
  return outs


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_devices(tmp_path):
  cfg = tmp_path / "tiny_cfg.py"
  cfg.write_text(CONFIG)
  single, multi = tmp_path / "single", tmp_path / "multi"
  _wait([_run_py([f"--config={cfg}", f"--workdir={single}"], _env(4))])
  port = _free_port()
  outs = _wait([_run_py([f"--config={cfg}", f"--workdir={multi}",
                         f"--coordinator_address=localhost:{port}", "--num_processes=2",
                         f"--process_id={i}"], _env(2)) for i in range(2)])
  assert "process 0 of 2, 2 local / 4 global devices" in outs[0][2]

  # The same parameters (the global batches hold the same examples; only the row order and
  # hence float summation order differ). Each AdamW step moves a parameter by about lr = 1e-3
  # whatever its gradient's size, so summation-order noise shows up at ~1e-5 after 3 steps;
  # a different batch or a missing all-reduce moves parameters by ~1e-3.
  _, _, _, a, info_a = setup.restore_model(str(single), prefer="last")
  _, _, _, b, info_b = setup.restore_model(str(multi), prefer="last")
  assert info_a["step"] == info_b["step"] == 3
  diffs = [float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  assert max(diffs) < 1e-4, max(diffs)

  # Only process 0 writes metrics: one train row per step, one final test row.
  rows = logs.read_metrics(str(multi))
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
  tests = [r for r in rows if r["split"] == "test"]
  assert len(tests) == 1 and tests[0]["num_examples"] == 13  # every test example once
  single_test = [r for r in logs.read_metrics(str(single)) if r["split"] == "test"][0]
  assert tests[0]["top1"] == pytest.approx(single_test["top1"], abs=1e-6)
  # Each process saved its own input-pipeline position with the checkpoint.
  states = sorted(os.listdir(multi / "data_state" / "3"))
  assert states == ["process_0.json", "process_1.json"]
  for f in states:
    assert isinstance(json.loads((multi / "data_state" / "3" / f).read_text()), dict)

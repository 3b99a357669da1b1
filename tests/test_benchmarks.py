"""The benchmark scripts run (CI-sized): they print their tables."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name, *args, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  env.pop("JAX_NUM_CPU_DEVICES", None)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc.stdout


@pytest.mark.slow
def test_train_step_benchmark_runs_on_cpu():
  out = _script("train_step.py", "--models", "trs_ti224,pmg_r18_224", "--batch",
                "2", "--iters", "1", "--warmup", "1", "--threads", "1")
  # One CPU device but pinned to one core (--threads 1): no batch chains (fgjax.models.vit).
  assert "ViT batch chains auto (1 for an even batch)" in out, out
  for label in ("TRS-DeiT-Ti/16", "PMG-ResNet18"):  # one ViT, one conv net
    row = [line for line in out.splitlines() if line.startswith(f"| {label} ")]
    assert len(row) == 1, out
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert float(cells[3]) > 0 and cells[7].endswith("x") and float(cells[8]) > 0


def test_input_pipeline_benchmark_runs():
  out = _script("input_pipeline.py", "--batches", "1", "--batch-size", "2", "--images", "2",
                "--repeats", "1", "--workers", "0")
  rows = [line for line in out.splitlines() if line.startswith("| 500x375") or
          line.startswith("| 3000x2000")]
  names = [[c.strip() for c in r.strip("|").split("|")][2] for r in rows]
  assert names == ["bare OpenCV", "fgjax (opencv)", "fgjax (pil, host float32)",
                   "bare OpenCV", "fgjax (opencv)", "fgjax (opencv, no draft)",
                   "fgjax (pil, host float32)"], names
  for r in rows:
    cells = [c.strip() for c in r.strip("|").split("|")]
    assert float(cells[3]) > 0 and cells[5].endswith("x")


def test_memory_benchmark_runs():
  out = _script("memory.py", "--models", "trs_ti224", "--batches", "1,2", "--device-gib", "1")
  rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
          if line.startswith("| TRS-DeiT-Ti/16")]
  # Both attention paths, each without and with remat.
  assert [(r[2], r[3]) for r in rows] == [("materialized", "no"), ("materialized", "yes"),
                                          ("auto", "no"), ("auto", "yes")]
  # (XLA:CPU does not turn remat into a smaller footprint; docs/benchmarks.md.)
  for row in rows:
    assert float(row[4]) > 0 and float(row[5]) > 0 and int(row[6]) > 0
  # No probabilities kept: less memory per image than the materialised path.
  assert float(rows[2][5]) < float(rows[0][5])
  out = _script("memory.py", "--models", "trs_ti224", "--batches", "1,2", "--device-gib", "1",
                "--attention", "chunked", "--no-remat")
  assert [line.split("|")[3].strip() for line in out.splitlines()
          if line.startswith("| TRS-DeiT-Ti/16")] == ["chunked"]


def test_time_interleaved_alternates_and_times_each():
  sys.path.insert(0, ROOT)
  from benchmarks import common
  calls = []
  fns = {"a": (lambda: calls.append("a"), None), "b": (lambda: calls.append("b") or 7,
                                                       lambda out: calls.append(f"sync{out}"))}
  timings = common.time_interleaved(fns, iters=3, warmup=1)
  assert calls == ["a", "b", "sync7",  # warm-up
                   "a", "b", "sync7", "b", "sync7", "a", "a", "b", "sync7"]
  assert timings["a"].iters == timings["b"].iters == 3 and timings["a"].warmup == 1
  with pytest.raises(ValueError):
    common.time_interleaved(fns, iters=0)


def test_racnn_benchmark_steps_update_only_their_phase_group():
  """The RA-CNN rows of train_step.py and memory.py time this step: one phase of the
  alternation with AdamW on its own group (here on the small CNN, in process)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import traverse_util

  from benchmarks.train_step import make_fgjax_step
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  batch = {"image": x, "label": jnp.array([0, 1])}
  for kind, owner in (("racnn_cls", "scale"), ("racnn_apn", "apn")):
    model, tx, step = make_fgjax_step("racnn_cnn_small", kind, 64, jnp.float32,
                                      dict(crop_size=48, apn_hidden=32))
    variables = dict(model.init(jax.random.key(1), x[:1]))
    params = variables.pop("params")
    opt = tx.init(params)
    assert sorted(opt) == ["apn", "classifiers"]
    new, _, _, loss = jax.jit(step)(params, opt, variables, batch, jax.random.key(2))
    assert np.isfinite(float(loss))
    a = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    b = traverse_util.flatten_dict(jax.device_get(new), sep="/")
    changed = {k for k in a if not np.array_equal(a[k], b[k])}
    assert changed and all(k.startswith(owner) for k in changed), (kind, sorted(changed)[:3])

"""fgjax.train.hostmem: glibc malloc keeps XLA:CPU's freed step buffers (no page faults per step).

The mechanism is checked in fresh processes (malloc options must be set before jax starts its
backend): a jitted function with a 256 MiB intermediate, which XLA allocates every call, faults
in fresh pages on every call with the system malloc and (almost) never once freed memory is
retained.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from fgjax.train import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GLIBC = hostmem.has_glibc()


def _thp_always():
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[always]" in f.read()
  except OSError:
    return False


# 256 MiB of fresh pages per call: 65,536 faults of 4 KiB (measured 65,540-65,590 here), or 128
# if the kernel backs large mappings with 2 MiB transparent huge pages.
_FRESH = 100 if _thp_always() else 30000

_PROBE = textwrap.dedent("""
    import json, os, resource, sys
    sys.path.insert(0, {root!r})
    from fgjax.train import hostmem
    early = os.environ["PROBE_WHEN"] == "early"
    done = hostmem.configure(os.environ["PROBE_MODE"]) if early else None
    import jax, jax.numpy as jnp
    x = jnp.ones((8192, 8)); w = jnp.ones((8, 8192)) / 8
    f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w)))   # a 256 MiB product, 1 GFLOP
    jax.block_until_ready(f(x, w)); jax.block_until_ready(f(x, w))
    if not early:
      done = hostmem.configure(os.environ["PROBE_MODE"])
      jax.block_until_ready(f(x, w))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
      jax.block_until_ready(f(x, w))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print("PROBE " + json.dumps({{"retained": done, "faults_per_call": faults / 4}}))
""").format(root=ROOT)


def _probe(mode, when="early"):
  env = dict(os.environ, PROBE_MODE=mode, PROBE_WHEN=when, JAX_PLATFORMS="cpu")
  for key in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "LD_PRELOAD", "GLIBC_TUNABLES"):
    env.pop(key, None)
  for key in [k for k in env if k.startswith("MALLOC_")]:  # glibc's own malloc variables
    env.pop(key)
  proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("PROBE ")][-1]
  return json.loads(line[6:]), proc.stderr


@pytest.mark.skipif(not _GLIBC, reason="glibc malloc options")
def test_retained_memory_removes_the_page_faults_of_each_step():
  system, _ = _probe("system")
  retained, _ = _probe("retain")
  assert system["retained"] is False and retained["retained"] is True
  assert system["faults_per_call"] > _FRESH, system
  assert retained["faults_per_call"] < min(100, system["faults_per_call"] / 10), (system, retained)


@pytest.mark.skipif(not _GLIBC, reason="glibc malloc options")
def test_auto_retains_on_the_cpu_and_too_late_is_a_warning_not_a_change():
  auto, _ = _probe("auto")
  assert auto["retained"] is True  # JAX_PLATFORMS=cpu
  late, err = _probe("retain", when="late")
  assert late["retained"] is False
  assert "call fgjax.train.hostmem.configure() before the first jax computation" in err
  assert late["faults_per_call"] > _FRESH  # nothing was set: the system malloc's faults


def test_modes_and_cpu_only(monkeypatch):
  with pytest.raises(ValueError, match="auto, retain, system"):
    hostmem.configure("keep")
  assert hostmem.configure("system") is False
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert hostmem.cpu_only()
  for platforms in ("cuda", "cpu,cuda", "tpu"):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert not hostmem.cpu_only()
    assert hostmem.configure("auto") is False
  assert isinstance(hostmem.accelerator_plugins(), list)

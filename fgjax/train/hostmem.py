"""Host memory on XLA:CPU: keep freed memory in the process for the next step.

XLA:CPU allocates an executable's temporary buffer (for a train step: every activation, about
1 GB for DeiT-Ti/16 at 224 and batch 16) with `malloc` when a step starts and frees it when the
step ends. glibc serves blocks that large with `mmap` and gives them back with `munmap`, so each
step touches fresh pages that the kernel must fault in and zero: measured on the 2-core build
machine, ~256,000 page faults and ~0.47 CPU-seconds of kernel time per DeiT-Ti step, about a
fifth of the step. `retain_freed_memory()` sets three glibc malloc options so that freed blocks
stay in the process and the next step reuses them (DeiT-Ti step: ~1,100 -> ~860 ms):

  M_MMAP_MAX = 0            large blocks come from the heap, not from their own mappings;
  M_TRIM_THRESHOLD = -1     the heap's free top is never handed back to the kernel;
  M_ARENA_MAX = 1           every thread allocates from the main heap (XLA's worker threads
                            would otherwise get per-thread arenas, whose heaps are capped at
                            64 MB, and map large blocks again).

It must run before jax creates its CPU backend: a thread picks its arena at its first
allocation. The costs: the process's resident memory stays at its peak instead of shrinking
between steps (a training process reaches that peak every step anyway), and with one arena
XLA's multi-threaded compiler contends for malloc, so compiling takes ~30% longer (DeiT-Ti train
step: 2.9 -> 3.9 s). That pays off after a few steps: the CPU demo (`configs/demo.py`, 400 + 400
steps of two small models) ran in 140 s instead of 170 s. Compile-bound work (the test suite)
is better off without it. Only glibc (Linux) has these options; elsewhere this is a no-op.
`configure("auto")`, which `run.py` calls first thing (`--host_memory`), applies it when jax
will run on the CPU only.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import sys

log = logging.getLogger("fgjax")

MODES = ("auto", "retain", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>
_applied = False
_OTHER_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc", "hoard", "tbbmalloc")


def has_glibc() -> bool:
  """Whether this process runs on glibc (Linux), whose malloc has these options."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (AttributeError, ValueError, OSError):
    return False


def _backends_initialized() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # noqa: BLE001 - private API; assume not yet
    return False


def accelerator_plugins() -> list[str]:
  """Installed jax accelerator plugins (CUDA/ROCm entry points or `jax_plugins.*` modules,
  libtpu), found without initialising any backend."""
  found = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
  try:
    import jax_plugins  # namespace package, present only when a plugin is installed
    found += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
  except ImportError:
    pass
  if importlib.util.find_spec("libtpu") is not None:
    found.append("libtpu")
  return sorted(set(found))


def cpu_only() -> bool:
  """Whether jax will run on the CPU only: JAX_PLATFORMS (or jax's `jax_platforms` config)
  names only "cpu", or it is unset and no accelerator plugin is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if not platforms and "jax" in sys.modules:
    try:
      import jax
      platforms = jax.config.jax_platforms or ""
    except Exception:  # noqa: BLE001
      platforms = ""
  if platforms:
    return all(p.strip() == "cpu" for p in platforms.split(",") if p.strip())
  return not accelerator_plugins()


def retain_freed_memory() -> bool:
  """Sets the glibc malloc options above; returns True if they are in effect.

  Returns False (and changes nothing) without glibc (not Linux, musl) or with another malloc
  preloaded (LD_PRELOAD; its `mallopt` accepts anything), and logs a warning and returns False
  when jax's backends already exist (too late for their threads). Idempotent."""
  global _applied
  if _applied:
    return True
  preload = os.environ.get("LD_PRELOAD", "").lower()
  if any(name in preload for name in _OTHER_ALLOCATORS):
    log.info("host memory: another malloc is preloaded (LD_PRELOAD), left as it is")
    return False
  if not has_glibc():
    log.info("host memory: not glibc, malloc left as it is")
    return False
  mallopt = ctypes.CDLL(None).mallopt
  if _backends_initialized():
    log.warning("host memory: jax's backends already exist; call fgjax.train.hostmem."
                "configure() before the first jax computation for it to take effect")
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  ok = all(mallopt(opt, val) == 1 for opt, val in ((_M_TRIM_THRESHOLD, -1),  # -1: never trim
                                                   (_M_MMAP_MAX, 0), (_M_ARENA_MAX, 1)))
  _applied = ok
  return ok


def configure(mode: str = "auto") -> bool:
  """`mode`: "auto" = retain freed memory when jax will run on the CPU only, "retain" =
  always, "system" = leave malloc as it is. Returns whether freed memory is retained."""
  if mode not in MODES:
    raise ValueError(f"host memory mode must be one of {', '.join(MODES)}; got {mode!r}")
  if mode == "system":
    return False
  if mode == "auto" and not cpu_only():
    log.info("host memory: jax may use an accelerator (JAX_PLATFORMS=%r, plugins %s), malloc "
             "left as it is", os.environ.get("JAX_PLATFORMS", ""), accelerator_plugins())
    return False
  done = retain_freed_memory()
  if done:
    log.info("host memory: freed memory is kept for reuse (glibc malloc: no mmap, no trim, "
             "one arena)")
  return done

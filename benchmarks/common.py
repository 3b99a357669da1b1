"""Shared helpers for the benchmark scripts in `benchmarks/`.

Only the standard library is imported here, so a script can import this module, configure
threads, and only then import jax / torch:

    from benchmarks import common
    info = common.configure_threads(args.threads)   # before `import jax`!
    import jax
    ...
    timing = common.time_fn(step, warmup=2, iters=10, sync=jax.block_until_ready)
    print(common.format_machine(common.describe_machine(threads=info.threads)))
    print(common.markdown_table(["pass", "ms"], [["fwd", "1.23"]]))

Contents:
  - thread control: `default_threads`, `configure_threads` (env vars + CPU affinity for XLA,
    OpenMP, MKL and PyTorch) and `set_torch_threads`;
  - timing: `time_fn` (warm-up, then per-iteration wall times; report the median) and
    `stopwatch` (one-shot timing of e.g. a compilation);
  - reporting: `describe_machine` / `format_machine` (CPU model, cores, accelerators, library
    versions, date, load), `markdown_table`, `fmt` and `write_json`;
  - accuracy evidence (`toolkit_evidence.py`, `pma_evidence.py`): `train_once` (a run, or the
    finished run a workdir already holds), `cpu_model` and `pct`.

A note on XLA's CPU thread count: `XLA_FLAGS=intra_op_parallelism_threads=N` is *not* an XLA
flag (it is a TensorFlow session option); current jaxlib accepts it silently and ignores it, and
`--xla_cpu_multi_thread_eigen` only switches between one thread and "all of them". The XLA CPU
client sizes its thread pool from the process's CPU affinity mask, so the only reliable way to
give XLA N threads is to restrict the affinity to N CPUs before jax creates its backend. That is
what `configure_threads` does (in addition to setting the conventional flags).
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Optional, Sequence

# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------


def available_cpus() -> list[int]:
  """CPUs this process may run on (its affinity mask), sorted; all CPUs where unsupported."""
  try:
    return sorted(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return list(range(os.cpu_count() or 1))


def default_threads() -> int:
  """Default thread count: the CPUs this process may use (= `os.cpu_count()` unless the
  process is already restricted, e.g. by `taskset` or a container's cpuset)."""
  return len(available_cpus())


@dataclasses.dataclass
class ThreadConfig:
  """What `configure_threads` did.

  threads: the thread count asked for (torch / OpenMP / MKL use exactly this many).
  xla_threads: the CPUs XLA's thread pool can use (= len(cpus)); equals `threads` unless more
    threads were asked for than the process has CPUs.
  cpus: the CPU ids the process is pinned to (None when the affinity was left unchanged).
  env: the environment variables that were set.
  warnings: human-readable problems (e.g. jax imported too early).
  """
  threads: int
  xla_threads: int
  cpus: Optional[list[int]]
  env: dict[str, str]
  warnings: list[str]

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _append_flags(existing: str, flags: Sequence[str]) -> str:
  """Adds each `name=value` flag to a space-separated flag string unless `name` is there."""
  parts = existing.split()
  for flag in flags:
    name = flag.split("=")[0]
    if not any(p.split("=")[0] == name for p in parts):
      parts.append(flag)
  return " ".join(parts)


def configure_threads(threads: Optional[int] = None, *, platform_name: Optional[str] = "cpu",
                      pin: bool = True) -> ThreadConfig:
  """Gives XLA (CPU), PyTorch, OpenMP and MKL the same number of threads.

  Must be called before jax (and preferably torch and numpy) are imported: XLA reads its flags
  and sizes its CPU thread pool when the backend is created, OpenMP/MKL read their variables
  when they load.

  Args:
    threads: thread count; None = `default_threads()`.
    platform_name: value for JAX_PLATFORMS ("cpu", "cuda", ...); None leaves it unset so jax
      picks its default backend. An existing JAX_PLATFORMS in the environment is kept.
    pin: restrict the process's CPU affinity to the first `threads` of its CPUs, which is what
      actually limits XLA's CPU thread pool (see the module docstring). Child processes inherit
      the mask.

  Returns:
    A `ThreadConfig`. Call `set_torch_threads(config.threads)` after importing torch.
  """
  cpus_avail = available_cpus()
  n = default_threads() if threads is None else int(threads)
  if n < 1:
    raise ValueError(f"threads must be >= 1, got {n}")
  warnings = []
  for mod in ("jax", "jaxlib", "torch"):
    if mod in sys.modules:
      warnings.append(f"{mod} was imported before configure_threads(); its thread settings "
                      "may not take effect")
  env = {}

  def setenv(key, value, override=True):
    if override or key not in os.environ:
      os.environ[key] = value
    env[key] = os.environ[key]

  if platform_name is not None:
    setenv("JAX_PLATFORMS", platform_name, override=False)
  setenv("XLA_FLAGS", _append_flags(os.environ.get("XLA_FLAGS", ""), [
      "--xla_cpu_multi_thread_eigen=true", f"intra_op_parallelism_threads={n}"]))
  for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    setenv(key, str(n))

  cpus = None
  if pin and n < len(cpus_avail):
    cpus = cpus_avail[:n]
    try:
      os.sched_setaffinity(0, cpus)
    except (AttributeError, OSError) as e:
      cpus = None
      warnings.append(f"could not pin to {n} CPUs ({e}); XLA may use all "
                      f"{len(cpus_avail)} CPUs")
  elif n > len(cpus_avail):
    warnings.append(f"{n} threads requested but only {len(cpus_avail)} CPUs available: torch "
                    f"oversubscribes, XLA uses {len(cpus_avail)}")
  xla_threads = len(cpus) if cpus is not None else len(cpus_avail)
  return ThreadConfig(threads=n, xla_threads=xla_threads, cpus=cpus, env=env,
                      warnings=warnings)


def set_torch_threads(threads: int) -> None:
  """`torch.set_num_threads(threads)` (intra-op); imports torch."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
  """Wall-clock times (seconds) of the timed iterations of one benchmark."""
  times_s: list[float]
  warmup: int = 0

  @property
  def iters(self) -> int:
    return len(self.times_s)

  @property
  def median_s(self) -> float:
    return statistics.median(self.times_s)

  @property
  def min_s(self) -> float:
    return min(self.times_s)

  @property
  def max_s(self) -> float:
    return max(self.times_s)

  @property
  def mean_s(self) -> float:
    return statistics.fmean(self.times_s)

  def ms_per_item(self, items: int) -> float:
    """Median milliseconds per item (e.g. per image) for `items` items per iteration."""
    return 1e3 * self.median_s / items

  def items_per_s(self, items: int) -> float:
    """Throughput from the median iteration time."""
    return items / self.median_s

  def as_dict(self) -> dict:
    return {"warmup": self.warmup, "iters": self.iters, "median_s": self.median_s,
            "min_s": self.min_s, "max_s": self.max_s, "mean_s": self.mean_s,
            "times_s": list(self.times_s)}


def time_fn(fn: Callable[[], Any], *, iters: int, warmup: int = 1,
            sync: Optional[Callable[[Any], Any]] = None) -> Timing:
  """Calls `fn()` `warmup` times untimed, then `iters` times timed, one timing per call.

  Args:
    fn: the work to time, called without arguments (close over the inputs).
    iters: number of timed calls (>= 1); report `Timing.median_s`.
    warmup: untimed calls first (compilation, autotuning, allocator and cache warm-up).
    sync: called with `fn()`'s result inside the timed region, to wait for asynchronous work:
      `jax.block_until_ready` for JAX, `lambda _: torch.cuda.synchronize()` for CUDA, None for
      synchronous code.
  """
  return time_interleaved({"fn": (fn, sync)}, iters=iters, warmup=warmup)["fn"]


def time_interleaved(fns: dict[str, tuple[Callable[[], Any], Optional[Callable[[Any], Any]]]],
                     *, iters: int, warmup: int = 1) -> dict[str, Timing]:
  """Like `time_fn` for several `(fn, sync)` pairs, alternating them call by call (the order
  reversed every round), so that a machine whose speed drifts (a shared VM) slows all alike.
  Returns {name: Timing}."""
  if iters < 1:
    raise ValueError(f"iters must be >= 1, got {iters}")
  names = list(fns)
  for name in names:
    fn, sync = fns[name]
    for _ in range(warmup):
      out = fn()
      if sync is not None:
        sync(out)
      del out
  times: dict[str, list[float]] = {name: [] for name in names}
  for i in range(iters):
    for name in (names if i % 2 == 0 else names[::-1]):
      fn, sync = fns[name]
      t0 = time.perf_counter()
      out = fn()
      if sync is not None:
        sync(out)
      times[name].append(time.perf_counter() - t0)
      del out
  return {name: Timing(times[name], warmup) for name in names}


def stopwatch(fn: Callable[[], Any]) -> tuple[Any, float]:
  """Runs `fn()` once; returns `(result, seconds)`. For one-off costs such as compilation."""
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------


def _cpuinfo() -> tuple[Optional[str], Optional[int]]:
  """(CPU model name, physical core count) from /proc/cpuinfo; Nones where unknown."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      text = f.read()
  except OSError:
    return None, None
  model = None
  cores = set()
  phys = core = None
  for line in text.splitlines() + [""]:
    if not line.strip():  # end of one processor's block
      if core is not None:
        cores.add((phys, core))
      phys = core = None
      continue
    key, _, value = line.partition(":")
    key, value = key.strip(), value.strip()
    if key in ("model name", "Model", "Hardware", "cpu model") and model is None and value:
      model = value
    elif key == "physical id":
      phys = value
    elif key == "core id":
      core = value
  return model, (len(cores) or None)


def cpu_flags() -> set[str]:
  """ISA feature flags of the first CPU in /proc/cpuinfo ("avx2", "avx512_bf16", "amx_bf16",
  ...; "asimd", "bf16", ... on ARM); empty where unknown."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
          return set(value.split())
  except OSError:
    pass
  return set()


def package_versions(names: Iterable[str]) -> dict[str, Optional[str]]:
  """Installed distribution versions (None when not installed), without importing them."""
  out = {}
  for name in names:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def _accelerators() -> dict[str, Any]:
  """Devices of jax / torch, only for those already imported (never imports them)."""
  out: dict[str, Any] = {}
  jax = sys.modules.get("jax")
  if jax is not None:
    try:
      devs = jax.devices()
      out["jax_backend"] = jax.default_backend()
      out["jax_devices"] = sorted({f"{d.platform}:{d.device_kind}" for d in devs})
      out["jax_device_count"] = len(devs)
    except Exception as e:  # pylint: disable=broad-except
      out["jax_backend"] = f"error: {e}"
  torch = sys.modules.get("torch")
  if torch is not None:
    out["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
      out["torch_cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
  return out


def describe_machine(threads: Optional[int] = None,
                     packages: Sequence[str] = ("jax", "jaxlib", "flax", "numpy", "torch",
                                                "timm")) -> dict[str, Any]:
  """A JSON-able description of where a benchmark ran.

  Includes CPU model, logical/physical/usable core counts, `threads` (as used by the caller),
  the 1-minute load average (high load = noisy timings), accelerators of already-imported
  jax/torch, package versions, Python, OS and the UTC date.
  """
  model, physical = _cpuinfo()
  try:
    load = os.getloadavg()
  except (AttributeError, OSError):
    load = None
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "host": platform.node(),
      "os": platform.platform(),
      "python": platform.python_version(),
      "cpu_model": model or platform.processor() or platform.machine(),
      "logical_cpus": os.cpu_count(),
      "physical_cores": physical,
      "usable_cpus": len(available_cpus()),
      "threads": threads,
      "loadavg": list(load) if load else None,
      "accelerators": _accelerators(),
      "versions": package_versions(packages),
  }


def format_machine(desc: dict[str, Any]) -> str:
  """Human-readable multi-line summary of `describe_machine()`."""
  cores = f"{desc['logical_cpus']} logical CPUs"
  if desc.get("physical_cores"):
    cores += f" / {desc['physical_cores']} physical cores"
  if desc.get("usable_cpus") != desc.get("logical_cpus"):
    cores += f", {desc['usable_cpus']} usable by this process"
  lines = [f"date:     {desc['date_utc']}",
           f"cpu:      {desc['cpu_model']} ({cores})"]
  if desc.get("threads") is not None:
    lines.append(f"threads:  {desc['threads']}")
  if desc.get("loadavg"):
    lines.append("load:     " + " ".join(f"{x:.2f}" for x in desc["loadavg"])
                 + " (1/5/15 min)")
  acc = desc.get("accelerators") or {}
  if "jax_backend" in acc:
    lines.append(f"jax:      backend {acc['jax_backend']}, devices "
                 f"{', '.join(acc.get('jax_devices', []))}")
  if acc.get("torch_cuda"):
    lines.append(f"torch:    cuda {', '.join(acc['torch_cuda'])}")
  vers = ", ".join(f"{k} {v}" for k, v in desc.get("versions", {}).items() if v)
  lines.append(f"versions: python {desc['python']}, {vers}")
  lines.append(f"os:       {desc['os']}")
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Tables and output
# --------------------------------------------------------------------------------------------


def fmt(x: Optional[float], digits: int = 3) -> str:
  """Formats a number with `digits` significant digits (at least 0 decimals); '-' for None/NaN.

  fmt(1234.5) == '1234', fmt(12.345) == '12.3', fmt(0.012345) == '0.0123'.
  """
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  if x == 0:
    return "0"
  decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))
  return f"{x:.{decimals}f}"


def _is_number(s: str) -> bool:
  s = s.strip().rstrip("x%")
  try:
    float(s)
    return True
  except ValueError:
    return False


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                   align: Optional[Sequence[str]] = None) -> str:
  """A padded GitHub-flavoured Markdown table.

  Args:
    headers: column titles.
    rows: cells (converted with `str`; format numbers beforehand, e.g. with `fmt`).
    align: per column "l" or "r"; default: right for columns whose cells are all numeric
      (a trailing 'x' or '%' allowed, '-' ignored), left otherwise.
  """
  cells = [[str(c) for c in row] for row in rows]
  ncol = len(headers)
  for row in cells:
    if len(row) != ncol:
      raise ValueError(f"row has {len(row)} cells, expected {ncol}: {row}")
  if align is None:
    align = []
    for j in range(ncol):
      col = [r[j] for r in cells if r[j] not in ("-", "")]
      align.append("r" if col and all(_is_number(c) for c in col) else "l")
  widths = [max([len(h)] + [len(r[j]) for r in cells] + [3]) for j, h in enumerate(headers)]

  def line(vals):
    out = [v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(vals, widths, align)]
    return "| " + " | ".join(out) + " |"

  sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2))
                       for w, a in zip(widths, align)) + "|"
  return "\n".join([line(headers), sep] + [line(r) for r in cells])


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON (creating parent directories)."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=False, default=str)
    f.write("\n")


# --------------------------------------------------------------------------------------------
# Accuracy evidence
# --------------------------------------------------------------------------------------------


def train_once(config, workdir: str) -> tuple[dict, float]:
  """(final metrics, seconds) of a training run; a finished run in `workdir` is read, not
  retrained (seconds NaN)."""
  from fgjax.train import trainer
  path = os.path.join(workdir, "final_metrics.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f), float("nan")
  t = time.time()
  result = trainer.train_and_evaluate(config, workdir)
  return result, time.time() - t


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo, else platform.processor())."""
  return _cpuinfo()[0] or platform.processor() or "unknown CPU"


def pct(x) -> str:
  """A fraction as a percentage with one decimal ("-" for None)."""
  return "-" if x is None else f"{100 * x:.1f}%"

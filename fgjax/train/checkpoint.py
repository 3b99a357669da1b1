"""Checkpoints with orbax: the last N, the best by validation accuracy, and data-iterator state.

Layout under the workdir:
  checkpoints/<step>/      the last `keep` train states (asynchronous orbax saves)
  best/<step>/             the best state by `val_top1` (only when a validation split exists)
  data_state/<step>/process_<i>.json   each process's input-pipeline iterator state
The train state is a plain dict pytree ({"params", "opt", "step", ...}); restoring takes an
abstract state (ShapeDtypeStructs with shardings) so arrays land sharded on the mesh.

What a failure leaves (docs/failures.md):
- A save interrupted by `kill -9` or a full disk leaves only orbax's temporary directory
  (`<step>.orbax-checkpoint-tmp*`), which the next run removes; a checkpoint directory exists only
  once its save committed. A save that fails raises `CheckpointSaveError` naming the path and,
  for a full disk, the free space.
- Restoring tries the newest checkpoint first. Before reading any array it compares the
  checkpoint's tree of shapes with the state the config builds: a mismatch is the config's
  fault, not the checkpoint's, and raises `CheckpointLayoutError` naming the first differences
  (nothing is moved). A checkpoint whose metadata or data cannot be read (bit rot, a partial
  copy) is named in a warning, moved aside to `<step>.corrupt` (never deleted) and the next
  older one is tried; `NoUsableCheckpointError` when none restores.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from fgjax.train import quiet

log = logging.getLogger("fgjax")


class CheckpointLayoutError(ValueError):
  """A checkpoint whose tree does not match the train state the config builds."""


class NoUsableCheckpointError(FileNotFoundError):
  """No checkpoint of a workdir could be restored (none exists, or every one is damaged)."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (a full disk, a read-only filesystem, ...)."""


# ----------------------------------------------------------------------------- helpers


def _is_disk_full(exc: BaseException) -> bool:
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(exc)
    if "No space left on device" in text or "os_error_code='28'" in text or \
        "Disk quota exceeded" in text:
      return True
    exc = exc.__cause__ or exc.__context__
  return False


def free_space(path: str) -> str:
  """Free space on the filesystem of `path` (or its nearest existing parent), e.g. '12.3 MiB'."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    free = shutil.disk_usage(path).free
  except OSError:
    return "unknown"
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if free < 1024 or unit == "TiB":
      return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
    free /= 1024.0
  raise AssertionError("unreachable")


def save_error(path: str, exc: BaseException) -> CheckpointSaveError:
  """A `CheckpointSaveError` for a failed write of `path`, naming the free space on a full disk."""
  first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
  if _is_disk_full(exc):
    return CheckpointSaveError(
        f"no space left on the device while saving {path} ({free_space(path)} free there); "
        f"the checkpoints saved before are intact: free some space and rerun the same command "
        f"to resume from the newest of them")
  return CheckpointSaveError(f"could not save {path}: {first}")


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _shapes(tree) -> dict[tuple, tuple]:
  """{path of names: shape} of a tree's array leaves (None leaves, e.g. empty optax states,
  are not stored and not compared)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if leaf is None:
      continue
    out[tuple(_key_name(k) for k in path)] = tuple(getattr(leaf, "shape", ()) or ())
  return out


def layout_differences(stored, wanted, limit: int = 4) -> list[str]:
  """The first `limit` differences between a checkpoint's tree metadata and an abstract state:
  missing or extra arrays and shape changes, as readable lines."""
  a, b = _shapes(stored), _shapes(wanted)
  diffs = []
  for k in sorted(set(a) | set(b), key=lambda k: (k[:1] != ("params",), k)):  # params first
    name = ".".join(k)
    if k not in a:
      diffs.append(f"{name}: not in the checkpoint (the config builds {list(b[k])})")
    elif k not in b:
      diffs.append(f"{name}: in the checkpoint {list(a[k])}, not built by the config")
    elif a[k] != b[k]:
      diffs.append(f"{name}: stored {list(a[k])}, the config builds {list(b[k])}")
  if len(diffs) > limit:
    diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
  return diffs


def move_aside(path: str) -> str:
  """Renames a damaged checkpoint directory to `<path>.corrupt` (`.corrupt.<n>` if taken)."""
  target, n = path + ".corrupt", 1
  while os.path.exists(target):
    target, n = f"{path}.corrupt.{n}", n + 1
  os.rename(path, target)
  return target


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    quiet.install()
    self.workdir = os.path.abspath(workdir)
    opts = dict(create=True, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True)
    handler = ocp.StandardCheckpointHandler()
    self.last = ocp.CheckpointManager(
        os.path.join(self.workdir, "checkpoints"), item_handlers=handler,
        options=ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), **opts))
    self.best = ocp.CheckpointManager(
        os.path.join(self.workdir, "best"), item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m["val_top1"], best_mode="max", **opts))
    self.data_dir = os.path.join(self.workdir, "data_state")
    self._pending = {}  # id(manager) -> step of its last save started

  # ------------------------------------------------------------------ saving
  def _save_data_state(self, step: int, data_state: Any):
    if data_state is None:
      return
    d = os.path.join(self.data_dir, str(step))
    path = os.path.join(d, f"process_{jax.process_index()}.json")
    if isinstance(data_state, bytes):
      data_state = {"bytes": data_state.decode("utf-8")}
    try:
      os.makedirs(d, exist_ok=True)
      with open(path + ".tmp", "w") as f:
        json.dump(data_state, f)
      os.replace(path + ".tmp", path)
    except OSError as e:
      raise save_error(path, e) from e

  def _prune_data_state(self, keep_steps):
    if jax.process_index() != 0 or not os.path.isdir(self.data_dir):
      return
    keep = {str(s) for s in keep_steps}
    for name in os.listdir(self.data_dir):
      if name not in keep:
        shutil.rmtree(os.path.join(self.data_dir, name), ignore_errors=True)

  def _guarded(self, mgr, step, fn):
    """Runs an orbax save or wait; a failure of this or an earlier asynchronous save becomes
    a `CheckpointSaveError` naming the step whose save failed."""
    try:
      return fn()
    except CheckpointSaveError:
      raise
    except Exception as e:  # orbax raises what TensorStore raised: ValueError, OSError, ...
      failed = self._pending.get(id(mgr), step)
      where = os.path.join(str(mgr.directory), str(failed) if failed is not None else "")
      raise save_error(where.rstrip(os.sep), e) from e

  def check(self):
    """Raises `CheckpointSaveError` if an asynchronous save has failed (the loop calls this at
    each log point, so a full disk stops the run soon after, not at the next save).

    Orbax's own finalisation may take the error first (it logs it and skips the commit), so a
    finished save whose step directory never appeared counts as failed too.
    """
    for mgr in (self.last, self.best):
      self._guarded(mgr, None, mgr.check_for_errors)
      step = self._pending.get(id(mgr))
      if step is None or mgr.is_saving_in_progress():
        continue
      del self._pending[id(mgr)]
      mgr.reload()
      if step not in mgr.all_steps():
        path = os.path.join(str(mgr.directory), str(step))
        raise CheckpointSaveError(
            f"the asynchronous save of {path} failed ({free_space(path)} free there; the "
            f"cause is logged above, e.g. no space left on the device); the checkpoints saved "
            f"before are intact: fix the cause and rerun the same command to resume from the "
            f"newest of them")

  def save(self, step: int, state, data_state=None, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` at `step` (no-op if that step exists)."""
    if step in self.last.all_steps():
      return False
    self.check()
    self._save_data_state(step, data_state)
    saved = self._guarded(self.last, step, lambda: self.last.save(
        step, args=ocp.args.StandardSave(state), force=force))
    self._pending[id(self.last)] = step
    self._prune_data_state(set(self.last.all_steps()) | set(self.best.all_steps()) | {step})
    return saved

  def save_best(self, step: int, state, val_top1: float, data_state=None):
    self.check()
    self._save_data_state(step, data_state)
    self._guarded(self.best, step, lambda: self.best.save(
        step, args=ocp.args.StandardSave(state), metrics={"val_top1": float(val_top1)},
        force=True))
    self._pending[id(self.best)] = step
    if jax.process_index() == 0:
      path = os.path.join(self.workdir, "best", "best.json")
      try:
        with open(path + ".tmp", "w") as f:
          json.dump({"step": int(step), "val_top1": float(val_top1)}, f)
        os.replace(path + ".tmp", path)
      except OSError as e:
        raise save_error(path, e) from e

  def best_value(self, default: float = -1.0) -> float:
    """Validation top-1 of the best checkpoint so far (survives restarts): the metric orbax
    committed with that checkpoint, so a save cut short by a crash never counts (best.json
    is a readable copy for people, written when the save starts)."""
    step = self.best.best_step()
    if step is None:
      return default
    try:
      return float(self.best.metrics(step)["val_top1"])
    except Exception:  # noqa: BLE001 (metrics unreadable: the next evaluation decides)
      log.warning("the metrics of %s/%d are unreadable: the best validation accuracy so far "
                  "is taken as unknown", self.best.directory, step)
      return default

  def wait(self):
    self._guarded(self.last, None, self.last.wait_until_finished)
    self._guarded(self.best, None, self.best.wait_until_finished)
    self.check()

  def close(self):
    try:
      self.wait()
    finally:
      for mgr in (self.last, self.best):
        try:
          mgr.close()
        except Exception:  # already reported by wait(); closing must not mask it
          pass

  # ------------------------------------------------------------------ restoring
  def latest_step(self) -> int | None:
    return self.last.latest_step()

  def best_step(self) -> int | None:
    return self.best.best_step()

  def has_checkpoint(self) -> bool:
    return bool(self.last.all_steps() or self.best.all_steps())

  def _candidates(self, which: str):
    """(manager, kind, step), newest first: `which`'s own checkpoints, then the other kind's."""
    own = [(self.best, "best", s) for s in sorted(self.best.all_steps(), reverse=True)]
    last = [(self.last, "last", s) for s in sorted(self.last.all_steps(), reverse=True)]
    if which == "best":
      return own + last
    return sorted(last + own, key=lambda c: (-c[2], c[1] != "last"))

  def _restore_one(self, mgr, step, abstract_state):
    where = os.path.join(str(mgr.directory), str(step))
    try:
      stored = mgr.item_metadata(step)
      stored = getattr(stored, "tree", stored)
      if stored is None:
        raise ValueError("no tree metadata")
    except Exception as e:
      raise _Damaged(where, e) from e
    diffs = layout_differences(stored, abstract_state)
    if diffs:
      raise CheckpointLayoutError(
          f"{where} does not fit the state this config builds (another model, method or "
          f"optimizer than the run that wrote it, or an fgjax from before the method "
          f"protocol): " + "; ".join(diffs))
    try:
      return mgr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # TensorStore's read errors are plain Exceptions
      raise _Damaged(where, e) from e

  def restore(self, abstract_state, step: int | None = None, which: str = "last",
              with_data_state: bool = True):
    """Restores a state; returns (state, data_state, step, kind).

    With `step`, exactly that checkpoint of `which` ("last" or "best"). Without, the newest
    checkpoint that restores: for "last" the newest of checkpoints/ and best/, for "best" the
    best one, then the last ones newest first. A damaged checkpoint is moved aside to
    `<step>.corrupt` with a warning and the next is tried; `CheckpointLayoutError` (the
    config's fault) stops at once; `NoUsableCheckpointError` when nothing restores. With
    `with_data_state`, a checkpoint whose data-iterator state is unreadable counts as unusable
    (its arrays are kept, the state file is moved aside) and the next older pair is tried.
    """
    if step is not None:
      mgr = self.best if which == "best" else self.last
      candidates = [(mgr, which, int(step))]
    else:
      candidates = self._candidates(which)
    if not candidates:
      raise NoUsableCheckpointError(f"no checkpoint in {self.workdir}/checkpoints or "
                                    f"{self.workdir}/best")
    damaged, unpaired = [], set()
    for mgr, kind, s in candidates:
      if s in unpaired:  # that step's data-iterator state is gone: no exact resume from it
        continue
      try:
        state = self._restore_one(mgr, s, abstract_state)
      except _Damaged as e:
        moved = e.where
        if jax.process_index() == 0 and os.path.isdir(e.where):
          moved = move_aside(e.where)
        log.warning("checkpoint %s cannot be read (%s): moved aside to %s; trying the next "
                    "older one", e.where, e.reason, moved)
        damaged.append(e.where)
        mgr.reload()
        continue
      try:
        data = self.load_data_state(s) if with_data_state else None
      except _Damaged as e:  # no exact resume from it: the pair goes aside as one
        ckpt_dir = os.path.join(str(mgr.directory), str(s))
        if jax.process_index() == 0:
          move_aside(e.where)
          move_aside(ckpt_dir)
        log.warning("the data-iterator state of %s cannot be read (%s): both moved aside as "
                    "*.corrupt; trying the next older checkpoint", ckpt_dir, e.reason)
        damaged.append(ckpt_dir)
        unpaired.add(s)
        mgr.reload()
        continue
      if damaged:
        log.warning("restored %s/%d instead of the damaged %s", mgr.directory, s,
                    ", ".join(damaged))
      return state, data, s, kind
    raise NoUsableCheckpointError(
        f"no checkpoint of {self.workdir} could be restored: {', '.join(damaged)} "
        f"{'is' if len(damaged) == 1 else 'are'} damaged (moved aside as *.corrupt)")

  def load_data_state(self, step: int):
    path = os.path.join(self.data_dir, str(step), f"process_{jax.process_index()}.json")
    if not os.path.exists(path):
      return None
    try:
      with open(path) as f:
        data = json.load(f)
    except (OSError, ValueError) as e:
      raise _Damaged(path, e) from e
    if isinstance(data, dict) and set(data) == {"bytes"}:
      return data["bytes"].encode("utf-8")
    return data


class _Damaged(Exception):
  """A checkpoint whose metadata or data cannot be read."""

  def __init__(self, where: str, cause: BaseException):
    self.where = where
    self.reason = _innermost_message(cause)
    super().__init__(f"{where}: {self.reason}")


def _innermost_message(exc: BaseException) -> str:
  """The first line of the deepest cause (TensorStore's own error, e.g. a ZSTD decompression
  failure, under orbax's generic "Encountered error while reading array index")."""
  seen = []
  while exc is not None and exc not in seen:
    seen.append(exc)
    exc = exc.__cause__ or exc.__context__
  for e in reversed(seen):
    text = str(e).strip()
    if text:
      return text.splitlines()[0][:240]
  return type(seen[-1]).__name__


def restore_params_from_workdir(workdir: str, abstract_state, prefer: str = "best"):
  """Restores the state a finished run selected: its best checkpoint if it has one, else the
  newest last one (a damaged checkpoint is moved aside and the next tried). Returns
  (state, step, which)."""
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    state, _, step, which = ckpt.restore(abstract_state, which=prefer, with_data_state=False)
    return state, step, which
  finally:
    ckpt.close()

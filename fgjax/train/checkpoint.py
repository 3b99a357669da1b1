"""Checkpoints with orbax: the last N, the best by validation accuracy, and data-iterator state.

Layout under the workdir:
  checkpoints/<step>/      the last `keep` train states (asynchronous orbax saves)
  best/<step>/             the best state by `val_top1` (only when a validation split exists)
  data_state/<step>/process_<i>.json   each process's input-pipeline iterator state
  data_state/<step>/crops.process_<i>.npz   the attention-region crop boxes in use at that
                           step (`fgjax.toolkit.crops`; only with `crop.enabled`), so a resumed
                           run crops by the same boxes; deleted with the step's checkpoints
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
  older one is tried; `NoUsableCheckpointError` when none restores. A read that fails for a
  reason of the machine (out of memory, permissions) raises `CheckpointReadError` and moves
  nothing. Readers (`read_only=True`: eval, predict, ...) create and clean up nothing, so they
  can run beside a training run.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fgjax.train import quiet

log = logging.getLogger("fgjax")


class CheckpointLayoutError(ValueError):
  """A checkpoint whose tree does not match the train state the config builds."""


class NoUsableCheckpointError(FileNotFoundError):
  """No checkpoint of a workdir could be restored (none exists, or every one is damaged)."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (a full disk, a read-only filesystem, ...)."""


class CheckpointReadError(RuntimeError):
  """A checkpoint could not be read for a reason that is not damage to its files (out of
  memory, permissions, an unavailable filesystem): nothing is moved aside."""


# Errors of the machine, not of the files: moving the checkpoint aside would not help, and the
# same error would condemn every older checkpoint too.
_NOT_DAMAGE = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
               "CANCELLED", "UNAUTHENTICATED", "Permission denied", "out of memory",
               "Out of memory", "Stale file handle")
_NOT_DAMAGE_ERRNOS = (errno.EACCES, errno.EPERM, errno.ENOMEM, errno.EIO, errno.ESTALE,
                      errno.ETIMEDOUT, errno.EAGAIN)


def _causes(exc: BaseException | None):
  """`exc` and the exceptions it was raised from (`__cause__`, else `__context__`), outermost
  first, each once."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__


def is_damage(exc: BaseException) -> bool:
  """Whether a failed read means the checkpoint's files are damaged (undecodable data,
  missing or truncated files), rather than a problem of the machine."""
  for e in _causes(exc):
    if isinstance(e, MemoryError):
      return False
    if isinstance(e, OSError) and e.errno in _NOT_DAMAGE_ERRNOS:
      return False
    if any(marker in str(e) for marker in _NOT_DAMAGE):
      return False
  return True


# ----------------------------------------------------------------------------- helpers


def _is_disk_full(exc: BaseException) -> bool:
  for e in _causes(exc):
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(e)
    if "No space left on device" in text or "os_error_code='28'" in text or \
        "Disk quota exceeded" in text:
      return True
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


def _shapes(tree) -> dict[str, tuple]:
  """{dotted path: shape} of a tree's array leaves (None leaves, e.g. empty optax states, are
  not stored and not compared)."""
  return {jax.tree_util.keystr(path, simple=True, separator="."):
          tuple(getattr(leaf, "shape", ()) or ())
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if leaf is not None}


def layout_differences(stored, wanted, limit: int = 4) -> list[str]:
  """The first `limit` differences between a checkpoint's tree metadata and an abstract state:
  missing or extra arrays and shape changes, as readable lines."""
  a, b = _shapes(stored), _shapes(wanted)
  diffs = []
  for k in sorted(set(a) | set(b), key=lambda k: (not k.startswith("params."), k)):  # params
    if k not in a:                                                                    # first
      diffs.append(f"{k}: not in the checkpoint (the config builds {list(b[k])})")
    elif k not in b:
      diffs.append(f"{k}: in the checkpoint {list(a[k])}, not built by the config")
    elif a[k] != b[k]:
      diffs.append(f"{k}: stored {list(a[k])}, the config builds {list(b[k])}")
  if len(diffs) > limit:
    diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
  return diffs


def move_aside(path: str) -> str | None:
  """Renames a damaged checkpoint (a directory or a file) to `<path>.corrupt` (`.corrupt.<n>`
  if taken); returns the new name, or None (with a warning) where renaming fails, e.g. on a
  read-only filesystem. Only process 0 renames."""
  if jax.process_index() != 0 or not os.path.exists(path):
    return None
  target, n = path + ".corrupt", 1
  while os.path.exists(target):
    target, n = f"{path}.corrupt.{n}", n + 1
  try:
    os.rename(path, target)
  except OSError as e:
    log.warning("could not move %s aside (%s): it stays in place and is skipped", path, e)
    return None
  return target


def _agree(status: int) -> int:
  """The worst of every process's status for one restore attempt (0 restored, 1 damaged,
  2 not damage): all processes take the same branch, so none resumes alone or waits alone."""
  if jax.process_count() == 1:
    return status
  import numpy as np
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.array([status], np.int32))))


def _barrier(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    """`read_only` (eval, predict and the other modes, which may run beside a training run):
    creates nothing and leaves orbax's temporary directories of a save in progress alone."""
    quiet.install()
    self.workdir = os.path.abspath(workdir)
    if read_only:
      opts = dict(create=False, read_only=True, cleanup_tmp_directories=False,
                  enable_async_checkpointing=False)
    else:  # a partial save left by a killed run is removed here
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
    self._on_commit = []  # callbacks run once the next save has committed

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

  def _crops_path(self, step: int) -> str:
    return os.path.join(self.data_dir, str(step), f"crops.process_{jax.process_index()}.npz")

  def _save_crops(self, step: int, crops: dict | None):
    """Writes the crop arrays in use at `step` ({name: array}) beside its data state."""
    if crops is None:
      return
    path = self._crops_path(step)
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path + ".tmp", "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in crops.items()})
      os.replace(path + ".tmp", path)
    except OSError as e:
      raise save_error(path, e) from e

  def load_crops(self, step: int) -> dict | None:
    """The crop arrays saved with the checkpoint of `step` ({name: array}), None where there
    are none; an unreadable file is named in a warning and counts as none (the trainer then
    computes the crops again)."""
    path = self._crops_path(step)
    if not os.path.exists(path):
      return None
    try:
      with np.load(path) as f:
        return {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001 (a truncated or damaged file: zip or pickle errors)
      log.warning("the crop boxes %s cannot be read (%s): they are computed again", path, e)
      return None

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
      callbacks, self._on_commit = self._on_commit, []
      for fn in callbacks:
        fn()

  def when_committed(self, fn):
    """Runs `fn()` once the next checkpoint save has committed (the trainer writes a changed
    config.json then, so it never describes checkpoints that do not exist)."""
    self._on_commit.append(fn)

  def moved_aside(self) -> list[str]:
    """Checkpoint directories that a restore moved aside as damaged (`<step>.corrupt*`)."""
    out = []
    for mgr in (self.last, self.best):
      d = str(mgr.directory)
      if os.path.isdir(d):
        out += sorted(os.path.join(d, n) for n in os.listdir(d) if ".corrupt" in n)
    return out

  def save(self, step: int, state, data_state=None, force: bool = False,
           crops: dict | None = None) -> bool:
    """Starts an asynchronous save of `state` at `step` (no-op if that step exists), with the
    data-iterator state and the crop arrays in use (`crops`, {name: array}) beside it."""
    if step in self.last.all_steps():
      return False
    self.check()
    self._save_data_state(step, data_state)
    self._save_crops(step, crops)
    saved = self._guarded(self.last, step, lambda: self.last.save(
        step, args=ocp.args.StandardSave(state), force=force))
    if saved:
      self._pending[id(self.last)] = step
    self._prune_data_state(set(self.last.all_steps()) | set(self.best.all_steps()) | {step})
    return saved

  def save_best(self, step: int, state, val_top1: float, data_state=None,
                crops: dict | None = None):
    self.check()
    self._save_data_state(step, data_state)
    self._save_crops(step, crops)
    if self._guarded(self.best, step, lambda: self.best.save(
        step, args=ocp.args.StandardSave(state), metrics={"val_top1": float(val_top1)},
        force=True)):
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
      raise _Unreadable(where, e) from e
    diffs = layout_differences(stored, abstract_state)
    if diffs:
      raise CheckpointLayoutError(
          f"{where} does not fit the state this config builds (another model, method or "
          f"optimizer than the run that wrote it, or an fgjax from before the method "
          f"protocol): " + "; ".join(diffs))
    try:
      return mgr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # TensorStore's read errors are plain Exceptions
      raise _Unreadable(where, e) from e

  def _attempt(self, mgr, step, abstract_state, with_data_state):
    """(status, state, data, error): status 0 restored, 1 damaged, 2 unreadable for a reason
    that is not damage. Layout errors raise (every process sees the same metadata)."""
    try:
      state = self._restore_one(mgr, step, abstract_state)
      data = self.load_data_state(step) if with_data_state else None
    except _Unreadable as e:
      return (1 if e.damage else 2), None, None, e
    return 0, state, data, None

  def restore(self, abstract_state, step: int | None = None, which: str = "last",
              with_data_state: bool = True):
    """Restores a state; returns (state, data_state, step, kind).

    With `step`, exactly that checkpoint of `which` ("last" or "best"). Without, the newest
    checkpoint that restores: for "last" the newest of checkpoints/ and best/, for "best" the
    best one, then the last ones newest first. A damaged checkpoint (undecodable data, missing
    files; with `with_data_state`, an unreadable data-iterator state too) is moved aside to
    `<step>.corrupt` with a warning, together with the other checkpoint of that step, and the
    next is tried. `CheckpointLayoutError` (the config's fault) stops at once, as does
    `CheckpointReadError` (out of memory, permissions: not the files' fault, nothing moved);
    `NoUsableCheckpointError` when nothing restores. Every process takes the same decision.
    """
    if step is not None:
      mgr = self.best if which == "best" else self.last
      candidates = [(mgr, which, int(step))]
    else:
      candidates = self._candidates(which)
    if not candidates:
      raise NoUsableCheckpointError(f"no checkpoint in {self.workdir}/checkpoints or "
                                    f"{self.workdir}/best")
    damaged, skipped = [], set()
    for mgr, kind, s in candidates:
      if s in skipped:
        continue
      status, state, data, err = self._attempt(mgr, s, abstract_state, with_data_state)
      agreed = _agree(status)
      if agreed == 0:
        if damaged:
          log.warning("restored %s/%d instead of the damaged %s", mgr.directory, s,
                      ", ".join(damaged))
        return state, data, s, kind
      where = err.where if err is not None else os.path.join(str(mgr.directory), str(s))
      reason = err.reason if err is not None else "another process could not read it"
      if agreed == 2:
        raise CheckpointReadError(
            f"{where} could not be read ({reason}); that is not damage to its files, so "
            f"nothing was moved: fix the cause and rerun")
      # Damaged: the checkpoint goes aside. An unreadable data-iterator state is shared by the
      # step's checkpoints (last and best): the state file and both go aside as one.
      step_dir = os.path.join(str(mgr.directory), str(s))
      data_path = os.path.join(self.data_dir, str(s), f"process_{jax.process_index()}.json")
      to_move = [step_dir]
      if err is not None and err.where == data_path:
        to_move = [data_path] + [os.path.join(str(m.directory), str(s))
                                 for m in (self.last, self.best)]
        skipped.add(s)
      moved = [m for m in (move_aside(p) for p in to_move) if m]
      _barrier(f"fgjax_checkpoint_moved_aside_{kind}_{s}")
      log.warning("checkpoint %s cannot be read (%s): %s; trying the next older one", where,
                  reason, "moved aside to " + ", ".join(moved) if moved else "skipped")
      damaged.append(where)
      for m in (self.last, self.best):
        m.reload()
    raise NoUsableCheckpointError(
        f"no checkpoint of {self.workdir} could be restored: {', '.join(damaged)} "
        f"{'is' if len(damaged) == 1 else 'are'} damaged (moved aside as *.corrupt; "
        f"docs/failures.md says how to recover)")

  def load_data_state(self, step: int):
    path = os.path.join(self.data_dir, str(step), f"process_{jax.process_index()}.json")
    if not os.path.exists(path):
      return None
    try:
      with open(path) as f:
        data = json.load(f)
    except (OSError, ValueError) as e:
      raise _Unreadable(path, e) from e
    if isinstance(data, dict) and set(data) == {"bytes"}:
      return data["bytes"].encode("utf-8")
    return data


class _Unreadable(Exception):
  """A checkpoint (or its data-iterator state) whose metadata or data cannot be read;
  `damage` says whether its files are at fault (`is_damage`)."""

  def __init__(self, where: str, cause: BaseException):
    self.where = where
    self.reason = _innermost_message(cause)
    self.damage = is_damage(cause)
    super().__init__(f"{where}: {self.reason}")


def _innermost_message(exc: BaseException) -> str:
  """The first line of the deepest cause (TensorStore's own error, e.g. a ZSTD decompression
  failure, under orbax's generic "Encountered error while reading array index")."""
  chain = list(_causes(exc))
  for e in reversed(chain):
    text = str(e).strip()
    if text:
      return text.splitlines()[0][:240]
  return type(chain[-1]).__name__


def restore_params_from_workdir(workdir: str, abstract_state, prefer: str = "best"):
  """Restores the state a finished run selected: its best checkpoint if it has one, else the
  newest last one (a damaged checkpoint is moved aside and the next tried). Returns
  (state, step, which)."""
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    state, _, step, which = ckpt.restore(abstract_state, which=prefer, with_data_state=False)
    return state, step, which
  finally:
    ckpt.close()

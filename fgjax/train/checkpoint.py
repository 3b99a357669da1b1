"""Checkpoints with orbax: the last N, the best by validation accuracy, and data-iterator state.

Layout under the workdir:
  checkpoints/<step>/      the last `keep` train states (asynchronous orbax saves)
  best/<step>/             the best state by `val_top1` (only when a validation split exists)
  data_state/<step>/process_<i>.json   each process's input-pipeline iterator state
The train state is a plain dict pytree ({"params", "opt", "step", ...}); restoring takes an
abstract state (ShapeDtypeStructs with shardings) so arrays land sharded on the mesh.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointLayoutError(ValueError):
  """A checkpoint whose tree does not match the train state the config builds."""


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    opts = dict(create=True, enable_async_checkpointing=async_save)
    self.last = ocp.CheckpointManager(
        os.path.join(self.workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), **opts))
    self.best = ocp.CheckpointManager(
        os.path.join(self.workdir, "best"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m["val_top1"], best_mode="max", **opts))
    self.data_dir = os.path.join(self.workdir, "data_state")

  # ------------------------------------------------------------------ saving
  def _save_data_state(self, step: int, data_state: Any):
    if data_state is None:
      return
    d = os.path.join(self.data_dir, str(step))
    os.makedirs(d, exist_ok=True)
    if isinstance(data_state, bytes):
      data_state = {"bytes": data_state.decode("utf-8")}
    path = os.path.join(d, f"process_{jax.process_index()}.json")
    with open(path + ".tmp", "w") as f:
      json.dump(data_state, f)
    os.replace(path + ".tmp", path)

  def _prune_data_state(self, keep_steps):
    if jax.process_index() != 0 or not os.path.isdir(self.data_dir):
      return
    keep = {str(s) for s in keep_steps}
    for name in os.listdir(self.data_dir):
      if name not in keep:
        shutil.rmtree(os.path.join(self.data_dir, name), ignore_errors=True)

  def save(self, step: int, state, data_state=None, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` at `step` (no-op if that step exists)."""
    if step in self.last.all_steps():
      return False
    self._save_data_state(step, data_state)
    saved = self.last.save(step, args=ocp.args.StandardSave(state), force=force)
    self._prune_data_state(set(self.last.all_steps()) | set(self.best.all_steps()) | {step})
    return saved

  def save_best(self, step: int, state, val_top1: float, data_state=None):
    self._save_data_state(step, data_state)
    self.best.save(step, args=ocp.args.StandardSave(state), metrics={"val_top1": float(val_top1)},
                   force=True)
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, "best", "best.json"), "w") as f:
        json.dump({"step": int(step), "val_top1": float(val_top1)}, f)

  def best_value(self, default: float = -1.0) -> float:
    """Validation top-1 of the best checkpoint so far (survives restarts)."""
    path = os.path.join(self.workdir, "best", "best.json")
    if self.best.best_step() is None or not os.path.exists(path):
      return default
    with open(path) as f:
      return float(json.load(f)["val_top1"])

  def wait(self):
    self.last.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.wait()
    self.last.close()
    self.best.close()

  # ------------------------------------------------------------------ restoring
  def latest_step(self) -> int | None:
    return self.last.latest_step()

  def best_step(self) -> int | None:
    return self.best.best_step()

  def restore(self, abstract_state, step: int | None = None, which: str = "last"):
    """Restores a state; `which` is "last" or "best". Returns (state, data_state, step)."""
    mgr = self.best if which == "best" else self.last
    if step is None:
      step = mgr.best_step() if which == "best" else mgr.latest_step()
    if step is None:
      raise FileNotFoundError(f"no {which} checkpoint in {self.workdir}")
    try:
      state = mgr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except (ValueError, KeyError, TypeError) as e:
      where = os.path.join(mgr.directory, str(step))
      raise CheckpointLayoutError(
          f"{where}: the checkpoint does not fit the state this config builds (another model "
          f"or method, or written by an fgjax before the method protocol, whose optimizer "
          f"state was not keyed by optimizer name): {str(e).splitlines()[0][:300]}") from e
    return state, self.load_data_state(step), step

  def load_data_state(self, step: int):
    path = os.path.join(self.data_dir, str(step), f"process_{jax.process_index()}.json")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      data = json.load(f)
    if isinstance(data, dict) and set(data) == {"bytes"}:
      return data["bytes"].encode("utf-8")
    return data


def restore_params_from_workdir(workdir: str, abstract_state, prefer: str = "best"):
  """Restores the state a finished run selected: its best checkpoint if it has one, else the
  last. Returns (state, step, which)."""
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    order = ("best", "last") if prefer == "best" else ("last", "best")
    for which in order:
      step = ckpt.best_step() if which == "best" else ckpt.latest_step()
      if step is not None:
        state, _, step = ckpt.restore(abstract_state, step, which)
        return state, step, which
    raise FileNotFoundError(f"no checkpoint found in {workdir}/checkpoints or {workdir}/best")
  finally:
    ckpt.close()

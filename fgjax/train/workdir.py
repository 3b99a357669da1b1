"""The workdir guard: a run never replaces the record of the run a workdir already holds.

`check(config, workdir, helpers)` runs before a training run writes anything. It compares the
config with the workdir's `config.json` (after the same resolution the run will apply: the
method's helpers, e.g. a teacher trained first into `<workdir>/teacher`, `Helper.resolve_config`;
keys ending in `_resolved` are what a run derives from its data and are not compared):
- no `config.json` (a new or empty workdir): a fresh run;
- the same config: a resume;
- a key that fgjax added later (`ADDED`), absent from `config.json`, counts as holding the value
  that does what fgjax did without it;
- only keys in `RESUMABLE` differ (a longer `total_steps`, other log, eval or checkpoint
  intervals, worker counts, a moved dataset folder, the decoding backend or draft decoding,
  which change images by a few levels of uint8, not what they show; the ViT attention path
  and its block size, the same function within float rounding; the pseudo-label mode's
  settings, which training does not read): a resume, each change logged (`eval.tta` is not
  one: validation under another preset would pick the best checkpoint on other numbers);
- any other key differs, the data has other class names (another dataset under the same
  name or folder), or the pseudo-label file (`data.pseudo_labels`) holds other rows than when
  the run started (its sha256, `pseudo_labels_sha256_resolved`): `WorkdirError` listing the
  keys (old -> new) and the two ways forward, unless `config.resume_with_changes=True`, which
  resumes with the new config and keeps the old file as `config.<n>.json`.
A run that a helper trains first (a teacher in `<workdir>/teacher`, `Helper.runs_first`) is
checked the same way against its own workdir.
A directory that holds files but no fgjax run (no config.json, checkpoints/ or teacher/) is
refused too. The guard writes the new `config.json` only through `Guard.commit()`, which the
trainer calls once the state is created (a new workdir) or, for a changed config, once the
run's first checkpoint has committed: a run that fails earlier leaves the old file as it was.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import logging
import os
import re
import shutil
from typing import Any, Sequence

import jax

log = logging.getLogger("fgjax")

RESUMABLE = ("total_steps", "total_epochs", "total_examples", "log_every_*", "eval_every_*",
             "checkpoint_every_*", "keep_checkpoints", "eval_batch_size", "visualize_examples",
             "data.worker_count", "data.prefetch", "data.data_dir", "data.text_dir", "data.backend",
             "data.draft_decode", "model.kwargs.attention_impl", "model.kwargs.attention_chunk",
             "pseudo_label.*")
IGNORED = ("*_resolved", "resume_with_changes")
# Keys added to the config after runs were saved without them, each with the value that does
# what fgjax did before the key existed: a config.json without the key compares as holding it,
# so a run saved by an earlier fgjax resumes.
ADDED = {"eval.tta": "none", "data.pseudo_labels": "", "model.kwargs.attn": None,
         "pseudo_label.threshold": 0.9, "pseudo_label.max_per_class": 0,
         "crop.enabled": False, "crop.kind": "random_box", "crop.start_epoch": 1,
         "crop.every_epochs": 1, "crop.map": "auto", "crop.threshold": 0.5,
         "crop.threshold_of": "max", "crop.box_size": [0.6, 0.6], "crop.num_boxes": 32,
         "data.text_dir": "", "data.allow_missing_text": False, "data.text.enabled": False,
         "data.text.max_phrases": 16, "data.text.max_words": 6,
         "data.text.train_sentences": "sample", "data.text.eval_sentences": "all",
         "data.text.min_count": 1, "data.text.vocab": "", "data.text.train_drop": 0.0}
_FGJAX_ENTRIES = ("config.json", "checkpoints", "teacher")
_MAX_LISTED = 12


class WorkdirError(ValueError):
  """A workdir that holds another run's config, or something that is not an fgjax run."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict) and tree:
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _matches(key: str, patterns: Sequence[str], any_part: bool = False) -> bool:
  """Whether `key` (dotted) matches a pattern; with `any_part`, whether one of its components
  does (a key inside an ignored section)."""
  names = key.split(".") if any_part else [key]
  return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def as_json(config) -> dict:
  """A config as the plain JSON-compatible dict that `config.json` stores."""
  return json.loads(config.to_json_best_effort())


def differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
  """(key, old value, new value) of every compared key that differs; a key absent on one side
  shows as `<unset>`, or as its `ADDED` value when the old side lacks it."""
  a, b = _flatten(old), _flatten(new)
  added = {k: v for k, v in ADDED.items() if k not in a and k in b}
  for key in added:  # an empty section the added key now fills ("kwargs": {})
    parts = key.split(".")
    for i in range(1, len(parts)):
      if a.get(".".join(parts[:i])) == {}:
        del a[".".join(parts[:i])]
  a.update(added)
  out = []
  for key in sorted(set(a) | set(b)):
    if _matches(key, IGNORED, any_part=True):
      continue
    va, vb = a.get(key, "<unset>"), b.get(key, "<unset>")
    if va != vb:
      out.append((key, va, vb))
  return out


def _show(value) -> str:
  text = value if value == "<unset>" else json.dumps(value)
  return text if len(text) <= 60 else text[:57] + "..."


def _names(names) -> str:
  shown = ", ".join(map(str, names[:3])) + (", ..." if len(names) > 3 else "")
  return f"{len(names)} classes ({shown})"


def read_saved(workdir: str) -> dict:
  """The dict a run saved as `<workdir>/config.json`; `WorkdirError` (a ValueError) when it
  is unreadable."""
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path} is unreadable ({e}): restore it from a copy (an earlier one "
                       f"may be kept beside it as config.<n>.json), or train into another "
                       f"--workdir") from None


def next_backup(workdir: str) -> str:
  """`config.<n>.json` with n one more than the largest already in `workdir`."""
  taken = [int(m.group(1)) for name in os.listdir(workdir)
           if (m := re.fullmatch(r"config\.(\d+)\.json", name))]
  return os.path.join(workdir, f"config.{max(taken, default=0) + 1}.json")


def write_config(config, workdir: str) -> str:
  """Writes `config.json` atomically (a temporary file renamed over it): a reader or a crash
  never sees half a file."""
  path = os.path.join(workdir, "config.json")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    try:
      with open(path + ".tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=2))
      os.replace(path + ".tmp", path)
    except OSError as e:  # a full disk: name the file; config.json itself is untouched
      raise OSError(e.errno, e.strerror, path + ".tmp") from e
  return path


@dataclasses.dataclass
class Guard:
  """The outcome of `check`: `kind` is "fresh", "same" or "changed"; `commit()` writes the
  run's config.json once (keeping the old one as config.<n>.json when `backup`)."""
  workdir: str
  kind: str
  changes: list = dataclasses.field(default_factory=list)
  backup: bool = False
  committed: bool = False

  def commit(self, config):
    if self.committed:
      return
    self.committed = True
    if self.kind == "same":
      return
    if self.backup and jax.process_index() == 0:
      kept = next_backup(self.workdir)
      shutil.copy2(os.path.join(self.workdir, "config.json"), kept)  # the old file stays
      log.info("kept the previous config as %s", kept)                # until the new is whole
    write_config(config, self.workdir)


def resolve(config, workdir: str, helpers=()):
  """A copy of `config` as the run will save it: each helper's `resolve_config` applied."""
  config = copy.deepcopy(config)
  for helper in helpers:
    helper.resolve_config(config, workdir)
  return config


def check(config, workdir: str, helpers=()) -> Guard:
  """Compares `config` with what `workdir` holds; raises `WorkdirError` (nothing written) when
  it holds another run. See the module docstring."""
  workdir = os.path.abspath(workdir)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory")
  if not os.path.exists(path):
    if os.path.isdir(workdir):
      entries = os.listdir(workdir)
      if entries and not any(e in entries for e in _FGJAX_ENTRIES):
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise WorkdirError(
            f"--workdir={workdir} is not an fgjax run (it holds {shown} but no config.json or "
            f"checkpoints/): give a new or empty directory")
    return Guard(workdir, "fresh")
  old = read_saved(workdir)
  for helper in helpers:  # a teacher trained first: its workdir holds its own run
    for sub_config, sub_dir in helper.runs_first(config, workdir):
      check(sub_config, sub_dir)
  new = as_json(resolve(config, workdir, helpers))
  diffs = differences(old, new)
  old_names, new_names = old.get("class_names_resolved"), new.get("class_names_resolved")
  if old_names and new_names and list(old_names) != list(new_names):  # another dataset
    diffs.insert(0, ("class_names_resolved", _names(old_names), _names(new_names)))
  old_pl, new_pl = (c.get("pseudo_labels_sha256_resolved") for c in (old, new))
  if old_pl and new_pl and old_pl != new_pl:  # the same data.pseudo_labels path, rewritten
    diffs.insert(0, ("data.pseudo_labels (the file's content, sha256)", old_pl[:12] + "...",
                     new_pl[:12] + "..."))
  if not diffs:
    return Guard(workdir, "same")
  blocking = [d for d in diffs if not _matches(d[0], RESUMABLE)]
  for key, a, b in diffs:
    if (key, a, b) not in blocking:
      log.info("workdir %s: resuming with %s changed: %s -> %s", workdir, key, _show(a),
               _show(b))
  if not blocking:
    return Guard(workdir, "changed", diffs)
  listed = [f"  {k}: {_show(a)} -> {_show(b)}" for k, a, b in blocking[:_MAX_LISTED]]
  if len(blocking) > _MAX_LISTED:
    listed.append(f"  ... and {len(blocking) - _MAX_LISTED} more")
  if config.get("resume_with_changes"):
    log.warning("workdir %s: resuming with a changed config (config.resume_with_changes):\n%s",
                workdir, "\n".join(listed))
    return Guard(workdir, "changed", diffs, backup=True)
  raise WorkdirError(
      f"{workdir} holds a run with another config ({path}); these keys differ (old -> new):\n"
      + "\n".join(listed) + "\nTrain into another --workdir, or resume this run with the new "
      "config by adding --config.resume_with_changes=True (the old config is kept as "
      f"{os.path.basename(next_backup(workdir))}).")

"""Failures, as docs/failures.md promises to handle them: `kill -9` at several moments, a
changed config rerun into a workdir, damaged checkpoints, a full disk, and the command-line
mistakes of a new user (one line, exit status 2, never a traceback).

The runs are `tests/tiny_config.py` (a 2-stage CNN, 6 steps, evaluation and a checkpoint every
2 steps); the killed ones go through `tests/fault_driver.py` in a subprocess.
"""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jax

import data_fixtures as fx
import tiny_config
from fgjax.train import checkpoint as ckpt_lib
from fgjax.train import modes, setup, trainer
from fgjax.train import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "tests/tiny_config.py"


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _run(*args, timeout=600):
  """run.py as a user runs it (the test session's 8 simulated CPU devices)."""
  return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *map(str, args)],
                        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _driver(workdir, *args, timeout=600):
  return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fault_driver.py"),
                         str(workdir), *args], cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=timeout)


def _no_traceback(proc):
  for stream in (proc.stdout, proc.stderr):
    assert "Traceback" not in stream, stream[-4000:]
    assert "Event loop is closed" not in stream, stream[-4000:]


def _error_line(proc) -> str:
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def _snapshot(workdir) -> dict:
  """{relative path: sha256} of every file under a workdir."""
  out = {}
  for dirpath, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _final_params(workdir, prefer="last"):
  _, _, _, variables, info = setup.restore_model(str(workdir), prefer=prefer)
  return jax.device_get(variables["params"]), info


def _assert_equal_trees(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _damage(step_dir):
  """Overwrites the middle of every data file of a checkpoint (what bit rot or a partial copy
  leaves; orbax may read a small state from the merged database or the per-process one): its
  metadata still reads, its arrays do not."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs
           if os.path.basename(d) == "d"]
  assert files, step_dir
  rng = np.random.default_rng(0)
  for path in files:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      f.seek(size // 4)
      f.write(rng.integers(0, 256, max(size // 2, 1), dtype=np.uint8).tobytes())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 6-step tiny run (best and last checkpoints), made once; tests copy it."""
  w = tmp_path_factory.mktemp("trained") / "run"
  proc = _driver(w)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return w


def _copy(trained, tmp_path, name="run"):
  dst = tmp_path / name
  shutil.copytree(trained, dst)
  return dst


# ----------------------------------------------------------------------------- workdir guard


def test_config_differences_ignore_resolved_keys_and_list_resumable_ones():
  old = {"a": 1, "num_classes_resolved": 3, "model": {"kwargs": {"width": 96}},
         "batch_spec_resolved": {"image": [[8], "float32"]}, "total_steps": 4}
  new = {"a": 1, "model": {"kwargs": {"width": 48}}, "total_steps": 8, "extra": None,
         "resume_with_changes": True}
  diffs = workdir_lib.differences(old, new)
  assert diffs == [("extra", "<unset>", None), ("model.kwargs.width", 96, 48),
                   ("total_steps", 4, 8)]
  assert workdir_lib._matches("total_steps", workdir_lib.RESUMABLE)
  assert workdir_lib._matches("eval_every_epochs", workdir_lib.RESUMABLE)
  assert workdir_lib._matches("data.worker_count", workdir_lib.RESUMABLE)
  assert not workdir_lib._matches("model.kwargs.width", workdir_lib.RESUMABLE)
  assert not workdir_lib._matches("optim.warmup_steps", workdir_lib.RESUMABLE)


def test_keys_added_later_compare_as_their_old_behaviour():
  """A config.json saved before `eval.tta` existed resumes under a config that has it at
  "none" (what fgjax did then), and not at another value; a key only the old side has still
  differs."""
  old = {"model": {"name": "resnet18", "kwargs": {}}, "data": {"name": "folder"}}
  new = {"model": {"name": "resnet18", "kwargs": {"attn": None}},
         "data": {"name": "folder", "pseudo_labels": ""}, "eval": {"tta": "none"}}
  assert workdir_lib.differences(old, new) == []
  new["eval"]["tta"] = "flip"
  assert workdir_lib.differences(old, new) == [("eval.tta", "none", "flip")]
  assert {k for k, _, _ in workdir_lib.differences(new, old)} >= {
      "data.pseudo_labels", "eval.tta", "model.kwargs.attn"}


def test_added_keys_hold_the_defaults_of_the_configs():
  """`workdir.ADDED` says what a config without the key did: the base config's defaults (and
  the ResNet recipes' `model.kwargs.attn`), so a run saved before the toolkit resumes."""
  from configs import common, pmg_resnet50_cub
  new = workdir_lib.as_json(common.base_config("classifier"))
  flat = workdir_lib._flatten(new)
  flat["model.kwargs.attn"] = pmg_resnet50_cub.get_config().model.kwargs.attn
  assert {k: flat[k] for k in workdir_lib.ADDED} == workdir_lib.ADDED
  old = json.loads(json.dumps(new))
  for section in ("crop", "eval", "pseudo_label"):
    del old[section]
  del old["data"]["pseudo_labels"]
  assert workdir_lib.differences(old, new) == []


def test_a_rewritten_pseudo_label_file_is_refused_on_resume(tmp_path):
  """The same data.pseudo_labels path with other content (another round written into it) is
  another training set: the guard names it; the same content resumes."""
  cfg = tiny_config.get_config()
  w = str(tmp_path / "w")
  with cfg.unlocked():
    cfg.data.pseudo_labels = str(tmp_path / "pl.csv")
    cfg.pseudo_labels_sha256_resolved = "a" * 64
  workdir_lib.write_config(cfg, w)
  assert workdir_lib.check(cfg, w).kind == "same"
  with cfg.unlocked():
    cfg.pseudo_labels_sha256_resolved = "b" * 64
  with pytest.raises(workdir_lib.WorkdirError, match=r"data\.pseudo_labels \(the file's content"):
    workdir_lib.check(cfg, w)


def test_changed_config_is_refused_before_anything_is_written(trained, tmp_path):
  w = _copy(trained, tmp_path)
  before = _snapshot(w)
  cfg = tiny_config.get_config()
  cfg.model.kwargs = dict(widths=(8, 24), convs_per_stage=1, stem_stride=2)
  cfg.optim.lr = 1e-2
  with pytest.raises(workdir_lib.WorkdirError) as e:
    trainer.train_and_evaluate(cfg, str(w))
  msg = str(e.value)
  assert "model.kwargs.widths: [8, 16] -> [8, 24]" in msg and "optim.lr: 0.003 -> 0.01" in msg
  assert "--workdir" in msg and "--config.resume_with_changes=True" in msg
  assert "config.1.json" in msg
  assert _snapshot(w) == before
  # resume_with_changes with a change the checkpoints cannot take: refused at the restore,
  # before config.json is replaced (the run that fails leaves the record as it was).
  with cfg.unlocked():
    cfg.resume_with_changes = True
  with pytest.raises(ckpt_lib.CheckpointLayoutError, match="does not fit the state"):
    trainer.train_and_evaluate(cfg, str(w))
  assert _snapshot(w) == before
  # The run is still usable.
  assert modes.evaluate_checkpoint(str(w))["step"] > 0


def test_resumable_and_deliberate_changes_resume_and_keep_the_old_config(trained, tmp_path,
                                                                          caplog):
  w = _copy(trained, tmp_path)
  old_text = open(w / "config.json").read()
  cfg = tiny_config.get_config("steps=8")
  cfg.log_every_steps = 2
  caplog.set_level("INFO", logger="fgjax")
  result = trainer.train_and_evaluate(cfg, str(w))
  assert result["selected"] in ("best", "last")
  assert "resuming with total_steps changed: 6 -> 8" in caplog.text
  assert json.load(open(w / "config.json"))["total_steps"] == 8
  assert not os.path.exists(w / "config.1.json")  # a resumable change keeps no copy
  assert os.path.isdir(w / "checkpoints" / "8")
  # A deliberate change of a parameter the state can take (the learning rate).
  cfg = tiny_config.get_config("steps=10")
  with cfg.unlocked():
    cfg.optim.lr = 1e-3
    cfg.resume_with_changes = True
  trainer.train_and_evaluate(cfg, str(w))
  kept = json.load(open(w / "config.1.json"))
  assert kept["optim"]["lr"] == 3e-3 and kept["total_steps"] == 8
  assert json.load(open(w / "config.json"))["optim"]["lr"] == 1e-3
  assert old_text != open(w / "config.json").read()


def test_a_teacher_trained_first_resumes_without_a_false_difference(tmp_path):
  """The student's config.json names its teacher's checkpoint (train_first resolved): the
  same command again is a resume, not a changed config."""
  from configs import demo
  w = tmp_path / "demo"
  cfg = lambda: demo.get_config("runlocal")
  trainer.train_and_evaluate(cfg(), str(w))
  saved = json.load(open(w / "config.json"))
  assert saved["teacher"]["checkpoint"] == str(w / "teacher")
  assert saved["teacher"]["train_first"] is None
  guard = workdir_lib.check(cfg(), str(w), setup.build(
      cfg(), 20)[1].helpers().values())
  assert guard.kind == "same"
  # The teacher finished; a changed teacher config would never train: refused.
  changed = cfg()
  changed.teacher.train_first.optim.lr = 1e-4
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r"(?s)demo/teacher holds a run with another config.*"
                           r"optim.lr: 0.006 -> 0.0001"):
    trainer.train_and_evaluate(changed, str(w))


def test_a_directory_that_is_not_a_run_is_refused(tmp_path):
  d = tmp_path / "mine"
  d.mkdir()
  (d / "notes.txt").write_text("mine")
  with pytest.raises(workdir_lib.WorkdirError, match="is not an fgjax run"):
    trainer.train_and_evaluate(tiny_config.get_config("steps=2"), str(d))
  assert os.listdir(d) == ["notes.txt"]
  with pytest.raises(FileNotFoundError, match="an fgjax workdir"):
    modes.evaluate_checkpoint(str(d))
  with pytest.raises(workdir_lib.WorkdirError, match="is a file, not a directory"):
    trainer.train_and_evaluate(tiny_config.get_config("steps=2"), str(d / "notes.txt"))


# ----------------------------------------------------------------------------- checkpoints


def test_damaged_newest_checkpoint_is_moved_aside_and_resume_equals_uninterrupted(
    trained, tmp_path, caplog):
  """Resume from the next older checkpoint (with its own data-iterator state), retrain the
  lost steps, and end where the uninterrupted run ended, bit for bit."""
  w = _copy(trained, tmp_path)
  ckpt = ckpt_lib.Checkpointer(str(w), async_save=False)
  best_step = ckpt.best_step()
  ckpt.close()
  _damage(w / "checkpoints" / "6")
  if best_step == 6:
    _damage(w / "best" / "6")
  caplog.set_level("INFO", logger="fgjax")
  trainer.train_and_evaluate(tiny_config.get_config(), str(w))
  assert "checkpoints/6 cannot be read (" in caplog.text and "Error reading" in caplog.text
  assert os.path.isdir(w / "checkpoints" / "6.corrupt")
  assert f"resumed from {w}/checkpoints/4" in caplog.text or \
      f"resumed from {w}/best/4" in caplog.text
  for prefer in ("last", "best"):
    pa, ia = _final_params(trained, prefer)
    pb, ib = _final_params(w, prefer)
    assert ia["step"] == ib["step"] and ia["checkpoint"] == ib["checkpoint"]
    _assert_equal_trees(pa, pb)


def test_eval_falls_back_to_older_checkpoints_then_fails_in_one_line(trained, tmp_path,
                                                                     caplog):
  w = _copy(trained, tmp_path)
  best = ckpt_lib.Checkpointer(str(w), async_save=False)
  best_step, last = best.best_step(), sorted(best.last.all_steps())
  best.close()
  assert best_step is not None and last == [2, 4, 6]
  _damage(w / "best" / str(best_step))
  caplog.set_level("INFO", logger="fgjax")
  m = modes.evaluate_checkpoint(str(w))
  assert m["checkpoint"] == "last" and m["step"] == 6  # the newest that restores
  assert f"best/{best_step} cannot be read" in caplog.text
  for s in last:
    _damage(w / "checkpoints" / str(s))
  with pytest.raises(ckpt_lib.NoUsableCheckpointError, match="no checkpoint of .* could be restored"):
    modes.evaluate_checkpoint(str(w))
  names = sorted(os.listdir(w / "checkpoints"))
  assert names == ["2.corrupt", "4.corrupt", "6.corrupt"]  # moved aside, never deleted


def test_a_layout_mismatch_moves_nothing(trained, tmp_path):
  w = _copy(trained, tmp_path)
  wrong = _abstract(w)
  wrong["params"]["head"]["kernel"] = jax.ShapeDtypeStruct((5, 5), np.float32)
  ckpt = ckpt_lib.Checkpointer(str(w), async_save=False)
  try:
    with pytest.raises(ckpt_lib.CheckpointLayoutError,
                       match=r"params.head.kernel: stored \[16, 4\], the config builds \[5, 5\]"):
      ckpt.restore(wrong)
  finally:
    ckpt.close()
  assert sorted(os.listdir(w / "checkpoints")) == ["2", "4", "6"]


def _abstract(w):
  cfg = setup.load_config(str(w))
  model, method = setup.build(cfg, int(cfg.num_classes_resolved))
  example = setup.config_example(cfg)
  opts = setup.build_optimizers(cfg, method, setup.params_shape(method, example))
  from fgjax.train import sharding
  return setup.abstract_train_state(cfg, method, opts, sharding.make_mesh(cfg), example)


def test_unreadable_data_state_moves_the_pair_aside(trained, tmp_path, caplog):
  w = _copy(trained, tmp_path)
  with open(w / "data_state" / "6" / "process_0.json", "w") as f:
    f.write("{not json")
  caplog.set_level("INFO", logger="fgjax")
  ckpt = ckpt_lib.Checkpointer(str(w), async_save=False)
  try:
    _, data, step, _ = ckpt.restore(_abstract(w))
  finally:
    ckpt.close()
  assert step == 4 and data == json.load(open(w / "data_state" / "4" / "process_0.json"))
  assert os.path.isdir(w / "checkpoints" / "6.corrupt")
  assert os.path.exists(w / "data_state" / "6" / "process_0.json.corrupt")


def test_machine_errors_move_nothing_and_readers_leave_a_live_run_alone(trained, tmp_path,
                                                                       monkeypatch):
  """Out of memory or permission denied while reading is not damage: nothing is moved (the
  same error would condemn every older checkpoint). Eval beside a running training leaves its
  save in progress (orbax's temporary directory) and creates nothing."""
  import orbax.checkpoint as ocp
  w = _copy(trained, tmp_path)
  partial = w / "checkpoints" / "8.orbax-checkpoint-tmp-1234"
  partial.mkdir()
  (w / "checkpoints" / "keep").mkdir()
  assert modes.evaluate_checkpoint(str(w))["step"] > 0
  assert partial.is_dir()  # a save in progress of a live run is not cleaned up by a reader
  shutil.rmtree(w / "checkpoints" / "keep")
  orig = ocp.CheckpointManager.restore
  for message in ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4096 bytes",
                  "PERMISSION_DENIED: Error opening file: Permission denied"):
    def failing(self, step, *a, _m=message, **k):
      raise ValueError(_m)
    monkeypatch.setattr(ocp.CheckpointManager, "restore", failing)
    with pytest.raises(ckpt_lib.CheckpointReadError, match="not damage to its files"):
      modes.evaluate_checkpoint(str(w))
    assert sorted(os.listdir(w / "checkpoints")) == ["2", "4", "6", partial.name]
  monkeypatch.setattr(ocp.CheckpointManager, "restore", orig)
  # A damaged checkpoint on a read-only share: skipped with a warning, the next one used.
  _damage(w / "checkpoints" / "6")
  real_rename = os.rename
  monkeypatch.setattr(os, "rename", lambda a, b: (_ for _ in ()).throw(
      PermissionError(errno.EROFS, "Read-only file system", a)) if "checkpoints" in str(a)
      else real_rename(a, b))
  m = modes.evaluate_checkpoint(str(w), which="last")
  assert m["step"] == 4 and os.path.isdir(w / "checkpoints" / "6")


def test_all_checkpoints_moved_aside_refuses_a_fresh_start(trained, tmp_path):
  w = _copy(trained, tmp_path)
  for d in ("checkpoints/2", "checkpoints/4", "checkpoints/6"):
    _damage(w / d)
  for s in os.listdir(w / "best"):
    if s.isdigit():
      _damage(w / "best" / s)
  with pytest.raises(ckpt_lib.NoUsableCheckpointError, match="could be restored"):
    trainer.train_and_evaluate(tiny_config.get_config(), str(w))
  before = _snapshot(w)
  with pytest.raises(ckpt_lib.NoUsableCheckpointError,
                     match="every checkpoint of .* was moved aside as damaged"):
    trainer.train_and_evaluate(tiny_config.get_config(), str(w))
  assert _snapshot(w) == before


def test_another_dataset_with_the_same_config_is_refused(trained, tmp_path):
  """Other class names (another dataset in the same folder) refuse like a changed key, even
  though `data.data_dir` may change on a resume."""
  w = _copy(trained, tmp_path)
  saved = json.load(open(w / "config.json"))
  saved["class_names_resolved"] = ["w", "x", "y", "z"]
  with open(w / "config.json", "w") as f:
    json.dump(saved, f)
  with pytest.raises(workdir_lib.WorkdirError, match="class_names_resolved: .*4 classes"):
    trainer.train_and_evaluate(tiny_config.get_config(), str(w))


def test_changed_config_is_written_only_once_its_first_checkpoint_committed(trained, tmp_path,
                                                                             monkeypatch):
  """A resumed run with a changed config that fails before its first checkpoint commits
  leaves config.json as it was."""
  from fgjax.train import logs
  w = _copy(trained, tmp_path)
  old = open(w / "config.json").read()
  orig = logs.ProgressBar.update

  def boom(self, step, *a, **k):
    if step == 7:
      raise RuntimeError("killed at step 7")
    return orig(self, step, *a, **k)
  monkeypatch.setattr(logs.ProgressBar, "update", boom)
  with pytest.raises(RuntimeError, match="killed at step 7"):
    trainer.train_and_evaluate(tiny_config.get_config("steps=10"), str(w))
  assert open(w / "config.json").read() == old
  monkeypatch.setattr(logs.ProgressBar, "update", orig)
  trainer.train_and_evaluate(tiny_config.get_config("steps=10"), str(w))
  assert json.load(open(w / "config.json"))["total_steps"] == 10


def test_disk_full_error_names_the_path_and_free_space(trained, tmp_path, monkeypatch):
  """An injected ENOSPC in orbax's save (the full-disk test on a real small filesystem is
  below): one error naming the checkpoint path and the free space."""
  import orbax.checkpoint as ocp
  w = _copy(trained, tmp_path)

  def full(self, step, *a, **k):
    raise ValueError(f"RESOURCE_EXHAUSTED: Error writing {self.directory}/{step}: Failed to "
                     f"write 4096 bytes: No space left on device [os_error_code='28']")
  monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
    trainer.train_and_evaluate(tiny_config.get_config("steps=8"), str(w))
  msg = str(e.value)
  assert "no space left" in msg and f"{w}/checkpoints/8" in msg and " free there" in msg
  assert "intact" in msg
  assert sorted(os.listdir(w / "checkpoints")) == ["2", "4", "6"]
  e2 = ckpt_lib.save_error("/x", OSError(errno.EACCES, "Permission denied"))
  assert str(e2) == "could not save /x: [Errno 13] Permission denied"


def test_a_full_disk_under_the_metrics_names_the_file(tmp_path):
  """/dev/full answers every write with ENOSPC: the error names the metrics file (run.py adds
  the free space)."""
  from fgjax.train import logs
  if not os.path.exists("/dev/full"):
    pytest.skip("no /dev/full on this system")
  writer = logs.MetricWriter(str(tmp_path), enabled=True)
  writer.path = "/dev/full"
  with pytest.raises(OSError) as e:
    writer.write(1, "train", {"loss": 1.0})
  assert e.value.errno == errno.ENOSPC and e.value.filename == "/dev/full"
  writer.close()


# ----------------------------------------------------------------------------- kill -9


@pytest.mark.slow
@pytest.mark.parametrize("fault,resumed_at", [("step:5", (4,)), ("save:4", (2, 4)),
                                              ("eval:4", (2,))])
def test_kill_9_then_resume_equals_uninterrupted(trained, tmp_path, fault, resumed_at):
  """Killed during a train step, during an asynchronous save, during an evaluation (whose
  step has no checkpoint yet: evaluation comes first); the same command again resumes from
  the checkpoint before and ends with the uninterrupted run's parameters and metrics."""
  w = tmp_path / "killed"
  proc = _driver(w, f"--fault={fault}")
  assert proc.returncode == -9, proc.stderr[-3000:]
  if fault != "step:5":  # killed before that step's checkpoint committed
    assert not os.path.isdir(w / "checkpoints" / "4")
  proc = _driver(w)  # the same command again
  assert proc.returncode == 0, proc.stderr[-4000:]
  _no_traceback(proc)
  # save:4 may resume from best/4: that step's best save (started before the killed one, as
  # evaluation comes first) can commit before the kill.
  starts = [f"resumed from {w}/checkpoints/{resumed_at[0]}\n"] + \
      [f"resumed from {w}/best/{s}\n" for s in resumed_at]
  assert any(x in proc.stderr for x in starts), proc.stderr[-3000:]
  for prefer in ("last", "best"):
    pa, ia = _final_params(trained, prefer)
    pb, ib = _final_params(w, prefer)
    assert ia == {**ib, "workdir": ia["workdir"]}
    _assert_equal_trees(pa, pb)
  ra = json.load(open(trained / "final_metrics.json"))
  rb = json.load(open(w / "final_metrics.json"))
  assert ra == rb
  assert not [n for n in os.listdir(w / "checkpoints") if "tmp" in n]  # partial save removed


@pytest.mark.slow
def test_full_disk_on_a_small_filesystem(tmp_path):
  """A real ENOSPC: a 12 MiB tmpfs (a user+mount namespace, no root needed) holds a finished
  4-step run; filled up, the run continued to 8 steps stops at its next save with one error
  naming the path and the free space; the earlier checkpoints still restore; with space freed
  the same command resumes and finishes."""
  probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                         capture_output=True)
  if probe.returncode != 0:
    pytest.skip("user namespaces are not available here (unshare failed): "
                + probe.stderr.decode()[:200])
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  out = tmp_path / "out"
  out.mkdir()
  run = f"{sys.executable} {ROOT}/run.py --config={TINY}"
  script = f"""
set -u
mount -t tmpfs -o size=12m tmpfs {mnt}
cd {ROOT}
{run}:steps=4 --workdir={mnt}/w > {out}/first.log 2>&1; echo $? > {out}/first.rc
free=$(df --output=avail -B1 {mnt} | tail -1)
head -c $((free - 24576)) /dev/zero > {mnt}/filler 2>/dev/null
{run}:steps=8 --workdir={mnt}/w > {out}/full.log 2>&1; echo $? > {out}/full.rc
ls {mnt}/w/checkpoints > {out}/after_full.ls
rm {mnt}/filler
{run} --mode=eval --checkpoint=last --workdir={mnt}/w > {out}/eval.log 2>&1; echo $? > {out}/eval.rc
{run}:steps=8 --workdir={mnt}/w > {out}/resume.log 2>&1; echo $? > {out}/resume.rc
ls {mnt}/w/checkpoints > {out}/after_resume.ls
"""
  subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script],
                 env=_env(), timeout=900, check=True)
  read = lambda name: open(out / name).read()
  assert read("first.rc").strip() == "0", read("first.log")[-3000:]
  full = read("full.log")
  assert read("full.rc").strip() == "1", full[-3000:]
  assert "Traceback" not in full, full[-3000:]
  assert "no space left on the device" in full.lower() or "No space left" in full, full[-3000:]
  assert f"{mnt}/w/" in full and " free there" in full, full[-3000:]
  # No checkpoint 6 (only orbax's temporary directory, which the next run removes).
  assert [n for n in read("after_full.ls").split() if n.isdigit()] == ["2", "4"]
  assert read("eval.rc").strip() == "0", read("eval.log")[-3000:]  # 2 and 4 intact
  resume = read("resume.log")
  assert read("resume.rc").strip() == "0", resume[-3000:]
  assert "resumed from" in resume and "/checkpoints/4" in resume
  assert read("after_resume.ls").split() == ["4", "6", "8"]


# ----------------------------------------------------------------------------- command line


def test_command_line_mistakes_are_one_line_with_exit_2(tmp_path):
  cases = [
      (["--config.optim.lrr=1"], ["--config.optim.lrr", 'Did you mean "lr"']),
      (["--config.batch_size=abc"], ["--config.batch_size=abc", "invalid literal"]),
      (["--config.data.augment.flipp=True"],
       ["--config.data.augment.flipp", 'Did you mean "flip" instead of "flipp"?']),
  ]
  for extra, needles in cases:
    proc = _run(f"--config={TINY}", f"--workdir={tmp_path / 'w'}", *extra, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    _no_traceback(proc)
    line = _error_line(proc)
    for needle in needles:
      assert needle in line, line
  proc = _run("--config=configs/no_such_config.py", timeout=300)
  assert proc.returncode == 2 and "No such file" in _error_line(proc)
  _no_traceback(proc)
  proc = _run(f"--config={TINY}:stepz=3", timeout=300)
  assert proc.returncode == 2 and "unknown config argument 'stepz'" in _error_line(proc)
  proc = _run(f"--config={TINY}", "--config.optim.lrr=1", "--traceback", timeout=300)
  assert proc.returncode != 0 and "Traceback" in proc.stderr
  assert not os.path.exists(tmp_path / "w")


def test_changed_config_rerun_through_run_py(trained, tmp_path):
  w = _copy(trained, tmp_path)
  before = _snapshot(w)
  proc = _run(f"--config={TINY}", f"--workdir={w}", "--config.optim.lr=0.01", timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  _no_traceback(proc)
  assert "optim.lr: 0.003 -> 0.01" in proc.stderr
  assert "--config.resume_with_changes=True" in proc.stderr
  assert _snapshot(w) == before
  proc = _run("--mode=eval", f"--workdir={tmp_path / 'nowhere'}", timeout=300)
  assert proc.returncode == 2 and "an fgjax workdir" in _error_line(proc)


def test_damaged_checkpoints_through_run_py(trained, tmp_path):
  w = _copy(trained, tmp_path)
  _damage(w / "checkpoints" / "6")
  proc = _run("--mode=eval", "--checkpoint=last", f"--workdir={w}", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  _no_traceback(proc)
  assert "checkpoints/6 cannot be read" in proc.stderr
  assert json.loads(proc.stdout[proc.stdout.index("{"):])["test"]["step"] == 4
  for d in ("checkpoints/4", "checkpoints/2"):
    _damage(w / d)
  for s in os.listdir(w / "best"):
    if s.isdigit():
      _damage(w / "best" / s)
  proc = _run("--mode=eval", f"--workdir={w}", timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  _no_traceback(proc)
  assert "could be restored" in _error_line(proc) and "no checkpoint of" in _error_line(proc)


def test_predict_skips_missing_and_bad_files(trained, tmp_path):
  good = fx.write_image(tmp_path / "bird.jpg", "jpeg", size=(48, 40))
  bad = fx.write_image(tmp_path / "broken.jpg", "garbage")
  text = tmp_path / "notes.txt"
  text.write_text("not an image")
  missing = tmp_path / "missing.jpg"
  proc = _run("--mode=predict", f"--workdir={trained}", good, bad, text, missing, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  _no_traceback(proc)
  for p in (bad, text, missing):
    assert f"skipped {p}" in proc.stderr
  assert good in proc.stdout and str(bad) not in proc.stdout
  proc = _run("--mode=predict", f"--workdir={trained}", bad, missing, timeout=300)
  assert proc.returncode == 2
  _no_traceback(proc)
  assert "none of the 2 files given could be read" in _error_line(proc)

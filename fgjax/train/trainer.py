"""The fgjax training loop: `train_and_evaluate(config, workdir)`.

In the spirit of big_vision's train.py: one readable loop over what the set-up built
(`fgjax.train.setup`); the loop knows no method: it runs the phase of the method's declared
updates that the step number selects (`Method.phases()`), each phase its own jitted step.
- The mesh and shardings: `fgjax.train.sharding` (data parallel over every device of every
  process, optionally fsdp); `jax.jit` with `NamedSharding`s and a donated state (no pmap).
- A non-finite loss freezes the state inside the step (no update is applied) and the host stops
  at the next log point naming the step; the checkpoints already on disk are the last good ones.
- orbax checkpoints: the last `keep_checkpoints`, plus the best by validation top-1 when
  `data.val_fraction > 0`; with the data iterator state, so resume is exact. SIGTERM saves and
  exits cleanly.
- Evaluation (`fgjax.train.evaluation`): top-1, top-5, mean per-class accuracy per head and the
  method's own metrics. Model selection only ever looks at validation; the test split is
  reported, never used to choose.
- Attention-region crops (`config.crop`, `fgjax.toolkit.crops`, off by default): at the due
  epoch boundaries the current model computes every training image's crop box; the train
  loader is rebuilt to crop by them (its state carries over) and the boxes are saved beside
  each checkpoint, so a resumed run crops by the boxes of its restored step.
Visualisation is not part of training: `run.py` draws after the loop returns.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from fgjax import data as fgdata
from fgjax.methods import base as protocol
from fgjax.toolkit import crops, pseudo_labels, tta
from fgjax.train import checkpoint as ckpt_lib
from fgjax.train import evaluation, logs, setup, sharding
from fgjax.train import workdir as workdir_lib
from fgjax.train.setup import TrainingError
from fgjax.train.step import make_train_step

log = logging.getLogger("fgjax")

__all__ = ["TrainingError", "train_and_evaluate"]


class _StopFlag:
  """Set by SIGTERM: the loop saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def install(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    for sig in (signal.SIGTERM,):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signum = signum
    log.warning("received signal %d: saving a checkpoint and stopping", signum)

  def restore(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def __bool__(self):
    return self.signum is not None


BEST_KEY = "top1_best_over_training"  # and "<head>_top1_best_over_training" for other heads
_BEST_SUFFIX = "_best_over_training"


def _heads(metrics) -> list[str]:
  """The top-1 keys of an evaluation: "top1" and each head's "<head>_top1"."""
  return [k for k in metrics if k == "top1" or (k.endswith("_top1") and "_best_" not in k)]


def _best_test_before(workdir: str, start: int) -> dict:
  """{top-1 key: (value, step)}: per head, the best test evaluation logged up to step `start`
  (a resumed run: the evaluations before its checkpoint); {} when there are none."""
  try:
    rows = logs.read_metrics(workdir)
  except (OSError, ValueError) as e:  # an unreadable log only loses the earlier evaluations
    log.warning("could not read the earlier test evaluations from %s/metrics.jsonl (%s); "
                "%s counts this run's only", workdir, e, BEST_KEY)
    return {}
  best = {}
  for r in rows:
    if r.get("split") == "test" and int(r.get("step", -1)) <= start:
      _keep_best(best, r, int(r["step"]))
  return best


def _keep_best(best: dict, metrics, step: int):
  """Updates {key: (value, step)} with an evaluation's top-1 values (ties keep the earlier)."""
  for k in _heads(metrics):
    if k not in best or float(metrics[k]) > best[k][0]:
      best[k] = (float(metrics[k]), int(step))


def _log_metrics(step, split, metrics):
  log.info("step %d %s: %s", step, split,
           ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in metrics.items()))


def _average(fetched: list[dict]) -> dict:
  """Mean of each metric over the steps since the last log point (phases may log different
  metrics: each is averaged over the steps that have it)."""
  keys = list(dict.fromkeys(k for m in fetched for k in m))
  return {k: float(np.mean([m[k] for m in fetched if k in m])) for k in keys}


def _cropping(config, train_src, old, table: crops.CropTable, text=None):
  """The train loader cropping by `table`'s boxes, continuing where the loader `old` stands."""
  state = old.get_state()
  old.close()
  new = setup.make_train_iter(config, train_src, crop_boxes=table.boxes, text=text)
  new.set_state(state)
  return new


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains per `config` in `workdir` (resuming if it holds a checkpoint); returns the final
  metrics {"val": ..., "test": ..., "selected": "best" | "last"} (or {"stopped_at": step}
  after SIGTERM)."""
  workdir = os.path.abspath(workdir)
  mesh = sharding.make_mesh(config)
  repl = sharding.replicated(mesh)
  train_src, val_src, test_src = setup.get_sources(config)
  num_classes = int(train_src.num_classes)
  with config.unlocked():
    config.num_classes_resolved = num_classes
    config.class_names_resolved = list(train_src.class_names)
    if config.data.get("pseudo_labels"):  # what the file held (workdir guard: rewritten since?)
      config.pseudo_labels_sha256_resolved = pseudo_labels.file_digest(config.data.pseudo_labels)
  # Text (data.text.enabled): the vocabulary of a resumed run, or one built from the training
  # texts (saved as <workdir>/vocab.txt once the workdir guard has passed).
  # (From the labelled training images only: pseudo-labelled test images bring no words.)
  labelled = train_src.train if isinstance(train_src, pseudo_labels.PseudoLabelSource) \
      else train_src
  text = setup.text_encoder(config, workdir, labelled)
  model, method = setup.build(config, num_classes, text)

  batch_size = int(config.batch_size)
  if batch_size % jax.device_count():
    raise ValueError(f"config.batch_size={batch_size} must be divisible by the number of "
                     f"devices ({jax.device_count()})")
  steps_per_epoch = max(len(train_src) // batch_size, 1)
  total_steps = setup.get_steps(config, "total", steps_per_epoch)
  log_every = setup.get_steps(config, "log_every", steps_per_epoch, default=50)
  eval_every = setup.get_steps(config, "eval_every", steps_per_epoch, default=total_steps)
  ckpt_every = setup.get_steps(config, "checkpoint_every", steps_per_epoch, default=eval_every)
  crop_plan = crops.CropPlan.of(config, steps_per_epoch, total_steps)  # None: crops off
  refresher = crops.Refresher(config, method, mesh) if crop_plan is not None else None
  tta_preset = tta.preset_of(config)  # an unknown preset fails here, before anything is written

  # Nothing is written before the workdir guard: a workdir holding another run is refused.
  guard = workdir_lib.check(config, workdir, method.helpers().values())

  # The method's frozen helpers (a teacher, which may first train in <workdir>/teacher and
  # then stands in the config as the checkpoint it became).
  env = protocol.HelperEnv(config=config, mesh=mesh, train_source=train_src, workdir=workdir,
                           restore=setup.restore_model, train=train_and_evaluate, text=text)
  try:
    helper_fns, helper_inputs = setup.build_helpers(method, env)
  except protocol.HelperStopped as e:
    log.warning("%s; rerun the same command to resume", e)
    return {"stopped_at": 0, "stopped_in": e.run}

  train_iter = setup.make_train_iter(config, train_src, text=method.text)
  example = setup.example_batch(train_iter.element_spec)
  setup.resolved(config, method, train_iter.element_spec)
  if refresher is not None:
    refresher.check(example)
  tta.check(method, tta_preset)  # a preset the model cannot take (cal8 on a ViT), before writing
  seed = int(config.seed)
  base_rng = jax.random.fold_in(jax.random.key(seed), 1)
  optimizers = setup.build_optimizers(config, method, setup.params_shape(method, example),
                                      steps_per_epoch, total_steps)
  phases = method.phases()

  ckpt = ckpt_lib.Checkpointer(workdir, keep=int(config.get("keep_checkpoints", 3)))
  writer = None
  stop = _StopFlag().install()
  failed = False
  try:
    if not ckpt.has_checkpoint() and ckpt.moved_aside():
      raise ckpt_lib.NoUsableCheckpointError(
          f"every checkpoint of {workdir} was moved aside as damaged "
          f"({', '.join(ckpt.moved_aside())}); starting again from step 0 would lose the run: "
          f"rename one back to resume from it, or train into another --workdir "
          f"(docs/failures.md)")
    if ckpt.has_checkpoint():
      state, data_state, start, kind = ckpt.restore(setup.abstract_train_state(
          config, method, optimizers, mesh, example))
      log.info("resumed from %s/%s/%d", workdir, "best" if kind == "best" else "checkpoints",
               start)
    else:
      state = setup.create_train_state(config, method, optimizers, mesh, jax.random.key(seed),
                                       example)
      data_state, start = None, 0
    setup.save_vocabulary(method.text, workdir)  # a new run's (kept when there)
    if guard.kind == "fresh":
      guard.commit(config)
    else:  # a changed config.json is written once the run's first checkpoint has committed
      ckpt.when_committed(lambda: guard.commit(config))
    writer = logs.MetricWriter(workdir)  # only once the state is there: a failed restore
                                         # leaves no new TensorBoard file

    def refresh_crops(step):
      table = refresher(setup.eval_variables(state), train_src, step)
      writer.write(step, "crops", dict(table.summary(), epoch=step // steps_per_epoch))
      return table

    crop_table = None  # the crops in use (None: plain random crops)
    if crop_plan is not None and start < total_steps:
      crop_table, refresh_now = crops.restored(ckpt.load_crops(start) if start else None,
                                               crop_plan, start, train_src)
      if jax.process_count() > 1:  # every process refreshes (a sharded pass) or none does
        refresh_now = bool(np.asarray(multihost_utils.process_allgather(
            np.asarray(refresh_now))).any())
      if refresh_now:
        crop_table = refresh_crops(start)
      if crop_table is not None:
        train_iter = _cropping(config, train_src, train_iter, crop_table, method.text)

    def crop_arrays():  # what each checkpoint saves beside it
      return None if crop_table is None else crop_table.arrays()

    if data_state is not None:
      train_iter.set_state(data_state)
    data_iter = iter(train_iter)

    state_sh = sharding.state_shardings(state, mesh)
    steps = [jax.jit(make_train_step(config, method, optimizers, phase, base_rng, helper_fns),
                     donate_argnums=(0,), out_shardings=(state_sh, repl)) for phase in phases]
    eval_step = jax.jit(evaluation.make_eval_step(method), out_shardings=repl)

    # The references' reporting protocol, beside the honest numbers: the best test top-1 over
    # every evaluation during training (it peeks at the test split).
    best_test = _best_test_before(workdir, start)

    def run_eval(split_src, split, step):
      if split_src is None:
        return None
      metrics = evaluation.evaluate(eval_step, setup.eval_variables(state),
                                    iter(setup.make_eval_iter(config, split_src,
                                                              text=method.text)), mesh,
                                    num_classes, method)
      logged = metrics
      if split == "test" and "top1" in metrics:
        _keep_best(best_test, metrics, step)
        logged = dict(metrics, **{k + _BEST_SUFFIX: best_test[k][0] for k in _heads(metrics)})
      writer.write(step, split, logged)
      _log_metrics(step, split, logged)
      return metrics

    best_val = ckpt.best_value(default=-1.0)
    bar = logs.ProgressBar(total_steps, start, batch_size=batch_size)
    pending = []
    step = start
    t_log = time.time()
    while step < total_steps:
      batch = next(data_iter)
      gbatch = fgdata.to_global_batch(batch, mesh)
      train_step = steps[protocol.phase_at(phases, step)]
      # The step itself never waits on the host: a device-to-host copy here is a bug (enforced
      # on GPU/TPU; on the CPU backend arrays already live on the host and the guard is moot).
      with jax.transfer_guard_device_to_host("disallow"):
        state, metrics = train_step(state, gbatch, helper_inputs)
      step += 1
      pending.append(metrics)
      bar.update(step)
      last = step == total_steps
      if step % log_every == 0 or last or stop:
        ckpt.check()  # a failed asynchronous save (a full disk) stops the run here
        fetched = jax.device_get(pending)
        bad = int(jax.device_get(state["bad_step"]))
        if bad >= 0:
          raise TrainingError(
              f"loss became non-finite at step {bad}; training stopped. The state was frozen "
              f"before that update and the checkpoints in {workdir}/checkpoints are intact. "
              f"Lower config.optim.lr, enable config.optim.clip_norm, or check the data.")
        avg = _average(fetched)
        dt = time.time() - t_log
        avg["img_per_s"] = len(fetched) * batch_size / max(dt, 1e-9)
        avg["epoch"] = step / steps_per_epoch
        writer.write(step, "train", avg)
        lrs = " ".join(f"{k} {v:.2e}" for k, v in avg.items() if k.startswith("lr"))
        bar.update(step, f"loss {avg['loss']:.4f} {lrs}", force=True)
        pending, t_log = [], time.time()
      if crop_plan is not None and crop_plan.due(step) and not stop:
        crop_table = refresh_crops(step)
        train_iter = _cropping(config, train_src, train_iter, crop_table, method.text)
        data_iter = iter(train_iter)
      # Evaluation comes before the step's checkpoint: a run killed while evaluating resumes
      # from an earlier checkpoint and evaluates again, so no evaluation (and no best
      # checkpoint) is ever skipped.
      if step % eval_every == 0 and not last:
        val = run_eval(val_src, "val", step)
        if val is not None and val["top1"] > best_val:
          best_val = val["top1"]
          ckpt.save_best(step, state, best_val, train_iter.get_state(), crops=crop_arrays())
        run_eval(test_src, "test", step)
      if step % ckpt_every == 0 or last or stop:
        ckpt.save(step, state, train_iter.get_state(), crops=crop_arrays())
      if stop:
        bar.close()
        ckpt.wait()
        log.warning("stopped by signal at step %d; checkpoint saved, rerun the same command to "
                    "resume", step)
        return {"stopped_at": step}
    bar.close()
    # Final report: validation picks the checkpoint (best, else last); test is only reported.
    if start >= total_steps:
      log.info("training already finished (%d steps); evaluating", total_steps)
    result = {"val": None}
    if val_src is not None:
      result["val"] = run_eval(val_src, "val", step)
      if result["val"]["top1"] > best_val:
        best_val = result["val"]["top1"]
        ckpt.save_best(step, state, best_val, train_iter.get_state(), crops=crop_arrays())
    which = "best" if ckpt.best_step() is not None else "last"
    ckpt.wait()
    if which == "best" and ckpt.best_step() != step:
      state, _, sel_step, which = ckpt.restore(sharding.abstract_with_shardings(state, mesh),
                                               which="best", with_data_state=False)
      if which == "best":
        log.info("selected the best validation checkpoint: step %d (val top-1 %.4f)",
                 sel_step, best_val)
        result["val_selected"] = {"step": int(sel_step), "top1": best_val}
    result["test"] = run_eval(test_src, "test", step)
    if "top1" in best_test:
      result["test_best_over_training"] = {
          "top1": best_test["top1"][0], "step": best_test["top1"][1],
          **{k: {"top1": v, "step": s} for k, (v, s) in best_test.items() if k != "top1"},
          "protocol": "the best test top-1 over all evaluations during training, as the "
                      "reference repositories report it, and the same for each other head "
                      "(its own best step); it peeks at the test split (choose with a "
                      "validation split for an honest number: 'test')"}
    result["selected"] = which
    result["tta"] = tta_preset  # the test-time augmentation of every evaluation above
    if train_src.transductive_images:  # pseudo-labelled test images trained on
      result["transductive"] = {
          "test_images_trained_on": train_src.transductive_images,
          "note": "the test metrics are transductive: the model trained on these test images "
                  "with its own predicted labels (data.pseudo_labels)"}
    guard.commit(config)
    if jax.process_index() == 0:
      path = os.path.join(workdir, "final_metrics.json")
      with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
      os.replace(path + ".tmp", path)
    return result
  except BaseException:
    failed = True
    raise
  finally:
    stop.restore()
    # After a failure, closing must not replace its error with a second one (a full disk
    # fails the pending save again).
    errors = []
    for close in ([writer.close] if writer else []) + [ckpt.close]:
      try:
        close()
      except Exception as e:
        errors.append(e)
    if errors and not failed:
      raise errors[0]


"""The fgjax trainer: `train_and_evaluate(config, workdir)` and the evaluation helpers.

In the spirit of big_vision's train.py: one readable loop.
- A mesh over every device of every process (`config.mesh`): a "data" axis, and with
  `config.mesh.fsdp` > 1 an "fsdp" axis too. The train state is a plain dict {"params", "opt",
  "step", "bad_step", ["ema"], [model collections]}: replicated, or with fsdp > 1 every large
  array split along its largest dimension divisible by the fsdp size (ZeRO-3 style through
  sharding annotations: XLA gathers parameters where they are used and reduce-scatters
  gradients). Batches are split over all mesh axes; `jax.jit` with `NamedSharding`s and a
  donated state (no pmap).
- The rng is `fold_in(key(seed), step)` inside the step, so a resumed run draws the same
  dropout masks as an uninterrupted one.
- A non-finite loss freezes the state inside the step (no update is applied) and the host stops
  at the next log point naming the step; the checkpoints already on disk are the last good ones.
- orbax checkpoints: the last `keep_checkpoints`, plus the best by validation top-1 when
  `data.val_fraction > 0`; with the data iterator state, so resume is exact. SIGTERM saves and
  exits cleanly.
- Evaluation: top-1, top-5, mean per-class accuracy (and the part-hit rate when the dataset has
  part boxes and the model selects patches). Model selection only ever looks at validation; the
  test split is reported, never used to choose.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from fgjax import data as fgdata
from fgjax import methods as fgmethods
from fgjax import models
from fgjax.train import checkpoint as ckpt_lib
from fgjax.train import logs
from fgjax.train import optim

log = logging.getLogger("fgjax")


class TrainingError(RuntimeError):
  """Training stopped for a reason the user must act on (message says which)."""


# ----------------------------------------------------------------------------- config helpers


def get_steps(config, name: str, steps_per_epoch: int, default=None):
  """Reads `{name}_steps`, `{name}_epochs` or `{name}_examples` from `config` as steps."""
  steps = config.get(f"{name}_steps")
  epochs = config.get(f"{name}_epochs")
  examples = config.get(f"{name}_examples")
  given = [v is not None for v in (steps, epochs, examples)]
  if sum(given) > 1:
    raise ValueError(f"config: set only one of {name}_steps, {name}_epochs, {name}_examples")
  if steps is not None:
    return int(steps)
  if epochs is not None:
    return int(round(float(epochs) * steps_per_epoch))
  if examples is not None:
    return int(round(float(examples) / max(config.batch_size, 1)))
  if default is None:
    raise ValueError(f"config: set one of {name}_steps, {name}_epochs or {name}_examples")
  return default


def dtype_of(name: str):
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ValueError(f"config.model.dtype must be float32 or bfloat16, got {name!r}") from None


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """The device mesh: ("data",) over all devices of all processes, or ("data", "fsdp") when
  `config.mesh.fsdp` > 1 (`config.mesh.data` = -1: all devices not used by fsdp)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  mcfg = config.get("mesh", {}) or {}
  fsdp = int(mcfg.get("fsdp", 1) or 1)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"config.mesh.fsdp={fsdp} must divide the number of devices ({n})")
  want = int(mcfg.get("data", -1))
  if want not in (-1, n // fsdp):
    raise ValueError(f"config.mesh.data={want} but {n} devices with config.mesh.fsdp={fsdp} "
                     f"leave {n // fsdp}")
  auto = jax.sharding.AxisType.Auto
  if fsdp == 1:
    return jax.make_mesh((n,), ("data",), axis_types=(auto,), devices=devices)
  return jax.make_mesh((n // fsdp, fsdp), ("data", "fsdp"), axis_types=(auto, auto),
                       devices=devices)


FSDP_MIN_SIZE = 2 ** 12  # arrays smaller than this stay replicated


def fsdp_spec(shape, fsdp: int) -> P:
  """PartitionSpec of one state array: split along its largest dimension divisible by `fsdp`
  (replicated when fsdp == 1, the array is small, or no dimension divides)."""
  if fsdp <= 1 or len(shape) == 0 or int(np.prod(shape)) < FSDP_MIN_SIZE:
    return P()
  for d in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[d] % fsdp == 0:
      return P(*[("fsdp" if i == d else None) for i in range(len(shape))])
  return P()


def state_shardings(tree, mesh):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) of train state."""
  fsdp = int(dict(mesh.shape).get("fsdp", 1))
  return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(a.shape, fsdp)), tree)


def batch_sharding(mesh) -> NamedSharding:
  """Batches: the leading axis split over every mesh axis."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def build_model(config, num_classes: int):
  mcfg = config.model
  kwargs = dict(mcfg.get("kwargs", {}) or {})
  kwargs["dtype"] = dtype_of(mcfg.get("dtype", "float32"))
  return models.create(mcfg.name, num_classes=num_classes, img_size=mcfg.img_size, **kwargs)


def save_config(config, workdir: str):
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} an fgjax workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


# ----------------------------------------------------------------------------- data


def get_sources(config):
  """(train, val or None, test) sources per config.data."""
  dcfg = config.data
  test_split = dcfg.get("test_split", "test")
  train = get_source(config, "train")
  test = get_source(config, test_split)
  val = None
  frac = float(dcfg.get("val_fraction", 0.0) or 0.0)
  if frac > 0:
    train, val = fgdata.split_train_val(train, frac, seed=int(config.seed))
  return train, val, test


def get_source(config, split: str):
  """`fgjax.data.get_source` with `data.source_kwargs`, merged with `data.split_kwargs[split]`
  (e.g. different synthetic example counts per split)."""
  dcfg = config.data
  kw = dict(dcfg.get("source_kwargs", {}) or {})
  kw.update(dict((dcfg.get("split_kwargs", {}) or {}).get(split, {}) or {}))
  if dcfg.get("skip_bad_images"):
    kw["skip_bad_images"] = True
  return fgdata.get_source(dcfg.name, split, dcfg.get("data_dir"), **kw)


def _pipeline_kwargs(config, train: bool) -> dict:
  dcfg = config.data
  kw = dict(image_size=int(config.model.img_size),
            resize_size=int(dcfg.get("resize_size", config.model.img_size)),
            normalize=dcfg.get("normalize", "imagenet"),
            resize_mode=dcfg.get("resize_mode", "shorter"),
            interpolation=dcfg.get("interpolation", "bilinear"),
            worker_count=int(dcfg.get("worker_count", 0)),
            prefetch=int(dcfg.get("prefetch", 2)))
  if train:
    kw.update(dict(dcfg.get("augment", {}) or {}))
  return kw


def make_eval_iter(config, source, batch_size: int):
  return fgdata.make_eval_loader(source, global_batch_size=batch_size,
                                 **_pipeline_kwargs(config, train=False))


# ----------------------------------------------------------------------------- state


def _teacher_labels_fn(config, mesh, train_source) -> tuple[Callable | None, Any, str]:
  """Returns (fn(teacher_inputs, batch) -> labels inside jit, teacher inputs pytree, summary)."""
  from fgjax import teachers
  tcfg = config.get("teacher", ml_collections.ConfigDict())
  return teachers.make_teacher(tcfg, config, mesh, train_source)


def create_train_state(config, model, method, tx, mesh, rng, init_batch_shape,
                       load_pretrained: bool = True):
  """Initialises params (or loads `config.init_from`) and the optimizer state, laid out on the
  mesh by `state_shardings` (replicated unless config.mesh.fsdp > 1)."""
  dummy = jnp.zeros(init_batch_shape, jnp.float32)

  def init(rng):
    variables = model.init({"params": rng, "dropout": rng}, dummy, train=False)
    return dict(variables)

  var_shardings = state_shardings(jax.eval_shape(init, rng), mesh)
  variables = jax.jit(init, out_shardings=var_shardings)(rng)
  params = variables.pop("params")
  if config.get("init_from") and load_pretrained and getattr(model, "backbone", None) is not None:
    # A wrapper model (PMG): the checkpoint is the backbone's (e.g. ImageNet ResNet-50).
    from fgjax import convert
    loaded = convert.load_backbone(config.init_from, model.backbone)
    params = dict(params)
    params["backbone"] = jax.device_put(loaded.pop("params"),
                                        var_shardings["params"]["backbone"])
    for name, tree in loaded.items():
      variables[name] = dict(variables[name])
      variables[name]["backbone"] = jax.device_put(tree, var_shardings[name]["backbone"])
    log.info("initialised the backbone from %s", config.init_from)
  elif config.get("init_from") and load_pretrained:
    from fgjax import convert
    loaded = convert.load_checkpoint(
        config.init_from, config.model.name, img_size=config.model.img_size,
        num_classes=model.num_classes, dont_load=tuple(config.get("init_dont_load", ()) or ()),
        model_kwargs={k: v for k, v in dict(config.model.get("kwargs", {}) or {}).items()},
        with_collections=True)
    params = jax.device_put(loaded.pop("params"), var_shardings["params"])
    for name, tree in loaded.items():  # e.g. a ResNet's BatchNorm statistics
      variables[name] = jax.device_put(tree, var_shardings[name])
    log.info("initialised from %s", config.init_from)
  state = {"params": params, "step": jnp.zeros((), jnp.int32),
           "bad_step": jnp.full((), -1, jnp.int32)}
  state.update(variables)  # batch_stats and other collections
  opt_shardings = state_shardings(jax.eval_shape(tx.init, params), mesh)
  state["opt"] = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  if float(config.get("ema_decay", 0.0) or 0.0) > 0:
    state["ema"] = jax.tree.map(jnp.copy, params)
  return jax.device_put(state, state_shardings(state, mesh))


def _collections(state) -> dict:
  return {k: v for k, v in state.items() if k not in ("params", "opt", "step", "bad_step", "ema")}


def method_losses(method, teacher_labels=None) -> list:
  """The method's losses, one optimizer update each: `loss(params, extra, batch, rng) ->
  (value, (metrics, new extra))`. One for most methods, S + 1 in sequence for PMG."""
  if hasattr(method, "stage_losses"):
    return method.stage_losses()
  return [lambda p, e, b, r: method.loss(p, e, b, r, teacher_labels)]


def apply_updates(loss_fns, tx, params, opt, extra, batch, rng):
  """One optimizer update per loss in `loss_fns`, in sequence (each on the params the previous
  one left). Returns (params, opt, extra, summed loss, merged metrics, last grads)."""
  loss, metrics = 0.0, {}
  for k, fn in enumerate(loss_fns):
    r = rng if len(loss_fns) == 1 else jax.random.fold_in(rng, k)
    (loss_k, (m, extra)), grads = jax.value_and_grad(fn, has_aux=True)(params, extra, batch, r)
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
    extra = extra or {}
    loss = loss + loss_k
    metrics.update(m)
  return params, opt, extra, loss, metrics, grads


def make_train_step(config, method, tx, schedules, base_rng, teacher_fn):
  """The jitted-to-be step: (state, batch, teacher_inputs) -> (state, metrics)."""
  ema_decay = float(config.get("ema_decay", 0.0) or 0.0)

  def step_fn(state, batch, teacher_inputs):
    step = state["step"]
    rng = jax.random.fold_in(base_rng, step)
    teacher_labels = None
    if teacher_fn is not None:
      teacher_labels = jax.lax.stop_gradient(teacher_fn(teacher_inputs, batch))
    loss_fns = method_losses(method, teacher_labels)
    params, opt, new_extra, loss, metrics, grads = apply_updates(
        loss_fns, tx, state["params"], state["opt"], _collections(state), batch, rng)
    new = {"params": params, "opt": opt, "step": step + 1}
    new.update(new_extra)
    if "ema" in state:
      new["ema"] = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p,
                                state["ema"], params)
    finite = jnp.isfinite(loss)
    ok = finite & (state["bad_step"] < 0)
    out = {k: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new[k], state[k])
           for k in new if k != "step"}
    out["step"] = step + 1
    out["bad_step"] = jnp.where(finite | (state["bad_step"] >= 0), state["bad_step"], step)
    metrics = dict(metrics)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(params)
    metrics["lr"] = schedules["new"](step * len(loss_fns))
    return out, metrics

  return step_fn


def abstract_train_state(config, model, method, tx, mesh):
  """ShapeDtypeStructs (with the train state's shardings) of the train state, for restoring."""
  img = int(config.model.img_size)
  abstract = jax.eval_shape(lambda: create_train_state(
      config, model, method, tx, mesh, jax.random.key(0), (1, img, img, 3),
      load_pretrained=False))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      abstract, state_shardings(abstract, mesh))


def build_optimizer(config, model, steps_per_epoch: int | None = None, total_steps: int = 1,
                    updates_per_step: int = 1):
  """(optax transform, schedules) from `config.optim` over the model's abstract parameters.

  Epoch-based keys (warmup_epochs, decay_every_epochs) become optimizer updates with
  `steps_per_epoch` and `updates_per_step` (PMG makes S + 1 updates per batch); the schedules
  span total_steps * updates_per_step updates. Without steps_per_epoch (restoring a model: only
  the state's structure matters) the schedule is constant.
  """
  img = int(config.model.img_size)
  params_shape = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, img, img, 3)),
                         train=False)["params"])
  ocfg = ml_collections.ConfigDict(config.optim.to_dict())
  with ocfg.unlocked():
    if steps_per_epoch is None:
      ocfg.schedule = "constant"
    else:
      for key in ("warmup", "decay_every"):
        if ocfg.get(f"{key}_epochs") is not None or ocfg.get(f"{key}_steps") is not None:
          ocfg[f"{key}_steps"] = get_steps(ocfg, key, steps_per_epoch) * updates_per_step
  return optim.make_optimizer(ocfg, params_shape, total_steps * updates_per_step)


def restore_model(workdir: str, prefer: str = "best", mesh=None, num_classes=None):
  """Rebuilds the model of a finished or running fgjax workdir and restores its variables.

  Returns (config, model, method, variables for `model.apply`, info dict). Uses the best
  validation checkpoint when there is one (unless prefer="last"); EMA params when the run kept
  an EMA.
  """
  config = load_config(workdir)
  mesh = mesh or make_mesh(config)
  if num_classes is None:
    num_classes = int(config.get("num_classes_resolved", 0) or 0) or None
  if num_classes is None:
    raise ValueError(f"{workdir}/config.json lacks num_classes_resolved")
  model = build_model(config, num_classes)
  method = fgmethods.get_method(config, model, num_classes)
  tx, _ = build_optimizer(config, model)  # only the state's structure is needed here
  abstract = abstract_train_state(config, model, method, tx, mesh)
  state, step, which = ckpt_lib.restore_params_from_workdir(workdir, abstract, prefer)
  info = {"step": int(step), "checkpoint": which, "workdir": workdir}
  return config, model, method, _eval_variables(state), info


# ----------------------------------------------------------------------------- evaluation


def part_hits(selected, part_boxes, grid, patch_size, stride):
  """Per example, the share of selected patches whose centre lies in a part box (-1 = pad).

  selected: (B, K) patch indices; part_boxes: (B, P, 4) x0, y0, x1, y1 in input pixels.
  Returns (hits (B,), has_parts (B,)).
  """
  gw = grid[1]
  row = selected // gw
  col = selected % gw
  cx = (col * stride + patch_size / 2.0)[:, :, None]
  cy = (row * stride + patch_size / 2.0)[:, :, None]
  b = part_boxes[:, None, :, :]
  valid = b[..., 2] > b[..., 0]
  inside = (cx >= b[..., 0]) & (cx < b[..., 2]) & (cy >= b[..., 1]) & (cy < b[..., 3]) & valid
  hit = inside.any(-1).astype(jnp.float32).mean(-1)
  has = valid.any(-1).any(-1)
  return hit, has


def make_eval_step(method, model):
  def eval_step(variables, batch):
    need_sel = "part_boxes" in batch and hasattr(model, "grid")
    out = method.eval_outputs(variables, batch, need_selection=need_sel)
    labels = batch["label"]
    res = {"mask": batch["mask"], "label": labels}
    for name, logits in out.items():
      if name == "selected":
        continue
      key = "" if name == "logits" else name + "_"
      top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
      res[key + "pred"] = top5[:, 0]
      res[key + "correct5"] = (top5 == labels[:, None]).any(-1)
    if "selected" in out:
      stride = model.patch_stride or model.patch_size
      hit, has = part_hits(out["selected"], batch["part_boxes"], model.grid, model.patch_size,
                           stride)
      # Chance: the share of all patches on a part (what uniformly random picks would score).
      every = jnp.broadcast_to(jnp.arange(model.grid[0] * model.grid[1]),
                               (labels.shape[0], model.grid[0] * model.grid[1]))
      res["part_hit"], res["has_parts"] = hit, has
      res["part_hit_chance"] = part_hits(every, batch["part_boxes"], model.grid,
                                         model.patch_size, stride)[0]
    return res
  return eval_step


def summarize_eval(results: dict[str, np.ndarray], num_classes: int) -> dict[str, float]:
  """top-1, top-5, mean per-class accuracy (+ per-head variants and part-hit rate)."""
  mask = results["mask"].astype(bool)
  labels = results["label"][mask]
  out = {"num_examples": int(mask.sum())}
  for key in [k for k in results if k.endswith("pred")]:
    prefix = key[: -len("pred")]
    pred = results[key][mask]
    correct = pred == labels
    out[prefix + "top1"] = float(correct.mean()) if correct.size else float("nan")
    out[prefix + "top5"] = float(results[prefix + "correct5"][mask].mean()) if correct.size \
        else float("nan")
    per_class = [correct[labels == c].mean() for c in range(num_classes) if (labels == c).any()]
    out[prefix + "mean_per_class"] = float(np.mean(per_class)) if per_class else float("nan")
  if "part_hit" in results:
    has = results["has_parts"].astype(bool) & mask
    if has.any():
      out["part_hit_rate"] = float(results["part_hit"][has].mean())
      if "part_hit_chance" in results:
        out["part_hit_chance"] = float(results["part_hit_chance"][has].mean())
  return out


def evaluate(eval_step_jit, variables, batches: Iterator, mesh, num_classes: int) -> dict:
  chunks: dict[str, list] = {}
  for batch in batches:
    gbatch = fgdata.to_global_batch(batch, mesh)
    res = eval_step_jit(variables, gbatch)
    res = multihost_utils.process_allgather(res, tiled=True)
    for k, v in res.items():
      chunks.setdefault(k, []).append(np.asarray(v))
  if not chunks:
    raise TrainingError("evaluation split is empty")
  return summarize_eval({k: np.concatenate(v) for k, v in chunks.items()}, num_classes)


# ----------------------------------------------------------------------------- main loop


class _StopFlag:
  """Set by SIGTERM/SIGINT: the loop saves a checkpoint and exits cleanly."""

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


def _eval_variables(state):
  variables = {"params": state["ema"] if "ema" in state else state["params"]}
  variables.update(_collections(state))
  return variables


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains per `config` in `workdir` (resuming if it holds a checkpoint); returns the final
  metrics {"val": ..., "test": ...}."""
  workdir = os.path.abspath(workdir)
  if config.get("teacher", {}).get("train_first"):
    _train_teacher_phase(config, workdir)
  mesh = make_mesh(config)
  repl = NamedSharding(mesh, P())
  train_src, val_src, test_src = get_sources(config)
  num_classes = int(train_src.num_classes)
  with config.unlocked():
    config.num_classes_resolved = num_classes
    config.class_names_resolved = list(train_src.class_names)
  save_config(config, workdir)
  model = build_model(config, num_classes)
  method = fgmethods.get_method(config, model, num_classes)

  batch_size = int(config.batch_size)
  if batch_size % jax.device_count():
    raise ValueError(f"config.batch_size={batch_size} must be divisible by the number of "
                     f"devices ({jax.device_count()})")
  steps_per_epoch = max(len(train_src) // batch_size, 1)
  total_steps = get_steps(config, "total", steps_per_epoch)
  # Schedules count optimizer updates: PMG makes S + 1 updates per batch.
  updates_per_step = int(getattr(method, "updates_per_step", 1))
  log_every = get_steps(config, "log_every", steps_per_epoch, default=50)
  eval_every = get_steps(config, "eval_every", steps_per_epoch, default=total_steps)
  ckpt_every = get_steps(config, "checkpoint_every", steps_per_epoch, default=eval_every)

  writer = logs.MetricWriter(workdir)
  seed = int(config.seed)
  base_rng = jax.random.fold_in(jax.random.key(seed), 1)
  img = int(config.model.img_size)
  tx, schedules = build_optimizer(config, model, steps_per_epoch, total_steps, updates_per_step)
  teacher_fn, teacher_inputs, teacher_desc = _teacher_labels_fn(config, mesh, train_src) \
      if method.uses_teacher else (None, None, "")
  if method.uses_teacher:
    log.info("teacher: %s", teacher_desc)

  ckpt = ckpt_lib.Checkpointer(workdir, keep=int(config.get("keep_checkpoints", 3)))
  stop = _StopFlag().install()
  try:
    latest = ckpt.latest_step()
    if latest is not None:
      state, data_state, start = ckpt.restore(abstract_train_state(config, model, method, tx,
                                                                   mesh))
      log.info("resumed from %s/checkpoints/%d", workdir, start)
    else:
      state = create_train_state(config, model, method, tx, mesh, jax.random.key(seed),
                                 (1, img, img, 3))
      data_state, start = None, 0

    train_iter = fgdata.make_train_loader(
        train_src, global_batch_size=batch_size, seed=seed, **_pipeline_kwargs(config, True))
    if data_state is not None:
      train_iter.set_state(data_state)
    data_iter = iter(train_iter)

    step_fn = make_train_step(config, method, tx, schedules, base_rng, teacher_fn)
    state_sh = state_shardings(state, mesh)
    train_step = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(state_sh, repl))
    eval_step = jax.jit(make_eval_step(method, model), out_shardings=repl)

    def run_eval(split_src, split, step):
      if split_src is None:
        return None
      metrics = evaluate(eval_step, _eval_variables(state),
                         iter(make_eval_iter(config, split_src,
                                             int(config.get("eval_batch_size", batch_size)))),
                         mesh, num_classes)
      writer.write(step, split, metrics)
      log.info("step %d %s: %s", step, split,
               ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in metrics.items()))
      return metrics

    best_val = ckpt.best_value(default=-1.0)
    bar = logs.ProgressBar(total_steps, start, batch_size=batch_size)
    pending = []
    step = start
    t_log = time.time()
    while step < total_steps:
      batch = next(data_iter)
      gbatch = fgdata.to_global_batch(batch, mesh)
      # The step itself never waits on the host: a device-to-host copy here is a bug (enforced
      # on GPU/TPU; on the CPU backend arrays already live on the host and the guard is moot).
      with jax.transfer_guard_device_to_host("disallow"):
        state, metrics = train_step(state, gbatch, teacher_inputs)
      step += 1
      pending.append(metrics)
      bar.update(step)
      last = step == total_steps
      if step % log_every == 0 or last or stop:
        fetched = jax.device_get(pending)
        bad = int(jax.device_get(state["bad_step"]))
        if bad >= 0:
          raise TrainingError(
              f"loss became non-finite at step {bad}; training stopped. The state was frozen "
              f"before that update and the checkpoints in {workdir}/checkpoints are intact. "
              f"Lower config.optim.lr, enable config.optim.clip_norm, or check the data.")
        avg = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        dt = time.time() - t_log
        avg["img_per_s"] = len(fetched) * batch_size / max(dt, 1e-9)
        avg["epoch"] = step / steps_per_epoch
        writer.write(step, "train", avg)
        bar.update(step, f"loss {avg['loss']:.4f} lr {avg['lr']:.2e}", force=True)
        pending, t_log = [], time.time()
      if step % ckpt_every == 0 or last or stop:
        ckpt.save(step, state, train_iter.get_state())
      if step % eval_every == 0 and not last:
        val = run_eval(val_src, "val", step)
        if val is not None and val["top1"] > best_val:
          best_val = val["top1"]
          ckpt.save_best(step, state, best_val, train_iter.get_state())
        run_eval(test_src, "test", step)
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
        ckpt.save_best(step, state, best_val, train_iter.get_state())
    which = "best" if ckpt.best_step() is not None else "last"
    ckpt.wait()
    if which == "best" and ckpt.best_step() != step:
      abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                              state, state_sh)
      state, _, sel_step = ckpt.restore(abstract, which="best")
      log.info("selected the best validation checkpoint: step %d (val top-1 %.4f)", sel_step,
               best_val)
      result["val_selected"] = {"step": int(sel_step), "top1": best_val}
    result["test"] = run_eval(test_src, "test", step)
    result["selected"] = which
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    n_vis = int(config.get("visualize_examples", 0) or 0)
    if n_vis and hasattr(model, "grid"):
      ckpt.wait()
      from fgjax.train import modes
      modes.visualize(workdir, [], num_images=n_vis, which=which)
    return result
  finally:
    stop.restore()
    writer.close()
    ckpt.close()


def _train_teacher_phase(config, workdir):
  """Phase 1 of a two-phase config: trains `config.teacher.train_first` into
  `<workdir>/teacher` (resumable like any run) and points `teacher.checkpoint` at it."""
  tcfg = config.teacher.train_first
  teacher_dir = os.path.join(workdir, "teacher")
  if not os.path.exists(os.path.join(teacher_dir, "final_metrics.json")):
    log.info("phase 1: training the teacher (%s) in %s", tcfg.model.name, teacher_dir)
    train_and_evaluate(tcfg, teacher_dir)
  with config.unlocked():
    config.teacher.checkpoint = teacher_dir
    config.teacher.train_first = None
  log.info("phase 2: training %s with the teacher from %s", config.model.name, teacher_dir)

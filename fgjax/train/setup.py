"""Set-up of a run: config files, data sources, model, method, optimizers, train state, restore.

Everything here happens before the first step (or without one: `restore_model` rebuilds a
finished run for evaluation, prediction and the toolkit). The loop (`fgjax.train.trainer`),
`fgjax.train.modes` and `fgjax.teachers` build on it; it imports neither.

- `build_optimizers` turns the method's declared optimizers (`Method.optimizers()`) into optax
  transforms, each over its own parameter group with its own schedule; schedules count that
  optimizer's updates (PMG makes S + 1 per batch; an alternating method makes some steps none).
- `create_train_state` initialises the model from an example batch with the loader's element
  spec (`Method.init_variables`), loads `config.init_from` into the model's checkpoint parts
  (`Method.load_pretrained`), and lays the state out on the mesh: a plain dict {"params",
  "opt": {optimizer: state over its group}, "step", "bad_step", ["ema"], [model collections]}.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fgjax import data as fgdata
from fgjax import methods as fgmethods
from fgjax import models
from fgjax.methods import base as protocol
from fgjax.train import checkpoint as ckpt_lib
from fgjax.train import optim
from fgjax.train import sharding
from fgjax.train import workdir as workdir_lib

log = logging.getLogger("fgjax")

STATE_KEYS = ("params", "opt", "step", "bad_step", "ema")


class TrainingError(RuntimeError):
  """Training stopped for a reason the user must act on (message says which)."""


# ----------------------------------------------------------------------------- config


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


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in `workdir` (its config.json)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} an fgjax workdir?")
  return ml_collections.ConfigDict(workdir_lib.read_saved(workdir))


# ----------------------------------------------------------------------------- data


def get_sources(config):
  """(train, val or None, test) sources per config.data. `data.pseudo_labels` (a file of
  `fgjax.toolkit.pseudo_labels`) appends its images to the train source after `val_fraction`
  has carved the validation split: pseudo-labelled images never enter model selection."""
  dcfg = config.data
  test_split = dcfg.get("test_split", "test")
  train = labelled = get_source(config, "train")
  test = get_source(config, test_split)
  val = None
  frac = float(dcfg.get("val_fraction", 0.0) or 0.0)
  if frac > 0:
    train, val = fgdata.split_train_val(train, frac, seed=int(config.seed))
  if dcfg.get("pseudo_labels"):
    from fgjax.toolkit import pseudo_labels
    train = pseudo_labels.add_to_train(train, os.fspath(dcfg.pseudo_labels), labelled,
                                       lambda split: get_source(config, split), test=test)
  return train, val, test


def get_test_source(config):
  """The test split (`data.test_split`) alone: what evaluation reads, without building the
  train source (nor reading `data.pseudo_labels`)."""
  return get_source(config, config.data.get("test_split", "test"))


def get_source(config, split: str):
  """`fgjax.data.get_source` with `data.source_kwargs`, merged with `data.split_kwargs[split]`
  (e.g. different synthetic example counts per split); with `data.text.enabled` the examples'
  descriptions too (`data.text_dir`, `data.allow_missing_text`; docs/text.md)."""
  dcfg = config.data
  kw = dict(dcfg.get("source_kwargs", {}) or {})
  kw.update(dict((dcfg.get("split_kwargs", {}) or {}).get(split, {}) or {}))
  if dcfg.get("skip_bad_images"):
    kw["skip_bad_images"] = True
  if text_enabled(config):
    kw.update(with_text=True, text_dir=dcfg.get("text_dir") or None,
              allow_missing_text=bool(dcfg.get("allow_missing_text", False)))
  return fgdata.get_source(dcfg.name, split, dcfg.get("data_dir"), **kw)


# ----------------------------------------------------------------------------- text

VOCAB_FILE = "vocab.txt"  # the run's vocabulary, in its workdir


def text_enabled(config) -> bool:
  """`config.data.text.enabled`: batches carry the examples' noun phrases."""
  return bool(((config.get("data") or {}).get("text") or {}).get("enabled", False))


def text_encoder(config, workdir: str | None = None, train_source=None):
  """The run's `fgjax.text.TextEncoder` (None when `data.text.enabled` is off).

  The vocabulary is the workdir's own `vocab.txt` when it exists (a resumed run, eval, predict:
  the ids the run trained with; its sha256 must be the one config.json recorded), else
  `data.text.vocab` (another run's vocab.txt, e.g. the teacher's) for a new run, else built
  from the noun phrases of `train_source`'s texts (a new run). A new run saves it with
  `save_vocabulary` once the workdir guard has passed. A workdir whose config.json recorded a
  vocabulary that is now missing or changed is refused."""
  if not text_enabled(config):
    return None
  from fgjax import text as fgtext
  tcfg = config.data.text
  given = tcfg.get("vocab") or ""
  own = os.path.join(workdir, VOCAB_FILE) if workdir else ""
  saved = config.get("vocab_sha256_resolved")
  if own and os.path.exists(os.path.join(workdir, "config.json")):
    saved = workdir_lib.read_saved(workdir).get("vocab_sha256_resolved") or saved
  if own and os.path.exists(own):
    vocab = fgtext.Vocabulary.load(own)
    if saved and vocab.sha256() != saved:
      raise ValueError(f"{own} was changed since the run started (its sha256 differs from "
                       f"vocab_sha256_resolved in config.json): the run's word ids are lost")
  elif saved:
    raise FileNotFoundError(f"{own or VOCAB_FILE} not found: the vocabulary this run trained "
                            f"with (sha256 {saved[:12]}... in config.json) is missing")
  elif given:
    if not os.path.exists(given):
      raise FileNotFoundError(f"config.data.text.vocab: {given} not found")
    vocab = fgtext.Vocabulary.load(given)
  elif train_source is not None:
    vocab = fgtext.Vocabulary.build((train_source.texts(i) for i in range(len(train_source))),
                                    min_count=tcfg.get("min_count", 1))
    log.info("built a vocabulary of %d words from the noun phrases of %d training texts",
             len(vocab), len(train_source))
  else:
    raise FileNotFoundError(f"{own or VOCAB_FILE} not found: the run's vocabulary (written by "
                            f"training with data.text.enabled) is missing")
  with config.unlocked():
    config.vocab_size_resolved = len(vocab)
    config.vocab_sha256_resolved = vocab.sha256()
  return fgtext.TextEncoder(vocab, tcfg.max_phrases, tcfg.max_words,
                            train_sentences=tcfg.get("train_sentences", "sample"),
                            eval_sentences=tcfg.get("eval_sentences", "all"),
                            train_drop=float(tcfg.get("train_drop", 0.0)))


def save_vocabulary(text, workdir: str):
  """Writes the run's vocabulary to `<workdir>/vocab.txt` (process 0; kept when present)."""
  if text is None or jax.process_index() != 0:
    return
  path = os.path.join(workdir, VOCAB_FILE)
  if not os.path.exists(path):
    os.makedirs(workdir, exist_ok=True)
    text.vocab.save(path)


def pipeline_kwargs(config, train: bool) -> dict:
  dcfg = config.data
  kw = dict(image_size=int(config.model.img_size),
            resize_size=int(dcfg.get("resize_size", config.model.img_size)),
            normalize=normalize_kind(config),
            resize_mode=dcfg.get("resize_mode", "shorter"),
            interpolation=dcfg.get("interpolation", "bilinear"),
            backend=dcfg.get("backend", "opencv"),
            draft=bool(dcfg.get("draft_decode", True)),
            worker_count=int(dcfg.get("worker_count", 0)),
            prefetch=int(dcfg.get("prefetch", 2)))
  if train:
    kw.update(dict(dcfg.get("augment", {}) or {}))
  return kw


def make_train_iter(config, source, crop_boxes=None, text=None):
  """The train loader; `crop_boxes` (N, 4): the attention-region crops (`fgjax.toolkit.crops`);
  `text`: the method's text encoder (`Method.text`), which adds the phrase fields."""
  return fgdata.make_train_loader(source, global_batch_size=int(config.batch_size),
                                  seed=int(config.seed), crop_boxes=crop_boxes, text=text,
                                  **pipeline_kwargs(config, True))


def make_eval_iter(config, source, batch_size: int | None = None, text=None):
  bs = int(batch_size or config.get("eval_batch_size", config.batch_size))
  return fgdata.make_eval_loader(source, global_batch_size=bs, text=text,
                                 **pipeline_kwargs(config, train=False))


def normalize_kind(config) -> str:
  """`config.data.normalize`: what the jitted steps normalise uint8 images with."""
  return (config.get("data") or {}).get("normalize", "imagenet")


def example_batch(spec: dict) -> dict:
  """One example of a loader's element spec (`Loader.element_spec`), for initialisation, as
  the method sees it: uint8 images become float32 (they are normalised inside the steps)."""
  return _as_seen({k: (tuple(s.shape[1:]), s.dtype) for k, s in spec.items()})


def _as_seen(fields: dict) -> dict:
  out = {}
  for k, (shape, dtype) in fields.items():
    if k == "image" and np.dtype(dtype) == np.uint8:
      dtype = jnp.float32
    out[k] = jnp.zeros((1,) + tuple(shape), dtype)
  return out


def config_example(config) -> dict:
  """An example batch for restoring `config`'s model without a data source: the train
  loader's element spec the run saved (`batch_spec_resolved`), or for a config that never ran
  the fields every source gives (`fgjax.data.batch_spec`)."""
  saved = config.get("batch_spec_resolved")
  if not saved:
    return example_batch(fgdata.batch_spec(int(config.model.img_size)))
  return _as_seen({k: (tuple(shape), dtype) for k, (shape, dtype) in saved.items()})


def resolved(config, method, element_spec):
  """`config` with what a run resolved for its later restore: the train loader's element spec
  (per-example shapes and dtypes) and where the method's class lives (a method registered
  outside fgjax is imported from there)."""
  with config.unlocked():
    config.batch_spec_resolved = {k: [list(s.shape[1:]), np.dtype(s.dtype).name]
                                  for k, s in element_spec.items()}
    config.method_import_resolved = fgmethods.import_path(type(method))
  return config


# ----------------------------------------------------------------------------- model, method


def build_model(config, num_classes: int, vocab_size: int | None = None):
  """The model of `config.model`; `vocab_size` (a model that reads text) its word count."""
  mcfg = config.model
  kwargs = dict(mcfg.get("kwargs", {}) or {})
  if "attn" in kwargs and kwargs["attn"] is None:  # the ResNet recipes' unset placeholder
    del kwargs["attn"]  # (configs.common.resnet_attention): the model's own default
  kwargs["dtype"] = dtype_of(mcfg.get("dtype", "float32"))
  if vocab_size is not None:
    kwargs["vocab_size"] = int(vocab_size)
  return models.create(mcfg.name, num_classes=num_classes, img_size=mcfg.img_size, **kwargs)


def _method_class(config):
  return fgmethods.method_class(config.get("method", "classifier"),
                                config.get("method_import_resolved"))


def build(config, num_classes: int, text=None):
  """(model, method) for `config`; `text` (the run's `text_encoder`) becomes `method.text`, and
  a method whose model reads text (`Method.reads_text`) gets a model sized to its vocabulary."""
  cls = _method_class(config)
  vocab_size = len(text.vocab) if (text is not None and cls.reads_text) else None
  model = build_model(config, num_classes, vocab_size)
  method = fgmethods.get_method(config, model, num_classes)
  method.text = text
  return model, method


# ----------------------------------------------------------------------------- optimizers


@dataclasses.dataclass(frozen=True)
class BuiltOptimizer:
  """An optax transform over one parameter group (`mask`, a bool tree over the params) and
  the schedule its learning-rate log reads (of the group's "new layers")."""
  tx: optax.GradientTransformation
  mask: Any
  schedule: Callable


def metric_name(metric: str, optimizer: str) -> str:
  """`lr`, `grad_norm` of optimizer "default"; `lr_<name>`, `grad_norm_<name>` of others."""
  return metric if optimizer == "default" else f"{metric}_{optimizer}"


def scaled_lr(optim_config, global_batch: int) -> float:
  """`optim.lr`, times global batch / `optim.lr_base_batch` when that is set (DeiT's rule:
  lr x batch x GPUs / 512); the rate every schedule of the optimizer starts from."""
  lr = float(optim_config.lr)
  base = optim_config.get("lr_base_batch")
  if base is None or base == 0:
    return lr
  if not isinstance(base, (int, float)) or base < 0:
    raise ValueError(f"config.optim.lr_base_batch must be a batch size > 0 (or 0/None: off), "
                     f"got {base!r}")
  return lr * global_batch / float(base)


def build_optimizers(config, method, params_shape, steps_per_epoch: int | None = None,
                     total_steps: int = 1) -> dict[str, BuiltOptimizer]:
  """{name: BuiltOptimizer} from the method's declared optimizers.

  Each optimizer's schedule spans its own updates over `total_steps` train steps (S + 1 per
  step for PMG); epoch-based keys (warmup_epochs, decay_every_epochs) and step keys become
  that optimizer's updates. Without steps_per_epoch (restoring: only the state's structure
  matters) the schedules are constant.
  """
  specs = method.optimizers()
  phases = method.phases()
  used = {u.optimizer for p in phases for u in p.updates}
  unknown = sorted(used - set(specs))
  if unknown:
    raise ValueError(f"method {method.name!r}: updates name undeclared optimizers {unknown}; "
                     f"declared: {sorted(specs)}")
  masks = protocol.group_mask(specs, params_shape)
  unused = sorted(set(specs) - used)
  if unused:
    log.warning("method %s: optimizers %s are declared but no update uses them: their "
                "parameters stay frozen", method.name, unused)
  flat = [v for m in masks.values() for v in jax.tree.leaves(m)]
  frozen = len(jax.tree.leaves(params_shape)) - sum(flat)
  if frozen:
    log.info("method %s: %d parameter arrays belong to no optimizer and stay frozen",
             method.name, frozen)
  out = {}
  for name, spec in specs.items():
    total = int(protocol.updates_before(phases, name, int(total_steps)))
    per_step = total / max(int(total_steps), 1)
    ocfg = ml_collections.ConfigDict(dict(spec.config))
    with ocfg.unlocked():
      if ocfg.get("lr_base_batch"):
        lr = scaled_lr(ocfg, int(config.batch_size))
        log.info("optimizer %s: lr %g x global batch %d / lr_base_batch %g = %.3g", name,
                 float(ocfg.lr), int(config.batch_size), float(ocfg.lr_base_batch), lr)
        ocfg.lr = lr  # make_optimizer reads only the rate
      if steps_per_epoch is None:
        ocfg.schedule = "constant"
      else:
        for key in ("warmup", "decay_every"):
          if ocfg.get(f"{key}_epochs") is not None or ocfg.get(f"{key}_steps") is not None:
            ocfg[f"{key}_steps"] = int(round(get_steps(ocfg, key, steps_per_epoch)
                                             * per_step))
    group = protocol.select(params_shape, masks[name])
    tx, schedules = optim.make_optimizer(ocfg, group, max(total, 1))
    out[name] = BuiltOptimizer(tx, masks[name], schedules["new"])
  return out


# ----------------------------------------------------------------------------- train state


def params_shape(method, example):
  return jax.eval_shape(lambda: method.init_variables(jax.random.key(0), example)["params"])


def create_train_state(config, method, optimizers, mesh, rng, example,
                       load_pretrained: bool = True):
  """Initialises the variables from `example` (or loads `config.init_from` into the model's
  checkpoint parts) and each optimizer's state over its group, laid out on the mesh by
  `state_shardings` (replicated unless config.mesh.fsdp > 1)."""
  def init(rng):
    return method.init_variables(rng, example)

  var_shardings = sharding.state_shardings(jax.eval_shape(init, rng), mesh)
  variables = jax.jit(init, out_shardings=var_shardings)(rng)
  if config.get("init_from") and load_pretrained:
    from fgjax import convert
    parts = method.load_pretrained(config.init_from,
                                   tuple(config.get("init_dont_load", ()) or ()))
    # Each loaded tree goes straight to the shardings of the fresh arrays it replaces.
    variables = convert.put_parts(
        variables, parts,
        lambda tree, target: jax.device_put(tree, jax.tree.map(lambda a: a.sharding, target)))
    log.info("initialised %s from %s", ", ".join(k or "the model" for k in parts),
             config.init_from)
  variables = dict(variables)
  params = variables.pop("params")
  state = {"params": params, "step": jnp.zeros((), jnp.int32),
           "bad_step": jnp.full((), -1, jnp.int32)}
  state.update(variables)  # batch_stats and other collections
  state["opt"] = {}
  for name, o in optimizers.items():
    group = protocol.select(params, o.mask)
    shardings = sharding.state_shardings(jax.eval_shape(o.tx.init, group), mesh)
    state["opt"][name] = jax.jit(o.tx.init, out_shardings=shardings)(group)
  if float(config.get("ema_decay", 0.0) or 0.0) > 0:
    state["ema"] = jax.tree.map(jnp.copy, params)
  return jax.device_put(state, sharding.state_shardings(state, mesh))


def collections(state) -> dict:
  """The model's collections besides params (batch_stats, CAL's centers) in a train state."""
  return {k: v for k, v in state.items() if k not in STATE_KEYS}


def eval_variables(state) -> dict:
  """Variables for `model.apply`: the EMA params when the run keeps an EMA."""
  variables = {"params": state["ema"] if "ema" in state else state["params"]}
  variables.update(collections(state))
  return variables


def abstract_train_state(config, method, optimizers, mesh, example):
  """ShapeDtypeStructs (with the train state's shardings) of the train state, for restoring."""
  abstract = jax.eval_shape(lambda: create_train_state(
      config, method, optimizers, mesh, jax.random.key(0), example, load_pretrained=False))
  return sharding.abstract_with_shardings(abstract, mesh)


def restore_model(workdir: str, prefer: str = "best", mesh=None, num_classes=None):
  """Rebuilds the model of a finished or running fgjax workdir and restores its variables.

  Returns (config, model, method, variables for `model.apply`, info dict). Uses the best
  validation checkpoint when there is one (unless prefer="last"); EMA params when the run kept
  an EMA.
  """
  config = load_config(workdir)
  mesh = mesh or sharding.make_mesh(config)
  if num_classes is None:
    num_classes = int(config.get("num_classes_resolved", 0) or 0) or None
  if num_classes is None:
    raise ValueError(f"{workdir}/config.json lacks num_classes_resolved")
  text = None
  if _method_class(config).reads_text:
    text = text_encoder(config, workdir)
  elif text_enabled(config):  # an image-only model (a distilled student): no text at inference
    with config.unlocked():
      config.data.text.enabled = False
  model, method = build(config, num_classes, text)
  example = config_example(config)
  optimizers = build_optimizers(config, method, params_shape(method, example))
  abstract = abstract_train_state(config, method, optimizers, mesh, example)
  state, step, which = ckpt_lib.restore_params_from_workdir(workdir, abstract, prefer)
  info = {"step": int(step), "checkpoint": which, "workdir": workdir}
  return config, model, method, eval_variables(state), info


def build_helpers(method, env: protocol.HelperEnv):
  """(fns, inputs) of the method's frozen helpers, each built once (and logged)."""
  fns, inputs = {}, {}
  for name, helper in method.helpers().items():
    fns[name], inputs[name], desc = helper.build(env)
    log.info("%s: %s", name, desc)
  return fns, inputs

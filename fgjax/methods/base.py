"""The method protocol: what a method declares, and all that the trainer runs.

A method is one module of `fgjax.methods` holding a subclass of `Method`, registered in
`fgjax.methods.METHODS` (one line in `fgjax/methods/__init__.py`, or
`fgjax.methods.register(name, cls)` from a module of your own) and built by
`fgjax.methods.get_method(config, model, num_classes)`. A new method is one model file
(`fgjax/models/`, with its factory registered in `fgjax/models/__init__.py`), one method file
and one config (`configs/`); `fgjax/train` is never edited for it. The trainer calls exactly
the members below and probes nothing (no `hasattr`/`getattr` on methods or models).

Config
  `sections`: {config key: defaults} of the method's own config sections, declared once (e.g.
  trs_deit's "trs" and "teacher"). `configs/common.py:base_config(method)` adds them to the
  shared keys, so a saved `config.json` holds only the sections of the method that ran.

Inputs
  A batch is a dict of arrays named by the data source: "image", "label", "id", "object_box",
  ["part_boxes"], ["part_locs"], "mask" in evaluation, and with `config.data.text.enabled`
  "phrases" (B, P, W) int32 word ids and "phrase_mask" (B, P) bool (`fgjax.text`; the encoder is
  `method.text`). `reads_text = True` declares a model that reads them: it is built with the
  run's `vocab_size`.
  `model_inputs(batch)` -> the positional arguments the model reads from it (default: the
  image). `init_variables(rng, example)` initialises the model from an example batch built from
  the loader's own element spec (`fgjax.data.Loader.element_spec`), never from a zeros image
  of an assumed shape.

Optimizers
  `optimizers()` -> {name: `OptimizerSpec(params, config)`}: one or more optax transforms, each
  over a named subset of the parameters (`params`: regexes fully matching 'a/b/c' parameter
  paths) with its own `config.optim`-style section (schedule, learning rate). A parameter that
  no optimizer claims stays frozen; two optimizers may not claim the same parameter. The train
  state holds each optimizer's state over its own group only (`state["opt"][name]`); all of
  them are checkpointed and restored. The default is one optimizer "default" over every
  parameter from `config.optim`.

Updates
  `phases()` -> a sequence of `Phase(updates, steps)`: phase k runs for `steps` consecutive
  train steps, then the next phase, cycling. A phase's `updates` are `Update(loss, optimizer)`
  applied in order within one step, each its own forward, backward and optimizer update, each
  on the parameters the previous one left. A loss is `loss(params, extra, ctx) -> (value,
  (metrics, new extra))`, where `params` is the full parameter tree, `extra` the model's other
  collections (BatchNorm statistics, CAL's centres) and `ctx` a `Context` (step number, rng,
  batch, the helpers' outputs). The gradient is taken with respect to the update's optimizer
  group only: parameters and optimizer states outside it are left bit for bit unchanged (the
  model's other collections, e.g. BatchNorm statistics, are whatever the loss returns).
  A leading run of phases with `once=True` runs once, before the cycle (a pre-training stage:
  RA-CNN's classifier and APN pre-training); the phases after it cycle. Examples: one update
  per step (the default); PMG's S + 1 sequential updates with one shared optimizer (one phase
  of S + 1 updates); RA-CNN's alternation (optimizer A for N steps, then B for M: two phases,
  after two `once` phases).

Helpers
  `helpers()` -> {name: `Helper`}: frozen helpers the method owns (a teacher checkpoint run
  inside the step, a teacher-prediction table). The set-up builds each once
  (`Helper.build(env)` -> (fn, inputs, description)); inside the jitted step
  `ctx.helpers[name] = stop_gradient(fn(inputs, batch))`.

Evaluation
  `eval_outputs(variables, batch)` -> (heads, values): `heads` {name: (B, C) logits} ("logits"
  is the one model selection reads: `top1`; others report `<name>_top1`, ...), `values` {name:
  (B,) per-example arrays} that `summarize(values)` (numpy, padding already removed) turns
  into the method's own metrics (e.g. the part-hit rate of the ViT methods).

Visualisation
  `draws` says whether the method draws anything; `render(variables, images, normalize,
  text_inputs=None)` -> a list of PIL images, one per input image (e.g. the selected patches and
  the rollout heat-map), saved as `<image>_<picture>.png`; `text_inputs` are the images'
  "phrases" / "phrase_mask" when the run reads text (PMA lists the phrases' weights).

Pretrained weights
  `load_pretrained(path, dont_load)` -> {part: variables} (default: `fgjax.convert.load_parts`
  over the model's `checkpoint_parts()`): each model names the submodules a checkpoint loads
  into, so a wrapper (PMG, CAL) hands its backbone to the backbone's own loader; the set-up
  puts each part into the fresh variables with that part's shardings.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fgjax.methods.regions import Regions

LossFn = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """One optax transform over the parameters whose 'a/b/c' paths fully match `params`, built
  from `config` (a `config.optim`-style section: name, lr, schedule, ...)."""
  config: Any
  params: tuple[str, ...] = (".*",)

  def owns(self, path: str) -> bool:
    return any(re.fullmatch(p, path) for p in self.params)


@dataclasses.dataclass(frozen=True)
class Update:
  """One forward, backward and update of optimizer `optimizer` with `loss`."""
  loss: LossFn
  optimizer: str = "default"


@dataclasses.dataclass(frozen=True)
class Phase:
  """`updates` applied in order on each of `steps` consecutive train steps; `once=True`: a
  phase of the leading pre-training stage, run once before the phases that cycle."""
  updates: tuple[Update, ...]
  steps: int = 1
  once: bool = False

  def __post_init__(self):
    if int(self.steps) < 1:
      raise ValueError(f"a phase lasts at least one step, got steps={self.steps}")
    if not self.updates:
      raise ValueError("a phase needs at least one update")


@dataclasses.dataclass(frozen=True)
class Context:
  """What a loss sees besides the parameters: the step number (a traced int32), the rng of
  this update, the batch and the outputs of the method's frozen helpers."""
  step: Any
  rng: Any
  batch: Mapping[str, Any]
  helpers: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class HelperEnv:
  """What a helper may use when it is built: the run's config, mesh and training source, the
  workdir, and the set-up's entry points (`restore(workdir)` -> (config, model, method,
  variables, info); `train(config, workdir)` trains another run first)."""
  config: Any
  mesh: Any
  train_source: Any
  workdir: str
  restore: Callable[..., Any]
  train: Callable[..., Any] | None = None
  text: Any = None  # the run's text encoder (fgjax.text.TextEncoder), or None


class HelperStopped(RuntimeError):
  """A helper's own training run (`env.train`) was stopped by a signal before it finished;
  `run` names it. The trainer stops too (a rerun resumes that run)."""

  def __init__(self, run: str, step: int):
    super().__init__(f"the {run} run stopped at step {step} before it finished")
    self.run, self.step = run, step


class Helper:
  """A frozen helper: `build(env)` -> (fn(inputs, batch) -> outputs, inputs pytree placed on the
  mesh, one-line description for the log).

  A helper that changes the run's config when it is built (a teacher trained first becomes the
  checkpoint it left) does so in `resolve_config(config, workdir)`, which must not build or
  train anything: the workdir guard applies it to a rerun's config before comparing it with
  the saved one (`fgjax.train.workdir`), and `build` applies it to the run's own config.
  """

  def build(self, env: HelperEnv):
    raise NotImplementedError

  def resolve_config(self, config, workdir: str) -> None:
    """Writes into `config` what building this helper in `workdir` will change (default:
    nothing)."""

  def runs_first(self, config, workdir: str) -> list:
    """[(config, workdir)] of the runs that building this helper trains first (a teacher in
    `<workdir>/teacher`); the workdir guard checks each against what its workdir holds."""
    return []


def _split(phases: Sequence[Phase]) -> tuple[int, int]:
  """(number of leading `once` phases, steps they take); raises if a `once` phase follows a
  cycling one or nothing cycles."""
  k = 0
  while k < len(phases) and phases[k].once:
    k += 1
  if k == len(phases):
    raise ValueError("a method's phases need at least one phase that cycles (once=False)")
  if any(p.once for p in phases[k:]):
    raise ValueError("phases with once=True must come before every cycling phase")
  return k, sum(int(p.steps) for p in phases[:k])


def phase_at(phases: Sequence[Phase], step: int) -> int:
  """Index of the phase that runs train step `step` (the `once` phases first, then the others
  cycle)."""
  k, head = _split(phases)
  r = int(step)
  if r >= head:
    r = head + (r - head) % sum(int(p.steps) for p in phases[k:])
  for i, p in enumerate(phases):
    if r < p.steps:
      return i
    r -= p.steps
  raise AssertionError("unreachable")


def updates_before(phases: Sequence[Phase], optimizer: str, step):
  """How many updates `optimizer` made before train step `step` (jnp or int)."""
  k, head = _split(phases)
  n_of = lambda p: sum(u.optimizer == optimizer for u in p.updates)
  count, start = 0, 0
  for p in phases[:k]:
    if n_of(p):
      count = count + n_of(p) * jnp.clip(step - start, 0, p.steps)
    start += p.steps
  cycling = phases[k:]
  cycle = sum(int(p.steps) for p in cycling)
  per_cycle = sum(int(p.steps) * n_of(p) for p in cycling)
  after = jnp.maximum(step - head, 0)
  count = count + (after // cycle) * per_cycle
  rem, start = after % cycle, 0
  for p in cycling:
    if n_of(p):
      count = count + n_of(p) * jnp.clip(rem - start, 0, p.steps)
    start += p.steps
  return count


def group_mask(specs: Mapping[str, OptimizerSpec], params) -> dict[str, Any]:
  """{optimizer: bool tree over `params`}; raises if two optimizers claim one parameter or one
  claims none."""
  flat = traverse_util.flatten_dict(params, sep="/")
  owner: dict[str, str] = {}
  for name, spec in specs.items():
    for path in flat:
      if spec.owns(path):
        if path in owner:
          raise ValueError(f"optimizers {owner[path]!r} and {name!r} both claim parameter "
                           f"{path!r}; their `params` patterns must not overlap")
        owner[path] = name
  for name, spec in specs.items():
    if name not in owner.values():
      raise ValueError(f"optimizer {name!r} claims no parameter: its patterns {spec.params} "
                       f"match none of {sorted(flat)[:6]}...")
  return {name: traverse_util.unflatten_dict({p: owner.get(p) == name for p in flat}, sep="/")
          for name in specs}


def select(params, mask):
  """The sub-tree of `params` where `mask` is True (nested dicts without the other leaves)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  keep = traverse_util.flatten_dict(mask, sep="/")
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if keep[k]}, sep="/")


def merge(params, group):
  """`params` with the leaves of the sub-tree `group` replaced."""
  flat = traverse_util.flatten_dict(params, sep="/")
  flat.update(traverse_util.flatten_dict(group, sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")


# ----------------------------------------------------------------------------- the base class


class Method:
  """The protocol's defaults: one loss (`loss`, which a subclass writes), one optimizer, one
  update per step, no helpers, the model's logits as the only head. On a ViT-family model
  (`Regions.of(model)`) evaluation adds the part-hit rate and visualisation draws the regions;
  other models draw nothing."""
  name = "base"
  sections: Mapping[str, Mapping[str, Any]] = {}

  # Whether the model reads text: the set-up then sizes it to the run's vocabulary
  # (`vocab_size=`). Batches carry text whenever `config.data.text.enabled` is on.
  reads_text: bool = False

  def __init__(self, config, model, num_classes: int):
    self.config = config
    self.model = model
    self.num_classes = num_classes
    self.label_smoothing = float(config.get("label_smoothing", 0.0))
    self.regions = Regions.of(model)
    # The run's text encoder (`fgjax.text.TextEncoder`; set by `fgjax.train.setup.build`), or
    # None: batches then hold no phrase fields.
    self.text = None

  picture = "regions"  # file-name suffix of what `render` draws (`<image>_regions.png`)

  @property
  def draws(self) -> bool:
    return self.regions is not None

  # ------------------------------------------------------------------ config
  def section(self, key: str) -> dict:
    """The config section `key` with this method's defaults for missing entries."""
    out = dict(self.sections[key])
    out.update(dict(self.config.get(key, {}) or {}))
    return out

  # ------------------------------------------------------------------ inputs
  def model_inputs(self, batch) -> tuple:
    return (batch["image"],)

  def init_variables(self, rng, example) -> dict:
    """The model's variables from an example batch (one example of the loader's spec)."""
    return dict(self.model.init({"params": rng, "dropout": rng}, *self.model_inputs(example),
                                train=False))

  def apply_train(self, params, extra_vars, *inputs, rng, **kw):
    """Train-mode forward: (logits, aux, updated extra vars). Collections the model keeps
    besides params (BatchNorm's batch_stats) are updated in train mode."""
    variables = {"params": params, **(extra_vars or {})}
    mutable = tuple(extra_vars or ())
    if mutable:
      (logits, aux), new_vars = self.model.apply(
          variables, *inputs, train=True, rngs={"dropout": rng}, mutable=list(mutable), **kw)
      return logits, aux, dict(new_vars)
    logits, aux = self.model.apply(variables, *inputs, train=True, rngs={"dropout": rng}, **kw)
    return logits, aux, extra_vars

  # ------------------------------------------------------------------ training
  def optimizers(self) -> dict[str, OptimizerSpec]:
    return {"default": OptimizerSpec(self.config.optim)}

  def loss(self, params, extra, ctx: Context):
    """The single loss of the default phase: (value, (metrics, new extra))."""
    raise NotImplementedError

  def phases(self) -> tuple[Phase, ...]:
    return (Phase((Update(self.loss, "default"),)),)

  def helpers(self) -> dict[str, Helper]:
    return {}

  # ------------------------------------------------------------------ evaluation
  def eval_outputs(self, variables, batch):
    if self.regions is not None and self.regions.has_parts(batch):
      logits, values = self.regions.eval_outputs(variables, batch)
      return {"logits": logits}, values
    logits, _ = self.model.apply(variables, *self.model_inputs(batch), train=False)
    return {"logits": logits}, {}

  def summarize(self, values: Mapping[str, np.ndarray]) -> dict[str, float]:
    return self.regions.summarize(values) if self.regions is not None else {}

  # ------------------------------------------------------------------ visualisation
  def render(self, variables, images: np.ndarray, normalize: str,
             text_inputs=None) -> list:
    del text_inputs  # the phrase fields of the images (a method that reads text lists them)
    if self.regions is None:
      raise ValueError(f"config.method={self.name!r} with {type(self.model).__name__} draws "
                       f"nothing: visualize draws the region selection of ViT-family models")
    return self.regions.render(variables, images, normalize)

  # ------------------------------------------------------------------ pretrained weights
  def load_pretrained(self, path: str, dont_load: Sequence[str] = ()) -> dict[str, dict]:
    """The checkpoint at `path` fitted to the model's checkpoint parts: {part key ("" = the
    whole model): {collection: tree}} (`fgjax.convert.load_parts`)."""
    from fgjax import convert
    return convert.load_parts(self.model, path, dont_load=dont_load)

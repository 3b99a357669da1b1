"""Optimizers and learning-rate schedules from a config (optax).

Config keys (`config.optim`):
  name: "adamw" | "sgd" (SGD with momentum, optionally Nesterov) | "adam"
  lr: base learning rate (the rate of the new layers)
  lr_base_batch: when set, the rate is lr x global batch / lr_base_batch (DeiT's rule, base
    512; applied by fgjax.train.setup.build_optimizers before the optimizer is built)
  backbone_lr_mult: the backbone's rate is `lr * backbone_lr_mult` (e.g. 0.1 for PMG)
  new_layers: regular expressions (full match on 'a/b/c' parameter paths) that form the
    "new layers" group; everything else is the backbone
  weight_decay: weight decay (decoupled for AdamW, added to the gradient for SGD); not
    applied to biases, norms, tokens and position embeddings (1-D parameters and names in
    `no_decay`) unless `decay_1d=True`, which decays the 1-D parameters too (torch.optim over
    `net.parameters()`, as the PMG and CAL references)
  b1, b2, eps (Adam), momentum, nesterov (SGD)
  clip_norm: global gradient-norm clipping (0 = off)
  schedule: "cosine" | "step" | "exponential" | "linear" | "constant", always after a linear
    warm-up of `warmup_steps` from `warmup_init_lr_factor * lr`
  decay_every_steps, decay_rate: the step schedule multiplies by `decay_rate` every
    `decay_every_steps`; "exponential" is the continuous version, lr * decay_rate ** (step /
    decay_every_steps) (CAL's 0.9 every 2 epochs)
  end_lr_factor: final rate of cosine/linear as a fraction of the peak
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import optax
from flax import traverse_util


def make_schedule(config, base_lr: float, total_steps: int) -> optax.Schedule:
  """Warm-up + {cosine, step, exponential, linear, constant} schedule for `total_steps`."""
  warmup = int(config.get("warmup_steps", 0) or 0)
  name = config.get("schedule", "cosine")
  end = base_lr * float(config.get("end_lr_factor", 0.0))
  decay_steps = max(total_steps - warmup, 1)
  if name == "cosine":
    main = optax.cosine_decay_schedule(base_lr, decay_steps, alpha=end / base_lr if base_lr else 0)
  elif name == "linear":
    main = optax.linear_schedule(base_lr, end, decay_steps)
  elif name == "constant":
    main = optax.constant_schedule(base_lr)
  elif name in ("step", "exponential"):
    every = int(config.get("decay_every_steps", 0) or 0)
    if every <= 0:
      raise ValueError("config.optim.decay_every_steps (or decay_every_epochs) must be > 0 for "
                       f"the {name} schedule")
    rate = float(config.get("decay_rate", 0.1))
    main = optax.exponential_decay(base_lr, every, rate, staircase=name == "step")
  else:
    raise ValueError(f"config.optim.schedule: unknown schedule {name!r} "
                     "(cosine, step, exponential, linear, constant)")
  if warmup <= 0:
    return main
  init = base_lr * float(config.get("warmup_init_lr_factor", 0.0))
  return optax.join_schedules([optax.linear_schedule(init, base_lr, warmup), main], [warmup])


def _match(patterns: Sequence[str], path: str) -> bool:
  return any(re.fullmatch(p, path) for p in patterns)


def param_labels(params, new_layers: Sequence[str]) -> Any:
  """'new' / 'backbone' label per parameter, from regexes over 'a/b/c' paths."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict(
      {k: ("new" if _match(new_layers, k) else "backbone") for k in flat}, sep="/")


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(no_decay: Sequence[str] = (), decay_1d: bool = False) -> Callable[[Any], Any]:
  """Weight-decay mask as a callable (works inside `optax.multi_transform`, whose masked
  trees hide the other group's leaves): decay the parameters not named in `no_decay` that are
  >1-D (all of them with `decay_1d`)."""
  def mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, v: bool((decay_1d or v.ndim > 1)
                             and not _match(no_decay, _path_str(path))), params)
  return mask


def _base_tx(config, lr_schedule, mask) -> optax.GradientTransformation:
  name = config.get("name", "adamw")
  wd = float(config.get("weight_decay", 0.0))
  if name == "adamw":
    return optax.adamw(lr_schedule, b1=config.get("b1", 0.9), b2=config.get("b2", 0.999),
                       eps=config.get("eps", 1e-8), weight_decay=wd, mask=mask)
  if name == "adam":
    return optax.adam(lr_schedule, b1=config.get("b1", 0.9), b2=config.get("b2", 0.999),
                      eps=config.get("eps", 1e-8))
  if name == "sgd":
    # PyTorch-style coupled weight decay (added to the gradient before momentum).
    return optax.chain(
        optax.add_decayed_weights(wd, mask) if wd else optax.identity(),
        optax.sgd(lr_schedule, momentum=config.get("momentum", 0.9) or None,
                  nesterov=bool(config.get("nesterov", False))))
  raise ValueError(f"config.optim.name: unknown optimizer {name!r} (adamw, adam, sgd)")


def make_optimizer(config, params, total_steps: int):
  """Returns (optax transformation, {group: schedule}) for `params`."""
  lr = float(config.lr)
  mult = float(config.get("backbone_lr_mult", 1.0))
  new_layers = tuple(config.get("new_layers", ("head.*",)))
  no_decay = tuple(config.get("no_decay", ("cls_token", "dist_token", "pos_embed")))
  mask = decay_mask(no_decay, bool(config.get("decay_1d", False)))
  schedules = {"new": make_schedule(config, lr, total_steps),
               "backbone": make_schedule(config, lr * mult, total_steps)}
  if mult == 1.0:
    tx = _base_tx(config, schedules["new"], mask)
  else:
    labels = param_labels(params, new_layers)
    tx = optax.multi_transform(
        {g: _base_tx(config, s, mask) for g, s in schedules.items()}, labels)
  clip = float(config.get("clip_norm", 0.0) or 0.0)
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx, schedules

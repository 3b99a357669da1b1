"""The train step: one phase of the method's declared updates, jitted by the loop.

`make_train_step(config, method, optimizers, phase, base_rng, helper_fns)` returns
`step_fn(state, batch, helper_inputs) -> (state, metrics)`:
- the batch's uint8 images are normalised first (`config.data.normalize`), on the device;
- the rng is `fold_in(key(seed), step)` (and `fold_in(rng, k)` for update k of a phase with
  several), so a resumed run draws the same dropout masks as an uninterrupted one;
- the method's frozen helpers run first, under `stop_gradient` (`ctx.helpers`);
- each `Update(loss, optimizer)` differentiates its loss with respect to its optimizer's
  parameter group only and updates that group and that optimizer's state: everything outside
  the group is left as it was, bit for bit (`apply_updates`);
- a non-finite loss freezes the whole state inside the step (no update is applied); the loop
  stops at the next log point naming the step;
- metrics: the method's, the summed loss, the gradient norm of each updated group's last
  update (`grad_norm`, `grad_norm_<optimizer>`), the parameter norm and each optimizer's
  learning rate (`lr`, `lr_<optimizer>`; the names without suffix for the one "default").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fgjax.data import normalize_batch
from fgjax.methods import base as protocol
from fgjax.train.setup import collections, metric_name, normalize_kind


def apply_updates(updates, optimizers, params, opt, extra, batch, rng, step=0, helpers=None):
  """The updates of one phase in sequence, each on the params the previous one left. Returns
  (params, opt, extra, summed loss, merged metrics, {optimizer: its last update's grads})."""
  loss, metrics, opt, last_grads = 0.0, {}, dict(opt), {}
  helpers = dict(helpers or {})
  for k, update in enumerate(updates):
    r = rng if len(updates) == 1 else jax.random.fold_in(rng, k)
    ctx = protocol.Context(step=step, rng=r, batch=batch, helpers=helpers)
    o = optimizers[update.optimizer]
    group = protocol.select(params, o.mask)

    def fn(g, params=params, extra=extra, ctx=ctx, loss_fn=update.loss):
      return loss_fn(protocol.merge(params, g), extra, ctx)

    (loss_k, (m, extra)), grads = jax.value_and_grad(fn, has_aux=True)(group)
    changes, opt[update.optimizer] = o.tx.update(grads, opt[update.optimizer], group)
    params = protocol.merge(params, optax.apply_updates(group, changes))
    extra = extra or {}
    loss = loss + loss_k
    metrics.update(m)
    last_grads[update.optimizer] = grads
  return params, opt, extra, loss, metrics, last_grads


def make_train_step(config, method, optimizers, phase: protocol.Phase, base_rng,
                    helper_fns=None):
  """The jitted-to-be step of `phase`: (state, batch, helper_inputs) -> (state, metrics)."""
  ema_decay = float(config.get("ema_decay", 0.0) or 0.0)
  phases = method.phases()
  helper_fns = dict(helper_fns or {})

  normalize = normalize_kind(config)

  def step_fn(state, batch, helper_inputs):
    batch = normalize_batch(batch, normalize)  # uint8 -> float32, on the device
    step = state["step"]
    rng = jax.random.fold_in(base_rng, step)
    helpers = {name: jax.lax.stop_gradient(fn(helper_inputs[name], batch))
               for name, fn in helper_fns.items()}
    params, opt, new_extra, loss, metrics, grads = apply_updates(
        phase.updates, optimizers, state["params"], state["opt"], collections(state), batch,
        rng, step, helpers)
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
    for name, g in grads.items():  # the groups this phase updated
      metrics[metric_name("grad_norm", name)] = optax.tree.norm(g)
    metrics["param_norm"] = optax.tree.norm(params)
    for name, o in optimizers.items():
      metrics[metric_name("lr", name)] = o.schedule(protocol.updates_before(phases, name, step))
    return out, metrics

  return step_fn

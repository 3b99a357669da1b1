"""Test-time augmentation (issue 19, spec section 8): `config.eval.tta` presets of views made on
the device from each evaluation batch, the softmax probabilities averaged over the views.

Every view is made from the eval crop the loader gives (resize to `data.resize_size`, centre
crop `model.img_size` = S), inside the jitted evaluation step, so the same preset means the
same views in the training run's evaluations, `run.py --mode=eval` and `--mode=predict`, and
costs no extra decoding. The views (x: the eval crop; flip: mirrored left-right):

  "none"        x alone (the method's own evaluation, unchanged)                    1 view
  "flip"        x, flip(x)                                                          2 views
  "multicrop"   x and five crops of side round(0.875 S) (top-left, top-right, bottom-left,
                bottom-right, centre) each resized to S (bilinear), each also flipped  12 views
  "multiscale"  centre crops of side S, round(0.875 S), round(0.75 S) (zoom 1, 1.14, 1.33)
                resized to S, each also flipped                                      6 views
  "cal8"        CAL's eight views (raoyongming/CAL `infer.py`): x and flip(x), each raw and
                cropped around that view's attention at thresholds 0.3, 0.2, 0.1 of its
                maximum (padding 10%, 10%, 5%; `fgjax.models.cal.attention_crop`)    8 views

For every head the method reports (`Method.eval_outputs`: "logits", CAL's "raw", PMG's
"combined"...) the result is log(mean over views of softmax(head)): a softmax of it gives the
averaged probabilities, its argmax and top-5 rank by them. The method's per-example values
(part hits) are those of view x, the unchanged batch; the other views see only the image (the
boxes and part locations are left out of their batches).

"cal8" on a CAL model is the model's own eight-view test (`model.kwargs.test_views="eight"`,
whatever the run trained with): the reference averages the eight views' logits, and so does
this preset there. On another CNN (a model whose aux holds "stages") the attention is the
channel mean of the last stage's feature map (the map CAL's crop would read with one
attention channel). ViT-family models and models without stages are refused with an error
naming config.eval.tta.
"""
from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp

PRESETS = ("none", "flip", "multicrop", "multiscale", "cal8")
CROP_FRACTION = 0.875  # multicrop: side of the five crops, as a fraction of the eval crop
SCALES = (1.0, 0.875, 0.75)  # multiscale: sides of the centre crops, fractions of S
CAL8_CROPS = ((0.3, 0.1), (0.2, 0.1), (0.1, 0.05))  # (threshold, padding), CAL's infer.py
_ANNOTATIONS = ("object_box", "part_boxes", "part_locs")  # left out of the extra views
NUM_VIEWS = {"none": 1, "flip": 2, "multicrop": 12, "multiscale": 6, "cal8": 8}


def preset_of(config) -> str:
  """`config.eval.tta` ("none" when the config has no eval section); raises ValueError naming
  the key for an unknown preset."""
  section = config.get("eval") if config is not None else None
  return check_preset(section.get("tta", "none") if section is not None else "none")


def check_preset(preset) -> str:
  preset = "none" if preset is None or preset == "" else preset
  if preset not in PRESETS:
    raise ValueError(f"config.eval.tta={preset!r} is not a test-time augmentation preset; "
                     f"choose one of {', '.join(PRESETS)}")
  return str(preset)


def flip(x):
  """Mirrors (B, H, W, C) images left-right."""
  return x[:, :, ::-1]


def _crop_resize(x, y0: int, x0: int, side: int):
  """The (side x side) crop at (y0, x0) of every image, resized back to the images' size."""
  B, H, W, C = x.shape
  crop = x[:, y0:y0 + side, x0:x0 + side]
  if side == H and side == W:
    return crop
  return jax.image.resize(crop.astype(jnp.float32), (B, H, W, C), "bilinear").astype(x.dtype)


def geometric_views(x, preset: str) -> list:
  """The views of the presets "none", "flip", "multicrop", "multiscale" (module docstring), in
  that order; the first is always x itself."""
  H, W = x.shape[1:3]
  S = min(H, W)
  if preset == "none":
    return [x]
  if preset == "flip":
    return [x, flip(x)]
  if preset == "multicrop":
    c = int(round(CROP_FRACTION * S))
    corners = [(0, 0), (0, W - c), (H - c, 0), (H - c, W - c), ((H - c) // 2, (W - c) // 2)]
    base = [x] + [_crop_resize(x, y0, x0, c) for y0, x0 in corners]
  elif preset == "multiscale":
    base = []
    for f in SCALES:
      c = int(round(f * S))
      base.append(_crop_resize(x, (H - c) // 2, (W - c) // 2, c))
  else:
    raise ValueError(f"config.eval.tta={preset!r} has no geometric views")
  return [v for b in base for v in (b, flip(b))]


def mean_probs_logits(logits) -> jax.Array:
  """(V, B, C) logits of V views -> (B, C) log of the views' mean softmax probabilities."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jax.nn.logsumexp(logp, axis=0) - math.log(logits.shape[0])


def _image_batch(batch, images):
  """The batch of an extra view: its image, without boxes or part locations."""
  out = {k: v for k, v in batch.items() if k not in _ANNOTATIONS}
  out["image"] = images
  return out


def _is_cal(method) -> bool:
  from fgjax.models import cal as cal_lib
  return isinstance(method.model, cal_lib.CAL)


def _cal_eight(method):
  """`method` with its CAL model's test views set to "eight" (same variables)."""
  out = copy.copy(method)
  out.model = method.model.clone(test_views="eight")
  return out


def check(method, preset: str) -> str:
  """Raises ValueError naming config.eval.tta when `method`'s model cannot take `preset`."""
  preset = check_preset(preset)
  if preset == "cal8" and not _is_cal(method) and method.regions is not None:
    raise ValueError(f"config.eval.tta='cal8' needs a CAL model or a CNN with feature-map "
                     f"stages (the attention crops read its last stage); "
                     f"{type(method.model).__name__} is a ViT-family model: use 'flip', "
                     f"'multicrop' or 'multiscale'")
  return preset


def _average(first: dict, views: list) -> dict:
  """{head: log mean probability} over the views' heads (each view a {head: (B, C)})."""
  return {k: mean_probs_logits(jnp.stack([first[k]] + [h[k] for h in views])) for k in first}


def _mapped_views(method, variables, batch, views):
  """The heads of each extra view ((B, H, W, C) arrays), one compiled model over a lax.map."""
  if not views:
    return []
  stacked = jnp.stack(views)
  heads = jax.lax.map(lambda v: method.eval_outputs(variables, _image_batch(batch, v))[0],
                      stacked)
  return [jax.tree.map(lambda a, i=i: a[i], heads) for i in range(len(views))]


def _channel_mean_map(method, variables, images):
  _, aux = method.model.apply(variables, *method.model_inputs({"image": images}), train=False)
  stages = aux.get("stages") if isinstance(aux, dict) else None
  if not stages:
    raise ValueError(f"config.eval.tta='cal8' needs a CAL model or a CNN whose outputs hold "
                     f"feature-map stages; {type(method.model).__name__} has none: use 'flip', "
                     f"'multicrop' or 'multiscale'")
  return jnp.maximum(stages[-1].astype(jnp.float32), 0.0).mean(-1)


def _cal8_views(method, variables, x):
  """flip(x) and the six attention crops (x's three, then flip(x)'s three)."""
  from fgjax.models import cal as cal_lib
  both = jnp.concatenate([x, flip(x)])
  maps = jax.lax.stop_gradient(_channel_mean_map(method, variables, both))
  crops = [cal_lib.attention_crop(both, maps, t, p)[0] for t, p in CAL8_CROPS]
  B = x.shape[0]
  return [flip(x)] + [c[:B] for c in crops] + [c[B:] for c in crops]


def eval_outputs(method, preset: str | None = None):
  """fn(variables, batch) -> (heads, values) of `method` under the TTA `preset` (default: the
  method's `config.eval.tta`): each head the log of its probabilities averaged over the views,
  the values those of the unchanged batch. "none" is `method.eval_outputs` itself."""
  preset = check(method, preset_of(method.config) if preset is None else preset)
  if preset == "none":
    return method.eval_outputs
  if preset == "cal8" and _is_cal(method):
    return _cal_eight(method).eval_outputs

  def fn(variables, batch):
    heads, values = method.eval_outputs(variables, batch)
    x = batch["image"]
    extra = (_cal8_views(method, variables, x) if preset == "cal8"
             else geometric_views(x, preset)[1:])
    return _average(heads, _mapped_views(method, variables, batch, extra)), values
  return fn

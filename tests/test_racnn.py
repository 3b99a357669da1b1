"""RA-CNN: the attention crop and the ranking loss against hand-computed values, the APN's
squares, the method's phases and updates, evaluation and the zoom-hit rate."""
import json
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

from fgjax import losses, models
from fgjax.models import racnn


def _image(h=12, w=16, c=2):
  """Every pixel distinct and no symmetry between x and y: value = 100 * row + col (+ 0.5 in
  the second channel)."""
  rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
  img = np.stack([100 * rows + cols, 100 * rows + cols + 0.5], -1)[..., :c]
  return img[None]


def test_crop_equals_the_hand_cut_square():
  img = _image()
  # tx = 6 (column centre), ty = 4 (row centre), tl = 2: rows 2..5, columns 4..7.
  box = np.array([[6.0, 4.0, 2.0]], np.float32)
  out = np.asarray(racnn.attention_crop(jnp.asarray(img), jnp.asarray(box), 4, k=1e4))
  np.testing.assert_allclose(out[0], img[0, 2:6, 4:8], rtol=1e-5)
  # The same with k = 10: each pixel weighted by the boxcar at its centre.
  h = lambda v: 1.0 / (1.0 + np.exp(-10.0 * v))
  c = np.arange(16) + 0.5
  r = np.arange(12) + 0.5
  mask = (h(r - 2) - h(r - 6))[:, None] * (h(c - 4) - h(c - 8))[None, :]
  want = (img[0] * mask[..., None])[2:6, 4:8]
  out10 = np.asarray(racnn.attention_crop(jnp.asarray(img), jnp.asarray(box), 4))
  np.testing.assert_allclose(out10[0], want, rtol=1e-5)
  # Swapping x and y must not give the same crop (the x/y swap of a public port).
  swapped = np.asarray(racnn.attention_crop(jnp.asarray(img), jnp.asarray(box[:, [1, 0, 2]]),
                                            4, k=1e4))
  assert not np.allclose(swapped, out)
  np.testing.assert_allclose(swapped[0], img[0, 4:8, 2:6], rtol=1e-5)


def test_crop_zoom_is_bilinear_between_pixel_centres():
  img = _image()
  # tl = 1 around (tx, ty) = (5, 3): the 2 x 2 square rows 2..3, cols 4..5 zoomed to 4 x 4.
  box = jnp.asarray([[5.0, 3.0, 1.0]])
  out = np.asarray(racnn.attention_crop(jnp.asarray(img), box, 4, k=1e4))[0, ..., 0]
  # Output sample u sits at continuous x = 4 + (u + 0.5) / 2, index coordinate x - 0.5:
  # 3.75, 4.25, 4.75, 5.25 -> clamped bilinear between columns 3..6 (all inside the image).
  xs = 4 + (np.arange(4) + 0.5) / 2 - 0.5
  ys = 2 + (np.arange(4) + 0.5) / 2 - 0.5
  want = 100 * ys[:, None] + xs[None, :]  # the image is linear in row and column
  np.testing.assert_allclose(out, want, rtol=1e-5)


def test_crop_equals_torch_grid_sample_values_and_box_gradients():
  """Against an independent formulation: torch's grid_sample (bilinear, border padding,
  align_corners=False) at the square's sample grid, times the boxcar mask; values and the
  gradient with respect to the box, on boxes with fractional corners and zoom factors both
  ways (x and y different in every box)."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  rng = np.random.default_rng(0)
  img = rng.normal(size=(3, 20, 28, 2)).astype(np.float32)
  boxes = np.array([[9.3, 7.1, 4.6], [17.8, 10.4, 9.7], [6.2, 12.9, 2.3]], np.float32)
  out = 11
  xt = torch.tensor(img.transpose(0, 3, 1, 2))
  bt = torch.tensor(boxes, requires_grad=True)
  tx, ty, tl = bt.unbind(1)
  u = (torch.arange(out, dtype=torch.float32) + 0.5) / out
  sx = (tx - tl)[:, None] + u * 2 * tl[:, None]
  sy = (ty - tl)[:, None] + u * 2 * tl[:, None]
  grid = torch.stack(torch.broadcast_tensors((2 * sx / 28 - 1)[:, None, :],
                                             (2 * sy / 20 - 1)[:, :, None]), -1)
  samp = F.grid_sample(xt, grid, mode="bilinear", padding_mode="border", align_corners=False)
  h = lambda v: torch.sigmoid(10.0 * v)
  mx = h(sx - (tx - tl)[:, None]) - h(sx - (tx + tl)[:, None])
  my = h(sy - (ty - tl)[:, None]) - h(sy - (ty + tl)[:, None])
  want = samp * my[:, None, :, None] * mx[:, None, None, :]
  weights = torch.tensor(rng.normal(size=want.shape).astype(np.float32))
  (want * weights).sum().backward()
  got = racnn.attention_crop(jnp.asarray(img), jnp.asarray(boxes), out)
  np.testing.assert_allclose(np.asarray(got), want.detach().numpy().transpose(0, 2, 3, 1),
                             atol=1e-5)
  w = jnp.asarray(weights.numpy().transpose(0, 2, 3, 1))
  g = jax.grad(lambda b: (racnn.attention_crop(jnp.asarray(img), b, out) * w).sum())(
      jnp.asarray(boxes))
  np.testing.assert_allclose(np.asarray(g), bt.grad.numpy(), rtol=1e-3, atol=1e-3)


def test_box_gradient_points_toward_the_bright_region():
  r, c = np.mgrid[0:32, 0:32] + 0.5
  blob = np.exp(-((r - 8) ** 2 + (c - 25) ** 2) / (2 * 5.0 ** 2))  # bright around x=25, y=8
  x = jnp.asarray(blob.astype(np.float32)[None, :, :, None])

  def loss(centre, tl=5.0):  # a darker crop = a higher loss
    return -racnn.attention_crop(x, jnp.append(centre, tl)[None], 8).mean()

  centre = jnp.asarray([14.0, 18.0])
  g = np.asarray(jax.grad(loss)(centre))
  assert g[0] < 0 and g[1] > 0  # move right (tx up) and up (ty down) to lower the loss
  step = jax.jit(lambda c: c - 50.0 * jax.grad(loss)(c))
  for _ in range(30):  # gradient descent on the centre finds the blob
    centre = step(centre)
  np.testing.assert_allclose(np.asarray(centre), [25.0, 8.0], atol=1.5)
  # the side's gradient through the mask and the sampling: growing the square around the
  # blob's centre takes in darker pixels
  assert float(jax.grad(lambda tl: loss(jnp.asarray([25.0, 8.0]), tl))(5.0)) > 0


def test_ranking_loss_hand_computed_and_on_probabilities():
  p1 = jnp.asarray([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
  p2 = jnp.asarray([[0.8, 0.1, 0.1], [0.2, 0.5, 0.3]])
  y = jnp.asarray([0, 2])
  # example 0: max(0, 0.7 - 0.8 + 0.05) = 0; example 1: max(0, 0.6 - 0.3 + 0.05) = 0.35
  assert float(losses.pairwise_ranking_loss(p1, p2, y)) == pytest.approx(0.35 / 2, abs=1e-7)
  assert float(losses.pairwise_ranking_loss(p1, p2, y, margin=0.2)) == \
      pytest.approx((0.1 + 0.5) / 2, abs=1e-7)
  # true-class probabilities already picked give the same
  assert float(losses.pairwise_ranking_loss(jnp.asarray([0.7, 0.6]), jnp.asarray([0.8, 0.3]),
                                            y)) == pytest.approx(0.175, abs=1e-7)
  g = jax.grad(lambda q: losses.pairwise_ranking_loss(p1, q, y))(p2)
  np.testing.assert_allclose(np.asarray(g), [[0, 0, 0], [0, 0, -0.5]], atol=1e-7)


def test_squares_stay_inside_with_the_minimum_side():
  z = jnp.asarray([[-50.0, 50.0, -50.0], [50.0, -50.0, 50.0], [0.0, 0.0, 0.0]])
  boxes, s = racnn.squares(z, 90.0, 1.0 / 3.0)
  b = np.asarray(boxes)
  assert np.all(b[:, 2] >= 30.0 - 1e-4) and np.all(b[:, 2] <= 45.0 + 1e-4)
  assert np.all(b[:, :2] - b[:, 2:3] >= -1e-4) and np.all(b[:, :2] + b[:, 2:3] <= 90 + 1e-4)
  np.testing.assert_allclose(b[0], [30, 60, 30], atol=1e-3)  # smallest, left, bottom
  np.testing.assert_allclose(b[1], [45, 45, 45], atol=1e-3)  # the whole image
  np.testing.assert_allclose(b[2], [45, 45, 37.5], atol=1e-4)  # the initial square
  # a square of a crop back in the parent's pixels
  parent = jnp.asarray([[60.0, 40.0, 20.0]])  # covers x 40..80, y 20..60
  child = jnp.asarray([[10.0, 30.0, 5.0]])  # in a 40 px crop: 1 crop px = 1 parent px
  np.testing.assert_allclose(np.asarray(racnn.in_parent(child, parent, 40)), [[50, 50, 5]])


# ----------------------------------------------------------------------------- model and method

from fgjax import methods  # noqa: E402
from fgjax.methods import racnn as racnn_method  # noqa: E402
from fgjax.train import logs, setup, sharding  # noqa: E402
import tests.data_fixtures as fx  # noqa: E402

SMALL = dict(widths=(8, 16, 16, 32), crop_size=48, apn_hidden=32)


def test_model_scales_squares_and_combined_logits():
  m = models.create("racnn_cnn_small", 5, 64, **SMALL)
  x = jax.random.normal(jax.random.key(0), (3, 64, 64, 3))
  v = m.init(jax.random.key(1), x)
  assert sorted(v["params"]) == ["apn1", "apn2", "scale1", "scale2", "scale3"]
  assert v["params"]["apn1"]["fc1"]["kernel"].shape == (2 * 2 * 32, 32)  # 4x4 map, pooled 2x2
  logits, aux = m.apply(v, x)
  probs = [jax.nn.softmax(l) for l in aux["scale_logits"]]
  np.testing.assert_allclose(np.exp(logits), np.mean(probs, 0), rtol=1e-5)
  b = np.asarray(aux["boxes"])
  assert b.shape == (3, 2, 3)
  sides = np.array([64.0, 48.0])[None, :]
  assert np.all(b[..., 2] >= sides / 3 - 1e-4) and np.all(b[..., 2] <= sides / 2 + 1e-4)
  assert np.all(b[..., :2] - b[..., 2:] >= -1e-4)
  assert np.all(b[..., :2] + b[..., 2:] <= sides[..., None] + 1e-4)
  # The APNs start at the centred square (sigmoids 0.5: N(0, 0.001) weights).
  np.testing.assert_allclose(np.asarray(aux["box_sigmoid"]), 0.5, atol=0.01)
  assert [c.shape for c in aux["crops"]] == [(3, 48, 48, 3)] * 2
  # The second crop is the first one's square cut again: in image pixels a smaller square.
  inner = np.asarray(aux["boxes_in_image"])[:, 1]
  np.testing.assert_allclose(inner, np.asarray(racnn.in_parent(b[:, 1], b[:, 0], 48)), rtol=1e-6)
  shared = models.create("racnn_cnn_small", 5, 64, share_weights=True, **SMALL)
  vs = shared.init(jax.random.key(1), x)
  assert sorted(vs["params"]) == ["apn1", "apn2", "scale1"]
  assert sorted(shared.checkpoint_parts()) == ["scale1"]
  assert sorted(m.checkpoint_parts()) == ["scale1", "scale2", "scale3"]
  assert m.checkpoint_parts()["scale2"].img_size == 48
  with pytest.raises(ValueError, match="min_side_frac"):
    models.create("racnn_cnn_small", 5, 64, min_side_frac=0.7, **SMALL).init(
        jax.random.key(0), x)


def test_pretrain_target_is_the_strongest_response_kept_off_the_bounds():
  fmap = np.zeros((2, 4, 8, 3), np.float32)
  fmap[0, 1, 4] = 5.0  # row 1, column 4 of a 4 x 8 map over a 64 px input
  fmap[1, 0, 0] = 5.0  # the corner: the target centre stops 10% inside the free range
  t = np.asarray(racnn_method.pretrain_targets(jnp.asarray(fmap), 64.0, 0.2, 0.5))
  np.testing.assert_allclose(t[0], [4.5 * 8, 1.5 * 16, 16.0], rtol=1e-6)  # tl = 64 / 4
  np.testing.assert_allclose(t[1], [16 + 0.1 * 32, 16 + 0.1 * 32, 16.0], rtol=1e-6)
  # With min_side_frac 1/3 the half-side square is too small: 10% above the smallest one.
  t3 = np.asarray(racnn_method.pretrain_targets(jnp.asarray(fmap), 60.0, 1 / 3, 0.5))
  np.testing.assert_allclose(t3[:, 2], 20 + 0.1 * 10, rtol=1e-6)


def test_zoom_hits_and_their_chance_level():
  square = jnp.asarray([[20.0, 20.0, 10.0], [20.0, 20.0, 10.0], [50.0, 50.0, 10.0]])
  parts = jnp.asarray([[[28, 12, 30, 14], [-1, -1, -1, -1]],  # centre (29, 13): inside
                       [[40, 40, 44, 44], [-1, -1, -1, -1]],  # centre (42, 42): outside
                       [[-1, -1, -1, -1], [-1, -1, -1, -1]]])  # no parts: the object box
  obj = jnp.asarray([[-1, -1, -1, -1], [-1, -1, -1, -1], [35, 30, 70, 75]])
  hit, chance, has = (np.asarray(a) for a in racnn_method.zoom_hits(square, parts, obj, 100.0))
  np.testing.assert_array_equal(hit, [1, 0, 1])
  assert has.tolist() == [True, True, True]
  # Chance: a 20 px square at a uniform centre in [10, 90]^2 holds the point (29, 13) when
  # the centre is within 10 px of it: x in [19, 39] (20/80), y in [10, 23] (13/80).
  assert chance[0] == pytest.approx(20 / 80 * 13 / 80, abs=0.02)
  # Inside the object box: centre x in [45, 60] (15/80), y in [40, 65] (25/80).
  assert chance[2] == pytest.approx(15 / 80 * 25 / 80, abs=0.02)
  hit, _, has = racnn_method.zoom_hits(square, None, None, 100.0)
  assert not np.asarray(has).any()
  # CUB part locations (x, y, visible): a hit = the square holds a visible point; they win
  # over part boxes and the object box; hidden points never count.
  locs = jnp.asarray([[[29, 13, 1], [0, 0, 0]], [[42, 42, 1], [15, 15, 0]],
                      [[-1, -1, 0], [-1, -1, 0]]], jnp.float32)
  hit, chance2, has = (np.asarray(a) for a in racnn_method.zoom_hits(
      square, parts, obj, 100.0, part_locs=locs))
  np.testing.assert_array_equal(hit, [1, 0, 1])  # the third: no visible part -> object box
  assert has.tolist() == [True, True, True]
  assert chance2[0] == pytest.approx(chance[0])  # the same point as the first part box centre
  assert chance2[2] == pytest.approx(chance[2])


def _method(**over):
  from configs import racnn_synthetic
  cfg = racnn_synthetic.get_config("classifier_pretrain=2,apn_pretrain=2,alternate=2,steps=10")
  cfg.model.img_size = 64
  cfg.model.kwargs = dict(cfg.model.kwargs, **SMALL)
  cfg.data.source_kwargs = dict(num_classes=3, image_size=72)
  cfg.data.split_kwargs = {"train": dict(num_examples=16), "test": dict(num_examples=8)}
  cfg.data.resize_size = 68
  cfg.batch_size = cfg.eval_batch_size = 8
  cfg.optim.warmup_steps = 0
  for k, v in over.items():
    cfg.racnn[k] = v
  model = models.create(cfg.model.name, 3, 64, **cfg.model.kwargs)
  return cfg, model, methods.get_method(cfg, model, 3)


def _flat(tree):
  from flax import traverse_util
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep="/")


def test_phases_two_optimizers_and_what_each_update_touches():
  cfg, model, method = _method()
  phases = method.phases()
  assert [(p.once, p.steps, p.updates[0].optimizer) for p in phases] == [
      (True, 2, "classifiers"), (True, 2, "apn"), (False, 2, "classifiers"), (False, 2, "apn")]
  assert phases[0].updates[0].loss == method.classifier_loss  # on the APNs' initial squares
  assert phases[1].updates[0].loss == method.apn_pretrain_loss
  assert phases[2].updates[0].loss == method.classifier_loss
  _, _, rand = _method(pretrain_squares="random")
  assert rand.phases()[0].updates[0].loss == rand.classifier_pretrain_loss
  with pytest.raises(ValueError, match="config.racnn.pretrain_squares"):
    _method(pretrain_squares="centre")
  assert phases[3].updates[0].loss == method.ranking_loss
  mesh = sharding.make_mesh(cfg)
  example = setup.config_example(cfg)
  optimizers = setup.build_optimizers(cfg, method, setup.params_shape(method, example), 1, 10)
  state = setup.create_train_state(cfg, method, optimizers, mesh, jax.random.key(0), example)
  assert sorted(state["opt"]) == ["apn", "classifiers"]
  batch = next(iter(setup.make_train_iter(cfg, setup.get_source(cfg, "train"))))
  batch = {k: v for k, v in batch.items()}
  from fgjax.train.step import make_train_step
  before = _flat(state["params"])
  for k, (owner, metric) in enumerate([("scale", "ce_scale2"), ("apn", "apn_pretrain"),
                                       ("scale", "ce_scale3"), ("apn", "rank_12")]):
    fn = jax.jit(make_train_step(cfg, method, optimizers, phases[k], jax.random.key(1)))
    new, metrics = fn(jax.tree.map(jnp.copy, state), batch, {})
    assert metric in metrics and np.isfinite(float(metrics["loss"]))
    for key in ("box2_cx_mean", "box3_side_std", "box2_at_bound"):
      assert key in metrics
    after = _flat(new["params"])
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed and all(p.startswith(owner) for p in changed), (k, sorted(changed)[:4])
    if owner == "apn":  # both APNs learn from the ranking loss and from pre-training
      assert any(p.startswith("apn1") for p in changed)
      assert any(p.startswith("apn2") for p in changed)
    else:  # every scale's network learns from its own cross-entropy
      assert {p.split("/")[0] for p in changed} == {"scale1", "scale2", "scale3"}


def test_random_square_pretraining_draws_every_square():
  """Classifier pre-training on random squares: the model takes the given sigmoids instead of
  the APNs', and the pre-training loss draws them uniformly, per example and per step."""
  cfg, model, method = _method()
  x = jax.random.normal(jax.random.key(0), (16, 64, 64, 3))
  v = model.init(jax.random.key(1), x[:2])
  sig = jax.random.uniform(jax.random.key(2), (16, 2, 3))
  _, aux = model.apply(v, x, box_sigmoid=sig)
  np.testing.assert_array_equal(np.asarray(aux["box_sigmoid"]), np.asarray(sig))
  for j, side in enumerate((64.0, float(model.crop_size))):
    want = racnn.squares_from_sigmoids(sig[:, j], side, model.min_side_frac)
    np.testing.assert_allclose(np.asarray(aux["boxes"][:, j]), np.asarray(want), rtol=1e-6)
  batch = {"image": x, "label": jnp.arange(16) % 3}
  stats = []
  for seed in (0, 1):
    ctx = methods.Context(step=0, rng=jax.random.key(seed), batch=batch, helpers={})
    stats.append(method.classifier_pretrain_loss(v["params"], {}, ctx)[1][0])
  ctx = methods.Context(step=0, rng=jax.random.key(0), batch=batch, helpers={})
  at_init = method.classifier_loss(v["params"], {}, ctx)[1][0]
  assert float(at_init["box2_side_std"]) < 1e-3  # the APNs' initial squares: all alike
  for m in stats:  # uniform sigmoids: side std (1 - 2/3) / sqrt(12) ~ 0.096 of the image
    assert 0.05 < float(m["box2_side_std"]) < 0.15 and float(m["box2_cx_std"]) > 0.02
  assert float(stats[0]["box2_cx_mean"]) != float(stats[1]["box2_cx_mean"])


def test_ranking_gradient_lowers_the_ranking_loss():
  """A few APN updates on one batch lower the ranking loss (the gradient through the crops
  and the zoom reaches the APNs and points the right way)."""
  cfg, model, method = _method()
  cfg.racnn.apn_optim = dict(name="sgd", lr=0.5, momentum=0.0, weight_decay=0.0)
  method = methods.get_method(cfg, model, 3)
  # Images whose content changes across them (ramps of random slopes), so that where a crop
  # sits changes what the next scale sees.
  a, b = jax.random.normal(jax.random.key(3), (2, 8, 1, 1, 3))
  r = jnp.linspace(-1, 1, 64)
  x = 2 * a * r[None, None, :, None] + 2 * b * r[None, :, None, None]
  y = jnp.arange(8) % 3
  v = model.init(jax.random.key(2), x)
  # Scale networks with strong, input-dependent heads so that the crop matters.
  params = jax.tree.map(lambda a: a, v["params"])
  for s in ("scale1", "scale2", "scale3"):
    params[s]["head"]["kernel"] = 0.3 * jax.random.normal(jax.random.key(4),
                                                          params[s]["head"]["kernel"].shape)
  ctx = methods.Context(step=0, rng=jax.random.key(0), batch={"image": x, "label": y},
                        helpers={})

  def rank(apn_params):
    p = dict(params, **apn_params)
    return method.ranking_loss(p, {}, ctx)[0]

  apn = {k: params[k] for k in ("apn1", "apn2")}
  start = float(rank(apn))
  assert start > 0
  d = jax.grad(rank)(apn)
  norm = float(optax.tree.norm(d))
  assert float(optax.tree.norm(d["apn1"])) > 0 and float(optax.tree.norm(d["apn2"])) > 0
  # A small step against the gradient lowers the loss, one along it raises it. (The gradient
  # is not the loss's full derivative: the coarser scale of each pair is a stop_gradient
  # reference, so p2's part in L_rank(p2, p3) is left out by design.)
  eps = 0.01
  along = lambda t: float(rank(jax.tree.map(lambda a, u: a + t * u / norm, apn, d)))
  assert along(-eps) < start < along(eps)
  step = jax.jit(lambda p: jax.tree.map(lambda a, u: a - 0.5 * u / optax.tree.norm(
      jax.grad(rank)(p)), p, jax.grad(rank)(p)))
  for _ in range(8):
    apn = step(apn)
  assert float(rank(apn)) < start


@pytest.mark.slow
def test_run_py_every_mode_on_fake_cub(tmp_path):
  """configs/racnn_vgg19_cub.py:runlocal through run.py as a user runs it: train (4 steps =
  classifier pre-training, APN pre-training, one classifier and one ranking step), eval (the
  combination, every scale, the zoom-hit rate against CUB's object boxes), predict,
  visualize and export_teacher."""
  from PIL import Image

  from fgjax import teachers
  from test_run import _ok, _run
  fake = fx.make_fake_cub(tmp_path / "data", num_classes=3, per_class=4, image_size=(80, 64))
  data = f"--config.data.data_dir={fake.data_dir}"
  w = tmp_path / "racnn"
  _ok(_run("--config=configs/racnn_vgg19_cub.py:runlocal", data, f"--workdir={w}"))
  rows = [r for r in logs.read_metrics(str(w)) if r.get("split") == "train"]
  assert rows and all(np.isfinite(r["loss"]) for r in rows)
  for key in ("box2_cx_mean", "box2_side_std", "box3_at_bound"):
    assert key in rows[-1], sorted(rows[-1])

  _ok(_run("--mode=eval", f"--workdir={w}"))
  test = json.loads((w / "eval_metrics.json").read_text())["test"]
  assert test["num_examples"] == len(fake.splits["test"])
  for key in ("top1", "scale1_top1", "scale2_top1", "scale3_top1", "box3_side_mean"):
    assert np.isfinite(test[key]), key
  assert 0.0 <= test["zoom_hit_rate"] <= 1.0 and 0.0 <= test["zoom_hit_chance"] <= 1.0

  paths = [os.path.join(fake.root, rel) for _, _, rel in fake.splits["test"][:2]]
  proc = _ok(_run("--mode=predict", f"--workdir={w}", *paths))
  assert all(p in proc.stdout for p in paths) and proc.stdout.count("%") == 2 * 3  # 3 classes

  out = tmp_path / "zoom"
  _ok(_run("--mode=visualize", f"--workdir={w}", f"--output={out}", *paths))
  pngs = sorted(out.glob("*_zoom.png"))
  assert len(pngs) == 2 and Image.open(pngs[0]).size == (2 * 64 + 4, 64)

  npz = tmp_path / "racnn_teacher.npz"
  _ok(_run("--mode=export_teacher", f"--workdir={w}", f"--output={npz}"))
  ids, logits, meta = teachers.load_predictions(str(npz))
  assert logits.shape == (len(fake.splits["train"]), 3) and meta["model"] == "racnn_cnn_small"

"""The method protocol: a method defined only here (two parameter groups, two optimizers
alternating every 3 steps) trains through the trainer run.py uses, with no edit under
fgjax/train; an update leaves the other group and its optimizer state bit for bit unchanged;
a resume in the middle of a phase equals the uninterrupted run."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import data_fixtures as fx
from configs import common
from fgjax import losses, methods
from fgjax.methods import base as protocol
from fgjax.train import checkpoint as ckpt_lib
from fgjax.train import logs, setup, trainer


class ToyAlternating(methods.Method):
  """Optimizer "a" (AdamW, weight decay) trains the head for `a_steps` steps, then optimizer
  "b" (SGD with momentum) trains the conv stages for `b_steps` steps, and again."""
  name = "toy_alternating"
  sections = {"toy": dict(a_steps=3, b_steps=3, b_lr=0.05)}

  def optimizers(self):
    toy = self.section("toy")
    b = ml_collections.ConfigDict(dict(self.config.optim))
    b.name, b.lr, b.momentum, b.weight_decay = "sgd", toy["b_lr"], 0.9, 1e-4
    return {"a": methods.OptimizerSpec(self.config.optim, params=("head/.*",)),
            "b": methods.OptimizerSpec(b, params=("stage.*",))}

  def ce(self, params, extra, ctx):
    logits, _, new = self.apply_train(params, extra, ctx.batch["image"], rng=ctx.rng)
    loss = losses.cross_entropy(logits, ctx.batch["label"])
    return loss, ({"loss": loss, "step_seen": ctx.step}, new)

  def phases(self):
    toy = self.section("toy")
    return (methods.Phase((methods.Update(self.ce, "a"),), steps=toy["a_steps"]),
            methods.Phase((methods.Update(self.ce, "b"),), steps=toy["b_steps"]))


methods.register("toy_alternating", ToyAlternating)


def toy_config(**over):
  c = common.base_config("toy_alternating")
  c.model.name = "cnn_small"
  c.model.img_size = 32
  c.model.kwargs = dict(widths=(8, 16), head_zeroinit=False)
  c.data.name = "synthetic"
  c.data.resize_size = 36
  c.data.source_kwargs = dict(num_classes=4, num_examples=48, image_size=40)
  c.batch_size = 8
  c.eval_batch_size = 16
  c.total_steps = 8
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1
  c.keep_checkpoints = 20
  c.optim.lr = 1e-2
  c.optim.warmup_steps = 2
  c.optim.warmup_init_lr_factor = 0.1
  for k, v in over.items():
    c[k] = v
  return c


def _states(workdir, cfg):
  """The raw train state of every checkpoint in `workdir`: {step: state}."""
  model, method = setup.build(cfg, 4)
  example = setup.config_example(cfg)
  opts = setup.build_optimizers(cfg, method, setup.params_shape(method, example))
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  abstract = setup.abstract_train_state(cfg, method, opts, mesh, example)
  ckpt = ckpt_lib.Checkpointer(str(workdir), keep=50, async_save=False)
  try:
    return {s: jax.device_get(ckpt.restore(abstract, s)[0]) for s in ckpt.last.all_steps()}
  finally:
    ckpt.close()


def _same(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb))


def _head(p):
  return {"head": p["head"]}


def _stages(p):
  return {k: v for k, v in p.items() if k.startswith("stage")}


def test_schedule_arithmetic():
  u = lambda o: methods.Update(lambda *a: None, o)
  phases = (methods.Phase((u("a"),), steps=3), methods.Phase((u("b"), u("b")), steps=2))
  assert [protocol.phase_at(phases, s) for s in range(11)] == [0, 0, 0, 1, 1] * 2 + [0]
  # "a" updates once on steps 0-2, 5-7; "b" twice on steps 3-4, 8-9.
  assert [int(protocol.updates_before(phases, "a", s)) for s in range(11)] == \
      [0, 1, 2, 3, 3, 3, 4, 5, 6, 6, 6]
  assert [int(protocol.updates_before(phases, "b", s)) for s in range(11)] == \
      [0, 0, 0, 0, 2, 4, 4, 4, 4, 6, 8]
  assert int(protocol.updates_before(phases, "b", jnp.int32(9))) == 6  # traced steps too
  with pytest.raises(ValueError, match="at least one step"):
    methods.Phase((u("a"),), steps=0)


def test_once_phases_run_before_the_cycle():
  u = lambda o: methods.Update(lambda *a: None, o)
  phases = (methods.Phase((u("a"),), steps=2, once=True),  # steps 0-1
            methods.Phase((u("b"),), steps=1, once=True),  # step 2
            methods.Phase((u("a"),), steps=2), methods.Phase((u("b"), u("b")), steps=1))
  assert [protocol.phase_at(phases, s) for s in range(10)] == [0, 0, 1, 2, 2, 3, 2, 2, 3, 2]
  assert [int(protocol.updates_before(phases, "a", s)) for s in range(10)] == \
      [0, 1, 2, 2, 3, 4, 4, 5, 6, 6]
  assert [int(protocol.updates_before(phases, "b", s)) for s in range(10)] == \
      [0, 0, 0, 1, 1, 1, 3, 3, 3, 5]
  assert int(protocol.updates_before(phases, "b", jnp.int32(9))) == 5
  with pytest.raises(ValueError, match="before every cycling phase"):
    protocol.phase_at((phases[2], phases[0]), 0)
  with pytest.raises(ValueError, match="at least one phase that cycles"):
    protocol.phase_at(phases[:2], 0)


def test_overlapping_groups_and_undeclared_optimizers_are_errors():
  specs = {"a": methods.OptimizerSpec({}, ("head/.*",)), "b": methods.OptimizerSpec({}, (".*",))}
  with pytest.raises(ValueError, match="'a' and 'b' both claim parameter 'head/kernel'"):
    protocol.group_mask(specs, {"head": {"kernel": 0}, "stage0": {"kernel": 0}})
  specs = {"a": methods.OptimizerSpec({}, ("head/.*",)), "b": methods.OptimizerSpec({}, ("x.*",))}
  with pytest.raises(ValueError, match=r"optimizer 'b' claims no parameter"):
    protocol.group_mask(specs, {"head": {"kernel": 0}, "stage0": {"kernel": 0}})
  cfg = toy_config()
  model, method = setup.build(cfg, 4)
  method.phases = lambda: (methods.Phase((methods.Update(method.ce, "c"),)),)
  with pytest.raises(ValueError, match=r"undeclared optimizers \['c'\]"):
    setup.build_optimizers(cfg, method, setup.params_shape(method, setup.config_example(cfg)))


def test_alternating_groups_train_through_the_trainer(tmp_path, monkeypatch):
  cfg = toy_config()
  result = trainer.train_and_evaluate(cfg, str(tmp_path / "whole"))
  assert result["test"]["num_examples"] > 0
  saved = json.load(open(tmp_path / "whole" / "config.json"))
  assert saved["toy"] == {"a_steps": 3, "b_steps": 3, "b_lr": 0.05}
  assert not {"trs", "teacher", "cal", "pmg", "transfg"} & set(saved)  # only this method's
  states = _states(tmp_path / "whole", cfg)
  assert sorted(states) == list(range(1, 9))
  _, method = setup.build(cfg, 4)
  example = setup.config_example(cfg)
  opts = setup.build_optimizers(cfg, method, setup.params_shape(method, example), 6, 8)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  states[0] = jax.device_get(setup.create_train_state(cfg, method, opts, mesh,
                                                      jax.random.key(cfg.seed), example))
  for step in range(8):  # the state before step `step` is states[step]
    before, after = states[step], states[step + 1]
    a_phase = protocol.phase_at(method.phases(), step) == 0
    moved, still = ("a", "b") if a_phase else ("b", "a")
    group = _head if a_phase else _stages
    other = _stages if a_phase else _head
    assert _same(other(before["params"]), other(after["params"])), (step, "params")
    assert _same(before["opt"][still], after["opt"][still]), (step, "opt", still)
    assert not _same(group(before["params"]), group(after["params"])), (step, "moved")
    assert not _same(before["opt"][moved], after["opt"][moved])
  # Each optimizer logs its own learning rate (its own update count), and losses see the step.
  rows = [r for r in logs.read_metrics(str(tmp_path / "whole")) if r["split"] == "train"]
  assert [r["step_seen"] for r in rows] == list(range(8))
  assert {"lr_a", "lr_b"} <= set(rows[0])
  # Warm-up (2 train steps) in each optimizer's own updates: "a" makes 5 of the 8 steps'
  # updates, so round(2 * 5/8) = 1 update of warm-up; "b" makes 3 (steps 3-5): 1 update.
  assert rows[0]["lr_a"] == pytest.approx(1e-3) and rows[1]["lr_a"] == pytest.approx(1e-2)
  assert rows[3]["lr_b"] == pytest.approx(5e-3) and rows[4]["lr_b"] == pytest.approx(0.05)
  assert rows[6]["lr_a"] < rows[2]["lr_a"]  # "a" resumes its own cosine after "b"'s phase

  # SIGTERM after step 4 (inside the second phase: steps 3-5 train "b"), then the same call
  # resumes: the final state equals the uninterrupted run's bit for bit.
  fx.interrupted_run(toy_config(), tmp_path / "resumed", monkeypatch, at_step=4)
  resumed = _states(tmp_path / "resumed", cfg)
  assert _same(resumed[8], states[8])


def test_a_wrapper_hands_each_part_to_its_own_loader(tmp_path):
  """A model with two ResNet trunks (as RA-CNN's scales will be) names both in
  `checkpoint_parts`; one timm checkpoint loads into each, the rest stays fresh."""
  import flax.linen as nn
  timm = pytest.importorskip("timm")
  from safetensors.numpy import save_file

  from fgjax import convert
  from fgjax.models import resnet

  class TwoTrunks(nn.Module):  # submodules as fields, as PMG's and CAL's backbone
    num_classes: int
    a: nn.Module
    b: nn.Module
    img_size: int = 32

    def checkpoint_parts(self):
      return {"a": self.a, "b": self.b}

    @nn.compact
    def __call__(self, x, *, train=False):
      fa, _ = self.a(x, train=train)
      fb, _ = self.b(x, train=train)
      return nn.Dense(self.num_classes, name="head")(fa + fb), {}

  ref = timm.create_model("resnet18", pretrained=False, num_classes=1000)
  sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  save_file(sd, str(tmp_path / "r18.safetensors"))
  trunk = lambda: resnet.ResNet(num_classes=0, depth=18, img_size=32)
  model = TwoTrunks(3, trunk(), trunk())
  fresh = jax.device_get(dict(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))))
  loaded = convert.load_into_model(model, fresh, str(tmp_path / "r18.safetensors"))
  want = sd["layer2.0.conv1.weight"].transpose(2, 3, 1, 0)
  for part in ("a", "b"):
    np.testing.assert_array_equal(loaded["params"][part]["layer2_0"]["conv1"]["kernel"], want)
    np.testing.assert_array_equal(loaded["batch_stats"][part]["bn1"]["var"],
                                  sd["bn1.running_var"])
  np.testing.assert_array_equal(loaded["params"]["head"]["kernel"],
                                fresh["params"]["head"]["kernel"])


def test_a_registered_method_restores_without_its_registration(tmp_path):
  """config.json names the method's class, so eval/predict of a run of a method registered
  outside fgjax work in a process that never registered it (no --config)."""
  cfg = toy_config(total_steps=2)
  trainer.train_and_evaluate(cfg, str(tmp_path))
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["method_import_resolved"] == "test_method_protocol:ToyAlternating"
  assert saved["batch_spec_resolved"]["image"] == [[32, 32, 3], "uint8"]
  del methods.METHODS["toy_alternating"]
  try:
    _, _, method, variables, info = setup.restore_model(str(tmp_path))
    assert type(method).__name__ == "ToyAlternating" and info["step"] == 2
  finally:
    methods.register("toy_alternating", ToyAlternating)


def test_a_teacher_run_stopped_by_a_signal_stops_the_student():
  from fgjax.methods.trs_deit import TeacherHelper
  cfg = common.base_config("trs_deit")
  cfg.teacher.train_first = common.base_config("classifier")
  env = methods.HelperEnv(config=cfg, mesh=None, train_source=None, workdir="/nonexistent",
                          restore=None, train=lambda c, w: {"stopped_at": 3})
  with pytest.raises(protocol.HelperStopped, match="teacher run stopped at step 3"):
    TeacherHelper(cfg.teacher).build(env)
  assert cfg.teacher.checkpoint == ""  # the student's config still names no teacher

"""TransFG: part selection against the reference algorithm, weight import, loss, quick config."""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

import data_fixtures as fx
from configs import common, transfg_cub
from fgjax import convert, losses, methods, models
from fgjax.train import logs, trainer


def _reference_part_attention(attention_maps):
  """TACJu/TransFG `Part_Attention` re-stated in torch: multiply the maps from the first block
  on (`last = A_i @ last`), take the cls row over the patches, argmax per head."""
  maps = [torch.from_numpy(np.asarray(a, np.float64)) for a in attention_maps]
  last = maps[0]
  for a in maps[1:]:
    last = torch.matmul(a, last)
  _, idx = last[:, :, 0, 1:].max(2)
  return idx.numpy()


def _model(**kw):
  model = models.create("transfg_tiny_patch16", 5, 64, depth=4, head_zeroinit=False, **kw)
  x = jax.random.normal(jax.random.key(1), (3, 64, 64, 3))
  return model, model.init(jax.random.key(0), x), x


def test_part_selection_matches_the_reference_on_the_same_attention_maps():
  model, variables, x = _model()
  assert model.grid == (5, 5) and model.patch_stride == 12  # (64 - 16) / 12 + 1 overlapping
  logits, aux = model.apply(variables, x, return_attention=True)
  want = _reference_part_attention(aux["attention"][:-1])
  np.testing.assert_array_equal(np.asarray(aux["selected"]), want)
  # The part layer (last block) saw [cls, one part per head]; the heads are on its cls token.
  assert aux["attention"][-1].shape == (3, 3, 4, 4)
  assert aux["tokens"].shape == (3, 4, 192) and logits.shape == (3, 5)
  # Random attention maps (sharper than a fresh model's) give the same argmax as well.
  keys = jax.random.split(jax.random.key(3), 5)
  maps = [jax.nn.softmax(4 * jax.random.normal(k, (2, 3, 26, 26)), -1) for k in keys]
  from fgjax.models import rollout
  np.testing.assert_array_equal(
      np.asarray(rollout.select_per_head(rollout.cls_row_scores(maps, 1))),
      _reference_part_attention(maps))


def test_imports_timm_vit_weights(tmp_path):
  timm = pytest.importorskip("timm")
  from safetensors.numpy import save_file
  torch.manual_seed(0)
  ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000).eval()
  sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  path = tmp_path / "vit_tiny.safetensors"
  save_file(sd, str(path))
  params = convert.load_checkpoint(str(path), "transfg_tiny_patch16", img_size=64,
                                   num_classes=5, model_kwargs={"depth": 12})
  np.testing.assert_allclose(np.asarray(params["blocks_3"]["attn"]["qkv"]["kernel"]),
                             sd["blocks.3.attn.qkv.weight"].T, rtol=0, atol=0)
  assert params["pos_embed"].shape == (1, 1 + 25, 192)  # 14x14 grid resampled to 5x5
  np.testing.assert_allclose(np.asarray(params["pos_embed"][0, 0]), sd["pos_embed"][0, 0])
  assert params["head"]["kernel"].shape == (192, 5)  # re-initialised for 5 classes
  model = models.create("transfg_tiny_patch16", 5, 64)
  logits, aux = model.apply({"params": params}, jnp.zeros((1, 64, 64, 3)))
  assert logits.shape == (1, 5) and aux["selected"].shape == (1, 3)


def test_loss_is_ce_plus_contrastive_on_the_cls_token():
  model, variables, x = _model()
  cfg = common.base_config("transfg")
  cfg.model.name = "transfg_tiny_patch16"
  method = methods.get_method(cfg, model, 5)
  batch = {"image": x, "label": jnp.array([0, 1, 0])}
  ctx = methods.Context(step=0, rng=jax.random.key(2), batch=batch, helpers={})
  loss, (metrics, _) = method.loss(variables["params"], {}, ctx)
  logits, aux = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  ce = losses.cross_entropy(logits, batch["label"])
  con = losses.contrastive_loss(aux["cls_features"], batch["label"], 0.4)
  np.testing.assert_allclose(float(loss), float(ce + con), rtol=1e-5)
  assert float(con) > 0 and set(metrics) >= {"ce", "con", "loss", "accuracy"}
  cfg.model.name = "deit_tiny_distilled_patch16"
  with pytest.raises(ValueError, match="transfg"):
    methods.get_method(cfg, models.create("deit_tiny_distilled_patch16", 5, 64, depth=2), 5)


def test_quick_config_trains_one_step_on_fake_cub(tmp_path):
  fake = fx.make_fake_cub(tmp_path / "data", num_classes=3, per_class=4)
  cfg = transfg_cub.get_config("runlocal")
  with cfg.unlocked():
    cfg.data.data_dir = fake.data_dir
    cfg.total_steps = 1
    cfg.eval_every_steps = 1
  result = trainer.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert result["test"]["num_examples"] == len(fake.splits["test"])
  row = [r for r in logs.read_metrics(str(tmp_path / "w")) if r["split"] == "train"][-1]
  assert np.isfinite(row["loss"]) and row["con"] > 0
  from test_run import part_hit_chance_on_test  # TransFG's overlapping patches (stride 12)
  assert 0 <= result["test"]["part_hit_rate"] <= 1
  assert result["test"]["part_hit_chance"] == pytest.approx(part_hit_chance_on_test(cfg),
                                                            abs=1e-6)


def test_recipe_follows_the_reference():
  """TACJu/TransFG's train.py launch and ViT-B_16 config (docs/fidelity.md)."""
  from fgjax.train import setup
  full = transfg_cub.get_config()
  assert (full.optim.name, full.optim.lr, full.total_steps, full.batch_size) == \
      ("sgd", 3e-2, 10_000, 64)  # 4 GPUs x 16
  assert setup.scaled_lr(full.optim, 64) == pytest.approx(3e-2)
  assert setup.scaled_lr(full.optim, 16) == pytest.approx(7.5e-3)  # the documented scaling
  assert (full.optim.warmup_steps, full.optim.clip_norm, full.optim.weight_decay) == \
      (500, 1.0, 0.0)
  assert (full.data.resize_size, full.model.img_size, full.model.kwargs.patch_stride) == \
      (600, 448, 12)
  assert (full.model.kwargs.drop_rate, full.model.kwargs.proj_drop_rate) == (0.1, 0.0)
  assert full.transfg.part_layer_init == "random"


def test_dropout_where_the_reference_has_it():
  """drop_rate 0.1 with proj_drop_rate 0: dropout after the embeddings and in the MLPs, none
  after the attention projection (the reference's Mlp and Embeddings dropout, its attention
  dropouts at attention_dropout_rate 0)."""
  import flax.linen as nn
  model = models.create("transfg_tiny_patch16", 5, 64, depth=3, drop_rate=0.1,
                        proj_drop_rate=0.0)
  x = jnp.zeros((2, 64, 64, 3))
  variables = model.init(jax.random.key(0), x)
  rates = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dropout):
      rates["/".join(context.module.path)] = context.module.rate
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  assert rates.pop("Dropout_0") == 0.1  # the embeddings
  for i in range(3):
    assert rates.pop(f"blocks_{i}/attn/Dropout_1") == 0.0
    assert rates.pop(f"blocks_{i}/mlp/Dropout_0") == rates.pop(f"blocks_{i}/mlp/Dropout_1") == 0.1
  assert not rates, rates
  timm_like = models.create("transfg_tiny_patch16", 5, 64, depth=3, drop_rate=0.1)
  assert timm_like.proj_drop_rate is None  # timm's rule: the projection drops at drop_rate


@pytest.mark.parametrize("part_layer_init", ["random", "pretrained"])
def test_part_layer_starts_fresh_and_the_part_norm_is_the_encoder_norm(tmp_path,
                                                                        part_layer_init):
  """The reference's load_from skips `part*` (the part layer stays at its initialisation) and
  copies `Transformer/encoder_norm` into `part_norm`; "pretrained" is fgjax's former choice."""
  timm = pytest.importorskip("timm")
  from safetensors.numpy import save_file
  torch.manual_seed(0)
  ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000, depth=3)
  sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  sd["norm.weight"] = sd["norm.weight"] + 0.5  # recognisable
  save_file(sd, str(tmp_path / "vit.safetensors"))
  cfg = transfg_cub.get_config("runlocal")
  cfg.transfg = {"part_layer_init": part_layer_init}
  model = models.create(cfg.model.name, 5, 64, **cfg.model.kwargs)
  method = methods.get_method(cfg, model, 5)
  params = method.load_pretrained(str(tmp_path / "vit.safetensors"))[""]["params"]
  fresh = convert.init_params(model, 0)
  np.testing.assert_array_equal(params["blocks_1"]["mlp"]["fc1"]["kernel"],
                                sd["blocks.1.mlp.fc1.weight"].T)
  np.testing.assert_array_equal(params["norm"]["scale"], sd["norm.weight"])  # part_norm
  last = params["blocks_2"]["attn"]["qkv"]["kernel"]
  if part_layer_init == "random":
    np.testing.assert_array_equal(last, fresh["blocks_2"]["attn"]["qkv"]["kernel"])
    assert not np.allclose(last, sd["blocks.2.attn.qkv.weight"].T)
  else:
    np.testing.assert_array_equal(last, sd["blocks.2.attn.qkv.weight"].T)
  cfg.transfg = {"part_layer_init": "block11"}
  with pytest.raises(ValueError, match="config.transfg.part_layer_init"):
    methods.get_method(cfg, model, 5)


@pytest.mark.slow
def test_readme_distillation_recipe_on_fake_cub(tmp_path):
  """The commands of docs/training.md (teacher, student with the online teacher; export,
  student from the predictions), with the quick variants."""
  from test_run import _ok, _run
  fake = fx.make_fake_cub(tmp_path / "data", num_classes=3, per_class=4)
  data = f"--config.data.data_dir={fake.data_dir}"
  teacher, student = tmp_path / "transfg_cub", tmp_path / "trs_deit_cub"
  _ok(_run("--config=configs/transfg_cub.py:runlocal", data, f"--workdir={teacher}"))
  online = tmp_path / "trs_deit_cub_online"
  _ok(_run("--config=configs/trs_deit_cub.py:runlocal", data,
           f"--config.teacher.checkpoint={teacher}", f"--workdir={online}"))
  rows = [r for r in logs.read_metrics(str(online)) if r["split"] == "train"]
  assert rows and "teacher_agreement" in rows[-1]
  _ok(_run("--mode=export_teacher", f"--workdir={teacher}"))
  preds = teacher / "teacher_predictions.npz"
  assert preds.exists()
  proc = _ok(_run("--config=configs/trs_deit_cub.py:runlocal", data,
                  f"--config.teacher.predictions={preds}", f"--workdir={student}"))
  assert "teacher_predictions.npz" in proc.stderr + proc.stdout
  rows = [r for r in logs.read_metrics(str(student)) if r["split"] == "train"]
  assert rows and "teacher_agreement" in rows[-1]

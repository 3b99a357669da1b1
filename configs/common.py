"""Shared pieces of fgjax configs (big_vision style: `get_config(arg)` + `parse_arg`)."""
from __future__ import annotations

import ml_collections

from fgjax import methods


def parse_arg(arg: str | None, **defaults):
  """'runlocal,variant=B' -> ConfigDict(runlocal=True, variant='B'), typed like `defaults`."""
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if not eq:
      value = True
    elif isinstance(default, bool):
      value = value.lower() in ("1", "true", "yes", "y")
    elif default is not None:
      value = type(default)(value)
    out[key] = value
  return out


def base_config(method: str = "classifier") -> ml_collections.ConfigDict:
  """The keys every method shares, plus the config sections of `method` with the defaults its
  module declares (`fgjax.methods.sections`); experiment configs override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = method
  c.model = ml_collections.ConfigDict(dict(name="deit_small_distilled_patch16", img_size=224,
                                           dtype="float32", kwargs={}))
  c.init_from = ""
  c.init_dont_load = ()
  c.data = ml_collections.ConfigDict(dict(
      name="synthetic", data_dir=None, test_split="test", val_fraction=0.0,
      resize_size=256, resize_mode="shorter", interpolation="bilinear", normalize="imagenet",
      backend="opencv", draft_decode=True, worker_count=0, prefetch=2,
      skip_bad_images=False, source_kwargs={}, split_kwargs={},
      pseudo_labels="",  # a pseudo-label CSV (fgjax.toolkit.pseudo_labels): its images join train
      # Text (docs/text.md): with text.enabled batches carry each example's noun phrases
      # (phrases x words ids + a mask). text_dir: CUB's text_c10/ (Reed et al. 2016; default:
      # text_c10 in or beside the CUB folder; other datasets: a .txt beside each image);
      # allow_missing_text: an image without a description gets an empty, fully masked text.
      # train_sentences "sample" (one per step) | "concat"; eval_sentences "all" | "first";
      # vocab: another run's vocab.txt (default: built from the training texts, saved in the
      # workdir); train_drop: the share of training examples whose text is dropped.
      text_dir="", allow_missing_text=False,
      text=dict(enabled=False, max_phrases=16, max_words=6, train_sentences="sample",
                eval_sentences="all", min_count=1, vocab="", train_drop=0.0),
      augment=dict(flip=True, sharpness=0.0, randaugment=None, autoaugment=False,
                   color_jitter=(0.0, 0.0, 0.0), crop_padding=0)))
  c.batch_size = 64
  c.eval_batch_size = 64
  c.total_steps = None
  c.total_epochs = None
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, lr_base_batch=0, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
      momentum=0.9, nesterov=False, clip_norm=0.0, schedule="cosine", warmup_steps=None,
      warmup_epochs=None, warmup_init_lr_factor=0.0, decay_every_steps=None,
      decay_every_epochs=None, decay_rate=0.1, end_lr_factor=0.0, backbone_lr_mult=1.0,
      new_layers=("head.*",), decay_1d=False))
  c.label_smoothing = 0.0
  c.ema_decay = 0.0
  c.log_every_steps = 50
  c.eval_every_steps = None
  c.eval_every_epochs = None
  c.checkpoint_every_steps = None
  c.checkpoint_every_epochs = None
  c.keep_checkpoints = 3
  # Attention-region random crops (fgjax.toolkit.crops, docs/toolkit.md): from epoch
  # start_epoch, every every_epochs, each training image's crop is the best of num_boxes random
  # boxes (box_size: fractions of the sides) by the attended pixels of the model's map (auto:
  # ViT rollout, CNN CAM) at threshold x its max (or mean); kind="scda": SCDA's box instead.
  c.crop = ml_collections.ConfigDict(dict(
      enabled=False, kind="random_box", start_epoch=1, every_epochs=1, map="auto",
      threshold=0.5, threshold_of="max", box_size=(0.6, 0.6), num_boxes=32))
  c.visualize_examples = 0  # run.py draws the first N test images after training (if the method draws)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  # Test-time augmentation of every evaluation and prediction (fgjax.toolkit.tta): "none",
  # "flip", "multicrop", "multiscale", "cal8"; docs/toolkit.md "Test-time augmentation".
  c.eval = ml_collections.ConfigDict(dict(tta="none"))
  # run.py --mode=pseudo_label: keep predictions with top-1 probability >= threshold, at most
  # max_per_class per predicted class (0: no cap); docs/toolkit.md "Pseudo-labels".
  c.pseudo_label = ml_collections.ConfigDict(dict(threshold=0.9, max_per_class=0))
  # A rerun into a workdir whose config.json differs in other keys than intervals, steps and
  # worker counts is refused; True resumes with this config (the old one kept as
  # config.<n>.json). docs/failures.md.
  c.resume_with_changes = False
  for key, defaults in methods.sections(method).items():
    c[key] = ml_collections.ConfigDict(defaults)
  return c


def quick_run(c: ml_collections.ConfigDict, steps: int = 2, batch: int = 8):
  """The step-based schedule of a `runlocal` variant: `steps` steps of `batch` images, logged
  every step, evaluated at the end, a checkpoint every step."""
  c.batch_size = batch
  c.eval_batch_size = batch
  c.total_epochs = None
  c.total_steps = steps
  c.log_every_steps = 1
  c.eval_every_epochs = None
  c.eval_every_steps = steps
  c.checkpoint_every_epochs = None
  c.checkpoint_every_steps = 1


def resnet_attention(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Declares `model.kwargs.attn` (None: plain blocks) so that `--config.model.kwargs.attn=se`
  (or cbam, sk, ge; `fgjax.models.resnet`) puts attention in every block of a ResNet recipe.
  A placeholder: ml_collections sets a key from the command line only if the config has it."""
  c.model.kwargs.attn = ml_collections.config_dict.placeholder(str)
  return c

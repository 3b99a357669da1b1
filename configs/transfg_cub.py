r"""TransFG on CUB-200-2011: ViT-B/16, overlapping patches (stride 12), 448 px, SGD 3e-2.

  python run.py --config=configs/transfg_cub.py \
      --config.data.data_dir=/path/to/CUB_200_2011 \
      --config.init_from=/path/to/ViT-B_16.npz \
      --workdir=runs/transfg_cub

Recipe (TransFG, He et al. 2022, via shared/spec/methods.md section 3 and the TACJu/TransFG
training script): ViT-B/16 from the ImageNet-21k Google checkpoint (`ViT-B_16.npz`), 37 x 37
overlapping patches at 448 (stride 12), part selection from the cls row of the attention
rollout over the first 11 blocks, part layer on [cls, 12 parts]. The part layer starts from
random weights, as the reference's `load_from` skips `part*`; the final norm (its `part_norm`)
loads from the checkpoint's encoder norm (`transfg.part_layer_init="pretrained"` loads block 12
into the part layer instead). Dropout 0.1 after the embeddings and in the MLPs, none after the
attention projection or on the attention weights (the reference's ViT-B_16 config:
`dropout_rate` 0.1, `attention_dropout_rate` 0). Loss = CE + contrastive loss (margin 0.4) on
the final cls token. SGD momentum 0.9, lr 3e-2, weight decay 0, 10k steps with 500 warm-up
steps then cosine, gradient clipping at 1.0. Batch 64, the reference's launch (4 GPUs x 16);
`optim.lr_base_batch=64` scales the rate linearly with another global batch, e.g.
`--config.batch_size=16` trains at 7.5e-3 (then `--config.total_steps=40000` sees as many
images as the reference). Train: resize to 600 x 600 (bilinear) -> random crop 448 -> flip ->
ImageNet normalisation; test: resize 600 x 600 -> centre crop 448. Reported: CUB 91.7 top-1,
the best test accuracy over evaluations every 100 steps (`test_best_over_training` here, beside
the honest numbers; the recipe evaluates every 1000 steps, `--config.eval_every_steps=100` as
the reference). Label smoothing is off by default as in the reference script
(`--config.label_smoothing=0.1` turns it on).

Deviations kept: the contrastive loss runs over the global batch (64 x 64 pairs), where each of
the reference's GPUs pairs only its own 16 images (the mean per pair is the same loss; the
cross-GPU pairs add negatives); the fresh part layer takes fgjax's ViT initialisation
(truncated normal 0.02, zero biases) where the reference's torch defaults give weights of std
0.021 (attention, uniform) and 0.023 (MLP, Xavier) with small random biases.

Used as a TRS-DeiT teacher: train it, then either point `teacher.checkpoint` of a TRS-DeiT
config at its workdir, or export its predictions with `run.py --mode=export_teacher`.

Arguments (`--config=configs/transfg_cub.py:ARG`): `runlocal` (tiny model, 64 px, 2 steps),
`variant=small|large`.
Note: the position embedding is resampled bicubically (timm's rule) where the reference uses
scipy's linear `ndimage.zoom`; fine-tuning absorbs the difference.
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, variant="base")
  c = common.base_config("transfg")
  c.model.name = f"transfg_{args.variant}_patch16"
  c.model.img_size = 448
  # attention_impl "auto": no attention probabilities kept (fgjax.models.attention).
  c.model.kwargs = dict(patch_stride=12, region_selection="cls_row", remat=False,
                        attention_impl="auto", drop_rate=0.1, proj_drop_rate=0.0)
  c.init_from = ""  # e.g. /weights/ViT-B_16.npz (ImageNet-21k) or a timm ViT checkpoint
  c.data.name = "cub"
  c.data.data_dir = "data/CUB_200_2011"
  c.data.resize_size = 600
  c.data.resize_mode = "square"
  c.data.interpolation = "bilinear"
  c.data.normalize = "imagenet"
  c.data.augment = dict(flip=True, sharpness=0.0, randaugment=None, autoaugment=False)
  c.batch_size = 64
  c.eval_batch_size = 64
  c.total_steps = 10_000
  c.optim.name = "sgd"
  c.optim.lr = 3e-2
  c.optim.lr_base_batch = 64  # 3e-2 at the reference's 64 images per step, linear otherwise
  c.optim.momentum = 0.9
  c.optim.weight_decay = 0.0
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 500
  c.optim.clip_norm = 1.0
  c.label_smoothing = 0.0
  c.log_every_steps = 50
  c.eval_every_steps = 1000  # the reference evaluates every 100 steps
  c.checkpoint_every_steps = 1000
  if args.runlocal:
    c.model.name = "transfg_tiny_patch16"
    c.model.img_size = 64
    c.model.kwargs = dict(depth=3, patch_stride=12, region_selection="cls_row", remat=False,
                          attention_impl="auto", drop_rate=0.1, proj_drop_rate=0.0)
    c.data.resize_size = 72
    c.batch_size = 8
    c.eval_batch_size = 8
    c.total_steps = 2
    c.optim.warmup_steps = 1
    c.log_every_steps = 1
    c.eval_every_steps = 2
    c.checkpoint_every_steps = 1
  return c

"""PMA recipe shared by the PMA configs (spec section 7; Song et al., IEEE TIP 2020).

No code was published, and the notes we have (seed 003) lost the paper's formulas and most of
its training details; what it gives: CUB-200-2011 at 448 x 448 with Reed et al.'s ten
descriptions per image (`text_c10/`), an ImageNet VGG-16 (conv5_3) or ResNet-50 (layer4)
backbone, conv map 2x2 max-pooled into local descriptors, three stages, noun phrases by
tokenisation, POS tagging and chunking, word embedding + LSTM per phrase, the QRM, the text
mask of the top 3 phrases above a threshold, a shared stage FC, [GAP(X); stage outputs] into
the classifier, cross-entropy; the reported top-1: VGG-16 86.8 image-only / 88.2 with text,
ResNet-50 87.5 / 88.7. Every other choice is open; fgjax's, with where each comes from:
- data: CUB's own train_test_split.txt (the spec: Reed et al.'s split is zero-shot);
  train resize 512 (square) -> random crop 448 -> flip, test resize 512 -> centre crop 448
  (the usual CUB recipe at 448, as CAL's `utils.get_transform`), ImageNet mean/std.
- text: all ten sentences' phrases concatenated, in training and evaluation
  (`data.text.train_sentences="concat"`, `eval_sentences="all"`: the paper describes one text
  per image and masks the top 3 of its phrases per stage, which needs more than one sentence's
  3-4 phrases), at most 40 phrases of 6 words (CUB's ten captions hold 30-40 noun phrases);
  noun phrases by fgjax's rule-based chunker (`fgjax.text.noun_phrases`; the paper used an
  NLP toolkit's tagger, which needs model downloads); vocabulary from the training texts.
- model: word embedding 300 (the usual GloVe width, randomly initialised: no embedding file
  is named), LSTM 512, SAM ratio 8, QRM and stage FC 512, text-mask threshold 0.1
  (`fgjax.models.pma`).
- optimiser: SGD momentum 0.9, weight decay 1e-4 (5e-4 for VGG), lr 1e-3 on the backbone and
  1e-2 on the new layers, cosine over 100 epochs, batch 16: the common fine-tuning recipe of
  CUB papers of the time (e.g. PMG's lr split, CAL's batch); the paper's own values are not in
  our notes.
`init_from`: an ImageNet checkpoint (torchvision/timm VGG-16 or ResNet-50) loads into the
backbone (`PMA.checkpoint_parts`).
"""
from __future__ import annotations

from configs import common


def pma_config(arg, *, backbone: str):
  args = common.parse_arg(arg, runlocal=False, image_only=False)
  c = common.base_config("pma")
  c.model.name = f"pma_{backbone}"
  c.model.img_size = 448
  c.model.kwargs = dict(embed_dim=300, hidden_dim=512, sam_ratio=8, qrm_dim=512, stage_dim=512,
                        text_mask_top=3, text_mask_threshold=0.1)
  c.init_from = ""  # e.g. /weights/vgg16-397923af.pth or resnet50-0676ba61.pth
  c.data.name = "cub"
  c.data.data_dir = "data/CUB_200_2011"
  c.data.text_dir = ""  # default: text_c10/ in or beside data_dir (Reed et al. 2016)
  c.data.text = dict(enabled=not args.image_only, max_phrases=40, max_words=6,
                     train_sentences="concat", eval_sentences="all", min_count=1, vocab="",
                     train_drop=0.0)
  c.data.resize_size = 512
  c.data.resize_mode = "square"
  c.data.normalize = "imagenet"
  c.data.augment = dict(flip=True, sharpness=0.0, randaugment=None, autoaugment=False,
                        color_jitter=(0.0, 0.0, 0.0))
  c.batch_size = 16
  c.eval_batch_size = 16
  c.total_epochs = 100
  c.optim.name = "sgd"
  c.optim.lr = 1e-2
  c.optim.backbone_lr_mult = 0.1
  c.optim.new_layers = ("(?!backbone/).*",)  # every layer outside the backbone
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4 if backbone.startswith("vgg") else 1e-4
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 0
  c.log_every_steps = 50
  c.eval_every_epochs = 10
  c.checkpoint_every_epochs = 1
  c.visualize_examples = 8
  if args.runlocal:
    # A quick local run: the small CPU variant at 64 px, a few steps on the same data.
    c.model.name = "pma_cnn_small"
    c.model.img_size = 64
    c.model.kwargs = dict()
    c.data.resize_size = 72
    c.data.text.max_phrases = 12
    c.visualize_examples = 2
    common.quick_run(c)
  return c

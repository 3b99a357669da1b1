"""RA-CNN recipe shared by the RA-CNN configs (spec section 6; Fu, Zheng and Mei, CVPR 2017).

From the paper and the released Caffe files (deploy prototxt, AttentionCrop and RankLoss
layers): VGG-19 at every scale (each its own weights), 448 input, crops zoomed to 224; the
APN on conv5_4 (28 x 28 at 448): max-pool 2x2, FC 1024, tanh, FC 3, sigmoid, both FCs
N(0, 0.001); each scale's classifier average-pools conv5_4 and applies one fc; boxcar k = 10;
tl at least 1/3 of the input side; ranking loss on the true-class softmax probabilities with
margin 0.05; APN pre-training toward the half-side square on the strongest conv response;
then alternation of the classifiers (cross-entropy, APNs frozen) and the APNs (ranking loss,
classifiers frozen). The paper reports CUB 85.3% (scale 1+2+3).

What the paper leaves open, and what fgjax chose:
- init: `init_from` = torchvision's ImageNet `vgg19-dcbb9e9d.pth` (or timm's `vgg19`), loaded
  into all three scale networks ("initialised from VGG-19 pre-trained on ImageNet"); the 200/196
  /120-class heads are new.
- classifier pre-training: `racnn.classifier_pretrain_steps` = 10 epochs of the classifier
  update before anything else (the paper fine-tunes the VGG on the task first; 10 epochs is
  the usual VGG fine-tuning length of its time, not a paper number); scales 2 and 3 learn on
  the APNs' initial centred squares (`racnn.pretrain_squares="apn"`; "random" draws uniform
  squares, slower to learn on the synthetic birds: docs/demo.md).
- APN pre-training: 2 epochs (`racnn.apn_pretrain_steps`; not given in the paper).
- alternation: one epoch of each (`racnn.alternate_every`; the paper alternates "until both
  losses stop changing"), 60 epochs in all.
- optimizer: SGD, momentum 0.9, weight decay 5e-4 (the Caffe VGG solver), batch 16, lr 1e-3
  for the new heads and 1e-4 for the pre-trained convs (backbone_lr_mult 0.1), cosine; the APNs
  SGD lr 1e-3 without decay (the Caffe files do not carry the solver).
- data: resize the shorter side to 512, random 448 crop and flip for training, centre 448 crop
  for evaluation (the Caffe-era FGVC pipeline; the paper says only "448 x 448 input").
"""
from __future__ import annotations

from configs import common


def racnn_config(arg, *, dataset: str, data_dir: str, train_size: int, epochs: int = 60):
  args = common.parse_arg(arg, runlocal=False, backbone="vgg19")
  c = common.base_config("racnn")
  c.model.name = f"racnn_{args.backbone}"
  c.model.img_size = 448
  c.model.kwargs = dict(crop_size=224)
  c.init_from = ""  # e.g. /weights/vgg19-dcbb9e9d.pth (torchvision) or vgg19.safetensors (timm)
  c.data.name = dataset
  c.data.data_dir = data_dir
  c.data.resize_size = 512
  c.data.normalize = "imagenet"
  c.data.augment = dict(flip=True, sharpness=0.0, randaugment=None, autoaugment=False)
  c.batch_size = 16
  c.eval_batch_size = 16
  steps_per_epoch = train_size // c.batch_size  # the trainer's epoch: full batches only
  c.total_epochs = epochs
  c.optim.name = "sgd"
  c.optim.lr = 1e-3
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.schedule = "cosine"
  c.optim.new_layers = (r"scale\d/head/.*", r"scale\d/fc/.*")
  c.optim.backbone_lr_mult = 0.1
  c.optim.no_decay = ()
  c.racnn.classifier_pretrain_steps = 10 * steps_per_epoch
  c.racnn.apn_pretrain_steps = 2 * steps_per_epoch
  c.racnn.alternate_every = steps_per_epoch
  c.racnn.apn_optim = dict(name="sgd", lr=1e-3, weight_decay=0.0)
  c.log_every_steps = 50
  c.eval_every_epochs = 5
  c.checkpoint_every_epochs = 1
  if args.runlocal:
    # A quick local run: the small CNN at every scale, small images, a few steps of each phase.
    c.model.name = "racnn_cnn_small"
    c.model.img_size = 64
    c.model.kwargs = dict(crop_size=48, apn_hidden=64)
    c.data.resize_size = 72
    c.racnn.classifier_pretrain_steps = 1
    c.racnn.apn_pretrain_steps = 1
    c.racnn.alternate_every = 1
    common.quick_run(c, steps=4)
  return c

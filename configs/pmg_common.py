"""PMG recipe shared by the PMG configs (spec section 5; PRIS-CV PMG `train.py`).

Recipe: ResNet-50 from ImageNet weights (`init_from` = a timm/torchvision resnet50 checkpoint;
it loads into the backbone), PMG heads on layer2/3/4; train: resize to 550 x 550 -> random crop
448 with padding 8 (black; the reference's `RandomCrop(448, padding=8)`) -> flip -> normalise
with mean/std 0.5; test: resize 550 x 550 -> centre crop 448. Each batch is used 4 times
(jigsaw 8, 4, 2, then the original image with 2 x CE on the concat head), each a full update.
The jigsaw is the reference's `jigsaw_generator`: one shuffled cycle of the cells for the whole
batch, every cell moved (`pmg.jigsaw_permutation="uniform"`, `pmg.jigsaw_per_image=True` give
fgjax's former per-image permutations). SGD momentum 0.9, weight decay 5e-4 on every parameter
(`optim.decay_1d`: BatchNorm and biases too, as the reference's `SGD(net.parameters())`), lr
2e-3 for the new layers (conv blocks and classifiers) and 2e-4 for the backbone, cosine, batch
16; the reference trains 200 epochs (we use the same; it reports CUB 89.6, Cars 95.1, Aircraft
93.4). Evaluation reports the concat head (`top1`) and the sum of the four heads
(`combined_top1`). The reference writes every epoch's test accuracy of both to
`results_test.txt` and keeps the model of the best combined accuracy; fgjax's
`test_best_over_training` holds the best of each head over training (`top1`, and
`combined_top1` with its own step), beside the honest last or validation-selected numbers.
"""
from __future__ import annotations

from configs import common


def pmg_config(arg, *, dataset: str, data_dir: str, backbone: str = "resnet50",
               epochs: int = 200):
  args = common.parse_arg(arg, runlocal=False)
  c = common.base_config("pmg")
  c.model.name = f"pmg_{backbone}"
  c.model.img_size = 448
  c.model.kwargs = {}
  c.init_from = ""  # e.g. /weights/resnet50.safetensors (timm) or resnet50-0676ba61.pth
  c.data.name = dataset
  c.data.data_dir = data_dir
  c.data.resize_size = 550
  c.data.resize_mode = "square"
  c.data.normalize = "half"
  c.data.augment = dict(flip=True, sharpness=0.0, randaugment=None, autoaugment=False,
                        crop_padding=8)
  c.batch_size = 16
  c.eval_batch_size = 16
  c.total_epochs = epochs
  c.optim.name = "sgd"
  c.optim.lr = 2e-3
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.schedule = "cosine"
  c.optim.new_layers = ("conv_block.*", "classifier.*")
  c.optim.backbone_lr_mult = 0.1
  c.optim.no_decay = ()
  c.optim.decay_1d = True  # the reference's SGD decays net.parameters(): BatchNorm, biases too
  # c.pmg: jigsaw (8, 4, 2) and concat weight 2 are the method's defaults (fgjax/methods/pmg.py).
  c.log_every_steps = 50
  c.eval_every_epochs = 10
  c.checkpoint_every_epochs = 1
  if args.runlocal:
    # A quick local run: small backbone, narrow heads, small images, a few steps.
    c.model.name = "pmg_resnet18" if backbone.startswith("resnet") else "pmg_deit_tiny"
    c.model.img_size = 64
    c.model.kwargs = dict(feature_size=64, stage_features=128)  # narrow heads
    if not backbone.startswith("resnet"):
      c.model.img_size = 128  # jigsaw 8 x 8 cells aligned to 16 px patches
      c.model.kwargs = dict(depth=3, feature_size=64, stage_features=128)
    c.data.resize_size = c.model.img_size + 8
    common.quick_run(c)
  if backbone.startswith("resnet"):
    common.resnet_attention(c)
  return c

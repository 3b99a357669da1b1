"""CAL recipe shared by the CAL configs (spec section 4; raoyongming/CAL `fgvc/`).

Recipe (`config_distributed.py`, `train_distributed.py`, `infer.py`, `utils.get_transform`):
WS-DAN on a ResNet-101 (or ResNet-50) from ImageNet weights (`init_from` = a timm/torchvision
checkpoint; it loads into the backbone) with layer4 at stride 1, not dilated (the reference's
`resnet.py`, `ResNet(stride=1)`: output stride 16, 28 x 28 maps at 448; `model.kwargs.
output_stride=32` for torchvision's layer4), M = 32 attention maps, bilinear attention pooling;
train: resize to 512 x 512 (448 / 0.875) -> random crop 448 -> flip -> colour jitter
(brightness 0.126, saturation 0.5, as torchvision's ColorJitter) -> ImageNet mean/std; test:
resize 512 x 512 -> centre crop 448, logits averaged over `infer.py`'s eight views (flip x
{raw, attention crops at thresholds 0.3, 0.2, 0.1}; `model.kwargs.test_views="two"` for the
raw + crop views of the reference's `validate`, which is 4x cheaper). Loss: CE(raw)/3 +
CE(effect) + 2/3 CE(crop and drop views) + centre loss (centre update rate beta 5e-2, one
write per class and batch as the reference's indexed assignment: `cal.center_update`). SGD
momentum 0.9, weight decay 1e-5 on every parameter, lr 1e-3 decayed by 0.9 every 2 epochs
(continuously), batch 16 (4 GPUs x 4), 160 epochs. The paper reports CUB 90.6, Cars 95.5,
Aircraft 94.2 top-1 with ResNet-101. The reference reports the best test accuracy over
training (`test_best_over_training` in final_metrics.json, labelled as that); fgjax's `top1`
is the last checkpoint's (or the best on `data.val_fraction` of train). Point by point:
docs/fidelity.md.
"""
from __future__ import annotations

from configs import common


def cal_config(arg, *, dataset: str, data_dir: str, backbone: str = "resnet101",
               epochs: int = 160):
  args = common.parse_arg(arg, runlocal=False)
  c = common.base_config("cal")
  c.model.name = f"cal_{backbone}"
  c.model.img_size = 448
  c.model.kwargs = dict(num_attentions=32)
  c.init_from = ""  # e.g. /weights/resnet101.safetensors (timm) or resnet101-63fe2227.pth
  c.data.name = dataset
  c.data.data_dir = data_dir
  c.data.resize_size = 512
  c.data.resize_mode = "square"
  c.data.normalize = "imagenet"
  c.data.augment = dict(flip=True, sharpness=0.0, randaugment=None, autoaugment=False,
                        color_jitter=(0.126, 0.0, 0.5))
  c.batch_size = 16
  c.eval_batch_size = 16
  c.total_epochs = epochs
  c.optim.name = "sgd"
  c.optim.lr = 1e-3
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-5
  c.optim.no_decay = ()
  c.optim.decay_1d = True  # the reference's SGD decays net.parameters(): BatchNorm, biases too
  c.optim.schedule = "exponential"
  c.optim.decay_every_epochs = 2
  c.optim.decay_rate = 0.9
  c.optim.warmup_steps = 0
  # c.cal: the reference's values are the method's defaults (fgjax/methods/cal.py).
  c.log_every_steps = 50
  c.eval_every_epochs = 10
  c.checkpoint_every_epochs = 1
  if args.runlocal:
    # A quick local run: ResNet-18 with 4 attention maps at 64 px, a few steps.
    c.model.name = "cal_resnet18"
    c.model.img_size = 64
    c.model.kwargs = dict(num_attentions=4)
    c.data.resize_size = 72
    common.quick_run(c)
  return common.resnet_attention(c)

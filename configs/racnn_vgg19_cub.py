r"""RA-CNN, VGG-19 at each scale, on CUB-200-2011 (recipe, open choices: configs/racnn_common.py).

  python run.py --config=configs/racnn_vgg19_cub.py \
      --config.data.data_dir=/path/to/CUB_200_2011 \
      --config.init_from=/path/to/vgg19-dcbb9e9d.pth --workdir=runs/racnn_vgg19_cub

Arguments: `runlocal` (the small CNN at every scale, 64 px, 4 steps: one of each phase),
`backbone=resnet50` (ResNet-50 scale networks, init_from a timm/torchvision resnet50).
"""
from configs.racnn_common import racnn_config


def get_config(arg=None):
  return racnn_config(arg, dataset="cub", data_dir="data/CUB_200_2011", train_size=5994)

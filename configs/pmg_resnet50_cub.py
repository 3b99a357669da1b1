r"""PMG with a ResNet-50 on cub (recipe: configs/pmg_common.py).

  python run.py --config=configs/pmg_resnet50_cub.py \
      --config.data.data_dir=/path/to/CUB_200_2011 \
      --config.init_from=/path/to/resnet50.safetensors --workdir=runs/pmg_resnet50_cub

Arguments: `runlocal` (PMG on a ResNet-18 at 64 px, 2 steps).
"""
from configs.pmg_common import pmg_config


def get_config(arg=None):
  return pmg_config(arg, dataset="cub", data_dir="data/CUB_200_2011")

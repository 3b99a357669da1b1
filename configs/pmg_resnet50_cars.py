r"""PMG with a ResNet-50 on stanford_cars (recipe: configs/pmg_common.py).

  python run.py --config=configs/pmg_resnet50_cars.py \
      --config.data.data_dir=/path/to/stanford_cars \
      --config.init_from=/path/to/resnet50.safetensors --workdir=runs/pmg_resnet50_cars

Arguments: `runlocal` (PMG on a ResNet-18 at 64 px, 2 steps).
"""
from configs.pmg_common import pmg_config


def get_config(arg=None):
  return pmg_config(arg, dataset="stanford_cars", data_dir="data/stanford_cars")

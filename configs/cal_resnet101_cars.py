r"""CAL (WS-DAN + counterfactual attention), ResNet-101, on Stanford Cars (configs/cal_common.py).

  python run.py --config=configs/cal_resnet101_cars.py \
      --config.data.data_dir=/path/to/stanford_cars \
      --config.init_from=/path/to/resnet101.safetensors --workdir=runs/cal_resnet101_cars

Arguments: `runlocal` (ResNet-18, 4 maps, 64 px, 2 steps).
"""
from configs.cal_common import cal_config


def get_config(arg=None):
  return cal_config(arg, dataset="stanford_cars", data_dir="data/stanford_cars",
                    backbone="resnet101")

r"""CAL (WS-DAN + counterfactual attention), ResNet-101, on FGVC-Aircraft (configs/cal_common.py).

  python run.py --config=configs/cal_resnet101_aircraft.py \
      --config.data.data_dir=/path/to/fgvc-aircraft-2013b \
      --config.init_from=/path/to/resnet101.safetensors --workdir=runs/cal_resnet101_aircraft

Arguments: `runlocal` (ResNet-18, 4 maps, 64 px, 2 steps).
"""
from configs.cal_common import cal_config


def get_config(arg=None):
  return cal_config(arg, dataset="fgvc_aircraft", data_dir="data/fgvc-aircraft-2013b",
                    backbone="resnet101")

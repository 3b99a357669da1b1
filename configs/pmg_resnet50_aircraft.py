r"""PMG with a ResNet-50 on fgvc_aircraft (recipe: configs/pmg_common.py).

  python run.py --config=configs/pmg_resnet50_aircraft.py \
      --config.data.data_dir=/path/to/fgvc-aircraft-2013b \
      --config.init_from=/path/to/resnet50.safetensors --workdir=runs/pmg_resnet50_aircraft

Arguments: `runlocal` (PMG on a ResNet-18 at 64 px, 2 steps).
"""
from configs.pmg_common import pmg_config


def get_config(arg=None):
  return pmg_config(arg, dataset="fgvc_aircraft", data_dir="data/fgvc-aircraft-2013b")

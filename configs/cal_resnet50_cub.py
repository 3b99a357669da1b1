r"""CAL (WS-DAN + counterfactual attention), ResNet-50, on CUB (recipe: configs/cal_common.py).

  python run.py --config=configs/cal_resnet50_cub.py \
      --config.data.data_dir=/path/to/CUB_200_2011 \
      --config.init_from=/path/to/resnet50.safetensors --workdir=runs/cal_resnet50_cub

As a TRS-DeiT teacher: `--config.teacher.checkpoint=runs/cal_resnet50_cub` in
configs/trs_deit_cub.py (docs/training.md, Distillation). Arguments: `runlocal` (ResNet-18, 4 maps,
64 px, 2 steps).
"""
from configs.cal_common import cal_config


def get_config(arg=None):
  return cal_config(arg, dataset="cub", data_dir="data/CUB_200_2011", backbone="resnet50")

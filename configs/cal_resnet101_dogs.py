r"""CAL (WS-DAN + counterfactual attention), ResNet-101, on Stanford Dogs (configs/cal_common.py).

The CAL reference ships no Dogs config (birds, cars, aircraft); TRS-DeiT distils from a CAL
teacher on Stanford Dogs, so this is the CAL recipe unchanged on Dogs (120 classes, 12,000
training images): the teacher of configs/trs_deit_dogs.py.

  python run.py --config=configs/cal_resnet101_dogs.py \
      --config.data.data_dir=/path/to/stanford_dogs \
      --config.init_from=/path/to/resnet101.safetensors --workdir=runs/cal_resnet101_dogs

As the TRS-DeiT teacher: `--config.teacher.checkpoint=runs/cal_resnet101_dogs` in
configs/trs_deit_dogs.py. Note that the ImageNet-1k classes include the 120 Dogs breeds and
the Dogs test images overlap ImageNet's training set, as for every ImageNet-pretrained Dogs
result. Arguments: `runlocal` (ResNet-18, 4 maps, 64 px, 2 steps).
"""
from configs.cal_common import cal_config


def get_config(arg=None):
  return cal_config(arg, dataset="stanford_dogs", data_dir="data/stanford_dogs",
                    backbone="resnet101")

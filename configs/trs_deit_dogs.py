r"""TRS-DeiT on Stanford Dogs: DeiT-B/16 @ 448, lr 5e-4, alpha 0.1, beta 0.4
(recipe: configs/trs_deit_common.py).

  python run.py --config=configs/trs_deit_dogs.py \
      --config.data.data_dir=/path/to/stanford_dogs \
      --config.init_from=/path/to/deit_base_distilled_patch16_224-df68dfff.pth \
      --config.teacher.checkpoint=runs/cal_resnet101_dogs \
      --workdir=runs/trs_deit_dogs

Arguments (`--config=configs/trs_deit_dogs.py:ARG`): `runlocal` (tiny quick run),
`variant=small` (DeiT-S), `trs=False` (plain DeiT, region selection off).
Source of the recipe: the TRS-DeiT paper (shared/seeds/000) via shared/spec/methods.md section 2.
"""
from configs.trs_deit_common import trs_deit_config


def get_config(arg=None):
  return trs_deit_config(arg, dataset="stanford_dogs", data_dir="data/stanford_dogs",
                         lr=5e-4, alpha=0.1)

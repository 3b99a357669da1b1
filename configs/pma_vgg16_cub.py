r"""PMA with a VGG-16 backbone on CUB-200-2011 with its descriptions (Song et al. 2020).

  python run.py --config=configs/pma_vgg16_cub.py \
      --config.data.data_dir=/data/CUB_200_2011 --config.data.text_dir=/data/text_c10 \
      --config.init_from=/weights/vgg16.pth --workdir=runs/pma_vgg16_cub
  python run.py --config=configs/pma_vgg16_cub.py:image_only      # PMA without text
  python run.py --config=configs/pma_vgg16_cub.py:runlocal        # a tiny quick run

The recipe, its sources and every open choice: configs/pma_common.py. The paper reports
86.8% image-only / 88.2% with text top-1 on CUB at 448. The image-only
student taught by this run: configs/pma_student_cub.py.
"""
from configs import pma_common


def get_config(arg=None):
  return pma_common.pma_config(arg, backbone="vgg16")

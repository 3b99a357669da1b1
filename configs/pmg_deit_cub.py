r"""PMG on a transformer: DeiT-B/16 on CUB-200-2011, heads on the patch tokens after blocks 4, 8
and 12 reshaped to the 28 x 28 grid; jigsaw cells aligned to the patch grid (448 = 8 x 56 px =
8 x 3.5 patches would not align, so this config uses 512 px: 8 x 64 = 8 x 4 patches).

  python run.py --config=configs/pmg_deit_cub.py \
      --config.data.data_dir=/path/to/CUB_200_2011 \
      --config.init_from=/path/to/deit_base_patch16_224.pth --workdir=runs/pmg_deit_cub

Recipe otherwise as configs/pmg_common.py (SGD, lr 2e-3 heads / 2e-4 backbone, batch 16).
Arguments: `runlocal` (PMG on a 3-block DeiT-Ti at 128 px, 2 steps), `variant=small`.
"""
from configs import common
from configs.pmg_common import pmg_config


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, variant="base")
  c = pmg_config("runlocal" if args.runlocal else None, dataset="cub",
                 data_dir="data/CUB_200_2011", backbone=f"deit_{args.variant}")
  if not args.runlocal:
    c.model.img_size = 512
    c.data.resize_size = 576
    c.data.normalize = "imagenet"
  return c

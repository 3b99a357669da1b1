r"""The FGVC9 Sorghum-100 second place (seed 004, spec section 8) as a recipe for your own
`folder` dataset (`train/<class>/*`, `val/<class>/*` and/or `test/<class>/*`; docs/datasets.md).

  python run.py --config=configs/fgvc9_regnety160_folder.py:res=512 \
      --config.data.data_dir=/data/sorghum \
      --config.init_from=/weights/regnety_160.safetensors --workdir=runs/fgvc9_512
  python run.py --config=configs/fgvc9_regnety160_folder.py:res=960 ... --workdir=runs/fgvc9_960
  python run.py --config=configs/fgvc9_regnety160_folder.py:runlocal ...   # a tiny quick run

Arguments: `res` (512 or 960; default 512), `runlocal` (RegNetY-1.6GF at 64 px, 2 steps).

What the seed states, and where it is here:
- RegNetY-16.0GF with its SE blocks (`regnety_160`, timm's layout; `init_from` a timm
  `regnety_160` checkpoint, e.g. its `model.safetensors`: the head is re-initialised for the
  new classes);
- the input resolution 512, then 960 (84.1 -> 91.9 on the private leaderboard): `:res=`; at 960
  every block is recomputed in the backward pass (`model.kwargs.remat=True`);
- the attention-region random crop, recomputed every epoch from the current model: the CAM
  before the classifier, thresholded at T, N random w x h boxes, the one covering most attended
  pixels is the image's crop for the next epoch (`crop.*`, docs/toolkit.md);
- flips, random crops and AutoAugment (`data.augment.autoaugment`, the ImageNet policy);
- dropout (95.1 -> 95.3): `model.kwargs.drop_rate`, before the classifier;
- TTA (`eval.tta`), pseudo-labels on the test set in rounds (91.9 -> 95.1) and an ensemble of
  weighted embeddings (95.3 -> 95.9): commands, below and in docs/toolkit.md.

What the seed does not state, and fgjax's choice (change any with --config.KEY=VALUE):
- optimizer and schedule: SGD with Nesterov momentum 0.9, lr 0.01 per 64 images
  (`optim.lr_base_batch=64`: lr x global batch / 64), cosine decay after 1 warm-up epoch,
  weight decay 1e-4 on the weights only (not BatchNorm or biases), label smoothing 0.1, 30
  epochs. These are the usual fine-tuning settings of timm's RegNets, not the team's;
- batch 32 at 512 and 16 at 960 (what fits one 80 GiB device at 512 and 960 with room:
  benchmarks/memory.py measures 54 and 15 images; docs/benchmarks.md);
- the crop's T = 0.5 of the map's maximum, N = 32 boxes of 0.75 x 0.75 of the image's sides,
  refreshed at the end of every epoch from the first (`crop.start_epoch=1`: the first refresh
  uses the model after one epoch, as the write-up's "after one epoch of training");
- dropout rate 0.2; TTA "flip" (the write-up names TTA, not its views);
- resize: the shorter side to res x 8 / 7, then a res x res crop (random in training, centre at
  test).

The rounds and the ensemble (docs/toolkit.md "Pseudo-labels" and "Ensembles"):

  C=--config=configs/fgvc9_regnety160_folder.py:res=960
  python run.py $C --workdir=runs/r0 ...
  python run.py --mode=pseudo_label --workdir=runs/r0 --images=/data/sorghum/unlabeled
  python run.py $C --workdir=runs/r1 --config.data.pseudo_labels=runs/r0/pseudo_labels.csv ...
  python run.py $C --workdir=runs/r1_seed1 --config.seed=1 \
      --config.data.pseudo_labels=runs/r0/pseudo_labels.csv ...
  python -m fgjax.tools.ensemble runs/r1 runs/r1_seed1 --on embeddings \
      --images=/data/sorghum/unlabeled --output=submission.csv
"""
from configs import common

RESOLUTIONS = (512, 960)


def get_config(arg=None):
  args = common.parse_arg(arg, res=512, runlocal=False)
  if args.res not in RESOLUTIONS:
    raise ValueError(f"configs/fgvc9_regnety160_folder.py: res must be one of {RESOLUTIONS}, "
                     f"got {args.res}")
  c = common.base_config("classifier")
  c.model.name = "regnety_160"
  c.model.img_size = args.res
  c.model.kwargs = dict(drop_rate=0.2, remat=args.res >= 960)
  c.init_from = ""  # a timm regnety_160 checkpoint (.safetensors or .pth)
  c.data.name = "folder"
  c.data.data_dir = ""
  c.data.resize_size = args.res * 8 // 7
  c.data.resize_mode = "shorter"
  c.data.normalize = "imagenet"
  c.data.augment = dict(flip=True, sharpness=0.0, randaugment=None, autoaugment=True,
                        color_jitter=(0.0, 0.0, 0.0), crop_padding=0)
  c.batch_size = 32 if args.res == 512 else 16
  c.eval_batch_size = c.batch_size
  c.total_epochs = 30
  c.optim.name = "sgd"
  c.optim.lr = 0.01
  c.optim.lr_base_batch = 64
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 1e-4
  c.optim.decay_1d = False
  c.optim.schedule = "cosine"
  c.optim.warmup_epochs = 1
  c.optim.new_layers = ("head.*",)
  c.label_smoothing = 0.1
  c.crop.enabled = True
  c.crop.kind = "random_box"
  c.crop.map = "cam"
  c.crop.threshold = 0.5
  c.crop.threshold_of = "max"
  c.crop.box_size = (0.75, 0.75)
  c.crop.num_boxes = 32
  c.crop.start_epoch = 1
  c.crop.every_epochs = 1
  c.eval.tta = "flip"
  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.checkpoint_every_epochs = 1
  if args.runlocal:
    c.model.name = "regnety_016"
    c.model.img_size = 64
    c.model.kwargs = dict(drop_rate=0.2, remat=False)
    c.data.resize_size = 72
    c.data.augment.autoaugment = False  # the quick run checks the wiring, not the policy
    c.crop.start_epoch = 0  # refresh before the first step: the crop path runs too
    common.quick_run(c)
  return c

r"""RA-CNN vs a single-scale classifier on the synthetic birds (CPU-sized evidence, docs/demo.md:
RA-CNN).

  python run.py --config=configs/racnn_synthetic.py               # RA-CNN, cnn_small x 3 scales
  python run.py --config=configs/racnn_synthetic.py:single=True   # cnn_small alone, same budget

The default (harder) variant of the birds (small parts among decoys, 20 classes, 4000 training
images), drawn at 128 px and read at 96 px: the small CNN (4 conv stages 16-128 wide, stride-2
stem, global max pooling: `pool`) at every scale, crops zoomed to 96 px. Budget: `steps` train
steps of 64 images for both runs (AdamW lr 3e-3, cosine). RA-CNN spends them as
`classifier_pretrain` steps of the classifier update (scales 2 and 3 on the APNs' initial
centred squares; `pretrain_squares=random`: on uniformly random ones), `apn_pretrain` steps
of APN pre-training, then alternation every `alternate` steps; the APNs have 256 hidden units
(1024 in the paper, for 14 x 14 x 512 inputs).
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, single=False, steps=1000, classifier_pretrain=300,
                          apn_pretrain=100, alternate=50, pool="max", min_side_frac=1 / 3,
                          widths="16-32-64-128", apn_optim="adamw", apn_lr=3e-3,
                          pretrain_squares="apn")
  c = common.base_config("classifier" if args.single else "racnn")
  c.seed = 1
  widths = tuple(int(w) for w in args.widths.split("-"))
  net = dict(widths=widths, convs_per_stage=1, stem_stride=2, pool=args.pool)
  if args.single:
    c.model.name = "cnn_small"
    c.model.kwargs = net
  else:
    c.model.name = "racnn_cnn_small"
    c.model.kwargs = dict(net, crop_size=96, apn_hidden=256, min_side_frac=args.min_side_frac)
    c.racnn.classifier_pretrain_steps = args.classifier_pretrain
    c.racnn.pretrain_squares = args.pretrain_squares
    c.racnn.apn_pretrain_steps = args.apn_pretrain
    c.racnn.alternate_every = args.alternate
    c.racnn.apn_optim = dict(name=args.apn_optim, lr=args.apn_lr)
  c.model.img_size = 96
  c.data.name = "synthetic"
  c.data.source_kwargs = dict(num_classes=20, image_size=128, cache=True)
  c.data.split_kwargs = {"train": dict(num_examples=4000)}
  c.data.resize_size = 104
  c.data.normalize = "half"
  c.data.augment = dict(flip=True, sharpness=0.0)
  c.batch_size = 64
  c.eval_batch_size = 128
  c.total_steps = args.steps
  c.optim.name = "adamw"
  c.optim.lr = 3e-3
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 20
  c.log_every_steps = 50
  c.eval_every_steps = args.steps
  c.checkpoint_every_steps = args.steps
  return c

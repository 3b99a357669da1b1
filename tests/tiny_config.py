"""A tiny classifier run for the failure tests (a 2-stage CNN on 32 px synthetic birds).

  python run.py --config=tests/tiny_config.py:steps=6 --workdir=W
  python tests/fault_driver.py W --fault=eval:4      # the same run, killed while evaluating

Six steps of 8 images; validation split (a best checkpoint), evaluation and a checkpoint every
2 steps, the last 3 kept.
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, steps=6, val=True)
  c = common.base_config("classifier")
  c.model.name = "cnn_small"
  c.model.img_size = 32
  c.model.kwargs = dict(widths=(8, 16), convs_per_stage=1, stem_stride=2)
  c.data.name = "synthetic"
  c.data.resize_size = 36
  c.data.source_kwargs = dict(num_classes=4, num_examples=64, image_size=40)
  c.data.val_fraction = 0.25 if args.val else 0.0
  c.batch_size = 8
  c.eval_batch_size = 16
  c.total_steps = args.steps
  c.log_every_steps = 1
  c.eval_every_steps = 2
  c.checkpoint_every_steps = 2
  c.keep_checkpoints = 3
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 1
  return c

r"""An image-only student distilled from a PMA teacher on CUB (Song et al. 2020, section III-E).

  python run.py --config=configs/pma_resnet50_cub.py --workdir=runs/pma_resnet50_cub  # teacher
  python run.py --config=configs/pma_student_cub.py \
      --config.data.data_dir=/data/CUB_200_2011 --config.data.text_dir=/data/text_c10 \
      --config.init_from=/weights/resnet50.pth --workdir=runs/pma_student_cub
  python run.py --config=configs/pma_student_cub.py:student=deit_small \
      --config.init_from=/weights/deit_small_patch16_224-cd65a155.pth
  python run.py --config=configs/pma_student_cub.py:teacher=predictions   # offline soft targets
  python run.py --config=configs/pma_student_cub.py:runlocal

The student reads images only; it learns the teacher's output probabilities (KL divergence at
temperature 1, no labels: the paper's eq. 11; `distill.ce_weight` > 0 adds cross-entropy, and
`distill.temperature` softens both sides). `teacher=online` (default) runs the frozen
teacher (`teacher.checkpoint`, a PMA workdir; default runs/pma_resnet50_cub) inside every step
on the student's augmented batch, with its text: the student's batches carry the phrases
(`data.text.enabled`), which only the teacher reads. `teacher=predictions` reads
`teacher.predictions` (default <teacher workdir>/teacher_predictions.npz, written by
`python run.py --mode=export_teacher --workdir=<teacher workdir>`): the teacher's probabilities
on the un-augmented training images with all their sentences, nothing to run per step.
Students (`student=`): resnet50 (448, the paper's image-only comparison), vgg16,
deit_small (DeiT-S at 448), trs_deit_small (TRS-DeiT's model at 448).
The rest of the recipe (data, optimiser) is the teacher's (configs/pma_common.py).
"""
from configs import common, pma_common

_STUDENTS = {"resnet50": ("resnet50", {}), "vgg16": ("vgg16", {}),
             "deit_small": ("deit_small_patch16", {}),
             "trs_deit_small": ("trs_deit_small_patch16", {})}


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, student="resnet50", teacher="online",
                          teacher_workdir="runs/pma_resnet50_cub")
  if args.student not in _STUDENTS:
    raise ValueError(f"student={args.student!r}: choose one of {sorted(_STUDENTS)}")
  if args.teacher not in ("online", "predictions"):
    raise ValueError(f"teacher={args.teacher!r}: choose online or predictions")
  if args.runlocal and args.teacher_workdir == "runs/pma_resnet50_cub":
    args.teacher_workdir = "runs/pma_resnet50_cub_runlocal"  # where its runlocal trains
  t = pma_common.pma_config("runlocal" if args.runlocal else None, backbone="resnet50")
  c = common.base_config("distill")
  for key in ("data", "optim", "batch_size", "eval_batch_size", "total_epochs", "total_steps",
              "log_every_steps", "eval_every_epochs", "eval_every_steps",
              "checkpoint_every_epochs", "checkpoint_every_steps"):
    c[key] = t[key]
  c.model.name, c.model.kwargs = _STUDENTS[args.student]
  c.model.img_size = t.model.img_size
  c.optim.new_layers = ("head.*",)
  c.distill = dict(temperature=1.0, kl_weight=1.0, ce_weight=0.0)
  if args.teacher == "online":
    c.teacher = dict(checkpoint=args.teacher_workdir, predictions="")
  else:  # the student's batches need no text: the soft targets are looked up by example id
    c.teacher = dict(checkpoint="", predictions=f"{args.teacher_workdir}/teacher_predictions.npz")
    c.data.text.enabled = False
  if args.runlocal:
    c.model.name, c.model.kwargs = "cnn_small", dict(widths=(16, 32, 64, 128))
    c.optim.new_layers = ("head.*",)
  return c

r"""PMA on the synthetic birds with the harder text (CPU-sized evidence, docs/pma.md).

  python run.py --config=configs/pma_synthetic.py --workdir=runs/pma_synthetic    # bi-modal
  python run.py --config=configs/pma_synthetic.py:modality=image   # image-only PMA (no text)
  python run.py --config=configs/pma_synthetic.py:modality=text    # the text alone
  python run.py --config=configs/pma_synthetic.py:student=True \
      --config.teacher.checkpoint=runs/pma_synthetic                # distilled image-only CNN
  python run.py --config=configs/pma_synthetic.py:text_drop=0.5     # text dropped for half
  python run.py --config=configs/pma_synthetic.py:runlocal          # a few steps

Data: the synthetic birds (20 classes, 96 px crops of 112 px renders, 4000 training images)
with `text="hard"` (`fgjax.data.synthetic`): each bird has 4 sentences that together mention
only one or two of its three coloured parts, each colour wrong with probability 0.1, so the
text narrows the class down without determining it and the image must still be read. All
sentences' phrases are concatenated (at most 16 phrases of 6 words). Model: `pma_cnn_small`
with 3 conv stages 16-64 wide (stem stride 2: a 12 x 12 last map at 96 px, so a 6 x 6 grid of
2x2 blocks, each 16 px; the default 4 stages give 3 x 3 blocks of 32 px, coarser than a part),
AdamW lr 3e-3, cosine, `steps` steps of 64 (800) for every variant (same budget). The
student is `cnn_small` (4 conv stages 16-128 wide, global max pooling) trained on the bi-modal
teacher's probabilities
(online teacher, KL at temperature 1, no labels), at cnn_small's learning rate 6e-3 (as
`configs/pmg_synthetic.py:ce=True,pool=max`, its cross-entropy baseline). `text_drop=p` drops
the whole text of a share p of the training examples (`data.text.train_drop`, not in the
paper): the bi-modal model then also learns to classify from the image alone.
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, modality="bimodal", student=False, steps=800,
                          seed=0, text_drop=0.0)
  if args.modality not in ("bimodal", "image", "text"):
    raise ValueError(f"modality={args.modality!r}: choose bimodal, image or text")
  c = common.base_config("distill" if args.student else "pma")
  c.seed = args.seed
  c.model.img_size = 96
  if args.student:
    c.model.name = "cnn_small"
    c.model.kwargs = dict(widths=(16, 32, 64, 128), convs_per_stage=1, stem_stride=2,
                          pool="max")
    c.teacher = dict(checkpoint="runs/pma_synthetic", predictions="")
    c.distill = dict(temperature=1.0, kl_weight=1.0, ce_weight=0.0)
  else:
    c.model.name = "pma_cnn_small"
    c.model.kwargs = dict(modality="text" if args.modality == "text" else "bimodal",
                          widths=(16, 32, 64))
  c.data.name = "synthetic"
  c.data.source_kwargs = dict(num_classes=20, image_size=112, cache=True, text="hard",
                              text_sentences=4, text_noise=0.1)
  c.data.split_kwargs = {"train": dict(num_examples=4000)}
  c.data.resize_size = 104
  c.data.normalize = "half"
  c.data.augment = dict(flip=True, sharpness=0.0)
  # The student's batches carry the text for its online teacher; image-only PMA reads none.
  c.data.text = dict(enabled=args.modality != "image", max_phrases=16, max_words=6,
                     train_sentences="concat", eval_sentences="all", min_count=1, vocab="",
                     train_drop=args.text_drop)
  c.batch_size = 64
  c.eval_batch_size = 128
  c.total_steps = args.steps
  c.optim.name = "adamw"
  c.optim.lr = 6e-3 if args.student else 3e-3  # the student: cnn_small's rate (pmg_synthetic)
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 20
  c.optim.new_layers = (".*",)
  c.log_every_steps = 50
  c.eval_every_steps = args.steps
  c.checkpoint_every_steps = args.steps
  if args.runlocal:
    c.data.split_kwargs = {"train": dict(num_examples=64), "test": dict(num_examples=32)}
    c.model.img_size = 64
    c.data.source_kwargs["image_size"] = 72
    c.data.resize_size = 72
    common.quick_run(c, steps=2, batch=16)
  return c

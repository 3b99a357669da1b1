r"""PMA on the synthetic birds with the harder text, in a CPU budget (issue 18's evidence).

  PYTHONPATH=. python benchmarks/pma_evidence.py --workdir=/tmp/pma_evidence [--seeds 2]

Per seed, the same data and budget (`configs/pma_synthetic.py`: 20 classes, 96 px, 4000
training and 1000 test images, `text="hard"`: 4 sentences per bird that together mention one or
two of its three parts, a colour wrong with probability 0.1; `--steps` steps of 64, AdamW):
- image-only PMA (`modality=image`: text off, the model has no text branch);
- text-only PMA (`modality=text`: the images are not read);
- bi-modal PMA, evaluated with its text and without it (`--without_text`: every phrase
  masked, the missing-modality case);
- the distilled image-only student: `cnn_small` (the same conv stages, global max pooling)
  trained on the bi-modal teacher's probabilities only (online teacher, KL at T = 1, no labels);
- the same student distilled from image-only PMA (a control: what distillation gives without
  any text);
- a plain `cnn_small` with cross-entropy on the labels, the student's architecture without a
  teacher;
- bi-modal PMA trained with the whole text of a share `--text-drop` of the training examples
  dropped (`data.text.train_drop`; not in the paper), with and without text.
And for every model that reads images, the share of located blocks (three per image, one per
stage) that hold a part's centre, against the chance of a block drawn uniformly from the grid.
Prints markdown tables; each run trains in its own workdir under `--workdir` (reused when it
holds a finished run: delete it to measure again).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="/tmp/pma_evidence")
  p.add_argument("--steps", type=int, default=800)
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--test", type=int, default=1000, help="test images")
  p.add_argument("--text-drop", type=float, default=0.5,
                 help="also a bi-modal run with this share of training texts dropped (0: not)")
  return p.parse_args(argv)


def config(seed: int, steps: int, test: int, **arg):
  from configs import pma_synthetic
  text = ",".join(f"{k}={v}" for k, v in arg.items())
  c = pma_synthetic.get_config(f"steps={steps},seed={seed}" + (f",{text}" if text else ""))
  c.data.split_kwargs = {"train": dict(num_examples=4000), "test": dict(num_examples=test)}
  return c


def plain_cnn(seed: int, steps: int, test: int):
  """The student's architecture trained on the labels (cross-entropy), same data and budget:
  toolkit_evidence.py's run (`configs/pmg_synthetic.py:ce=True,pool=max`, lr 6e-3)."""
  from benchmarks import toolkit_evidence
  c = toolkit_evidence.base_config(steps, seed)
  c.data.split_kwargs = {"train": dict(num_examples=4000), "test": dict(num_examples=test)}
  return c


def main(argv=None) -> int:
  args = parse_args(argv)
  from benchmarks.common import cpu_model, pct, train_once as train
  from fgjax.train import modes
  os.makedirs(args.workdir, exist_ok=True)
  cpu = cpu_model()
  import jax
  print(f"# PMA on the synthetic birds (hard text): {cpu}, {os.cpu_count()} CPUs, jax "
        f"{jax.__version__}, {time.strftime('%Y-%m-%d')}, {args.steps} steps of 64 per run, "
        f"{args.test} test images\n")
  rows = []  # (seed, name, test top-1, part hits, chance, seconds)
  for s in range(args.seeds):
    d = lambda name: os.path.join(args.workdir, f"{name}_seed{s}")
    runs = [("image-only PMA", config(s, args.steps, args.test, modality="image"), d("image")),
            ("text-only PMA", config(s, args.steps, args.test, modality="text"), d("text")),
            ("bi-modal PMA, with text", config(s, args.steps, args.test), d("bimodal"))]
    if args.text_drop:
      runs.append((f"bi-modal PMA, text dropped for {args.text_drop:g} in training, with text",
                   config(s, args.steps, args.test, text_drop=args.text_drop), d("textdrop")))
    results = {}
    for name, cfg, w in runs:
      results[name], dt = train(cfg, w)
      t = results[name]["test"]
      rows.append((s, name, t["top1"], t.get("located_part_hits"),
                   t.get("located_part_hits_chance"), dt))
    with contextlib.redirect_stdout(io.StringIO()):  # its JSON printout
      m = modes.evaluate_checkpoint(d("bimodal"), which="last", without_text=True,
                                    output=os.path.join(args.workdir, f"eval_notext_seed{s}"))
    rows.append((s, "bi-modal PMA, without text", m["top1"], m.get("located_part_hits"),
                 m.get("located_part_hits_chance"), float("nan")))
    if args.text_drop:
      with contextlib.redirect_stdout(io.StringIO()):
        m = modes.evaluate_checkpoint(d("textdrop"), which="last", without_text=True,
                                      output=os.path.join(args.workdir, f"eval_td_seed{s}"))
      rows.append((s, f"bi-modal PMA, text dropped for {args.text_drop:g} in training, "
                   f"without text", m["top1"], m.get("located_part_hits"),
                   m.get("located_part_hits_chance"), float("nan")))
    student = config(s, args.steps, args.test, student=True)
    student.teacher.checkpoint = d("bimodal")
    r, dt = train(student, d("student"))
    rows.append((s, "distilled image-only student (cnn_small)", r["test"]["top1"], None, None,
                 dt))
    control = config(s, args.steps, args.test, student=True, modality="image")
    control.teacher.checkpoint = d("image")
    r, dt = train(control, d("student_of_image"))
    rows.append((s, "the same student of image-only PMA (control: no text anywhere)",
                 r["test"]["top1"], None, None, dt))
    r, dt = train(plain_cnn(s, args.steps, args.test), d("cnn_ce"))
    rows.append((s, "cnn_small, cross-entropy (no teacher)", r["test"]["top1"], None, None, dt))

  print("| seed | model | test top-1 | located blocks on a part | chance | train time |\n"
        "|--:|---|--:|--:|--:|--:|")
  for s, name, top1, hits, chance, dt in rows:
    print(f"| {s} | {name} | {pct(top1)} | {pct(hits)} | {pct(chance)} | "
          f"{'-' if dt != dt else f'{dt:.0f} s'} |")
  if args.seeds > 1:
    print("\n| model | mean test top-1 over seeds |\n|---|--:|")
    for name in dict.fromkeys(n for _, n, *_ in rows):
      vals = [t for _, n, t, *_ in rows if n == name]
      print(f"| {name} | {pct(sum(vals) / len(vals))} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())

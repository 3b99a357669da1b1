r"""The competition toolkit on the synthetic birds in a CPU budget (issue 19's evidence).

  PYTHONPATH=. python benchmarks/toolkit_evidence.py --workdir=/tmp/toolkit_evidence

One small CNN (`cnn_small`: 4 conv stages 16-128 wide, one conv each, stem stride 2, global max
pooling; `configs/pmg_synthetic.py:ce=True,pool=max`), the default (hard) birds (20 classes,
decoys, 96 px crops of 112 px images resized to 104), 4000 training and 1000 test images,
`--steps` steps of 64 (AdamW lr 6e-3, cosine, 20 warm-up steps) per run, and then:

- one model against an ensemble of `--seeds` seeds (`fgjax.tools.ensemble`, mean of the
  softmax probabilities);
- test-time augmentation of the seed-0 model (`--mode=eval --tta=...`);
- a pseudo-label round per seed: each seed's model labels the test split (threshold
  `--threshold`), a new run of that seed trains on train + those (the test split as the
  unlabeled set, as a competition's leaderboard images are: its test numbers are
  transductive, and are reported as such);
- attention-region crops (`crop.*`, CAM, T = 0.5 of the max, 32 boxes of `--box` of the
  sides, from epoch `--crop-start`) against the plain random crop, seed by seed.

Prints one markdown table per tool. Each run trains in its own workdir under `--workdir`
(reused when it holds a finished run: delete it to measure again).
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
  p.add_argument("--workdir", default="/tmp/toolkit_evidence")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--threshold", type=float, default=0.9)
  p.add_argument("--box", type=float, default=0.8)
  p.add_argument("--crop-start", type=int, default=4)
  p.add_argument("--tta", default="flip,multicrop,multiscale,cal8")
  return p.parse_args(argv)


def base_config(steps: int, seed: int):
  from configs import pmg_synthetic
  c = pmg_synthetic.get_config(f"ce=True,pool=max,steps={steps}")
  c.seed = seed
  c.data.split_kwargs = {"train": dict(num_examples=4000), "test": dict(num_examples=1000)}
  c.optim.warmup_steps = 20
  c.eval_every_steps = None
  c.eval_every_epochs = None
  c.checkpoint_every_steps = steps
  return c


def main(argv=None) -> int:
  args = parse_args(argv)
  from benchmarks.common import cpu_model, pct, train_once as train
  from fgjax.tools import ensemble
  from fgjax.train import modes
  os.makedirs(args.workdir, exist_ok=True)
  cpu = cpu_model()
  import jax
  print(f"# The toolkit on the synthetic birds: {cpu}, {os.cpu_count()} CPUs, jax "
        f"{jax.__version__}, {time.strftime('%Y-%m-%d')}, {args.steps} steps of 64 per run\n")
  seeds = []
  for s in range(args.seeds):
    w = os.path.join(args.workdir, f"seed{s}")
    result, dt = train(base_config(args.steps, s), w)
    seeds.append((w, result["test"], dt))
  w0 = seeds[0][0]

  print("## Ensemble of seeds (mean of softmax probabilities)\n")
  print("| run | test top-1 | top-5 | train time |\n|---|--:|--:|--:|")
  for w, test, dt in seeds:
    print(f"| {os.path.basename(w)} | {pct(test['top1'])} | {pct(test['top5'])} | {dt:.0f} s |")
  members = ensemble.load_members([w for w, _, _ in seeds])
  report = ensemble.evaluate(members, on="logits")
  e = report["ensemble"]
  mean1 = sum(t["top1"] for _, t, _ in seeds) / len(seeds)
  print(f"| mean of the {len(seeds)} single runs | {pct(mean1)} | | |")
  print(f"| ensemble of {len(seeds)} | {pct(e['top1'])} | {pct(e['top5'])} | |")
  emb = ensemble.evaluate(members, on="embeddings")["ensemble"]
  print(f"| ensemble of {len(seeds)}, embeddings (centroids from train) | {pct(emb['top1'])} | "
        f"{pct(emb['top5'])} | |\n")

  print("## Test-time augmentation of seed0\n")
  print("| preset | test top-1 | top-5 |\n|---|--:|--:|")
  print(f"| none | {pct(seeds[0][1]['top1'])} | {pct(seeds[0][1]['top5'])} |")
  for preset in [p for p in args.tta.split(",") if p]:
    with contextlib.redirect_stdout(io.StringIO()):  # its JSON printout
      m = modes.evaluate_checkpoint(w0, which="last", tta=preset,
                                    output=os.path.join(args.workdir, f"eval_{preset}"))
    print(f"| {preset} | {pct(m['top1'])} | {pct(m['top5'])} |")
  print()

  print("## A pseudo-label round per seed (test split as the unlabeled set)\n")
  import csv
  from fgjax.train import setup
  cfg0 = setup.load_config(w0)
  test_src = setup.get_source(cfg0, "test")
  names = list(cfg0.class_names_resolved)
  truth = dict(zip([int(i) for i in test_src.ids], [names[int(y)] for y in test_src.labels]))
  print("| seed | labelled only: test top-1 | pseudo-labels (right) | round 1: test top-1 "
        "(transductive) | round 1 train time |\n|---|--:|--:|--:|--:|")
  before, after = [], []
  for s, (w, test, _) in enumerate(seeds):
    pl_file = os.path.join(args.workdir, f"pseudo_labels_seed{s}.csv")
    if not os.path.exists(pl_file):
      with contextlib.redirect_stdout(io.StringIO()):
        modes.pseudo_label(w, split="test", output=pl_file, which="last",
                           threshold=args.threshold)
    with open(pl_file) as f:
      rows = list(csv.DictReader(f))
    right = sum(truth[int(r["image"].split(":")[2])] == r["class"] for r in rows)
    c1 = base_config(args.steps, s)
    c1.data.pseudo_labels = pl_file
    r1, dt1 = train(c1, os.path.join(args.workdir, f"pseudo_round1_seed{s}"))
    before.append(test["top1"])
    after.append(r1["test"]["top1"])
    print(f"| {s} | {pct(test['top1'])} | {len(rows)} ({right}) | {pct(r1['test']['top1'])} | "
          f"{dt1:.0f} s |")
  print(f"| mean | {pct(sum(before) / len(before))} | | {pct(sum(after) / len(after))} | |")
  print(f"\n(threshold {args.threshold}; the pseudo-labels of seed s come from seed s's "
        f"model; 'right' counted against the true test labels afterwards)\n")

  print("## Attention-region crops against the plain random crop, per seed\n")
  print(f"(CAM, T = 0.5 of the max, 32 boxes of {args.box} x {args.box} of the sides, refreshed "
        f"every epoch from epoch {args.crop_start})\n")
  print("| seed | plain random crop: test top-1 | attention crops: test top-1 | train time |"
        "\n|---|--:|--:|--:|")
  plain, cropped = [], []
  for s, (_, test, _) in enumerate(seeds):
    cc = base_config(args.steps, s)
    cc.crop.enabled = True
    cc.crop.map = "cam"
    cc.crop.box_size = (args.box, args.box)
    cc.crop.start_epoch = args.crop_start
    rc, dtc = train(cc, os.path.join(args.workdir, f"crops_seed{s}"))
    plain.append(test["top1"])
    cropped.append(rc["test"]["top1"])
    print(f"| {s} | {pct(test['top1'])} | {pct(rc['test']['top1'])} | {dtc:.0f} s |")
  print(f"| mean | {pct(sum(plain) / len(plain))} | {pct(sum(cropped) / len(cropped))} | |")
  return 0


if __name__ == "__main__":
  sys.exit(main())

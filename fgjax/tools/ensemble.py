"""Weighted ensembles of fgjax runs (issue 19; spec section 8, the FGVC9 write-up's "ensemble
of embeddings"), on the test split or on a folder of unlabeled images.

    python -m fgjax.tools.ensemble runs/a runs/b runs/c --weights 2,1,1
    python -m fgjax.tools.ensemble runs/a runs/b --on embeddings --output ensemble.json
    python -m fgjax.tools.ensemble runs/a runs/b --images photos/ --output submission.csv

Each member is a workdir, restored from its own `config.json` (its best validation
checkpoint, or the last with `--checkpoint last`) and run with its own evaluation
preprocessing (image size, resize, normalisation). Members must agree on the classes
(`class_names_resolved`). Weights are normalised to sum to 1 (default: equal).

`--on logits` (default): the ensemble's probabilities are the weighted mean of the members'
softmax probabilities, sum_i w_i softmax(z_i) (probabilities are averaged, not logits); the
prediction is their arg-max. Each member runs under its own test-time augmentation preset
(`config.eval.tta`, `fgjax.toolkit.tta`), or under `--tta` for all.
`--on embeddings`: each member's pre-logit embedding (`aux["pre_logits"]` of its model, the
single evaluation view) is L2-normalised and scaled by the square root of the member's weight,
and the members' vectors are concatenated: e = [sqrt(w_1) e_1 / |e_1|, ..., sqrt(w_M) e_M /
|e_M|] (so that each member counts linearly in its weight in a dot product). A nearest class
centroid classifier is fitted on the TRAIN split of the same members (the whole train split,
before any validation hold-out, without `data.pseudo_labels` images, each image through each
member's evaluation transform; no test image is used): the centroid of class c is the mean of the
train vectors e of class c, L2-normalised. An image's scores are the cosine similarities
cos(e, c) to the centroids; the prediction is the most similar centroid. Embeddings are of
the single evaluation view (no TTA).

The report gives top-1, top-5 and mean per-class accuracy of the ensemble beside each
member's own numbers (its softmax head, and with `--on embeddings` also the same centroid rule
on its own embedding), as a table on stdout and as JSON with `--output`. `--images=DIR` predicts
every image file under DIR (recursively; or the images of a list file) instead and writes
`--output` as the CSV of run.py's predict mode (`fgjax.toolkit.submission`: header
`filename,class`, file names relative to DIR; `--top_k=K` adds class_2..class_K and
prob_1..prob_K, logits only); unreadable files are named in a warning and skipped. Bad input
(a directory that is not a workdir, members with different classes, wrong weights) is a one-line
`error: ...` and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

import numpy as np

log = logging.getLogger("fgjax")

MODES = ("logits", "embeddings")


class EnsembleError(ValueError):
  """The members cannot be ensembled as asked (the message names the workdir or option)."""


@dataclasses.dataclass
class Member:
  """One restored run: its workdir, saved config, method (with the model), variables for
  `model.apply`, restore info ({"step", "checkpoint"}) and mesh."""
  workdir: str
  config: object
  method: object
  variables: dict
  info: dict
  mesh: object

  @property
  def tta(self) -> str:
    from fgjax.toolkit import tta as tta_lib
    return tta_lib.preset_of(self.config)

  @property
  def class_names(self) -> list[str]:
    names = list(self.config.get("class_names_resolved", []) or [])
    return names or [str(i) for i in range(self.method.num_classes)]


# ----------------------------------------------------------------------------- members


def load_members(workdirs, which: str = "best", tta: str | None = None) -> list[Member]:
  """Restores every workdir (`fgjax.train.setup.restore_model`) after checking that they
  agree on the classes (`check_same_classes`). `tta`: the test-time augmentation preset
  (`fgjax.toolkit.tta`) of every member; None: each member's own `config.eval.tta`."""
  import ml_collections
  from fgjax.toolkit import tta as tta_lib
  from fgjax.train import setup, sharding
  if not workdirs:
    raise EnsembleError("ensemble: name at least one workdir")
  if tta is not None:
    tta_lib.check_preset(tta)
  configs = [setup.load_config(w) for w in workdirs]  # every config.json before any restore
  check_same_classes(list(workdirs), configs)
  members = []
  for w in workdirs:
    cfg, _, method, variables, info = setup.restore_model(w, prefer=which)
    with cfg.unlocked():
      if cfg.get("eval") is None:  # a run saved before config.eval existed
        cfg.eval = ml_collections.ConfigDict(dict(tta="none"))
      if tta is not None:
        cfg.eval.tta = tta
    tta_lib.check(method, tta_lib.preset_of(cfg))
    log.info("ensemble: %s: %s (%s checkpoint, step %d, tta %s)", w, cfg.model.name,
             info["checkpoint"], info["step"], tta_lib.preset_of(cfg))
    members.append(Member(w, cfg, method, variables, info, sharding.make_mesh(cfg)))
  return members


def check_same_classes(workdirs, configs) -> None:
  """Raises EnsembleError naming the first workdir whose classes (`class_names_resolved`, or
  the class count when a run saved no names) differ from the first member's."""
  def classes(cfg):
    names = cfg.get("class_names_resolved")
    return list(names) if names else int(cfg.get("num_classes_resolved", 0) or 0)

  ref = classes(configs[0])
  for w, cfg in zip(workdirs[1:], configs[1:]):
    got = classes(cfg)
    if got == ref:
      continue
    if isinstance(got, list) and isinstance(ref, list) and len(got) == len(ref):
      k = next(i for i, (a, b) in enumerate(zip(ref, got)) if a != b)
      why = f"class {k} is {got[k]!r}, not {ref[k]!r}"
    else:
      n = lambda c: len(c) if isinstance(c, list) else c
      why = f"{n(got)} classes, not {n(ref)}"
    raise EnsembleError(f"ensemble: {w}/config.json: its classes differ from those of "
                        f"{workdirs[0]} ({why}); the members must be trained on the same "
                        f"classes")


def normalize_weights(weights, n: int) -> np.ndarray:
  """(n,) float64 weights summing to 1 (equal when `weights` is None); each must be >= 0 and
  at least one > 0."""
  if weights is None:
    return np.full(n, 1.0 / n)
  w = np.asarray(list(weights), np.float64)
  if w.shape != (n,):
    raise EnsembleError(f"--weights: {len(w)} weights for {n} workdirs")
  if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
    raise EnsembleError(f"--weights: need finite weights >= 0, not all 0; got "
                        f"{','.join(f'{v:g}' for v in w)}")
  return w / w.sum()


def parse_weights(text: str | None):
  if text is None:
    return None
  try:
    return [float(v) for v in text.split(",")]
  except ValueError:
    raise EnsembleError(f"--weights={text!r}: expected comma-separated numbers, e.g. "
                        f"--weights=2,1,1") from None


# ----------------------------------------------------------------------------- combining


def softmax(logits) -> np.ndarray:
  """float64 softmax over the last axis."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def weighted_probabilities(probs, weights) -> np.ndarray:
  """sum_i w_i p_i of the members' (N, C) probabilities."""
  return sum(float(w) * np.asarray(p, np.float64) for w, p in zip(weights, probs))


def l2_normalize(x, eps: float = 1e-12) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def weighted_embeddings(embeddings, weights) -> np.ndarray:
  """(N, sum D_i): [sqrt(w_1) e_1 / |e_1|, ..., sqrt(w_M) e_M / |e_M|] of the members' (N, D_i)
  embeddings. The square roots make weights linear in a dot product of two such vectors (the
  scores against the centroids): sum_i w_i cos(e_i, e'_i)."""
  return np.concatenate([np.sqrt(float(w)) * l2_normalize(e)
                         for w, e in zip(weights, embeddings)], -1)


def fit_centroids(embeddings, labels, num_classes: int) -> np.ndarray:
  """(C, D) L2-normalised mean embedding of each class (zeros for a class with no example:
  it is never predicted)."""
  e = np.asarray(embeddings, np.float64)
  labels = np.asarray(labels)
  sums = np.zeros((num_classes, e.shape[-1]))
  np.add.at(sums, labels, e)
  missing = [c for c in range(num_classes) if not (labels == c).any()]
  if missing:
    log.warning("ensemble: classes %s have no train example: no centroid", missing[:10])
  return l2_normalize(sums)


def cosine_scores(embeddings, centroids) -> np.ndarray:
  """(N, C) cosine similarity of each embedding to each centroid (-1 for an empty class)."""
  scores = l2_normalize(embeddings) @ np.asarray(centroids, np.float64).T
  empty = ~np.asarray(centroids).any(-1)
  scores[:, empty] = -1.0
  return scores


def accuracy(scores, labels, num_classes: int) -> dict[str, float]:
  """top-1, top-5, mean per-class accuracy of (N, C) scores (`summarize_eval`'s definitions)."""
  from fgjax.train import evaluation
  scores = np.asarray(scores)
  labels = np.asarray(labels)
  top5 = np.argsort(-scores, axis=-1, kind="stable")[:, :min(5, scores.shape[-1])]
  return evaluation.summarize_eval(
      {"mask": np.ones(len(labels), bool), "label": labels, "pred": top5[:, 0],
       "correct5": (top5 == labels[:, None]).any(-1)}, num_classes)


# ----------------------------------------------------------------------------- model passes


def _embedding_fn(member: Member):
  """fn(variables, batch) -> (B, D) float32 pre-logit embeddings, as evaluation runs the model
  (the uint8 batch normalised on the device, the method's model inputs, train=False)."""
  import jax.numpy as jnp
  from fgjax import data as fgdata
  from fgjax.train import setup
  method = member.method
  kind = setup.normalize_kind(member.config)

  def fn(variables, batch):
    inputs = method.model_inputs(fgdata.normalize_batch(batch, kind))
    _, aux = method.model.apply(variables, *inputs, train=False)
    if not isinstance(aux, dict) or "pre_logits" not in aux:
      raise EnsembleError(f"ensemble --on embeddings: {member.workdir}: model "
                          f"{member.config.model.name} returns no aux['pre_logits'] embedding; "
                          f"use --on logits")
    return aux["pre_logits"].astype(jnp.float32).reshape(inputs[0].shape[0], -1)
  return fn


def source_embeddings(member: Member, source) -> dict[str, np.ndarray]:
  """{"embedding" (N, D), "id" (N,)} of every example of `source` through the member's
  evaluation transform, batched on all devices (padding removed)."""
  import jax
  from jax.experimental import multihost_utils
  from fgjax import data as fgdata
  from fgjax.train import setup
  embed = _embedding_fn(member)

  @jax.jit
  def fn(v, batch):
    return {"embedding": embed(v, batch), "id": batch["id"], "mask": batch["mask"]}

  parts = []
  for batch in setup.make_eval_iter(member.config, source, text=member.method.text):
    res = fn(member.variables, fgdata.to_global_batch(batch, member.mesh))
    parts.append(jax.tree.map(np.asarray, multihost_utils.process_allgather(res, tiled=True)))
  if not parts:
    return {"embedding": np.zeros((0, 0), np.float32), "id": np.zeros((0,), np.int64)}
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  keep = out.pop("mask").astype(bool)
  return {k: v[keep] for k, v in out.items()}


def image_embeddings(member: Member, paths, skip_bad: bool = False):
  """(paths read, (N, D) embeddings) of image files through the member's evaluation
  preprocessing (`fgjax.train.evaluation.load_images`), in batches padded to the device
  count. A file that cannot be read raises, or with `skip_bad` is named in a warning and
  left out."""
  import jax
  from fgjax.train import sharding
  cfg, mesh = member.config, member.mesh
  n_dev = mesh.devices.size
  bs = int(cfg.get("eval_batch_size", cfg.batch_size))
  bs = max(n_dev, -(-bs // n_dev) * n_dev)
  fn = jax.jit(_embedding_fn(member), out_shardings=sharding.replicated(mesh))
  kept, out = [], []
  for start in range(0, len(paths), bs):
    chunk = [(p, _load(cfg, p, skip_bad)) for p in paths[start:start + bs]]
    chunk = [(p, x) for p, x in chunk if x is not None]
    if not chunk:
      continue
    x = np.stack([a for _, a in chunk])
    pad = -len(x) % n_dev
    if pad:
      x = np.concatenate([x, np.repeat(x[:1], pad, axis=0)])
    batch = jax.device_put({"image": x}, sharding.batch_sharding(mesh))
    out.append(np.asarray(fn(member.variables, batch))[:len(chunk)])
    kept.extend(p for p, _ in chunk)
  return kept, (np.concatenate(out) if out else np.zeros((0, 0), np.float32))


def _load(cfg, path, skip_bad: bool):
  from fgjax.train import evaluation
  try:
    return evaluation.load_images(cfg, [path])[0]
  except OSError as e:  # missing, a directory, BadImageError
    if not skip_bad:
      raise
    why = "no such file" if isinstance(e, FileNotFoundError) else \
        (str(e).splitlines()[0] if str(e) else "unreadable")
    log.warning("skipped %s: %s", path, why)
    return None


def _by_id(ids, *arrays):
  order = np.argsort(np.asarray(ids), kind="stable")
  return (np.asarray(ids)[order],) + tuple(np.asarray(a)[order] for a in arrays)


def _split_source(member: Member, split: str):
  from fgjax.train import setup
  if split == "test":
    split = member.config.data.get("test_split", "test")
  return setup.get_source(member.config, split)


def _check_same_examples(members, ids_per_member, split: str):
  for m, ids in zip(members[1:], ids_per_member[1:]):
    if len(ids) != len(ids_per_member[0]) or (ids != ids_per_member[0]).any():
      raise EnsembleError(f"ensemble: {m.workdir}: its {split} split ({len(ids)} examples) is "
                          f"not that of {members[0].workdir} ({len(ids_per_member[0])}); the "
                          f"members must read the same dataset (data.* in config.json)")


# ----------------------------------------------------------------------------- evaluate


def evaluate(members, weights=None, on: str = "logits") -> dict:
  """The ensemble and each member on the test split: {"on", "combine", "num_examples",
  "ensemble": {top1, top5, mean_per_class, num_examples}, "members": [{workdir, weight, model,
  checkpoint, step, "softmax": metrics[, "centroid": metrics]}]}."""
  from fgjax.train import evaluation
  if on not in MODES:
    raise EnsembleError(f"--on={on!r}: choose one of {', '.join(MODES)}")
  w = normalize_weights(weights, len(members))
  num_classes = members[0].method.num_classes
  ids_all, probs, labels = [], [], None
  for m in members:
    src = _split_source(m, "test")
    lookup = dict(zip(np.asarray(src.ids).tolist(), np.asarray(src.labels).tolist()))
    out = evaluation.predict_source(m.config, m.method, m.variables, src, m.mesh, tta=m.tta)
    ids, logits = _by_id(out["id"], out["logits"])
    ids_all.append(ids)
    probs.append(softmax(logits))
    if labels is None:
      labels = np.array([lookup[int(i)] for i in ids])
  _check_same_examples(members, ids_all, "test")
  rows = [{"workdir": m.workdir, "weight": float(wi), "model": m.config.model.name,
           "checkpoint": m.info["checkpoint"], "step": int(m.info["step"]), "tta": m.tta,
           "softmax": accuracy(p, labels, num_classes)}
          for m, wi, p in zip(members, w, probs)]
  report = {"on": on, "split": "test", "num_examples": int(len(labels)), "members": rows}
  if on == "logits":
    report["combine"] = "weighted mean of the members' softmax probabilities"
    report["ensemble"] = accuracy(weighted_probabilities(probs, w), labels, num_classes)
    return report
  train_labels, train_e = train_embeddings(members)
  test_e = []
  for m, row, ids, t_emb in zip(members, rows, ids_all, train_e):
    e_ids, e_emb = _by_id(*_pair(source_embeddings(m, _split_source(m, "test"))))
    assert (e_ids == ids).all()
    test_e.append(e_emb)
    own = fit_centroids(l2_normalize(t_emb), train_labels, num_classes)
    row["centroid"] = accuracy(cosine_scores(e_emb, own), labels, num_classes)
    row["embedding_dim"] = int(t_emb.shape[-1])
  centroids = fit_centroids(weighted_embeddings(train_e, w), train_labels, num_classes)
  scores = cosine_scores(weighted_embeddings(test_e, w), centroids)
  report["combine"] = ("nearest class centroid (cosine) on the concatenated weighted "
                       "L2-normalised pre-logit embeddings; centroids from the train split")
  report["num_train_examples"] = int(len(train_labels))
  report["ensemble"] = accuracy(scores, labels, num_classes)
  return report


def _pair(out):
  return out["id"], out["embedding"]


def train_embeddings(members) -> tuple[np.ndarray, list[np.ndarray]]:
  """(labels (N,), [(N, D_i) embeddings per member]) of the whole train split (before any
  validation hold-out), ordered by example id; every member must read the same examples."""
  labels, ids0, out = None, None, []
  for m in members:
    src = _split_source(m, "train")
    lookup = dict(zip(np.asarray(src.ids).tolist(), np.asarray(src.labels).tolist()))
    ids, emb = _by_id(*_pair(source_embeddings(m, src)))
    if labels is None:
      ids0, labels = ids, np.array([lookup[int(i)] for i in ids])
    _check_same_examples([members[0], m], [ids0, ids], "train")
    out.append(emb)
  return labels, out


def format_table(report: dict) -> str:
  """The report as a text table: one row per member and rule, then the ensemble."""
  name_w = max([len("ensemble")] + [len(r["workdir"]) for r in report["members"]])
  head = f"{'run':<{name_w}}  {'weight':>6}  {'rule':<9}  {'top1':>7}  {'top5':>7}  " \
         f"{'per-class':>9}"
  lines = [head, "-" * len(head)]

  def line(name, weight, rule, m):
    return (f"{name:<{name_w}}  {weight:>6}  {rule:<9}  {m['top1']:7.4f}  {m['top5']:7.4f}  "
            f"{m['mean_per_class']:9.4f}")

  for r in report["members"]:
    lines.append(line(r["workdir"], f"{r['weight']:.3f}", "softmax", r["softmax"]))
    if "centroid" in r:
      lines.append(line(r["workdir"], f"{r['weight']:.3f}", "centroid", r["centroid"]))
  rule = "softmax" if report["on"] == "logits" else "centroid"
  lines.append(line("ensemble", "1.000", rule, report["ensemble"]))
  lines.append(f"({report['num_examples']} test examples; ensemble: {report['combine']})")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- predict


def predict_scores(members, paths, weights=None, on: str = "logits",
                   skip_bad: bool = False) -> tuple[list[str], np.ndarray]:
  """(paths read, (N, C) ensemble scores) of image files: the weighted mean of the members'
  softmax probabilities, each member under its TTA preset (`on="logits"`), or the cosine
  similarities to the centroids fitted on the members' train-split embeddings
  (`on="embeddings"`). A file that cannot be read raises, or with `skip_bad` is named in a
  warning and left out (the first member reads every file; the others read those it kept)."""
  from fgjax.train import evaluation, modes
  if on not in MODES:
    raise EnsembleError(f"--on={on!r}: choose one of {', '.join(MODES)}")
  w = normalize_weights(weights, len(members))
  kept = list(paths)
  if on == "logits":
    probs = []
    for k, m in enumerate(members):
      read, logits = evaluation.predict_files(m.config, m.method, m.variables, kept, m.mesh,
                                              tta=m.tta, progress=len(kept) > 100,
                                              skip_bad=skip_bad and k == 0,
                                              texts=modes.texts_for(m.method, kept))
      kept = list(read)
      probs.append(softmax(logits))
    return kept, weighted_probabilities(probs, w)
  train_labels, train_e = train_embeddings(members)
  queries = []
  for k, m in enumerate(members):
    kept, emb = image_embeddings(m, kept, skip_bad=skip_bad and k == 0)
    queries.append(emb)
  if not kept:
    return kept, np.zeros((0, members[0].method.num_classes))
  centroids = fit_centroids(weighted_embeddings(train_e, w), train_labels,
                            members[0].method.num_classes)
  return kept, cosine_scores(weighted_embeddings(queries, w), centroids)


def predict_folder(members, images: str, output: str, weights=None, on: str = "logits",
                   top_k: int = 0) -> list[list[str]]:
  """Predicts every image of `images` (a folder, recursively, or a list file:
  `fgjax.toolkit.submission.list_images`; unreadable files are named in a warning and
  skipped) and writes the submission CSV `output` (`fgjax.toolkit.submission.write_csv`:
  `filename,class`, with `top_k` also class_2.. and prob_1..; logits only). Returns the rows."""
  import jax
  from fgjax.toolkit import submission
  if top_k and on != "logits":
    raise EnsembleError("--top_k: the probability columns need --on logits (--on embeddings "
                        "gives cosine similarities, not probabilities)")
  entries = submission.list_images(images)
  kept, scores = predict_scores(members, [p for _, p in entries], weights, on, skip_bad=True)
  if not kept:
    raise EnsembleError(f"--images={images}: none of its {len(entries)} files could be read "
                        f"as an image")
  name_of = {path: name for name, path in entries}
  names = [name_of[p] for p in kept]
  if jax.process_index() == 0:
    submission.write_csv(output, names, scores, members[0].class_names, top_k)
  log.info("ensemble: wrote %d predictions to %s", len(kept), output)
  return submission.rows(names, scores, members[0].class_names, top_k)


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fgjax.tools.ensemble",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+", help="run directories (workdirs) of the members")
  parser.add_argument("--weights", default=None,
                      help="comma-separated member weights (normalised to sum 1; default equal)")
  parser.add_argument("--on", default="logits", choices=MODES,
                      help="logits: weighted mean of softmax probabilities; embeddings: "
                      "nearest class centroid on weighted concatenated embeddings")
  parser.add_argument("--checkpoint", default="best", choices=("best", "last"),
                      help="which checkpoint of each member")
  parser.add_argument("--tta", default=None,
                      help="test-time augmentation preset of every member (none, flip, "
                      "multicrop, multiscale, cal8); default: each member's config.eval.tta")
  parser.add_argument("--images", default=None,
                      help="predict every image under this folder (or in this list file) "
                      "instead of evaluating")
  parser.add_argument("--top_k", type=int, default=0,
                      help="with --images and --on logits: also the CSV columns class_2.."
                      "class_K and prob_1..prob_K")
  parser.add_argument("--output", default=None,
                      help="the report as JSON (evaluation) or the CSV (with --images)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notes per restore

  from fgjax import data as fgdata
  from fgjax.train import checkpoint
  user_errors = (EnsembleError, fgdata.DatasetNotFoundError, fgdata.BadImageError,
                 FileNotFoundError, KeyError, ValueError)
  try:
    if args.images is not None and not args.output:
      raise EnsembleError("--images needs --output=FILE.csv (where the predictions go)")
    if args.top_k and args.on != "logits":
      raise EnsembleError("--top_k: the probability columns need --on logits (--on "
                          "embeddings gives cosine similarities, not probabilities)")
    weights = parse_weights(args.weights)
    normalize_weights(weights, len(args.workdirs))  # before restoring anything
    members = load_members(args.workdirs, args.checkpoint, args.tta)
    if args.images is not None:
      rows = predict_folder(members, args.images, args.output, weights, args.on, args.top_k)
      print(f"wrote {args.output}: {len(rows)} images, ensemble of {len(members)} ({args.on})")
      return 0
    report = evaluate(members, weights, args.on)
    print(format_table(report))
    if args.output:
      os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
      with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
      print(f"wrote {args.output}")
  except user_errors as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {msg}", file=sys.stderr)
    return 2
  except checkpoint.CheckpointReadError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

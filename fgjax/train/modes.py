"""run.py's non-training modes: eval, predict, visualize, export_teacher.

Each restores the model of a workdir (best validation checkpoint when the run has one, else
the last; `which="last"` forces the last) from its saved `config.json`, through the set-up's
`restore_model`; none of them imports the training loop.

A run that reads text (`data.text.enabled`, PMA) uses its saved vocabulary (`vocab.txt`):
eval and export_teacher read the split's descriptions, predict and visualize take `text=`
(one description for every image) or a `.txt` beside each image, and `without_text=True`
(run.py `--without_text`) runs the model on images alone (every phrase masked, the
missing-modality case).

Eval and predict run under the test-time augmentation preset (`fgjax.toolkit.tta`) of the
`tta` argument (run.py `--tta`), else of a config given on the command line
(`config.eval.tta`), else of the run's own config. Eval also writes the error analysis
(`fgjax.toolkit.analysis`: per_class.csv, confused_pairs.csv, confusion.png); predict over a
folder (`images=`) writes a submission CSV (`fgjax.toolkit.submission`).
"""
from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections
import numpy as np

from fgjax import data as fgdata
from fgjax import teachers
from fgjax.toolkit import analysis, submission
from fgjax.toolkit import tta as tta_lib
from fgjax.train import evaluation, setup, sharding

log = logging.getLogger("fgjax")


def _restore(workdir, which, config=None, tta=None, without_text=False):
  if tta is not None:
    tta_lib.check_preset(tta)
  cfg, model, method, variables, info = setup.restore_model(workdir, prefer=which)
  with cfg.unlocked():
    if config is not None:  # a config given on the command line overrides data, eval settings
      cfg.data = config.data
      if config.get("eval") is not None:
        cfg.eval = ml_collections.ConfigDict(config.eval.to_dict())
    if cfg.get("eval") is None:  # a run saved before config.eval existed
      cfg.eval = ml_collections.ConfigDict(dict(tta="none"))
    if tta is not None:
      cfg.eval.tta = tta
    if not method.reads_text or without_text:  # after a --config's data section
      if setup.text_enabled(cfg):
        cfg.data.text.enabled = False  # the sources need no description files either
  if without_text and method.text is not None:
    method.text = None  # batches without phrases: the image-only mode
    log.info("without text: %s runs on the images alone", cfg.model.name)
  tta_lib.check(method, tta_lib.preset_of(cfg))
  log.info("restored %s (%s checkpoint, step %d)", cfg.model.name, info["checkpoint"],
           info["step"])
  return cfg, model, method, variables, info


def evaluate_checkpoint(workdir: str, config=None, which: str = "best", tta: str | None = None,
                        output: str | None = None, without_text: bool = False) -> dict:
  """Evaluates a checkpoint on the test split under the TTA preset (module docstring); writes
  `eval_metrics.json` (with "tta": the preset) in the workdir and the error analysis of the
  "logits" head (per_class.csv, confused_pairs.csv, confusion.png) in `output` (a directory;
  default the workdir). `without_text` (a run that reads text, on the images alone) writes
  `eval_metrics_without_text.json` and, by default, the analysis in `<workdir>/without_text/`,
  beside the with-text files."""
  cfg, model, method, variables, info = _restore(workdir, which, config, tta, without_text)
  preset = tta_lib.preset_of(cfg)
  mesh = sharding.make_mesh(cfg)
  test_src = setup.get_test_source(cfg)
  eval_step = jax.jit(evaluation.make_eval_step(method, preset))
  results = evaluation.eval_results(eval_step, variables,
                                    iter(setup.make_eval_iter(cfg, test_src, text=method.text)),
                                    mesh)
  metrics = evaluation.summarize_eval(results, model.num_classes, method)
  metrics.update({"tta": preset, "checkpoint": info["checkpoint"], "step": info["step"]})
  textless = method.reads_text and method.text is None and without_text
  if method.reads_text:
    metrics["text"] = "with" if method.text is not None else "without"
  print(json.dumps({"test": metrics}, indent=2))
  if jax.process_index() == 0:
    name = "eval_metrics_without_text.json" if textless else "eval_metrics.json"
    with open(os.path.join(workdir, name), "w") as f:
      json.dump({"test": metrics}, f, indent=2)
    real = results["mask"].astype(bool)
    names = list(cfg.get("class_names_resolved", []) or [])
    output = output or (os.path.join(workdir, "without_text") if textless else workdir)
    written = analysis.write_reports(output, results["label"][real],
                                     results["pred"][real], names or None, model.num_classes)
    log.info("wrote %s", ", ".join(written.values()))
  return metrics


class NoReadableImagesError(ValueError):
  """None of the image files given to predict or visualize could be read."""


def readable_images(paths) -> list[str]:
  """The files of `paths` that exist and decode as images; a warning names each other one.
  Raises `NoReadableImagesError` when none is left."""
  kept = []
  for path in paths:
    try:
      fgdata.load_image(path)
    except FileNotFoundError:
      log.warning("skipped %s: no such file", path)
    except IsADirectoryError:
      log.warning("skipped %s: a directory, not an image file", path)
    except OSError as e:  # BadImageError: not an image, truncated, unreadable
      log.warning("skipped %s: %s", path, str(e).splitlines()[0] if str(e) else "unreadable")
    else:
      kept.append(path)
  if paths and not kept:
    raise NoReadableImagesError(f"none of the {len(paths)} files given could be read as an "
                                f"image ({', '.join(map(str, paths[:3]))}"
                                f"{', ...' if len(paths) > 3 else ''})")
  return kept


PRINT_AT_MOST = 20  # predict prints each image's top-k when it writes no CSV or few rows


def texts_for(method, paths, text: str | None = None) -> list | None:
  """The description of each image for a run that reads text: `text` (one description for
  every image; sentences split at line breaks) or else the `.txt` beside each image (same stem),
  else none (an empty text: the image-only mode). None when the run reads no text."""
  if method.text is None:
    if text:
      log.warning("--text is ignored: this run reads no text (or --without_text)")
    return None
  from fgjax import text as fgtext
  if text:
    return [fgtext.sentences(text)] * len(paths)
  out = []
  for path in paths:
    side = os.path.splitext(str(path))[0] + ".txt"
    if os.path.isfile(side):
      with open(side, encoding="utf-8", errors="replace") as f:
        out.append(fgtext.sentences(f.read()))
    else:
      out.append(None)
  found = sum(t is not None for t in out)
  log.info("text: %d of %d images have a .txt beside them%s", found, len(out),
           "" if found == len(out) else " (the others run image-only)")
  return out


def predict(workdir: str, paths=(), which: str = "best", top_k: int = 5,
            images: str | None = None, output: str | None = None, csv_top_k: int = 0,
            tta: str | None = None, text: str | None = None,
            without_text: bool = False) -> list[dict]:
  """Top-k class names with probabilities for each image file that can be read (the others
  are named in a warning and skipped), batched on every device with a progress bar. `images`:
  a directory (recursively) or a list file of images (`fgjax.toolkit.submission.list_images`)
  besides the files of `paths`. With `images` or `output`, writes the submission CSV
  (`filename,class` [+ class_2.., prob_1.. with `csv_top_k`]) to `output` (default
  `<workdir>/submission.csv`); prints each image's top-k when there are at most
  PRINT_AT_MOST images or no CSV is written. A run that reads text gets `text` or the `.txt`
  beside each image (`texts_for`); `without_text` runs it on the images alone."""
  if int(csv_top_k) < 0:
    raise ValueError(f"--top_k={csv_top_k}: must be >= 0 (0: filename,class only)")
  entries = [(str(p), str(p)) for p in paths]
  if images:
    entries += submission.list_images(images)
  if not entries:
    raise ValueError("predict needs image files: run.py --mode=predict --workdir=W a.jpg b.jpg "
                     "or --images=DIR")
  cfg, _, method, variables, _ = _restore(workdir, which, tta=tta, without_text=without_text)
  files = [path for _, path in entries]
  kept, logits = evaluation.predict_files(cfg, method, variables, files,
                                          sharding.make_mesh(cfg),
                                          tta=tta_lib.preset_of(cfg), progress=True,
                                          texts=texts_for(method, files, text))
  if not kept:
    raise NoReadableImagesError(f"none of the {len(files)} files given could be read as an "
                                f"image ({', '.join(map(str, files[:3]))}"
                                f"{', ...' if len(files) > 3 else ''})")
  name_of = dict((path, name) for name, path in entries)
  names = list(cfg.get("class_names_resolved", []) or [])
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  results = []
  write = bool(images or output)
  show = not write or len(kept) <= PRINT_AT_MOST
  for path, p in zip(kept, probs):
    top = np.argsort(-p, kind="stable")[:top_k]
    row = {"image": name_of[path], "path": path,
           "top": [{"class": names[i] if i < len(names) else str(i),
                    "index": int(i), "prob": float(p[i])} for i in top]}
    results.append(row)
    if show:
      print(row["image"])
      for r in row["top"]:
        print(f"  {r['prob']:7.2%}  {r['class']}")
  if write and jax.process_index() == 0:
    out = output or os.path.join(workdir, "submission.csv")
    submission.write_csv(out, [name_of[p] for p in kept], probs, names or None, csv_top_k)
    log.info("wrote %d predictions (%d files skipped) to %s", len(kept),
             len(files) - len(kept), out)
  return results


def visualize(workdir: str, paths, output: str | None = None, which: str = "best",
              config=None, num_images: int = 8, required: bool = True,
              text: str | None = None, without_text: bool = False) -> list[str]:
  """Writes one PNG per image of what the run's method draws (for the ViT methods: the
  selected patches and the rollout heat-map; CAL: the attention map and crop; PMA: the three
  located blocks and the phrases' weights, with `text` or the `.txt` beside each image, or the
  test images' own descriptions). A method that draws nothing is an error, or with
  `required=False` (run.py after training) a log line."""
  saved = setup.load_config(workdir)
  if not required and not setup.build(saved, int(saved.num_classes_resolved))[1].draws:
    log.info("visualize: %s with %s draws nothing", saved.get("method", "classifier"),
             saved.model.name)
    return []
  cfg, model, method, variables, _ = _restore(workdir, which, config,
                                              without_text=without_text)
  if not method.draws:
    raise ValueError(f"visualize: config.method={cfg.get('method', 'classifier')!r} with "
                     f"{cfg.model.name} draws nothing (ViT-family models and CAL draw)")
  output = output or os.path.join(workdir, "visualize")
  os.makedirs(output, exist_ok=True)
  text_inputs = None
  if paths:
    paths = readable_images(list(paths))
    x = evaluation.load_images(cfg, paths)
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    texts = texts_for(method, paths, text)
    if texts is not None:
      text_inputs = evaluation.text_fields(method, texts)
  else:
    test_src = setup.get_test_source(cfg)
    batch = next(iter(setup.make_eval_iter(cfg, test_src, max(num_images, 1),
                                           text=method.text)))
    n = int(np.asarray(batch["mask"]).sum())
    x = np.asarray(batch["image"])[:n]
    names = [f"test_{int(i)}" for i in np.asarray(batch["id"])[:n]]
    if "phrases" in batch:
      text_inputs = {k: np.asarray(batch[k])[:n] for k in ("phrases", "phrase_mask")}
  written = []
  normalize = setup.normalize_kind(cfg)
  if x.dtype == np.uint8:  # what render draws on: the images the model saw
    x = fgdata.Normalizer(normalize)(x)
  for name, img in zip(names, method.render(variables, x, normalize, text_inputs)):
    path = os.path.join(output, f"{name}_{method.picture}.png")
    img.save(path)
    written.append(path)
  log.info("wrote %d images to %s", len(written), output)
  return written


def export_teacher(workdir: str, output: str | None = None, which: str = "best",
                   config=None, without_text: bool = False) -> str:
  """Writes the model's logits and probabilities for every training example, keyed by example
  id (a run that reads text reads each example's description, as its evaluation does)."""
  cfg, model, method, variables, info = _restore(workdir, which, config,
                                                 without_text=without_text)
  mesh = sharding.make_mesh(cfg)
  train_src = setup.get_source(cfg, "train")
  out = evaluation.predict_source(cfg, method, variables, train_src, mesh, tta="none")
  ids, logits = out["id"], out["logits"]
  output = output or os.path.join(workdir, "teacher_predictions.npz")
  if jax.process_index() == 0:
    teachers.save_predictions(output, ids, logits, {
        "model": cfg.model.name, "workdir": os.path.abspath(workdir), "step": info["step"],
        "checkpoint": info["checkpoint"], "dataset": cfg.data.name,
        "num_classes": model.num_classes, "method": cfg.get("method", "classifier"),
        "text": method.text is not None})
  lookup = dict(zip(np.asarray(train_src.ids).tolist(), np.asarray(train_src.labels).tolist()))
  acc = float((logits.argmax(-1) == np.array([lookup[int(i)] for i in ids])).mean())
  log.info("wrote teacher predictions for %d training examples to %s (train accuracy %.4f)",
           len(ids), output, acc)
  return output


def pseudo_label(workdir: str, images=None, split: str | None = None, output: str | None = None,
                 which: str = "best", config=None, threshold: float | None = None,
                 max_per_class: int | None = None, tta: str | None = None,
                 without_text: bool = False) -> dict:
  """Writes the confident predictions of a workdir's model on unlabeled images (`images`: a
  folder, searched recursively, a text file of paths or a list of paths) or on a split of the
  run's dataset (`split`, e.g. "test") as a pseudo-label CSV (`fgjax.toolkit.pseudo_labels`;
  default `<workdir>/pseudo_labels.csv`). `threshold` / `max_per_class` default to the
  `pseudo_label` section of `config`, else of the run's saved config, else 0.9 / no cap.
  The probabilities are the run's eval predictions (with `tta`, or `eval.tta`, averaged over
  the preset's views)."""
  from fgjax.toolkit import pseudo_labels as pl
  if (images is None or images == []) == (split is None):
    raise ValueError("pseudo_label needs exactly one of --images=DIR (a folder or a text file "
                     "of image paths) and --split=NAME (a split of the run's dataset, e.g. test)")
  saved = setup.load_config(workdir)
  settings = dict(threshold=pl.DEFAULT_THRESHOLD, max_per_class=pl.DEFAULT_MAX_PER_CLASS)
  for given in (saved.get("pseudo_label"), None if config is None else
                config.get("pseudo_label")):
    settings.update({k: given[k] for k in settings if given is not None and k in given})
  settings.update({k: v for k, v in (("threshold", threshold),
                                     ("max_per_class", max_per_class)) if v is not None})
  threshold, max_per_class = pl.check_settings(settings["threshold"], settings["max_per_class"])
  if split is not None and split == "train":
    raise ValueError("--split=train: the train split is labelled; pseudo-label another split "
                     "(e.g. --split=test) or a folder (--images=DIR)")
  if isinstance(images, (str, os.PathLike)):  # --images: as predict reads it
    images = [os.path.abspath(path) for _, path in submission.list_images(images)]
  cfg, _, method, variables, info = _restore(workdir, which, config, tta=tta,
                                             without_text=without_text)
  names = list(cfg.get("class_names_resolved", []) or [])
  mesh = sharding.make_mesh(cfg)
  preset = tta_lib.preset_of(cfg)
  if split is not None:
    src = setup.get_source(cfg, split)
    out = evaluation.predict_source(cfg, method, variables, src, mesh, tta=preset)
    logits, ids = out["logits"], np.asarray(out["id"]).tolist()
    files = getattr(src, "files", None)
    pos = {int(k): i for i, k in enumerate(np.asarray(src.ids).tolist())}
    keys = [files[pos[int(k)]] if files is not None else pl.split_ref(split, k) for k in ids]
    what = f"the {len(keys)} images of the {split} split"
  else:
    keys, logits = evaluation.predict_files(cfg, method, variables, list(images), mesh,
                                            tta=preset, progress=True,
                                            texts=texts_for(method, list(images)))
    if not keys:
      raise NoReadableImagesError(f"none of the {len(images)} files given could be read as an "
                                  f"image ({', '.join(map(str, images[:3]))}"
                                  f"{', ...' if len(images) > 3 else ''})")
    what = f"{len(keys)} images" + (f" ({len(images) - len(keys)} unreadable files skipped)"
                                     if len(keys) < len(images) else "")
  probs = np.asarray(jax.nn.softmax(np.asarray(logits, np.float32), axis=-1))
  if not names:
    names = [str(i) for i in range(probs.shape[-1])]
  rows = pl.confident_rows(keys, probs, names, threshold, max_per_class)
  output = output or os.path.join(workdir, "pseudo_labels.csv")
  if jax.process_index() == 0:
    pl.write(output, rows)
  counts = {}
  for _, name, _ in rows:
    counts[name] = counts.get(name, 0) + 1
  log.info("pseudo-labelled %d of %s (top-1 probability >= %g%s; %s checkpoint, step %d%s): "
           "%d classes, wrote %s", len(rows), what, threshold,
           f", at most {max_per_class} per class" if max_per_class else "", info["checkpoint"],
           info["step"], f", tta {preset}" if preset != "none" else "", len(counts), output)
  if not rows:
    log.warning("pseudo_label: no prediction reached top-1 probability %g: the file lists no "
                "image (a lower --threshold keeps more)", threshold)
  print(f"{len(rows)} of {len(keys)} images pseudo-labelled -> {output}")
  return {"output": output, "num_images": len(keys), "num_selected": len(rows),
          "per_class": counts, "threshold": threshold, "max_per_class": max_per_class}

r"""fgjax command line: train, evaluate, predict, visualise and export teacher predictions.

  python run.py --config=configs/demo.py                        # the CPU demo (synthetic data)
  python run.py --config=configs/trs_deit_cub.py \
      --config.data.data_dir=/data/CUB_200_2011 \
      --config.init_from=/weights/deit_base_distilled_patch16_224-df68dfff.pth \
      --workdir=runs/trs_deit_cub
  python run.py --config=configs/trs_deit_cub.py:runlocal       # a tiny quick run
  python run.py --mode=eval --workdir=runs/trs_deit_cub          # test split, best/last ckpt
  python run.py --mode=predict --workdir=runs/trs_deit_cub img1.jpg img2.jpg
  python run.py --mode=predict --workdir=W --images=DIR --output=submission.csv [--top_k=3]
  python run.py --mode=eval --workdir=W --tta=flip    # TTA; also per_class.csv, confusion.png
  python run.py --mode=visualize --workdir=runs/trs_deit_cub img1.jpg   # rollout + patches PNG
  python run.py --mode=export_teacher --workdir=runs/cal_cub     # teacher_predictions.npz
  python run.py --mode=predict --workdir=runs/pma_cub bird.jpg --text="a bird with a red crown"
  python run.py --mode=eval --workdir=runs/pma_cub --without_text # a text model, images alone
  python run.py --mode=pseudo_label --workdir=W --images=DIR     # W/pseudo_labels.csv

Multi-host: `--coordinator_address=host:port --num_processes=N --process_id=i` (or the
usual JAX environment variables; automatic on TPU) call `jax.distributed.initialize`.
On the CPU, `--host_memory=auto` keeps XLA's freed step buffers for reuse
(fgjax/train/hostmem.py).
Exit status (docs/failures.md): 0 done (also a run stopped by SIGTERM, which saved a
checkpoint); 1 training failed (a non-finite loss, a checkpoint that could not be saved: the
message says why); 2 bad input: an unknown config key or a value of the wrong type, a missing
dataset, checkpoint or image, a workdir that holds another run's config or no fgjax run, no
checkpoint that restores. Errors are one line (`--traceback` shows the traceback).
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from fgjax.train import hostmem  # stdlib only: jax's backend does not start here

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/x.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "visualize",
                                            "export_teacher", "pseudo_label"], "What to do.")
_OUTPUT = flags.DEFINE_string("output", None, "Output path for export_teacher/visualize, the "
                              "submission CSV of predict, the error-analysis folder of eval.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "predict: the submission CSV's top-k columns "
                              "(class_2..class_K, prob_1..prob_K); 0: filename,class only.")
_TTA = flags.DEFINE_string("tta", None, "eval/predict: test-time augmentation preset, overrides "
                           "config.eval.tta (none, flip, multicrop, multiscale, cal8).")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "last"],
                                "Which checkpoint eval/predict/visualize/export use.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "visualize: test images when no files given.")
_IMAGES = flags.DEFINE_string("images", None, "predict/pseudo_label: a folder of images "
                              "(searched recursively) or a text file of image paths.")
_SPLIT = flags.DEFINE_string("split", None, "pseudo_label: a split of the run's dataset (e.g. "
                             "test) instead of --images.")
_THRESHOLD = flags.DEFINE_float("threshold", None, "pseudo_label: keep predictions with top-1 "
                                "probability >= this (default: config pseudo_label.threshold, "
                                "0.9).")
_MAX_PER_CLASS = flags.DEFINE_integer("max_per_class", None, "pseudo_label: at most this many "
                                      "images per predicted class (default: config "
                                      "pseudo_label.max_per_class, 0: no cap).")
_TEXT = flags.DEFINE_string("text", None, "predict/visualize of a run that reads text (PMA): "
                            "the description of every image given (default: the .txt beside "
                            "each image, else none: image-only).")
_WITHOUT_TEXT = flags.DEFINE_bool("without_text", False, "eval/predict/visualize/export_teacher/"
                                  "pseudo_label of a run that reads text: the images alone "
                                  "(every phrase masked).")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show full tracebacks for input errors.")
_COORD = flags.DEFINE_string("coordinator_address", None, "Multi-host coordinator host:port.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_HOST_MEMORY = flags.DEFINE_enum(
    "host_memory", "auto", list(hostmem.MODES),
    "XLA:CPU step buffers: 'retain' keeps freed memory for the next step instead of returning "
    "it to the kernel (glibc malloc options; ~20% faster CPU train steps), 'auto' does so when "
    "jax runs on the CPU only, 'system' leaves malloc alone. See fgjax/train/hostmem.py.")


def _default_workdir(config_path: str | None) -> str:
  name = os.path.splitext(os.path.basename((config_path or "run").split(":")[0]))[0]
  arg = (config_path or "").partition(":")[2]
  return os.path.join("runs", name + (f"_{arg.replace(',', '_').replace('=', '')}" if arg else ""))


def _config_path(argv=None) -> str | None:
  for a in argv or sys.argv:
    if a.startswith("--config="):
      return a.split("=", 1)[1]
  return None


def _one_line(text: str) -> str:
  return " ".join(str(text).replace("\\n", " ").split())


def _config_error(argv, e: BaseException) -> str:
  """A readable line for an error raised while absl parsed --config and its overrides."""
  while isinstance(e, (KeyError, AttributeError)) and e.args and \
      isinstance(e.args[0], BaseException):
    e = e.args[0]  # ml_collections wraps its KeyError ("did you mean") in an AttributeError
  text = str(e.args[0]) if isinstance(e, (KeyError, AttributeError)) and e.args else str(e)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  config = f"--config={_config_path(argv) or '?'}"
  if isinstance(e, (KeyError, AttributeError)):
    key = lines[0].strip("'\"") if lines else "?"
    given = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")
             and key in a.split("=", 1)[0].split(".")]
    where = given[0] if given else f"config key {key!r}"
    return _one_line(f"{where}: the config has no key {key!r}. {' '.join(lines[1:])} (a key "
                     f"must exist in the config file to be set from the command line)")
  if "Failed loading config file" in text:
    cause = [line for line in lines if line.startswith("[Errno")]
    return _one_line(f"{config}: cannot load the config file"
                     + (f" ({cause[-1]})" if cause else ""))
  if "Traceback (most recent call last)" in text:  # the config file's own error
    return _one_line(f"{config}: {lines[-1]}")
  return _one_line(text)


def _parse_flags(argv):
  """absl's flag parsing with one-line errors and exit status 2 (`--traceback` re-raises)."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # flags.Error, ml_collections' KeyError/AttributeError, a config's own
    if "--traceback" in argv:
      raise
    print(f"error: {_config_error(argv, e)}\n(rerun with --traceback for the full traceback)",
          file=sys.stderr)
    sys.exit(2)


class _NoTracebacks(logging.Filter):
  """Keeps the first line of library log records and drops their tracebacks (orbax logs each
  failure of a background save several times, with a traceback): the error that reaches
  run.py is reported once, in one line."""

  def filter(self, record):
    if record.exc_info or record.exc_text:
      record.exc_info, record.exc_text = None, None
    msg = record.getMessage()
    if "\n" in msg:
      record.msg, record.args = msg.splitlines()[0], None
    return True


def main(argv):
  images = argv[1:]
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S")
  logging.getLogger("absl").setLevel(logging.WARNING)
  from fgjax.train import quiet
  if _TRACEBACK.value:
    quiet.enabled = False  # --traceback: everything the libraries print stays
  else:
    for name in ("absl", "asyncio"):
      logging.getLogger(name).addFilter(_NoTracebacks())
    quiet.install()
  from fgjax.train import distributed
  hostmem.configure(_HOST_MEMORY.value)  # before jax creates a backend
  distributed.initialize(_COORD.value, _NPROC.value, _PID.value)

  from fgjax import convert, data, teachers
  from fgjax.train import checkpoint, modes, trainer
  try:
    config = _CONFIG.value
    if config is not None:
      config.get("seed")  # a config file that failed to load raises at first use, not parsing
  except Exception as e:
    if _TRACEBACK.value:
      raise
    print(f"error: {_config_error(sys.argv, e)}", file=sys.stderr)
    return 2
  workdir = _WORKDIR.value or _default_workdir(_config_path())
  user_errors = (data.DatasetNotFoundError, data.BadImageError, convert.CheckpointError,
                 teachers.TeacherError, FileNotFoundError, KeyError, ValueError)
  run_errors = (trainer.TrainingError, checkpoint.CheckpointSaveError,
                checkpoint.CheckpointReadError)
  try:
    if _MODE.value == "train":
      if config is None:
        raise ValueError("--config is required for training (e.g. --config=configs/demo.py)")
      result = trainer.train_and_evaluate(config, workdir)
      n_vis = int(config.get("visualize_examples", 0) or 0)
      if n_vis and "selected" in result:  # a finished run (not one stopped by a signal)
        modes.visualize(workdir, [], num_images=n_vis, which=result["selected"],
                        required=False)
    elif _MODE.value == "eval":
      modes.evaluate_checkpoint(workdir, config, which=_CHECKPOINT.value, tta=_TTA.value,
                                output=_OUTPUT.value, without_text=_WITHOUT_TEXT.value)
    elif _MODE.value == "predict":
      modes.predict(workdir, images, which=_CHECKPOINT.value, images=_IMAGES.value,
                    output=_OUTPUT.value, csv_top_k=_TOP_K.value, tta=_TTA.value,
                    text=_TEXT.value, without_text=_WITHOUT_TEXT.value)
    elif _MODE.value == "visualize":
      modes.visualize(workdir, images, output=_OUTPUT.value, which=_CHECKPOINT.value,
                      config=config, num_images=_NUM_IMAGES.value, text=_TEXT.value,
                      without_text=_WITHOUT_TEXT.value)
    elif _MODE.value == "pseudo_label":
      if _IMAGES.value:  # the folder or list file, and any image files after the flags
        from fgjax.toolkit import submission
        images = [p for _, p in submission.list_images(_IMAGES.value)] + list(images)
      modes.pseudo_label(workdir, images=list(images) or None, split=_SPLIT.value,
                         output=_OUTPUT.value, which=_CHECKPOINT.value, config=config,
                         threshold=_THRESHOLD.value, max_per_class=_MAX_PER_CLASS.value,
                         tta=_TTA.value, without_text=_WITHOUT_TEXT.value)
    elif _MODE.value == "export_teacher":
      modes.export_teacher(workdir, output=_OUTPUT.value, which=_CHECKPOINT.value,
                           config=config, without_text=_WITHOUT_TEXT.value)
  except run_errors as e:
    if _TRACEBACK.value:
      raise
    logging.error("%s", e)
    return 1
  except user_errors as e:
    if _TRACEBACK.value:
      raise
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {msg}\n(rerun with --traceback for the full traceback)", file=sys.stderr)
    return 2
  except OSError as e:  # a full disk or a read-only filesystem outside the checkpoints
    if _TRACEBACK.value:
      raise
    where = f" ({checkpoint.free_space(e.filename)} free there)" if e.filename else ""
    logging.error("%s%s", e, where)
    return 1
  return 0


def _main_and_exit(argv):
  code = main(argv)
  if code:
    # After an error the run has already closed its checkpoints and logs; exit without the
    # libraries' exit handlers and background threads, which would fail again (a full disk)
    # and print tracebacks under the one-line error.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
  sys.exit(0)


if __name__ == "__main__":
  app.run(_main_and_exit, flags_parser=_parse_flags)

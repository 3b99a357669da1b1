r"""fgjax command line: train, evaluate, predict, visualise and export teacher predictions.

  python run.py --config=configs/demo.py                        # the CPU demo (synthetic data)
  python run.py --config=configs/trs_deit_cub.py \
      --config.data.data_dir=/data/CUB_200_2011 \
      --config.init_from=/weights/deit_base_distilled_patch16_224-df68dfff.pth \
      --workdir=runs/trs_deit_cub
  python run.py --config=configs/trs_deit_cub.py:runlocal       # a tiny quick run
  python run.py --mode=eval --workdir=runs/trs_deit_cub          # test split, best/last ckpt
  python run.py --mode=predict --workdir=runs/trs_deit_cub img1.jpg img2.jpg
  python run.py --mode=visualize --workdir=runs/trs_deit_cub img1.jpg   # rollout + patches PNG
  python run.py --mode=export_teacher --workdir=runs/cal_cub     # teacher_predictions.npz

Multi-host: `--coordinator_address=host:port --num_processes=N --process_id=i` (or the
usual JAX environment variables; automatic on TPU) call `jax.distributed.initialize`.
On the CPU, `--host_memory=auto` keeps XLA's freed step buffers for reuse
(fgjax/train/hostmem.py).
Exit status: 0 done, 1 training failed (message says why), 2 bad input (missing dataset,
checkpoint or config key).
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
                                            "export_teacher"], "What to do.")
_OUTPUT = flags.DEFINE_string("output", None, "Output path for export_teacher/visualize.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "last"],
                                "Which checkpoint eval/predict/visualize/export use.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "visualize: test images when no files given.")
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


def _config_path() -> str | None:
  for a in sys.argv:
    if a.startswith("--config="):
      return a.split("=", 1)[1]
  return None


def main(argv):
  images = argv[1:]
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S")
  logging.getLogger("absl").setLevel(logging.WARNING)
  from fgjax.train import distributed
  hostmem.configure(_HOST_MEMORY.value)  # before jax creates a backend
  distributed.initialize(_COORD.value, _NPROC.value, _PID.value)

  from fgjax import convert, data, teachers
  from fgjax.train import modes, trainer
  config = _CONFIG.value
  workdir = _WORKDIR.value or _default_workdir(_config_path())
  user_errors = (data.DatasetNotFoundError, convert.CheckpointError, teachers.TeacherError,
                 FileNotFoundError, KeyError, ValueError)
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
      modes.evaluate_checkpoint(workdir, config, which=_CHECKPOINT.value)
    elif _MODE.value == "predict":
      modes.predict(workdir, images, which=_CHECKPOINT.value)
    elif _MODE.value == "visualize":
      modes.visualize(workdir, images, output=_OUTPUT.value, which=_CHECKPOINT.value,
                      config=config, num_images=_NUM_IMAGES.value)
    elif _MODE.value == "export_teacher":
      modes.export_teacher(workdir, output=_OUTPUT.value, which=_CHECKPOINT.value,
                           config=config)
  except trainer.TrainingError as e:
    logging.error("%s", e)
    return 1
  except user_errors as e:
    if _TRACEBACK.value:
      raise
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {msg}\n(rerun with --traceback for the full traceback)", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))

"""Trains `tests/tiny_config.py` in this process and, with --fault, kills it with SIGKILL at a
chosen moment (the fault-injection tests in tests/test_failures.py):

  python tests/fault_driver.py WORKDIR [--steps=6] [--fault=step:5|save:4|eval:4]

- step:N  while train step N runs (right after the loop dispatched it: jax runs it
          asynchronously, so the kill lands during or just after its computation);
- save:N  while the asynchronous save of step N writes (right after orbax started it);
- eval:N  while the evaluation at step N runs (after its first batch).
Before it kills, the driver waits until the previous checkpoint (of the step before N, N - 2
for save and eval) has committed, so that the rerun resumes from a checkpoint rather than from
scratch. Without --fault the run goes to the end, as `run.py --config=tests/tiny_config.py`
would. Logs at INFO level (the tests read "resumed from").
"""
import argparse
import logging
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def _kill():
  os.kill(os.getpid(), signal.SIGKILL)


def _wait_committed(workdir: str, step: int, timeout: float = 60.0):
  """Waits until checkpoints/<step> exists (orbax renames it into place when it commits)."""
  path = os.path.join(workdir, "checkpoints", str(step))
  deadline = time.time() + timeout
  while step > 0 and not os.path.isdir(path):
    if time.time() > deadline:
      raise SystemExit(f"{path} did not commit within {timeout} s")
    time.sleep(0.05)


def _inject(fault: str, workdir: str):
  import orbax.checkpoint as ocp
  from fgjax.train import evaluation, logs
  kind, _, n = fault.partition(":")
  n = int(n)
  if kind == "step":
    orig_update = logs.ProgressBar.update

    def update(self, step, *args, **kwargs):
      if step == n and not args:  # right after step n was dispatched (it runs asynchronously)
        _wait_committed(workdir, 2 * ((n - 1) // 2))
        _kill()
      return orig_update(self, step, *args, **kwargs)
    logs.ProgressBar.update = update
  elif kind == "save":
    orig_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
      out = orig_save(self, step, *args, **kwargs)
      if step == n and os.path.basename(str(self.directory)) == "checkpoints":
        _wait_committed(workdir, n - 2)
        _kill()
      return out
    ocp.CheckpointManager.save = save
  elif kind == "eval":
    orig_eval, calls = evaluation.evaluate, [0]

    def killing(batches):
      for batch in batches:
        yield batch
        _kill()  # asked for the second batch: the first one is being evaluated

    def evaluate(eval_step, variables, batches, *args, **kwargs):
      calls[0] += 1  # the val split, then the test split, at each evaluation (every 2 steps)
      if calls[0] == n - 1:
        _wait_committed(workdir, n - 2)
        batches = killing(batches)
      return orig_eval(eval_step, variables, batches, *args, **kwargs)
    evaluation.evaluate = evaluate
  else:
    raise SystemExit(f"unknown fault {fault!r}")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--fault", default="")
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's INFO lines
  import tiny_config
  from fgjax.train import trainer
  if args.fault:
    _inject(args.fault, os.path.abspath(args.workdir))
  trainer.train_and_evaluate(tiny_config.get_config(f"steps={args.steps}"), args.workdir)


if __name__ == "__main__":
  main()

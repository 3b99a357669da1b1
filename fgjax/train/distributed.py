"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

- Explicit: `run.py --coordinator_address=host:1234 --num_processes=2 --process_id=0`.
- Environment: JAX's own variables (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
  `JAX_PROCESS_ID`) or a cluster JAX auto-detects (SLURM, Open MPI, Cloud TPU pod slices),
  signalled by `FGJAX_DISTRIBUTED=1` or the TPU/SLURM variables checked below.
- Otherwise: single process, nothing to do.
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("fgjax")

_AUTO_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
             "FGJAX_DISTRIBUTED")


def initialize(coordinator_address=None, num_processes=None, process_id=None):
  if coordinator_address or num_processes or process_id is not None:
    if not (coordinator_address and num_processes and process_id is not None):
      raise ValueError("multi-host needs all of --coordinator_address, --num_processes and "
                       "--process_id")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif any(os.environ.get(k) for k in _AUTO_ENV) or (
      os.environ.get("SLURM_NTASKS", "1") not in ("", "1")):
    jax.distributed.initialize()
  else:
    return
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())

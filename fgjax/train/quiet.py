"""What the libraries print after an error that fgjax already reports in one line.

- orbax: a restore that fails on a damaged checkpoint leaves its other TensorStore reads
  running; they raise "Event loop is closed" in their threads and errors in coroutines nobody
  awaits, dozens of tracebacks through `sys.unraisablehook` and asyncio's logger.
- tensorboardX: on a full disk its flush thread and its atexit clean-up fail again with
  ENOSPC, each with a traceback.
`install()` (idempotent; the checkpointer and run.py call it) filters exactly these: the
closed-loop RuntimeError, exceptions raised inside orbax's checkpoint code, asyncio's "never
retrieved" reports, and ENOSPC from tensorboardX; everything else reaches the previous hooks.
"""
from __future__ import annotations

import errno
import logging
import os
import sys
import threading

enabled = True  # run.py --traceback sets False: install() then does nothing
_previous = {}
_ORBAX = f"{os.sep}orbax{os.sep}checkpoint{os.sep}"
_TENSORBOARD = f"{os.sep}tensorboardX{os.sep}"


def _frames(tb):
  while tb is not None:
    yield tb.tb_frame.f_code.co_filename
    tb = tb.tb_next


def is_noise(exc: BaseException | None, tb) -> bool:
  """Whether an exception that nobody will handle is library noise (see the docstring)."""
  if exc is None:
    return False
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True
  files = list(_frames(tb))
  if any(_ORBAX in f for f in files):
    return True
  return (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
          and any(_TENSORBOARD in f for f in files))


def _unraisable(unraisable):
  if is_noise(unraisable.exc_value, unraisable.exc_traceback):
    return
  _previous.get("unraisable", sys.__unraisablehook__)(unraisable)


def _thread(args):
  if is_noise(args.exc_value, args.exc_traceback):
    return
  _previous.get("thread", threading.__excepthook__)(args)


class _AsyncioNeverRetrieved(logging.Filter):
  def filter(self, record):
    return not record.getMessage().startswith(("Task exception was never retrieved",
                                               "Future exception was never retrieved"))


def install():
  """Installs the filters once per process (unless `enabled` is False)."""
  if not enabled:
    return
  if sys.unraisablehook is not _unraisable:
    _previous["unraisable"] = sys.unraisablehook
    sys.unraisablehook = _unraisable
  if threading.excepthook is not _thread:
    _previous["thread"] = threading.excepthook
    threading.excepthook = _thread
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _AsyncioNeverRetrieved) for f in asyncio_log.filters):
    asyncio_log.addFilter(_AsyncioNeverRetrieved())

"""``SIGTERM`` and ``SIGINT`` outside the training loop: exit at once with 75, so a rerun resumes.

`experiments.main` calls :func:`install` first thing, before its slow imports
(JAX, orbax), the data and the compilation (about 15 s before the first step),
so a preemption notice or a Ctrl-C in that time ends the run with status 75
(``EX_TEMPFAIL``, as after a saved preemption) and one line saying there was
nothing to save, instead of Python's default death by signal (status 143 for
``SIGTERM``, a ``KeyboardInterrupt`` traceback for ``SIGINT``). While the
training loop runs, :class:`experiments.preemption.PreemptionWatch` replaces
these handlers (it saves the step it stops at) and puts them back after.

The handler ends the process on the spot (``os._exit``), as the signal's
default action would, rather than raising: an exception raised from a signal
handler is lost when the signal lands in a garbage-collection callback (JAX
runs one), and the run would go on. Outside the loop nothing is unsaved:
checkpoints are written synchronously inside it, ``metrics.jsonl`` a whole
line per write.

This module imports nothing slow.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["EXIT_CODE", "install", "message"]

EXIT_CODE = 75
"""``EX_TEMPFAIL``: rerun to resume; `experiments.preemption.PREEMPTED_EXIT_CODE` too."""


def message(signum: int) -> str:
  """The line printed when signal ``signum`` stops the run outside the training loop."""
  return (f"Stopped by {signal.Signals(signum).name} outside the training loop (while starting "
          "up or finishing): there was nothing to save. Rerun the same command to resume.")


def _exit(signum: int, frame: object) -> None:
  try:
    sys.stdout.flush()
    sys.stderr.flush()
  except Exception:
    pass
  os.write(2, f"{message(signum)}\n".encode())
  os._exit(EXIT_CODE)


def install() -> None:
  """Makes ``SIGTERM`` and ``SIGINT`` end the process with :data:`EXIT_CODE` and one line.

  Call it from the main thread.
  """
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, _exit)

"""Stopping at a preemption notice: every process saves the same step, then the run exits.

``SIGTERM`` (what SLURM, Kubernetes and Cloud TPU send before they stop a job)
and ``SIGINT`` (Ctrl-C) ask the trainer to stop. In a multi-process run JAX's
preemption sync manager, started by ``jax.distributed.initialize``, catches
``SIGTERM`` on any process and agrees with the others on one step at which
``CheckpointManager.reached_preemption`` is true everywhere; ``SIGINT`` is
forwarded to it as ``SIGTERM``. A single process stops at the next step. The
trainer then saves that step and raises :class:`Preempted`, and
``experiments.main`` exits with :data:`PREEMPTED_EXIT_CODE`.
"""

from __future__ import annotations

from collections.abc import Callable
import os
import signal
import threading
from typing import Self

import jax

__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "PreemptionWatch"]

PREEMPTED_EXIT_CODE = 75
"""``experiments.main``'s exit status after a preemption was saved (``EX_TEMPFAIL``: rerun to
resume)."""


class Preempted(Exception):
  """The run stopped at a preemption notice after saving ``step``."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f"Preempted: saved the checkpoint of step {step} in {workdir}; rerun the "
                     "same command to resume from it.")
    self.step = step


class PreemptionWatch:
  """Installs the signal handlers for the length of a ``with`` block and says when to stop.

  Args:
    reached_sync_point: ``step -> bool``, the multi-process agreement
      (:meth:`experiments.checkpoints.Checkpoints.reached_preemption`); used
      when ``jax.process_count() > 1``.

  Example::

    with PreemptionWatch(checkpoints.reached_preemption) as preemption:
      for step in steps:
        ...
        if preemption.reached(step):
          ...  # save, then stop
  """

  def __init__(self, reached_sync_point: Callable[[int], bool]):
    self._reached_sync_point = reached_sync_point
    self._multi_process = jax.process_count() > 1
    self.signal: int | None = None
    self._previous: dict[int, object] = {}

  def _forward_to_sigterm(self, signum, frame) -> None:
    # JAX's preemption notifier listens to SIGTERM only.
    os.kill(os.getpid(), signal.SIGTERM)

  def _note(self, signum, frame) -> None:
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C: stop now (the trainer still tries to save).
    self.signal = signum

  def __enter__(self) -> Self:
    if threading.current_thread() is threading.main_thread():
      if self._multi_process:
        handlers = {signal.SIGINT: self._forward_to_sigterm}
      else:
        handlers = {signal.SIGTERM: self._note, signal.SIGINT: self._note}
      for signum, handler in handlers.items():
        self._previous[signum] = signal.signal(signum, handler)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def reached(self, step: int) -> bool:
    """Whether to save ``step`` and stop; call after every step, on every process."""
    if self._multi_process:
      return self._reached_sync_point(step)
    return self.signal is not None

"""One run per workdir: an exclusive ``fcntl`` lock per process, released when it dies."""

from __future__ import annotations

import fcntl
import os
import pathlib
from typing import Self

__all__ = ["WorkdirLock", "WorkdirLocked"]


class WorkdirLocked(RuntimeError):
  """Another live process holds the workdir; the message names it and its process id."""


class WorkdirLock:
  """Holds ``workdir/process_<index>.lock`` with ``fcntl.flock`` for the life of a run.

  Each process of a run locks the file of its own process index: one
  process-0 run owns the config, metrics and checkpoint bookkeeping, and each
  process its own checkpoint shards, so a second run on the same workdir fails
  at the first process index both use. The kernel releases the lock when the
  holder exits, however it exits, so a killed run never leaves the workdir
  locked.

  Args:
    workdir: The run's directory (created if missing).
    process_index: This process's ``jax.process_index()``.

  Example::

    with WorkdirLock(workdir, process_index=jax.process_index()):
      ...  # train
  """

  def __init__(self, workdir: str | pathlib.Path, *, process_index: int = 0):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / f"process_{process_index}.lock"
    self._file = None

  def acquire(self) -> None:
    """Takes the lock or raises :class:`WorkdirLocked` at once."""
    self.workdir.mkdir(parents=True, exist_ok=True)
    file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held while locked)
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      file.seek(0)
      holder = file.read().strip() or "unknown"
      file.close()
      raise WorkdirLocked(
          f"The workdir {self.workdir} is in use by another run (process id {holder}, lock "
          f"{self.path.name}); wait for it to end or choose another --workdir.") from None
    file.seek(0)
    file.truncate()
    file.write(f"{os.getpid()}\n")
    file.flush()
    self._file = file

  def release(self) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self) -> Self:
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()

"""One run per workdir: an exclusive ``fcntl`` lock per process, released when it dies."""

from __future__ import annotations

import fcntl
import os
import pathlib
from typing import Self

__all__ = ["WorkdirError", "WorkdirLock", "WorkdirLocked", "check_unlocked", "check_workdir"]


class WorkdirError(RuntimeError):
  """The workdir cannot be used (a file, under a file, not writable); the message says which."""


class WorkdirLocked(WorkdirError):
  """Another live process holds the workdir; the message names it and its process id."""


def check_workdir(workdir: str | pathlib.Path) -> None:
  """Raises :class:`WorkdirError` unless ``workdir`` is, or can be made, a writable folder.

  Writes nothing: the trainer calls it before it reads the data, so that a bad
  ``--workdir`` is reported at once, like a bad config field.
  """
  path = pathlib.Path(workdir).absolute()
  existing = path
  while not existing.exists() and existing.parent != existing:
    existing = existing.parent
  if not existing.is_dir():
    where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
    raise WorkdirError(f"The workdir {path} {where}, not a folder; choose another --workdir.")
  if not os.access(existing, os.W_OK | os.X_OK):
    where = "" if existing == path else f" ({existing}, where it would be created)"
    raise WorkdirError(f"The workdir {path} is not writable{where}; choose another --workdir.")


def _locked_message(workdir: pathlib.Path, path: pathlib.Path, holder: str) -> str:
  return (f"The workdir {workdir} is in use by another run (process id {holder or 'unknown'}, "
          f"lock {path.name}); wait for it to end or choose another --workdir.")


def check_unlocked(workdir: str | pathlib.Path, *, process_index: int = 0) -> None:
  """Raises :class:`WorkdirLocked` if a live run holds ``workdir``'s lock of ``process_index``.

  Writes nothing and holds nothing: the command line calls it before the slow
  imports, so that a second run on a busy workdir says so at once. The lock
  itself is taken later by :class:`WorkdirLock`.
  """
  path = pathlib.Path(workdir) / f"process_{process_index}.lock"
  try:
    file = open(path, encoding="utf-8")
  except OSError:
    return  # No lock file yet (or unreadable): WorkdirLock decides later.
  with file:
    try:
      fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirLocked(_locked_message(pathlib.Path(workdir), path,
                                          file.read().strip())) from None
    fcntl.flock(file, fcntl.LOCK_UN)


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
    """Takes the lock or raises :class:`WorkdirLocked` at once.

    Raises:
      WorkdirLocked: if another live process holds it.
      WorkdirError: if the workdir or the lock file cannot be created.
    """
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
      file = open(self.path, "a+", encoding="utf-8")
    except OSError as e:
      raise WorkdirError(f"The workdir {self.workdir} cannot be used: {e.strerror} "
                         f"({e.filename}); choose another --workdir.") from None
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      file.seek(0)
      holder = file.read().strip()
      file.close()
      raise WorkdirLocked(_locked_message(self.workdir, self.path, holder)) from None
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

"""The tracebacks third-party libraries print when they fail, sent to a file instead of the console.

A failed save is reported by the trainer in one line (:class:`experiments.checkpoints.SaveError`),
but the libraries under it print their own reports first: orbax logs each failed writer thread
with its traceback through ``absl.logging``, and TensorStore's callbacks raise "Event loop is
closed" once orbax has closed their event loop, which Python prints as unraisable exceptions
(a full disk gave 141 lines of 46 tracebacks). :class:`LibraryErrors` keeps those in a file, the
run's ``errors.log``.
"""

from __future__ import annotations

import logging
import pathlib
import sys
import threading
import time
import traceback
from typing import Any, Self

__all__ = ["LibraryErrors"]

_DEFAULT_HOOKS = (sys.__unraisablehook__, threading.__excepthook__)
# absl: orbax's failed writer threads. asyncio: "Task exception was never retrieved", logged when
# the garbage collector meets a failed write task that orbax abandoned.
_LIBRARY_LOGGERS = ("absl", "asyncio")


class _ToFile(logging.Filter):
  """Passes records on, except errors and tracebacks, which it writes to the file instead."""

  def __init__(self, owner: LibraryErrors):
    super().__init__()
    self._owner = owner

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR and not record.exc_info:
      return True
    text = record.getMessage()
    if record.exc_info:
      text += "\n" + "".join(traceback.format_exception(*record.exc_info))
    return not self._owner.write(f"{record.pathname}:{record.lineno}", text)


class LibraryErrors:
  """While installed, the libraries' error reports go to ``path``, not to the console.

  Diverted: records of level ``ERROR`` and above, or with a traceback, logged
  through ``absl.logging`` or ``asyncio``'s logger (which the libraries use: the trainer's own
  messages go through ``logging.getLogger("experiments...")`` and are not
  touched); unraisable exceptions (``sys.unraisablehook``); and uncaught
  exceptions of threads (``threading.excepthook``). The file is opened when
  the first report comes, appended to, and flushed per report. Before its
  folder exists (the trainer creates the workdir after checking the config
  and the data) reports go to the console as before; where the file cannot be
  written (the disk that failed the save is full) they are dropped.

  Args:
    path: The file, e.g. ``workdir/errors.log``.

  Example::

    with LibraryErrors(workdir / "errors.log") as errors:
      ...  # a save fails; orbax's tracebacks land in workdir/errors.log
    if errors.written:
      print(f"details in {errors.path}")
  """

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    self.count = 0
    """How many reports came (written or, where the file could not be written, dropped)."""
    self.written = 0
    """How many reports are in the file (a full disk may leave it empty)."""
    self._file = None
    self._filter = _ToFile(self)
    self._previous: tuple[Any, Any] | None = None

  def write(self, source: str, text: str) -> bool:
    """Appends one report headed by the time and ``source``: False if its folder is missing.

    A report the file cannot take (a full disk) is dropped, and True returned.
    """
    if self._file is None and not self.path.parent.is_dir():
      return False
    self.count += 1
    try:
      if self._file is None:
        self._file = open(self.path, "a", encoding="utf-8")
      self._file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {source}\n{text.rstrip()}\n")
      self._file.flush()
      self.written += 1
    except OSError:
      pass
    return True

  def _unraisable(self, unraisable: Any) -> None:
    lines = traceback.format_exception(unraisable.exc_type, unraisable.exc_value,
                                       unraisable.exc_traceback)
    where = unraisable.err_msg or "Exception ignored"
    if unraisable.object is not None:
      where += f" in {unraisable.object!r}"
    if not self.write("unraisable", f"{where}\n{''.join(lines)}"):
      (self._previous or _DEFAULT_HOOKS)[0](unraisable)

  def _thread_exception(self, args: Any) -> None:
    if args.exc_type is SystemExit:
      return
    lines = traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)
    name = args.thread.name if args.thread is not None else "?"
    if not self.write(f"thread {name}", "".join(lines)):
      (self._previous or _DEFAULT_HOOKS)[1](args)

  def install(self) -> Self:
    """Diverts the reports from now on (until :meth:`uninstall`)."""
    if self._previous is None:
      for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).addFilter(self._filter)
      self._previous = (sys.unraisablehook, threading.excepthook)
      sys.unraisablehook = self._unraisable
      threading.excepthook = self._thread_exception
    return self

  def uninstall(self) -> None:
    """Puts the console back and closes the file."""
    if self._previous is not None:
      for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).removeFilter(self._filter)
      sys.unraisablehook, threading.excepthook = self._previous
      self._previous = None
    if self._file is not None:
      try:
        self._file.close()
      except OSError:
        pass
      self._file = None

  def __enter__(self) -> Self:
    return self.install()

  def __exit__(self, *exc_info) -> None:
    self.uninstall()

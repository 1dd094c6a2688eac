"""Where the trainer's numbers go: TensorBoard event files, a JSON-lines file, the console."""

from __future__ import annotations

from collections.abc import Mapping
import json
import logging
import math
import os
import pathlib
import sys
import time
from typing import Any, TextIO

import jax
import numpy as np

from adderjax.analysis import read_metrics  # noqa: F401  (its one home; experiments read it here)
from adderjax.optim import ScaleByAdaptiveLrState

logger = logging.getLogger(__name__)


class MetricsError(RuntimeError):
  """``metrics.jsonl`` could not be written; the message names the reason and the file."""


def _json_number(value: Any) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None


def _cut_torn_line(fd: int, path: pathlib.Path) -> None:
  """Truncates the file open as ``fd`` after its last newline, if a crash tore its last record."""
  end = os.lseek(fd, 0, os.SEEK_END)
  position, tail = end, b""
  while position > 0 and b"\n" not in tail:
    step = min(position, 1 << 16)
    position -= step
    tail = os.pread(fd, step, position) + tail
  if not tail or tail.endswith(b"\n"):
    return
  keep = position + tail.rfind(b"\n") + 1  # 0 when the file holds no newline at all
  os.ftruncate(fd, keep)
  logger.warning("Dropped the unfinished last record of %s (a run stopped while writing it): "
                 "%r.", path, tail[keep - position:].decode("utf-8", "replace")[:200])


class MetricWriter:
  """Appends scalars to ``workdir/metrics.jsonl`` and to TensorBoard events in
  ``workdir/tensorboard``.

  Only process 0 writes. Every line is strict JSON: a NaN or infinite value
  (a diverging run) is written as ``null``. The JSON-lines file is appended to,
  so nothing an earlier (or interrupted) run logged is lost; after a resume,
  steps between the last checkpoint and the interruption appear twice and the
  later line is the one of the run that continued. Each record is one
  ``write`` of a whole line; one that fails (a full disk) is cut off again, and
  a record a killed run left unfinished is cut off (with a warning) when the
  file is opened, so the file always ends with a whole line.

  Raises:
    MetricsError: from the constructor or :meth:`write`, naming the reason
      (e.g. ``No space left on device``) and the file.
  """

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._fd = None
    self._tensorboard = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # Writes event files without TensorFlow.
      try:
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        _cut_torn_line(self._fd, self.path)
        self._tensorboard = SummaryWriter(logdir=str(self.path.parent / "tensorboard"),
                                          flush_secs=30)
      except OSError as e:
        self.close()
        raise MetricsError(f"Could not open the metrics: {e.strerror} "
                           f"({e.filename or self.path}).") from None

  def _append(self, line: bytes) -> None:
    end = os.lseek(self._fd, 0, os.SEEK_END)
    try:
      done = 0
      while done < len(line):  # One write unless the disk fills up mid-line.
        done += os.write(self._fd, line[done:])
    except OSError as e:
      try:
        os.ftruncate(self._fd, end)  # No half line: the file still ends with a whole record.
      except OSError:
        pass
      raise MetricsError(f"Could not write the metrics: {e.strerror} ({self.path}); the records "
                         "before this one are intact.") from None

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Records ``scalars`` at ``step``."""
    if not self.enabled:
      return
    record = {"step": int(step), "time": time.time()}
    record.update({k: _json_number(v) for k, v in scalars.items()})
    self._append((json.dumps(record, allow_nan=False) + "\n").encode("utf-8"))
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, float(value), global_step=int(step))

  def close(self) -> None:
    """Closes both files; a failure to flush the TensorBoard events is logged, not raised."""
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None
    if self._tensorboard is not None:
      try:
        self._tensorboard.close()
      except OSError as e:
        logger.warning("Could not finish the TensorBoard events: %s (%s).", e.strerror,
                       self.path.parent / "tensorboard")
      self._tensorboard = None


def adaptive_lr_scales(opt_state: Any) -> dict[str, float]:
  """Per adder kernel, the adaptive-rate factor of the last update, by parameter path.

  Reads every :class:`adderjax.optim.ScaleByAdaptiveLrState` in the optimizer
  state; the names are like ``adaptive_lr_scale/conv2/kernel``.
  """
  scales = {}
  states = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ScaleByAdaptiveLrState))
  for state in states:
    if not isinstance(state, ScaleByAdaptiveLrState):
      continue
    for path, value in jax.tree_util.tree_flatten_with_path(state.scale)[0]:
      name = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
      scales[f"adaptive_lr_scale/{name}"] = float(np.asarray(value))
  return scales


def format_duration(seconds: float, *, unknown: str = "?") -> str:
  """``3725`` -> ``'1h02m05s'``; ``unknown`` for a non-finite number."""
  if not math.isfinite(seconds):
    return unknown
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressBar:
  """A one-line console progress bar with throughput and ETA.

  On a terminal the line is redrawn in place; otherwise (logs, CI) one line is
  printed per update. The ETA counts from :meth:`compiled` on, so that the
  first step's compilation does not inflate it; until a step has been timed
  after that, it shows ``ETA —``.
  """

  def __init__(self, total_steps: int, *, enabled: bool = True, stream: TextIO | None = None,
               width: int = 24):
    self.total_steps = total_steps
    self.enabled = enabled and jax.process_index() == 0
    self.stream = stream or sys.stderr
    self.width = width
    self._interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._start_step: int | None = None
    self._start_time = 0.0

  def compiled(self, step: int) -> None:
    """Marks ``step`` as done with a compilation behind it: the ETA's rate counts from here.

    The trainer calls it after the first step (and after the first evaluation),
    whose time is mostly XLA's compilation.
    """
    self._start_step = step
    self._start_time = time.perf_counter()

  def update(self, step: int, *, images_per_sec: float, **scalars: float) -> None:
    """Shows progress at ``step`` (the number of steps done)."""
    if not self.enabled:
      return
    done = 0 if self._start_step is None else step - self._start_step
    eta = ((time.perf_counter() - self._start_time) / done * (self.total_steps - step)
           if done > 0 else float("nan"))
    fraction = step / max(self.total_steps, 1)
    filled = int(round(self.width * fraction))
    bar = "#" * filled + "." * (self.width - filled)
    extra = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
    line = (f"[{bar}] {step}/{self.total_steps} {100 * fraction:5.1f}% "
            f"{images_per_sec:,.0f} img/s ETA {format_duration(eta, unknown='—')} {extra}")
    if self._interactive:
      self.stream.write("\r" + line + " " * 4)
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.enabled and self._interactive:
      self.stream.write("\n")
      self.stream.flush()

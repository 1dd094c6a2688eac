"""Where the trainer's numbers go: TensorBoard event files, a JSON-lines file, the console."""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import numpy as np

from adderjax.optim import ScaleByAdaptiveLrState


def _json_number(value: Any) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None


class MetricWriter:
  """Appends scalars to ``workdir/metrics.jsonl`` and to TensorBoard events in ``workdir/tensorboard``.

  Only process 0 writes. Every line is strict JSON: a NaN or infinite value
  (a diverging run) is written as ``null``. The JSON-lines file is opened in append mode, so
  nothing an earlier (or interrupted) run logged is lost; after a resume, steps
  between the last checkpoint and the interruption appear twice and the later
  line is the one of the run that continued.
  """

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tensorboard = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # Writes event files without TensorFlow.
      workdir = pathlib.Path(workdir)
      self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
      self._tensorboard = SummaryWriter(logdir=str(workdir / "tensorboard"), flush_secs=30)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Records ``scalars`` at ``step``."""
    if not self.enabled:
      return
    record = {"step": int(step), "time": time.time()}
    record.update({k: _json_number(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, float(value), global_step=int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


def read_metrics(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl``, the last one kept for a repeated (step, keys) pair."""
  records: dict[tuple[int, tuple[str, ...]], dict[str, Any]] = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        records[(record["step"], tuple(sorted(record)))] = record
  return sorted(records.values(), key=lambda r: r["step"])


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


def format_duration(seconds: float) -> str:
  """``3725`` -> ``'1h02m05s'``."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressBar:
  """A one-line console progress bar with throughput and ETA.

  On a terminal the line is redrawn in place; otherwise (logs, CI) one line is
  printed per update.
  """

  def __init__(self, total_steps: int, *, start_step: int = 0, enabled: bool = True,
               stream: TextIO | None = None, width: int = 24):
    self.total_steps = total_steps
    self.enabled = enabled and jax.process_index() == 0
    self.stream = stream or sys.stderr
    self.width = width
    self._interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._start_step = start_step
    self._start_time = time.perf_counter()

  def update(self, step: int, *, images_per_sec: float, **scalars: float) -> None:
    """Shows progress at ``step`` (the number of steps done)."""
    if not self.enabled:
      return
    done = step - self._start_step
    elapsed = time.perf_counter() - self._start_time
    eta = elapsed / done * (self.total_steps - step) if done > 0 else float("inf")
    fraction = step / max(self.total_steps, 1)
    filled = int(round(self.width * fraction))
    bar = "#" * filled + "." * (self.width - filled)
    extra = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
    line = (f"[{bar}] {step}/{self.total_steps} {100 * fraction:5.1f}% "
            f"{images_per_sec:,.0f} img/s ETA {format_duration(eta)} {extra}")
    if self._interactive:
      self.stream.write("\r" + line + " " * 4)
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.enabled and self._interactive:
      self.stream.write("\n")
      self.stream.flush()

"""Whether a workdir's run is already finished, found without JAX: a rerun then exits at once.

A run is finished when its newest checkpoint is at (or past) the config's last
step, that checkpoint's save completed (its digest file exists) and
``metrics.jsonl`` holds the evaluation of that step. Only the file names and
the metrics file are read, so the command line can answer before it imports
JAX, builds the data pipeline or compiles anything.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

__all__ = ["final_checkpoint_step", "stored_result"]

DIGEST_FILE = "sha256sums.json"  # experiments.checkpoints.DIGEST_FILE, without importing JAX.


def final_checkpoint_step(workdir: str | pathlib.Path, total_steps: int) -> int | None:
  """The newest completed checkpoint's step if it is ``>= total_steps``, else None."""
  directory = pathlib.Path(workdir) / "checkpoints"
  try:
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
  except OSError:
    return None
  if not steps or max(steps) < total_steps:
    return None
  step = max(steps)
  return step if (directory / str(step) / DIGEST_FILE).is_file() else None


def stored_result(workdir: str | pathlib.Path, step: int) -> dict[str, float] | None:
  """The ``eval_*`` numbers ``metrics.jsonl`` holds for ``step`` (the last such record), or None.

  Lines that are not JSON objects (a torn last line) are skipped.
  """
  found: dict[str, Any] | None = None
  try:
    with open(pathlib.Path(workdir) / "metrics.jsonl", encoding="utf-8") as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if isinstance(record, dict) and record.get("step") == step and "eval_accuracy" in record:
          found = record
  except OSError:
    return None
  if found is None:
    return None
  return {k: float(v) for k, v in found.items() if k.startswith("eval_")
          and isinstance(v, (int, float))}

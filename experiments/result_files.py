"""JSON result files that are written atomically and never lose an earlier, different result.

:func:`write_result` writes ``path`` through a temporary file and a rename, so a
reader sees the old file or the new one, never half of one. When ``path``
already holds a different result (compared without the fields named
``volatile``, such as timings), the old file is first kept next to it as
``NAME.1.json`` (then ``NAME.2.json``, ...: the first free number), so
``path`` always holds the newest result and every earlier one stays on disk.
Rewriting the same result replaces the file and keeps nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
import itertools
import json
import os
import pathlib
from typing import Any

__all__ = ["write_result"]


def _without(record: Any, volatile: Iterable[str]) -> Any:
  if not isinstance(record, dict):
    return record
  return {k: v for k, v in record.items() if k not in set(volatile)}


def _keep(path: pathlib.Path) -> pathlib.Path:
  """Copies ``path`` to the first free ``NAME.N.json`` without ever overwriting; returns it."""
  for number in itertools.count(1):
    candidate = path.with_name(f"{path.stem}.{number}{path.suffix}")
    try:
      os.link(path, candidate)  # Atomic, and fails if the name is taken.
    except FileExistsError:
      continue
    except OSError:  # No hard links on this filesystem: copy, still refusing to overwrite.
      try:
        with open(candidate, "xb") as f:
          f.write(path.read_bytes())
      except FileExistsError:
        continue
    return candidate
  raise AssertionError("unreachable")


def write_result(path: str | os.PathLike, record: dict[str, Any], *,
                 volatile: Iterable[str] = ()) -> pathlib.Path | None:
  """Writes ``record`` as JSON to ``path``, keeping a different earlier result.

  Args:
    path: The file; its folder is created if needed.
    record: A JSON-serialisable dict.
    volatile: Fields that may differ between two runs of the same result
      (timings): ignored when comparing with the file already there.

  Returns:
    Where the earlier, different result was kept, or None if there was none
    (no file, or the same result).
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  volatile = tuple(volatile)
  kept = None
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except (OSError, ValueError):
      old = None  # Not a result this writes: kept, as any other different content.
    if _without(old, volatile) != _without(json.loads(json.dumps(record)), volatile):
      kept = _keep(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    with open(tmp, "w") as f:
      f.write(json.dumps(record, indent=2) + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return kept

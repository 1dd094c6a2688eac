"""Orbax checkpoints of the training state, named by step, under ``workdir/checkpoints``.

Every save is synchronous and followed by a digest, ``sha256sums.json``, of
each file the save wrote, kept in the step's folder. Restoring checks the
newest checkpoint against its digest, restores it and checks that every value
is finite; a checkpoint that fails is reported in one line, moved to
``workdir/checkpoints_damaged/`` (never deleted) and the next older one is
tried. If none passes, nothing is moved and :class:`CheckpointError` lists why
each failed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from experiments.guards import all_finite

__all__ = ["DIGEST_FILE", "CheckpointError", "Checkpoints", "SaveError"]

logger = logging.getLogger(__name__)

DIGEST_FILE = "sha256sums.json"
"""The digest written into each step's folder after its save: ``{"files": {path: sha256}}``."""


class CheckpointError(RuntimeError):
  """No checkpoint in the directory can be restored; the message says why for each."""


class SaveError(CheckpointError):
  """A checkpoint could not be written (disk full, permissions); earlier ones are kept."""


def _flat(state: Any) -> dict[str, Any]:
  """The state's arrays by their pytree path, e.g. ``'0/conv1/kernel/value'``.

  The optimizer state holds NamedTuples and empty marker nodes; a flat dict of
  arrays keeps the files readable and independent of how those are serialized.
  """
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in leaves}


def _all_processes(ok: bool) -> bool:
  """Whether ``ok`` holds on every process (every process must call this)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _file_digests(directory: pathlib.Path) -> dict[str, str]:
  digests = {}
  for path in sorted(directory.rglob("*")):
    if path.is_file() and path.name != DIGEST_FILE:
      sha = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          sha.update(block)
      digests[path.relative_to(directory).as_posix()] = sha.hexdigest()
  return digests


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _reason(error: BaseException) -> str:
  """Why ``error`` happened: the operating system's words for its errno, else its first line.

  The errno is found on an ``OSError`` in the chain or in TensorStore's
  ``[os_error_code='28']``: both give ``'No space left on device'``.
  """
  seen = error
  for _ in range(8):  # The error and the ones it was raised from.
    if seen is None:
      break
    if isinstance(seen, OSError) and seen.errno:
      return os.strerror(seen.errno)
    match = re.search(r"os_error_code='?(\d+)", str(seen))
    if match:
      return os.strerror(int(match.group(1)))
    seen = seen.__cause__ or seen.__context__
  return _first_line(error)


class Checkpoints:
  """Saves and restores a training state, verified by a digest per save.

  Orbax writes a checkpoint into a temporary directory and renames it when
  complete, so a run killed while saving leaves the previous checkpoints as
  they were and the partial one is never restored. Older checkpoints are only
  removed (``keep``) after a newer one has been written completely.

  Args:
    directory: Where the step directories go; damaged ones are moved to the
      sibling ``<directory>_damaged``.
    keep: How many of the newest checkpoints to keep.

  Example::

    checkpoints = Checkpoints(workdir / "checkpoints", keep=3)
    step, state = checkpoints.restore_latest(state)  # (None, state) if there is none
    checkpoints.save(100, state)
  """

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3):
    self.directory = pathlib.Path(directory).absolute()
    self.damaged_directory = self.directory.with_name(self.directory.name + "_damaged")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """Whether every process has agreed to stop at ``step`` after a preemption notice.

    JAX's preemption sync manager (multi-process runs) turns a ``SIGTERM`` to
    any process into one step at which all of them return True. Always False in
    a run without ``jax.distributed``.
    """
    return self._manager.reached_preemption(step)

  def save(self, step: int, state: Any) -> None:
    """Writes ``state`` as checkpoint ``step`` and its digest; returns when both are on disk.

    Raises:
      SaveError: if anything could not be written. The earlier checkpoints are
        untouched and the partial one is never restored.
    """
    if step in self._manager.all_steps():
      return
    try:
      self._manager.save(step, args=ocp.args.StandardSave(_flat(state)), force=True)
      self._manager.wait_until_finished()
      if jax.process_index() == 0:
        step_dir = self.directory / str(step)
        text = json.dumps({"step": step, "files": _file_digests(step_dir)}, indent=1)
        tmp = step_dir / (DIGEST_FILE + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, step_dir / DIGEST_FILE)
      _sync(f"checkpoint_digest_{step}")
    except Exception as e:
      kept = [s for s in self._manager.all_steps() if s != step]
      raise SaveError(f"Could not save the checkpoint of step {step}: {_reason(e)} (writing "
                      f"{self.directory}). The earlier checkpoints {kept} are kept.") from e

  def restore(self, step: int, like: Any) -> Any:
    """Restores checkpoint ``step`` into the structure, shapes and shardings of ``like``."""
    flat_like = _flat(like)
    abstract = {k: ocp.utils.to_shape_dtype_struct(v) for k, v in flat_like.items()}
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    missing = sorted(set(flat_like) - set(restored))
    if missing:
      raise ValueError(f"Checkpoint {step} lacks {missing[:5]}: it was written for another model "
                       "or optimizer than the config describes.")
    treedef = jax.tree.structure(like)
    return jax.tree.unflatten(treedef, [restored[k] for k in flat_like])

  def verify_files(self, step: int) -> str | None:
    """Why checkpoint ``step``'s files are damaged (one line), or None if they match the digest.

    A checkpoint without a digest (written by an older version, or a run killed
    between the save and its digest) is not checked here; :meth:`restore_latest`
    still checks that it restores and that its values are finite.
    """
    step_dir = self.directory / str(step)
    if not step_dir.is_dir() or not any(step_dir.iterdir()):
      return "its folder is empty"
    digest_path = step_dir / DIGEST_FILE
    if not digest_path.exists():
      return None
    try:
      expected = json.loads(digest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      return f"its digest {DIGEST_FILE} is unreadable ({_first_line(e)})"
    actual = _file_digests(step_dir)
    missing = sorted(set(expected) - set(actual))
    if missing:
      return f"{len(missing)} file(s) are missing, e.g. {missing[0]}"
    changed = sorted(name for name in expected if expected[name] != actual[name])
    if changed:
      return (f"{len(changed)} file(s) differ from the digest written at save time, "
              f"e.g. {changed[0]}")
    return None

  def _check(self, step: int, like: Any) -> tuple[str | None, Any]:
    """(why checkpoint ``step`` is unusable or None, the restored state); collective."""
    problem = self.verify_files(step)
    if not _all_processes(problem is None):
      return problem or "its files are damaged on another process", None
    try:
      state = self.restore(step, like)
    except Exception as e:
      state, problem = None, f"it cannot be restored ({_first_line(e)})"
    if not _all_processes(problem is None):
      return problem or "it cannot be restored on another process", None
    if not bool(all_finite(state)):
      return "it holds non-finite values (NaN or infinity)", None
    return None, state

  def _move_aside(self, step: int, problem: str) -> None:
    if jax.process_index() == 0:
      self.damaged_directory.mkdir(parents=True, exist_ok=True)
      name = f"{step}.{time.strftime('%Y%m%dT%H%M%S')}"
      target, copy = self.damaged_directory / name, 1
      while target.exists():  # Never move into (or over) an earlier one.
        target, copy = self.damaged_directory / f"{name}.{copy}", copy + 1
      shutil.move(self.directory / str(step), target)
      logger.warning("Checkpoint %d in %s is damaged: %s; moved to %s.", step, self.directory,
                     problem, target)
    _sync(f"checkpoint_moved_{step}")

  def restore_latest(self, like: Any) -> tuple[int | None, Any]:
    """The newest good checkpoint restored into ``like``: ``(step, state)``, or ``(None, like)``.

    Damaged checkpoints newer than the one restored are moved aside.

    Raises:
      CheckpointError: if there are checkpoints but none is good; nothing is moved.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    problems = []
    for step in steps:
      problem, state = self._check(step, like)
      if problem is None:
        for damaged, why in problems:
          self._move_aside(damaged, why)
        if problems:
          self._manager.reload()
        return step, state
      problems.append((step, problem))
    if problems:
      raise CheckpointError(
          f"No checkpoint in {self.directory} can be restored: "
          + "; ".join(f"step {s}: {p}" for s, p in problems)
          + ". Nothing was moved or overwritten; move them away to start afresh.")
    return None, like

  def wait(self) -> None:
    """Blocks until every save has been written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

"""Orbax checkpoints of the training state, named by step, under ``workdir/checkpoints``."""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


def _flat(state: Any) -> dict[str, Any]:
  """The state's arrays by their pytree path, e.g. ``'0/conv1/kernel/value'``.

  The optimizer state holds NamedTuples and empty marker nodes; a flat dict of
  arrays keeps the files readable and independent of how those are serialized.
  """
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in leaves}


class Checkpoints:
  """Saves and restores a training state; each save is atomic.

  Orbax writes a checkpoint into a temporary directory and renames it when
  complete, so a run killed while saving leaves the previous checkpoints as
  they were and the partial one is never restored.

  Args:
    directory: Where the step directories go.
    keep: How many of the newest checkpoints to keep.
  """

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    """Saves ``state`` as checkpoint ``step`` (asynchronously; see :meth:`wait`)."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(_flat(state)), force=True)

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

  def wait(self) -> None:
    """Blocks until every save has been written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

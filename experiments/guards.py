"""The NaN/Inf guards: `all_finite`, and the divergence guard.

The divergence guard is what the trainer does when a step's loss or state is not finite.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["NONFINITE_ACTIONS", "Diverged", "DivergenceGuard", "all_finite"]

logger = logging.getLogger(__name__)

NONFINITE_ACTIONS = ("stop", "skip")
"""``config.on_nonfinite``: stop the run with :class:`Diverged`, or skip the step's update."""


def all_finite(tree: Any) -> jax.Array:
  """A boolean scalar: whether every floating-point value in ``tree`` is finite.

  Traceable: the trainer's jitted step computes it on the updated state, and the
  checkpoints check a restored state with it.

  Example:
    >>> import jax.numpy as jnp
    >>> bool(all_finite({"w": jnp.ones(3), "step": jnp.int32(1)}))
    True
    >>> bool(all_finite([jnp.array([1.0, jnp.nan])]))
    False
  """
  flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


class Diverged(RuntimeError):
  """The training loss or state became non-finite; the message names the step."""


class DivergenceGuard:
  """Collects each step's finiteness flag and acts on it at the trainer's check points.

  The flags stay on the device until :meth:`check`, so the training loop is not
  synchronised every step; the trainer checks before it logs, evaluates or
  saves, so a non-finite state is never saved. With ``"skip"`` the jitted step
  has already kept the previous state for a non-finite step, and the guard only
  counts such steps, stopping after ``max_consecutive_skips`` in a row.

  Args:
    action: One of :data:`NONFINITE_ACTIONS`.
    max_consecutive_skips: With ``"skip"``, how many steps in a row may be skipped.

  Example::

    guard = DivergenceGuard("stop")
    guard.record(step, metrics["finite"])
    guard.check()  # raises Diverged naming the first non-finite step
  """

  def __init__(self, action: str, *, max_consecutive_skips: int = 10):
    if action not in NONFINITE_ACTIONS:
      raise ValueError(f"config.on_nonfinite must be one of {NONFINITE_ACTIONS}, got {action!r}.")
    self.action = action
    self.max_consecutive_skips = max_consecutive_skips
    self.skipped_steps: list[int] = []
    self._consecutive = 0
    self._pending: list[tuple[int, Any]] = []

  def record(self, step: int, finite: Any) -> None:
    """Notes step ``step``'s flag (a device boolean: loss and new state all finite)."""
    self._pending.append((step, finite))

  def check(self) -> None:
    """Acts on the flags recorded since the last check.

    Raises:
      Diverged: with ``"stop"``, at the first non-finite step; with ``"skip"``,
        after ``max_consecutive_skips`` skipped steps in a row.
    """
    if not self._pending:
      return
    steps = [step for step, _ in self._pending]
    flags = np.asarray(jax.device_get([flag for _, flag in self._pending]), dtype=bool)
    self._pending = []
    for step, finite in zip(steps, flags):
      if finite:
        self._consecutive = 0
        continue
      if self.action == "stop":
        raise Diverged(
            f"Diverged at step {step}: the training loss or the updated state is not finite "
            "(config.on_nonfinite='stop'). Nothing after the last checkpoint was saved; lower "
            "config.learning_rate or set config.on_nonfinite='skip'.")
      self.skipped_steps.append(step)
      self._consecutive += 1
      logger.warning("Step %d skipped: its loss or update was not finite "
                     "(config.on_nonfinite='skip'); %d skipped so far.", step,
                     len(self.skipped_steps))
      if self._consecutive >= self.max_consecutive_skips:
        raise Diverged(
            f"Diverged at step {step}: {self._consecutive} steps in a row had a non-finite loss "
            f"or update and were skipped (config.max_consecutive_skips="
            f"{self.max_consecutive_skips}); lower config.learning_rate.")

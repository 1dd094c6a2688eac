"""The schedule of the adder layers' exponent p: ``config.adder_p_schedule``.

The lp AdderNets (Chen et al., "Adder Neural Networks", TPAMI,
arXiv:2105.14202; Winograd AdderNet, ICML 2021, "l2-to-l1 training") start
with ``-sum |X - F|^2`` and bring ``p`` down to 1 during training. The
schedule is a string, so that it fits on the command line:

- ``""`` (default): no exponent; the layers are the L1 AdderNet layers, with
  the fastest kernels and no :class:`adderjax.nn.AdderExponent` in the state.
- ``"constant:P"``: ``p = P`` throughout.
- ``"linear:P0:P1:F"`` or ``"cosine:P0:P1:F"``: from ``P0`` to ``P1`` over the
  first fraction ``F`` of the training steps (linearly, or along half a cosine
  period), then ``P1``. ``"cosine:2:1:0.5"`` anneals from 2 to 1 over the
  first half of training; the second half trains at ``p = 1`` exactly, with
  the paper's gradients and the L1 kernels.

Every ``P`` lies in ``[1, 2]`` and ``0 < F <= 1``. The trainer evaluates the
schedule inside its jitted step at the optimizer's step count, so ``p``
changes without a recompilation, and logs it as ``adder_p``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from adderjax.ops.spec import P_RANGE

__all__ = ["KINDS", "PSchedule", "parse"]

KINDS = ("constant", "linear", "cosine")
_FORMS = '"constant:P", "linear:P0:P1:F" or "cosine:P0:P1:F"'


@dataclasses.dataclass(frozen=True)
class PSchedule:
  """A parsed ``config.adder_p_schedule``.

  Example:
    >>> from experiments.adder_p import parse
    >>> schedule = parse("cosine:2:1:0.5")
    >>> [round(float(schedule.at(step, total_steps=10)), 3) for step in (0, 1, 5, 9)]
    [2.0, 1.905, 1.0, 1.0]

  Attributes:
    kind: ``"constant"``, ``"linear"`` or ``"cosine"``.
    start: ``p`` at step 0.
    end: ``p`` from the end of the ramp on.
    fraction: the part of the training steps the ramp takes.
  """

  kind: str
  start: float
  end: float
  fraction: float

  def at(self, count: jax.Array | int, *, total_steps: int) -> jax.Array:
    """``p`` for the update after ``count`` updates (traceable): a float32 scalar."""
    ramp_steps = max(1, round(self.fraction * total_steps))
    t = jnp.clip(jnp.asarray(count, jnp.float32) / ramp_steps, 0.0, 1.0)
    shape = t if self.kind == "linear" else 0.5 * (1.0 - jnp.cos(jnp.pi * t))
    value = self.start + (self.end - self.start) * shape
    low, high = min(self.start, self.end), max(self.start, self.end)
    # The exact end value after the ramp: p == 1 selects the paper's gradients and kernels.
    value = jnp.where(t >= 1.0, self.end, jnp.clip(value, low, high))
    return value.astype(jnp.float32)


def _error(text: object, problem: str) -> ValueError:
  return ValueError(f"config.adder_p_schedule must be \"\" or {_FORMS}, with every P in "
                    f"[{P_RANGE[0]:g}, {P_RANGE[1]:g}] and 0 < F <= 1; {problem}, got "
                    f"config.adder_p_schedule={text!r}.")


def _number(text: str, part: str, what: str) -> float:
  try:
    value = float(part)
  except ValueError:
    raise _error(text, f"{what} {part!r} is not a number") from None
  if not math.isfinite(value):
    raise _error(text, f"{what} is {part}")
  return value


def parse(text: str) -> PSchedule | None:
  """Parses ``config.adder_p_schedule``: None for ``""``, else a :class:`PSchedule`.

  Raises:
    ValueError: naming ``config.adder_p_schedule``, for any other form or a
      value out of range.
  """
  if not isinstance(text, str):
    raise _error(text, "it is not a string")
  if not text.strip():
    return None
  kind, *parts = [part.strip() for part in text.split(":")]
  if kind not in KINDS:
    raise _error(text, f"the kind {kind!r} is not one of {KINDS}")
  if len(parts) != (1 if kind == "constant" else 3):
    raise _error(text, f"{kind!r} takes {1 if kind == 'constant' else 3} numbers after it")
  names = ("P",) if kind == "constant" else ("P0", "P1", "F")
  values = [_number(text, part, what) for part, what in zip(parts, names)]
  for what, p in zip(names[:2], values[:2]):
    if not P_RANGE[0] <= p <= P_RANGE[1]:
      raise _error(text, f"{what}={p:g} is out of range")
  start, end, fraction = values if kind != "constant" else (values[0], values[0], 1.0)
  if not 0 < fraction <= 1:
    raise _error(text, f"F={fraction:g} is out of range")
  return PSchedule(kind, start, end, fraction)

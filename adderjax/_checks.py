"""Argument checks shared by `adderjax.ops`, `adderjax.nn`, `adderjax.linen` and the models.

Each raises a ValueError that names the argument and its value.
"""

from __future__ import annotations

from collections.abc import Sequence
import numbers
from typing import Any

__all__ = ["ZERO_PADDINGS", "Padding2D", "canonical_padding", "check_groups", "is_int",
           "positive_int", "positive_pair"]

ZERO_PADDINGS = ("SAME", "SAME_LOWER", "VALID")
"""The padding strings of `jax.lax.conv_general_dilated`: zeros around the input."""

Padding2D = str | tuple[tuple[int, int], tuple[int, int]]


def is_int(value: Any) -> bool:
  """Whether ``value`` is an integer (Python or NumPy), not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(value: Any, name: str) -> int:
  """``value`` as an int if it is a positive int, else a ValueError naming ``name``."""
  if not is_int(value) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {name}={value!r}.")
  return int(value)


def positive_pair(value: Any, name: str) -> tuple[int, int]:
  """An int ``n`` as ``(n, n)``, or a pair of ints; all positive, else a ValueError."""
  if is_int(value):
    pair = (value, value)
  elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
    pair = tuple(value)
  else:
    raise ValueError(
        f"{name} must be an int or a pair of ints (adder layers are 2-D), got {name}={value!r}.")
  if not all(is_int(v) for v in pair):
    raise ValueError(f"{name} must be an int or a pair of ints, got {name}={value!r}.")
  if min(pair) < 1:
    raise ValueError(f"{name} must be positive, got {name}={value!r}.")
  return int(pair[0]), int(pair[1])


def canonical_padding(padding: Any, modes: Sequence[str] = ZERO_PADDINGS) -> Padding2D:
  """Validates a 2-D ``padding`` and returns an upper-case string or 2 ``(low, high)`` pairs.

  Args:
    padding: one of ``modes`` (any case); an int for the same padding on
      every side; or a sequence of 2 entries, each an int or a
      ``(low, high)`` pair of ints, all non-negative.
    modes: the padding strings accepted.

  Returns:
    The upper-case string, or ``((top, bottom), (left, right))``.
  """
  modes = tuple(modes)
  expected = (f"padding must be one of {modes}, an int, or a sequence of 2 ints or "
              f"(low, high) pairs (adder layers are 2-D), got padding={padding!r}.")
  if isinstance(padding, str):
    if padding.upper() not in modes:
      raise ValueError(expected)
    return padding.upper()
  if is_int(padding):
    pads = [padding, padding]
  elif isinstance(padding, Sequence) and len(padding) == 2:
    pads = list(padding)
  else:
    raise ValueError(expected)
  pairs = []
  for p in pads:
    pair = (p, p) if is_int(p) else p
    if not (isinstance(pair, Sequence) and len(pair) == 2 and all(is_int(v) for v in pair)):
      raise ValueError(f"Each entry of padding must be an int or a (low, high) pair of ints, "
                       f"got padding={padding!r}.")
    if min(pair) < 0:
      raise ValueError(f"padding must be non-negative, got padding={padding!r}.")
    pairs.append((int(pair[0]), int(pair[1])))
  return tuple(pairs)  # type: ignore[return-value]


def check_groups(in_features: int, out_features: int, feature_group_count: int, *,
                 out_name: str = "out_features") -> None:
  """A ValueError unless ``feature_group_count`` divides both feature counts."""
  if in_features % feature_group_count:
    raise ValueError(f"in_features={in_features} is not divisible by "
                     f"feature_group_count={feature_group_count}.")
  if out_features % feature_group_count:
    raise ValueError(f"{out_name}={out_features} is not divisible by "
                     f"feature_group_count={feature_group_count}.")

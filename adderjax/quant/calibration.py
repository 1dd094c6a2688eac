"""Calibrating the input range of each adder layer on some batches.

Per batch, a high percentile of ``|x|`` (Nie et al. use about the 99.94th)
and the minimum of ``x``; over the batches, the running maximum of the
percentile, floored at ``1e-3``, and whether any input was negative.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

__all__ = ["DEFAULT_PERCENTILE", "RANGE_FLOOR", "InputRange", "adder_layers", "observe_inputs",
           "replace_module"]

DEFAULT_PERCENTILE = 99.94
RANGE_FLOOR = 1e-3


@dataclasses.dataclass(frozen=True)
class InputRange:
  """The calibrated input range of one layer.

  Attributes:
    range: the running max over batches of the per-batch percentile of
      ``|x|``, floored at `RANGE_FLOOR`.
    minimum: the smallest input seen.
  """

  range: float
  minimum: float

  @property
  def signed(self) -> bool:
    """Whether an input was negative, so that the signed quantizer is needed."""
    return self.minimum < 0.0


class _Observation(nnx.Variable):
  """What a probe saw on the last batch."""


class _Probe(nnx.Module):
  """Wraps a layer: records statistics of its input, then calls it."""

  def __init__(self, layer: nnx.Module, percentile: float, thresholds: jax.Array | None):
    self.layer = layer
    self.percentile = percentile
    self.abs_percentile = _Observation(jnp.zeros((), jnp.float32))
    self.minimum = _Observation(jnp.zeros((), jnp.float32))
    count = 1 if thresholds is None else thresholds.shape[0]
    self.thresholds = _Observation(jnp.full((count,), jnp.inf, jnp.float32) if thresholds is None
                                   else jnp.asarray(thresholds, jnp.float32))
    self.clipped = _Observation(jnp.zeros((count,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    magnitude = jnp.abs(x.astype(jnp.float32)).reshape(-1)
    self.abs_percentile[...] = jnp.percentile(magnitude, self.percentile)
    self.minimum[...] = jnp.min(x).astype(jnp.float32)
    self.clipped[...] = jnp.mean(magnitude[None, :] > self.thresholds[...][:, None], axis=1)
    return self.layer(x)


def adder_layers(model: nnx.Module, types: tuple[type, ...]) -> list[tuple[tuple, nnx.Module]]:
  """The ``(path, module)`` of each module of one of ``types``, in graph order."""
  return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, types)]


def replace_module(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  """Puts ``new`` where ``path`` (from `nnx.iter_modules`) leads in ``model``."""
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(path[-1], int):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def _call(model: nnx.Module, batch: Any) -> Any:
  return model(batch)


@nnx.jit(static_argnums=2)
def _run(model: nnx.Module, batch: Any, apply: Callable[[nnx.Module, Any], Any]) -> None:
  apply(model, batch)


def observe_inputs(
    model: nnx.Module,
    paths: Sequence[tuple],
    batches: Sequence[Any],
    *,
    percentile: float = DEFAULT_PERCENTILE,
    thresholds: Sequence[jax.Array] | None = None,
    apply: Callable[[nnx.Module, Any], Any] | None = None,
) -> tuple[list[InputRange], list[jax.Array]]:
  """Runs ``model`` (in eval mode) on ``batches`` and summarizes the inputs of the layers at
  ``paths``.

  The model is wrapped in place while it runs and restored afterwards.

  Args:
    model: the model; its BatchNorms use their running statistics.
    paths: where the layers are (`adder_layers`).
    batches: the inputs.
    percentile: the percentile of ``|x|`` taken per batch.
    thresholds: per layer, scales ``(G,)`` to measure the fraction of inputs
      above (``|x| > s``); None for none.
    apply: ``apply(model, batch)`` runs the model; defaults to ``model(batch)``.

  Returns:
    ``(ranges, clipped)``: each layer's `InputRange`, and the mean over the
    batches of the fraction of its inputs above each threshold.
  """
  layers = [_module_at(model, path) for path in paths]
  probes = [_Probe(layer, percentile, None if thresholds is None else thresholds[i])
            for i, layer in enumerate(layers)]
  for path, probe in zip(paths, probes):
    replace_module(model, path, probe)
  model.eval()
  try:
    ranges = [0.0] * len(paths)
    minima = [float("inf")] * len(paths)
    clipped = [jnp.zeros_like(p.clipped[...]) for p in probes]
    for batch in batches:
      _run(model, batch, apply or _call)
      for i, probe in enumerate(probes):
        ranges[i] = max(ranges[i], float(probe.abs_percentile[...]))
        minima[i] = min(minima[i], float(probe.minimum[...]))
        clipped[i] = clipped[i] + probe.clipped[...]
  finally:
    for path, layer in zip(paths, layers):
      replace_module(model, path, layer)
  count = len(batches)
  return ([InputRange(max(r, RANGE_FLOOR), m) for r, m in zip(ranges, minima)],
          [c / count for c in clipped])


def _module_at(model: nnx.Module, path: tuple) -> nnx.Module:
  module = model
  for key in path:
    module = module[key] if isinstance(key, int) else getattr(module, key)
  return module

"""Recomputing BatchNorm running statistics over training batches, or shifting them to a derived
model."""

from __future__ import annotations

from collections.abc import Callable, Iterable
import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

__all__ = ["recompute_batch_norm_stats", "shift_batch_norm_stats"]


def _call(model: nnx.Module, batch: Any) -> Any:
  return model(batch)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batch_moments(graphdef: nnx.GraphDef, apply: Callable[[nnx.Module, Any], Any],
                   stats: nnx.State, rest: nnx.State, batch: Any) -> nnx.State:
  """Each BatchNorm's (mean, var) of ``batch``, in float32; cached across calls and models."""
  model = nnx.merge(graphdef, stats, rest)
  apply(model, batch)
  return jax.tree.map(lambda s: s.astype(jnp.float32), nnx.state(model, nnx.BatchStat))


def _batch_norms(model: nnx.Module) -> list[nnx.BatchNorm]:
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]


def recompute_batch_norm_stats(
    model: nnx.Module,
    batches: Iterable[Any],
    *,
    apply: Callable[[nnx.Module, Any], Any] | None = None,
) -> int:
  """Replaces every BatchNorm's running statistics by their value over ``batches``.

  The running averages that training leaves behind lag the weights, and adder
  layers, whose outputs have a large mean that moves as the kernels learn,
  suffer more from the lag than convolutions. This recomputes them exactly:
  each BatchNorm's ``mean`` becomes the mean of its input over all the
  batches and ``var`` the variance over all of them (batches of equal size are
  weighted equally), with the model's weights fixed. While the statistics are
  gathered, every BatchNorm normalizes with the batch's own statistics, as in
  training (the "precise BN" of Wu and Johnson, 2021). BatchNorm ``momentum``
  and ``use_running_average`` are restored afterwards.

  Args:
    model: The model, changed in place.
    batches: The inputs, each passed to ``apply``: e.g. some training batches
      (with the training augmentation).
    apply: ``apply(model, batch)`` runs the model; defaults to
      ``model(batch)``. It is compiled with ``jax.jit``, once per model
      structure and ``apply`` (pass the same function to reuse it).

  Returns:
    The number of batches used.

  Raises:
    ValueError: If the model has no BatchNorm or ``batches`` is empty.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from adderjax.models.batch_norm_stats import recompute_batch_norm_stats
    >>> model = nnx.BatchNorm(1, rngs=nnx.Rngs(0))
    >>> recompute_batch_norm_stats(model, [jnp.array([[1.0], [3.0]]), jnp.array([[5.0], [7.0]])])
    2
    >>> print(model.mean[...], model.var[...])
    [4.] [5.]
  """
  moments, stats, count = _measure(model, batches, apply)
  nnx.update(model, jax.tree.map(lambda new, old: new.astype(old.dtype), moments, stats))
  return count


def shift_batch_norm_stats(
    model: nnx.Module,
    reference: nnx.Module,
    batches: Iterable[Any],
    *,
    apply: Callable[[nnx.Module, Any], Any] | None = None,
) -> int:
  """Moves ``model``'s BatchNorm statistics by how its BatchNorm inputs differ from ``reference``'s.

  For a model derived from ``reference`` that still holds its running
  statistics (e.g. one quantized by `adderjax.quant.quantize`): each
  BatchNorm's mean moves by the difference between the two models' means of
  its input over ``batches``, and its variance is scaled by the ratio of their
  variances, both measured as `recompute_batch_norm_stats` measures. The two
  models see the same images, so the sampling noise of a few batches cancels
  in the difference and only what the derivation changed remains: a model
  that computes what ``reference`` computes keeps the statistics exactly.
  Recomputing them outright on a few batches instead replaces running
  averages estimated over many more images by a noisier estimate (LeNet-5-BN
  on MNIST, 8 batches of 128: its float model's test loss rises 1.5-2% and its
  accuracy moves by up to 0.1 points, where quantization to 16 bits changes
  nothing; ``benchmarks/quant_batch_norm.py``).

  Args:
    model: The derived model, changed in place.
    reference: The model whose statistics ``model`` holds; not changed.
    batches: The inputs, each passed to ``apply``; iterated once (kept in a list).
    apply: ``apply(model, batch)`` runs either model; defaults to ``model(batch)``.

  Returns:
    The number of batches used.

  Raises:
    ValueError: If a model has no BatchNorm, their BatchNorms differ, or
      ``batches`` is empty.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from adderjax.models.batch_norm_stats import shift_batch_norm_stats
    >>> reference = nnx.Sequential(lambda x: 2 * x, nnx.BatchNorm(1, rngs=nnx.Rngs(0)))
    >>> model = nnx.Sequential(lambda x: 2 * x + 1, nnx.BatchNorm(1, rngs=nnx.Rngs(0)))
    >>> shift_batch_norm_stats(model, reference, [jnp.array([[1.0], [3.0]])])
    1
    >>> print(model.layers[1].mean[...], model.layers[1].var[...])  # From 0 and 1: +1, x1.
    [1.] [1.]
  """
  batches = list(batches)
  measured, stats, count = _measure(model, batches, apply)
  expected, _, _ = _measure(reference, batches, apply)
  paths = [sorted(dict(nnx.to_flat_state(t))) for t in (measured, expected)]
  if paths[0] != paths[1]:
    raise ValueError(f"model and reference have different BatchNorms: {paths[0][:4]} ... against "
                     f"{paths[1][:4]} ...")

  def shifted(mean, got_mean, want_mean, var, got_var, want_var):
    ratio = jnp.where(want_var > 0, got_var / jnp.where(want_var > 0, want_var, 1.0), 1.0)
    return mean + (got_mean - want_mean), var * ratio

  moments = _map_norm_stats(shifted, stats, measured, expected)
  nnx.update(model, jax.tree.map(lambda new, old: new.astype(old.dtype), moments, stats))
  return count


def _measure(model: nnx.Module, batches: Iterable[Any],
             apply: Callable[[nnx.Module, Any], Any] | None
             ) -> tuple[nnx.State, nnx.State, int]:
  """(each BatchNorm's (mean, var) over ``batches``, its current statistics, the batch count)."""
  norms = _batch_norms(model)
  if not norms:
    raise ValueError("model has no nnx.BatchNorm whose statistics could be recomputed.")
  apply = apply or _call
  saved = [(bn.momentum, bn.use_running_average) for bn in norms]
  for bn in norms:
    # With momentum 0 a training-mode call leaves exactly the batch's statistics.
    bn.momentum, bn.use_running_average = 0.0, False
  try:
    graphdef, stats, rest = nnx.split(model, nnx.BatchStat, ...)
    count, first, second = 0, None, None
    for batch in batches:
      moments = _batch_moments(graphdef, apply, stats, rest, batch)
      squares = _second_moments(moments)
      if count == 0:
        first, second = moments, squares
      else:
        first = jax.tree.map(jnp.add, first, moments)
        second = jax.tree.map(jnp.add, second, squares)
      count += 1
    if count == 0:
      raise ValueError("batches is empty: at least one batch is needed.")
    mean = jax.tree.map(lambda s: s / count, first)
    moments = _from_second_moments(mean, jax.tree.map(lambda s: s / count, second))
  finally:
    for bn, (momentum, use_running_average) in zip(norms, saved):
      bn.momentum, bn.use_running_average = momentum, use_running_average
  return moments, stats, count


def _map_norm_stats(fn: Callable[..., tuple[jax.Array, jax.Array]], *trees: nnx.State) -> nnx.State:
  """Applies ``fn(*means, *vars) -> (mean, var)`` to each BatchNorm's statistics in ``trees``."""
  flats = [dict(nnx.to_flat_state(t)) for t in trees]
  out = dict(flats[0])
  for path in flats[0]:
    if path[-1] != "mean":
      continue
    var_path = path[:-1] + ("var",)
    new_mean, new_var = fn(*[f[path][...] for f in flats], *[f[var_path][...] for f in flats])
    out[path] = out[path].replace(new_mean)
    out[var_path] = out[var_path].replace(new_var)
  return nnx.from_flat_state(out)


def _second_moments(moments: nnx.State) -> nnx.State:
  """(mean, var) -> (mean, E[x^2])."""
  return _map_norm_stats(lambda mean, var: (mean, var + mean * mean), moments)


def _from_second_moments(mean: nnx.State, second: nnx.State) -> nnx.State:
  """(E[x], E[x^2]) -> (E[x], Var[x])."""
  return _map_norm_stats(
      lambda mean, _, __, square: (mean, jnp.maximum(square - mean * mean, 0.0)), mean, second)

"""BatchNorm in training mode with its ReLU and residual add, as one op (native on CPU).

``batch_norm_act(y, scale, bias, residual)`` is what ``relu(bn(y) + residual)``
computes with an `nnx.BatchNorm` in training mode: the batch statistics over
every axis but the last, the normalisation, the residual add and the ReLU,
with the batch mean and (biased) variance returned for the running averages.
XLA runs that as a reduction and two elementwise passes that each write an
activation, and as as many more for the gradient; the native kernels
(``csrc/batch_norm_cpu.cc``) take two passes forward (statistics, then the
output) and two backward (the two sums, then the input and residual
gradients), the work shared over XLA's threads.

The statistics are summed around a shift (each channel's first value), in
float within chunks of rows and in double across them, in a fixed order: an
adder layer's output has an offset of thousands over a spread of a few units,
where ``E[y^2] - E[y]^2`` (`nnx.BatchNorm`'s default ``use_fast_variance``)
loses the variance in float32. Both implementations compute them this way:

- ``"cpu"``: the native kernels (float32 only), with a `jax.custom_vjp`;
- ``"xla"``: the same formulas in `jax.numpy`, differentiated by JAX (any float dtype).

``implementation=None`` takes ``"cpu"`` where it can run (float32 on the CPU
backend, the native library built), else ``"xla"``.

Example:
  >>> import jax.numpy as jnp
  >>> from adderjax.ops.batch_norm import batch_norm_act
  >>> y = jnp.array([[-3000.0, 1.0], [-3002.0, 3.0]])
  >>> a, mean, var = batch_norm_act(y, jnp.ones(2), jnp.zeros(2), epsilon=0.0)
  >>> a.tolist(), mean.tolist(), var.tolist()
  ([[1.0, 0.0], [0.0, 1.0]], [-3001.0, 2.0], [1.0, 1.0])
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from adderjax.ops import cpu_native, native_build

__all__ = ["IMPLEMENTATIONS", "BatchNormImplementation", "apply_batch_statistics",
           "batch_norm_act", "batch_norm_relu_backward", "batch_statistics", "native_supported"]

BatchNormImplementation = Literal["cpu", "xla"]
IMPLEMENTATIONS: tuple[BatchNormImplementation, ...] = ("cpu", "xla")


def _check_operands(y, scale, bias, residual) -> None:
  if not isinstance(y, jax.Array | np.ndarray) or y.ndim < 1:
    raise ValueError(f"y must be an array with the channels last, got y of shape "
                     f"{getattr(y, 'shape', None)}.")
  if y.size == 0:
    raise ValueError(f"y must have at least one element to take statistics over, got y of "
                     f"shape {y.shape}.")
  channels = y.shape[-1]
  for name, value in (("scale", scale), ("bias", bias)):
    if jnp.shape(value) != (channels,):
      raise ValueError(f"{name} must have shape ({channels},) (y's channels), got "
                       f"{name} of shape {jnp.shape(value)}.")
  if residual is not None and jnp.shape(residual) != y.shape:
    raise ValueError(f"residual must have y's shape {y.shape}, got residual of shape "
                     f"{jnp.shape(residual)}.")


def native_supported(y: jax.Array, *others: jax.Array | None) -> str | None:
  """Why the native kernels cannot run on ``y``, or None.

  ``others`` are the other operands, in the order scale, bias, residual, mean, var (None for
  one that is absent).
  """
  if jax.default_backend() != "cpu":
    return f"they run on the CPU backend, this is {jax.default_backend()!r}"
  for name, value in zip(("y", "scale", "bias", "residual", "mean", "var"), (y, *others)):
    if value is not None and jnp.dtype(jnp.result_type(value)) != jnp.float32:
      return f"they take float32, {name} is {jnp.dtype(jnp.result_type(value)).name}"
  if not cpu_native.available():
    return f"the native library is not available ({cpu_native.unavailable_reason()})"
  return None


def batch_norm_act(y: jax.Array, scale: jax.Array, bias: jax.Array,
                   residual: jax.Array | None = None, *, epsilon: float = 1e-5,
                   relu: bool = True, implementation: BatchNormImplementation | None = None,
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``relu((y - mean) * scale * rsqrt(var + epsilon) + bias + residual)`` with batch statistics.

  Args:
    y: the layer's output, channels last; the statistics reduce every other axis.
    scale: the BatchNorm's scale, ``(C,)``.
    bias: the BatchNorm's bias, ``(C,)``.
    residual: added after the normalisation, before the ReLU (``y``'s shape), or None.
    epsilon: added to the variance.
    relu: whether to apply the ReLU (else the identity).
    implementation: ``"cpu"`` (native kernels), ``"xla"``, or None (``"cpu"`` where it can
      run, else ``"xla"``).

  Returns:
    ``(out, mean, var)``: the output, and the batch mean and biased variance per channel
    (without gradient: they are what the running averages follow).

  Raises:
    ValueError: for operands of the wrong shape, or an unknown ``implementation``, or
      ``implementation="cpu"`` where the native kernels cannot run (saying why).
  """
  _check_operands(y, scale, bias, residual)
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got "
                     f"implementation={implementation!r}.")
  reason = (native_supported(y, scale, bias, residual) if implementation != "xla"
            else "xla was asked for")
  if implementation == "cpu" and reason is not None:
    raise ValueError(f"implementation='cpu' cannot run here: {reason}; use "
                     "implementation='xla' or None.")
  if reason is None:
    out, mean, var = _native(y, scale, bias, residual, float(epsilon), bool(relu),
                             residual is not None)
  else:
    out, mean, var = _reference(y, scale, bias, residual, float(epsilon), bool(relu))
  return out, lax.stop_gradient(mean), lax.stop_gradient(var)


def apply_batch_statistics(y: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array,
                           bias: jax.Array, residual: jax.Array | None = None, *,
                           epsilon: float = 1e-5, relu: bool = True) -> jax.Array:
  """`batch_norm_act`'s output for batch statistics summed elsewhere (native kernels only).

  ``mean`` and ``var`` must be the batch mean and biased variance of ``y`` per channel, as the
  adder forward sums them in its epilogue (`adderjax.ops.adder_batch_norm`): the forward applies
  them in one pass over ``y``, and the gradient is `batch_norm_act`'s, through the statistics
  as functions of ``y``; ``mean`` and ``var`` themselves get none (zeros).

  Args:
    y: the layer's output, channels last.
    mean: its batch mean per channel, ``(C,)``.
    var: its biased batch variance per channel, ``(C,)``.
    scale: the BatchNorm's scale, ``(C,)``.
    bias: the BatchNorm's bias, ``(C,)``.
    residual: added after the normalisation, before the ReLU (``y``'s shape), or None.
    epsilon: added to the variance.
    relu: whether to apply the ReLU.

  Returns:
    ``relu((y - mean) * scale * rsqrt(var + epsilon) + bias + residual)``.

  Raises:
    ValueError: for operands of the wrong shape, or where the native kernels cannot run
      (saying why).
  """
  _check_operands(y, scale, bias, residual)
  for name, value in (("mean", mean), ("var", var)):
    if jnp.shape(value) != (y.shape[-1],):
      raise ValueError(f"{name} must have shape ({y.shape[-1]},) (y's channels), got "
                       f"{name} of shape {jnp.shape(value)}.")
  reason = native_supported(y, scale, bias, residual, mean, var)
  if reason is not None:
    raise ValueError(f"apply_batch_statistics runs the native kernels, which cannot run here: "
                     f"{reason}.")
  return _native_apply(y, scale, bias, residual, mean, var, float(epsilon), bool(relu),
                       residual is not None)


def batch_norm_relu_backward(d_out: jax.Array, y: jax.Array, mean: jax.Array, var: jax.Array,
                             scale: jax.Array, bias: jax.Array, *, epsilon: float = 1e-5,
                             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The gradient of ``relu(BatchNorm(y))`` in training mode (native kernels, float32).

  For a kernel that applies the BatchNorm and ReLU where it reads ``y`` (`adderjax.ops.
  adder_batch_norm`) and so needs their gradient in its own backward: `batch_norm_act`'s, with
  ``mean`` and ``var`` the batch statistics of ``y``, the ReLU's mask computed from ``y``.

  Returns:
    ``(dy, dscale, dbias)`` for the cotangent ``d_out`` of the output.
  """
  saved = (y, _empty(), scale, bias, mean, var)
  dy, dscale, dbias, _ = _native_backward(float(epsilon), True, False, saved, (d_out,))
  return dy, dscale, dbias


def batch_statistics(y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The batch mean and biased variance per channel (the last axis) of ``y``, in `jax.numpy`.

  Summed around each channel's first value, as `batch_norm_act` sums them; differentiable.
  """
  return _statistics(y)


def _statistics(y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The batch mean and biased variance per channel, summed around each channel's first value."""
  axes = tuple(range(y.ndim - 1))
  shift = lax.stop_gradient(y.reshape(-1, y.shape[-1])[0])
  centred = y - shift
  m = jnp.mean(centred, axes)
  var = jnp.maximum(0.0, jnp.mean(jnp.square(centred), axes) - jnp.square(m))
  return shift + m, var


def _reference(y, scale, bias, residual, epsilon, relu):
  """The op in `jax.numpy`, for any float dtype; JAX differentiates it."""
  mean, var = _statistics(y)
  out = (y - mean) * (lax.rsqrt(var + epsilon) * scale) + bias
  if residual is not None:
    out = out + residual
  return (jax.nn.relu(out) if relu else out), mean, var


def _call(target, shapes, *args, epsilon, relu):
  call = jax.ffi.ffi_call(target, shapes, vmap_method="sequential")
  return call(*args, epsilon=np.float32(epsilon), relu=np.int64(relu))


def _empty() -> jax.Array:
  return jnp.zeros((0,), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _native(y, scale, bias, residual, epsilon, relu, with_residual):
  return _native_forward(y, scale, bias, residual, epsilon, relu, with_residual)[0]


def _native_forward(y, scale, bias, residual, epsilon, relu, with_residual):
  channels = jax.ShapeDtypeStruct((y.shape[-1],), jnp.float32)
  out, mean, var = _call(native_build.BATCH_NORM_TARGET,
                         (jax.ShapeDtypeStruct(y.shape, jnp.float32), channels, channels),
                         y, scale, bias, residual if with_residual else _empty(),
                         epsilon=epsilon, relu=relu)
  # The backward finds the ReLU's mask in the output, or, without a residual, computes it again
  # from y (one pass less over an activation, and the output need not be kept).
  mask_source = out if relu and with_residual else _empty()
  return (out, mean, var), (y, mask_source, scale, bias, mean, var)


def _native_backward(epsilon, relu, with_residual, saved, cotangents):
  y, mask_source, scale, bias, mean, var = saved
  d_out = cotangents[0]  # mean and var leave without gradient (batch_norm_act's stop_gradient)
  channels = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
  d_residual = jax.ShapeDtypeStruct(y.shape if with_residual else (0,), jnp.float32)
  dy, dscale, dbias, dr = _call(native_build.BATCH_NORM_GRAD_TARGET,
                                (jax.ShapeDtypeStruct(y.shape, jnp.float32), channels, channels,
                                 d_residual),
                                d_out, y, mask_source, scale, bias, mean, var, epsilon=epsilon,
                                relu=relu)
  return dy, dscale, dbias, (dr if with_residual else None)


_native.defvjp(_native_forward, _native_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _native_apply(y, scale, bias, residual, mean, var, epsilon, relu, with_residual):
  return _native_apply_forward(y, scale, bias, residual, mean, var, epsilon, relu,
                               with_residual)[0]


def _native_apply_forward(y, scale, bias, residual, mean, var, epsilon, relu, with_residual):
  out = _call(native_build.BATCH_NORM_APPLY_TARGET, jax.ShapeDtypeStruct(y.shape, jnp.float32),
              y, scale, bias, residual if with_residual else _empty(), mean, var,
              epsilon=epsilon, relu=relu)
  mask_source = out if relu and with_residual else _empty()
  return out, (y, mask_source, scale, bias, mean, var)


def _native_apply_backward(epsilon, relu, with_residual, saved, d_out):
  mean, var = saved[4:]
  dy, dscale, dbias, dr = _native_backward(epsilon, relu, with_residual, saved, (d_out,))
  return dy, dscale, dbias, dr, jnp.zeros_like(mean), jnp.zeros_like(var)


_native_apply.defvjp(_native_apply_forward, _native_apply_backward)

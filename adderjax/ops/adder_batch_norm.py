"""An adder convolution and the BatchNorm after it (with its ReLU and residual add), as one op.

``adder_conv_batch_norm_act(x, w, scale, bias, residual)`` is
``batch_norm_act(adder_conv(x, w), scale, bias, residual)``
(`adderjax.ops.batch_norm.batch_norm_act`): BatchNorm in training mode after
an adder layer. Where the adder layer runs the native CPU kernels
(`adderjax.ops.cpu_native`), its forward sums the batch statistics of its
output in the epilogue of each output row, while the row is in cache, and
combines the rows in double, in a fixed order
(`adderjax.ops.cpu_native.forward_with_statistics`): the BatchNorm then takes
one pass over the output (`adderjax.ops.batch_norm.apply_batch_statistics`)
instead of two. The gradients are those of the composition: the adder layer's
(``grad_mode``), and BatchNorm's through its batch statistics. Elsewhere
(another implementation, dtype or backend, inputs sharded over explicit mesh
axes) it is the composition itself.

The statistics are summed around a value of each output row, so that an
adder layer's offset (thousands, over a spread of a few units) does not
cancel the variance; the two paths agree to float32 rounding.

Example:
  >>> import jax.numpy as jnp
  >>> from adderjax.ops.adder_batch_norm import adder_conv_batch_norm_act
  >>> x = jnp.arange(32.0).reshape(2, 4, 4, 1)
  >>> w = jnp.zeros((1, 1, 1, 2))
  >>> out, mean, var = adder_conv_batch_norm_act(x, w, jnp.ones(2), jnp.zeros(2), relu=False)
  >>> mean.tolist(), round(float(out.mean()), 6), round(float(out.std()), 3)
  ([-15.5, -15.5], 0.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence
import functools

import jax
from jax import lax
import jax.numpy as jnp

from adderjax.ops import batch_norm as batch_norm_ops
from adderjax.ops import cpu_native
from adderjax.ops.cpu_native import InputNorm
from adderjax.ops.dispatch import (
  Implementation,
  ImplementationLike,
  PaddingLike,
  _adder_conv_bwd,
  _resolve_implementation,
  adder_conv,
  check_implementation,
)
from adderjax.ops.sharding import explicit_batch_axes
from adderjax.ops.spec import ConvSpec, GradMode, check_grad_mode, conv_spec

__all__ = ["InputNorm", "adder_conv_batch_norm_act", "adder_conv_with_statistics",
           "apply_input_norm", "fused_unsupported_reason"]


def fused_unsupported_reason(x: jax.Array, w: jax.Array, scale: jax.Array, bias: jax.Array,
                             residual: jax.Array | None = None, *, strides=1,
                             padding: PaddingLike = "SAME", rhs_dilation=1,
                             feature_group_count: int = 1,
                             implementation: ImplementationLike = None) -> str | None:
  """Why `adder_conv_batch_norm_act` runs as the composition of its two ops here, or None.

  Takes the operands and options of `adder_conv_batch_norm_act`.
  """
  spec = conv_spec(x, w, strides=strides, padding=padding, rhs_dilation=rhs_dilation,
                   feature_group_count=feature_group_count)
  return _unsupported_reason(x, w, spec, scale, bias, residual, check_implementation(
      implementation))


def _unsupported_reason(x, w, spec: ConvSpec, scale, bias, residual,
                        implementation: ImplementationLike) -> str | None:
  if jnp.result_type(x) != jnp.float32 or jnp.result_type(w) != jnp.float32:
    return "the fused kernels take float32 x and w"
  if not x.shape[0] or 0 in spec.output_spatial(x.shape[1:3], w.shape[:2]):
    return "the output is empty"
  if explicit_batch_axes(x):
    return "x is sharded over explicit mesh axes"
  if not isinstance(_resolve_implementation(implementation, x, w, spec),
                    cpu_native.NativeCpuAdderConv):
    return "the adder layer does not run the native CPU kernels"
  return batch_norm_ops.native_supported(x, scale, bias, residual)


def apply_input_norm(x: jax.Array, input_norm: InputNorm) -> jax.Array:
  """``relu(BatchNorm(x))`` for the `InputNorm` of ``x`` (its batch statistics), written out.

  What `adder_conv_batch_norm_act` reads where it cannot read through ``input_norm``, with the
  same numbers and gradient: the native op with the given statistics where it runs, else the
  `jax.numpy` BatchNorm, which sums ``x``'s statistics again.
  """
  mean, var, scale, bias, epsilon = input_norm
  if batch_norm_ops.native_supported(x, scale, bias, None, mean, var) is None:
    return batch_norm_ops.apply_batch_statistics(x, mean, var, scale, bias, epsilon=epsilon)
  return batch_norm_ops.batch_norm_act(x, scale, bias, epsilon=epsilon, implementation="xla")[0]


def adder_conv_batch_norm_act(
    x: jax.Array,
    w: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    residual: jax.Array | None = None,
    *,
    input_norm: InputNorm | None = None,
    strides: int | Sequence[int] = 1,
    padding: PaddingLike = "SAME",
    rhs_dilation: int | Sequence[int] = 1,
    feature_group_count: int = 1,
    grad_mode: GradMode = "full_precision",
    implementation: ImplementationLike = None,
    epsilon: float = 1e-5,
    relu: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``batch_norm_act(adder_conv(x, w), scale, bias, residual)``, the statistics summed in the conv.

  With ``input_norm``, ``x`` is the output of the layer before, not yet through
  its BatchNorm and ReLU: the convolution reads ``relu(BatchNorm(x))`` (the
  `InputNorm` holds that BatchNorm's batch statistics of ``x``, as this op
  returns them, and its scale, bias and epsilon), which the native kernels
  compute as they copy their input, forward and backward, so that it is never
  written out. The gradients then reach ``x`` and ``input_norm.scale`` and
  ``input_norm.bias`` through that BatchNorm (``input_norm.mean`` and ``var``
  get none). Where the fused kernels do not run, or ``grad_mode`` is not
  ``"full_precision"``, the input is written out first (`apply_input_norm`).

  Args:
    x: input, ``(batch, height, width, in_channels)``.
    w: filters, ``(kh, kw, in_channels // feature_group_count, out_channels)``.
    scale: the BatchNorm's scale, ``(out_channels,)``.
    bias: the BatchNorm's bias, ``(out_channels,)``.
    residual: added after the normalisation, before the ReLU (the output's shape), or None.
    input_norm: the BatchNorm and ReLU ``x`` goes through first, or None.
    strides: as in `adderjax.ops.adder_conv`.
    padding: as in `adderjax.ops.adder_conv`.
    rhs_dilation: as in `adderjax.ops.adder_conv`.
    feature_group_count: as in `adderjax.ops.adder_conv`.
    grad_mode: the adder layer's backward, as in `adderjax.ops.adder_conv`.
    implementation: the adder layer's, as in `adderjax.ops.adder_conv`; the fused kernels run
      where it resolves to ``"cpu"`` (`fused_unsupported_reason` says why not elsewhere).
    epsilon: added to the variance.
    relu: whether to apply the ReLU.

  Returns:
    ``(out, mean, var)``: the output, and the batch mean and biased variance of the adder
    layer's output per channel (without gradient), as `adderjax.ops.batch_norm.batch_norm_act`
    returns them.

  Raises:
    ValueError: as `adderjax.ops.adder_conv` and `adderjax.ops.batch_norm.batch_norm_act` raise
      for their operands and options, and for an ``input_norm`` whose statistics are not of
      ``x``'s channels.
  """
  options = dict(strides=strides, padding=padding, rhs_dilation=rhs_dilation,
                 feature_group_count=feature_group_count, grad_mode=grad_mode,
                 implementation=implementation)
  spec = conv_spec(x, w, strides=strides, padding=padding, rhs_dilation=rhs_dilation,
                   feature_group_count=feature_group_count)
  if _unsupported_reason(x, w, spec, scale, bias, residual,
                         check_implementation(implementation)) is not None:
    if input_norm is not None:
      x = apply_input_norm(x, _check_input_norm(input_norm, x))
    y = adder_conv(x, w, **options)
    return batch_norm_ops.batch_norm_act(y, scale, bias, residual, epsilon=epsilon, relu=relu)
  y, mean, var = adder_conv_with_statistics(x, w, input_norm=input_norm, **options)
  out = batch_norm_ops.apply_batch_statistics(y, mean, var, scale, bias, residual,
                                              epsilon=epsilon, relu=relu)
  return out, mean, var


def adder_conv_with_statistics(
    x: jax.Array,
    w: jax.Array,
    *,
    input_norm: InputNorm | None = None,
    strides: int | Sequence[int] = 1,
    padding: PaddingLike = "SAME",
    rhs_dilation: int | Sequence[int] = 1,
    feature_group_count: int = 1,
    grad_mode: GradMode = "full_precision",
    implementation: ImplementationLike = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``adder_conv(x, w)`` and its batch mean and biased variance per channel.

  The first half of `adder_conv_batch_norm_act`, for a BatchNorm that the next layer applies
  as it reads this output (the `InputNorm` of these statistics): the fused kernels where they
  run (`fused_unsupported_reason` with no scale and bias), else `adder_conv` and the statistics
  summed as `adderjax.ops.batch_norm` sums them. ``input_norm`` as in
  `adder_conv_batch_norm_act`.

  Returns:
    ``(y, mean, var)``: the output, with the adder layer's gradients, and its statistics
    (without gradient).
  """
  spec = conv_spec(x, w, strides=strides, padding=padding, rhs_dilation=rhs_dilation,
                   feature_group_count=feature_group_count)
  grad_mode = check_grad_mode(grad_mode)
  implementation = check_implementation(implementation)
  if input_norm is not None:
    input_norm = _check_input_norm(input_norm, x)
  fused = _unsupported_reason(x, w, spec, None, None, None, implementation) is None
  if input_norm is not None and not (
      fused and grad_mode == "full_precision"
      and batch_norm_ops.native_supported(x, *input_norm[:4]) is None):
    x, input_norm = apply_input_norm(x, input_norm), None
  if not fused:
    y = adder_conv(x, w, strides=strides, padding=padding, rhs_dilation=rhs_dilation,
                   feature_group_count=feature_group_count, grad_mode=grad_mode,
                   implementation=implementation)
    mean, var = batch_norm_ops.batch_statistics(y)
  elif input_norm is None:
    y, mean, var = _conv_with_statistics(x, w, spec, grad_mode,
                                         _resolve_implementation(implementation, x, w, spec))
  else:
    y, mean, var = _normed_conv_with_statistics(x, w, *input_norm[:4], float(input_norm.epsilon),
                                                spec)
  return y, lax.stop_gradient(mean), lax.stop_gradient(var)


def _check_input_norm(input_norm: InputNorm, x: jax.Array) -> InputNorm:
  if not isinstance(input_norm, InputNorm):
    raise TypeError(f"input_norm must be an InputNorm or None, got "
                    f"input_norm={type(input_norm).__name__}.")
  for name in ("mean", "var", "scale", "bias"):
    if jnp.shape(getattr(input_norm, name)) != (x.shape[-1],):
      raise ValueError(f"input_norm.{name} must have shape ({x.shape[-1]},) (x's channels), got "
                       f"shape {jnp.shape(getattr(input_norm, name))}.")
  return input_norm


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_with_statistics(x, w, spec: ConvSpec, grad_mode: GradMode,
                          implementation: Implementation):
  del grad_mode, implementation  # The backward's.
  return cpu_native.forward_with_statistics(x, w, spec)


def _conv_with_statistics_fwd(x, w, spec, grad_mode, implementation):
  return _conv_with_statistics(x, w, spec, grad_mode, implementation), (x, w)


def _conv_with_statistics_bwd(spec, grad_mode, implementation, residuals, cotangents):
  # The statistics leave through lax.stop_gradient: only the output's cotangent is nonzero.
  return _adder_conv_bwd(spec, grad_mode, implementation, jnp.float32, residuals, cotangents[0])


_conv_with_statistics.defvjp(_conv_with_statistics_fwd, _conv_with_statistics_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _normed_conv_with_statistics(x, w, in_mean, in_var, in_scale, in_bias, epsilon,
                                 spec: ConvSpec):
  norm = InputNorm(in_mean, in_var, in_scale, in_bias, epsilon)
  return cpu_native.forward_with_statistics(x, w, spec, norm)


def _normed_conv_with_statistics_fwd(x, w, in_mean, in_var, in_scale, in_bias, epsilon, spec):
  out = _normed_conv_with_statistics(x, w, in_mean, in_var, in_scale, in_bias, epsilon, spec)
  return out, (x, w, in_mean, in_var, in_scale, in_bias)


def _normed_conv_with_statistics_bwd(epsilon, spec, residuals, cotangents):
  x, w, in_mean, in_var, in_scale, in_bias = residuals
  g = cotangents[0]  # The statistics leave through lax.stop_gradient.
  norm = InputNorm(in_mean, in_var, in_scale, in_bias, epsilon)
  # The full-precision gradients of the adder layer at its normalised input, read through norm,
  # then the input's BatchNorm and ReLU.
  d_input = cpu_native.input_grad_full_precision(x, w, g, spec, norm)
  dw = cpu_native.weight_grad_full_precision(x, w, g, spec, norm)
  dx, d_scale, d_bias = batch_norm_ops.batch_norm_relu_backward(
      d_input, x, in_mean, in_var, in_scale, in_bias, epsilon=epsilon)
  return dx, dw, jnp.zeros_like(in_mean), jnp.zeros_like(in_var), d_scale, d_bias


_normed_conv_with_statistics.defvjp(_normed_conv_with_statistics_fwd,
                                    _normed_conv_with_statistics_bwd)

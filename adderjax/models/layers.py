"""The building blocks every model shares: layers of a chosen kind, BatchNorm, activation.

A model is built in one of three kinds, which differ only in the layers they
put where the paper compares them (Chen et al., CVPR 2020, Tables 1-3):

- ``"adder"``: :class:`adderjax.nn.AdderConv` / :class:`adderjax.nn.AdderDense`
  (N(0, 1) kernels, no bias, the paper's gradients and ``grad_mode``).
- ``"conv"``: :class:`flax.nnx.Conv` / :class:`flax.nnx.Linear`, the CNN.
- ``"binary"``: :class:`adderjax.nn.BinaryConv` /
  :class:`adderjax.nn.BinaryDense`, the BNN, whose activation is HardTanh
  rather than ReLU (the sign of a ReLU output is always +1).

Each model keeps some layers multiplicative whatever its kind (the stem, the
classifier); it asks :class:`Layers` for ``kind="conv"`` there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any, Literal, get_args

from flax import nnx
from flax.typing import Dtype, PaddingLike
import jax
import jax.numpy as jnp

from adderjax._checks import positive_int as check_positive_int
from adderjax.nn import (
  AdderConv,
  AdderDense,
  BinaryConv,
  BinaryDense,
  PendingBatchNormRelu,
  adder_conv_batch_norm,
  batch_norm_relu,
  float32_statistics,
  materialize,
)
from adderjax.nn import batch_norm as fused_batch_norm  # layers.batch_norm builds one
from adderjax.ops.dispatch import ImplementationLike, check_implementation
from adderjax.ops.spec import GradMode, check_grad_mode

__all__ = [
    "BATCH_NORM_MOMENTUM",
    "KINDS",
    "Kind",
    "Layers",
    "activation",
    "batch_norm",
    "batch_norm_activation",
    "check_inputs",
    "check_kind",
    "check_positive_int",
    "conv_batch_norm_activation",
    "conv_layer",
    "dense_layer",
    "global_average_pool",
    "max_pool",
]

Kind = Literal["adder", "conv", "binary"]
"""The type of ``kind`` arguments; `KINDS` lists its values."""

KINDS = get_args(Kind)
"""The kinds of model: AdderNet, CNN, BNN."""

BATCH_NORM_MOMENTUM = 0.9
"""Flax's convention (PyTorch's default 0.1): adder outputs have a large
negative mean that Flax's default 0.99 tracks too slowly (README.md)."""


def check_kind(kind: Any) -> Kind:
  """Returns ``kind`` if it is one of :data:`KINDS`, else raises a ValueError naming it."""
  if not isinstance(kind, str) or kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got kind={kind!r}.")
  return kind


def batch_norm(features: int, *, rngs: nnx.Rngs, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32) -> nnx.BatchNorm:
  """A BatchNorm over the last axis with momentum 0.9 and epsilon 1e-5, as PyTorch's.

  It normalises in float32 whatever ``dtype`` is, and returns ``dtype``
  (:func:`adderjax.nn.float32_statistics`): an adder output's offset is too
  large for half precision. ``model.train()`` and ``model.eval()`` switch it between batch
  statistics (updating the running ones) and the running statistics.

  Args:
    features: the number of channels.
    rngs: rng key.
    dtype: the dtype of the computation (default: infer from input and params).
    param_dtype: the dtype of the scale and bias (default: float32).

  Returns:
    A :class:`flax.nnx.BatchNorm` in training mode.

  Example:
    >>> from flax import nnx
    >>> from adderjax.models.layers import batch_norm
    >>> batch_norm(16, rngs=nnx.Rngs(0)).momentum
    0.9
  """
  return nnx.BatchNorm(features, momentum=BATCH_NORM_MOMENTUM, epsilon=1e-5, dtype=dtype,
                       param_dtype=param_dtype, promote_dtype=float32_statistics, rngs=rngs)


def activation(kind: Kind) -> Callable[[jax.Array], jax.Array]:
  """The activation of a model of this kind: ReLU, or HardTanh for ``"binary"``.

  The next binary layer binarises its input with ``sign``, which is +1 for
  every ReLU output; BNN (Hubara et al., 2016) uses HardTanh, whose gradient
  is the straight-through estimator's window.

  Args:
    kind: one of :data:`KINDS`.

  Returns:
    :func:`flax.nnx.relu` or :func:`flax.nnx.hard_tanh`.
  """
  return nnx.hard_tanh if check_kind(kind) == "binary" else nnx.relu


def conv_layer(
    kind: Kind,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    *,
    padding: PaddingLike = "SAME",
    use_bias: bool = False,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    grad_mode: GradMode = "full_precision",
    implementation: ImplementationLike = None,
    rngs: nnx.Rngs,
) -> nnx.Module:
  """A 2-D convolution of the given kind.

  Args:
    kind: ``"adder"`` for :class:`adderjax.nn.AdderConv` (N(0, 1) kernel),
      ``"conv"`` for :class:`flax.nnx.Conv`, ``"binary"`` for
      :class:`adderjax.nn.BinaryConv`.
    in_features: number of input channels.
    out_features: number of output channels.
    kernel_size: an int or a pair.
    strides: an int or a pair.
    padding: as in :class:`flax.nnx.Conv`; the models pass ``k // 2`` as
      PyTorch's ``padding`` would.
    use_bias: whether the layer has a bias.
    dtype: the dtype of the computation.
    param_dtype: the dtype of the parameters.
    grad_mode: the adder layers' backward pass (ignored by other kinds).
    implementation: the adder op's implementation (ignored by other kinds).
    rngs: rng key.

  Returns:
    The layer, whose kernel parameter is named ``kernel`` and has the shape
    ``(kh, kw, in_features, out_features)``.

  Example:
    >>> from flax import nnx
    >>> from adderjax.models.layers import conv_layer
    >>> layer = conv_layer("adder", 3, 16, 3, 2, padding=1, rngs=nnx.Rngs(0))
    >>> type(layer).__name__, layer.kernel.shape
    ('AdderConv', (3, 3, 3, 16))
  """
  options = dict(padding=padding, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                 rngs=rngs)
  if check_kind(kind) == "adder":
    return AdderConv(in_features, out_features, kernel_size, strides, grad_mode=grad_mode,
                     implementation=implementation, **options)
  if isinstance(kernel_size, int):
    kernel_size = (kernel_size, kernel_size)
  layer_class = nnx.Conv if kind == "conv" else BinaryConv
  return layer_class(in_features, out_features, kernel_size, strides, **options)


def dense_layer(
    kind: Kind,
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = False,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    grad_mode: GradMode = "full_precision",
    implementation: ImplementationLike = None,
    rngs: nnx.Rngs,
) -> nnx.Module:
  """A fully connected layer of the given kind.

  Args:
    kind: ``"adder"`` for :class:`adderjax.nn.AdderDense` (N(0, 1) kernel),
      ``"conv"`` for :class:`flax.nnx.Linear`, ``"binary"`` for
      :class:`adderjax.nn.BinaryDense`.
    in_features: the number of input features.
    out_features: the number of output features.
    use_bias: whether the layer has a bias.
    dtype: the dtype of the computation.
    param_dtype: the dtype of the parameters.
    grad_mode: the adder layers' backward pass (ignored by other kinds).
    implementation: the adder op's implementation (ignored by other kinds).
    rngs: rng key.

  Returns:
    The layer, whose kernel parameter is named ``kernel`` and has the shape
    ``(in_features, out_features)``.

  Example:
    >>> from flax import nnx
    >>> from adderjax.models.layers import dense_layer
    >>> layer = dense_layer("binary", 4, 10, rngs=nnx.Rngs(0))
    >>> type(layer).__name__, layer.kernel.shape
    ('BinaryDense', (4, 10))
  """
  options = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  if check_kind(kind) == "adder":
    return AdderDense(in_features, out_features, grad_mode=grad_mode,
                      implementation=implementation, **options)
  layer_class = nnx.Linear if kind == "conv" else BinaryDense
  return layer_class(in_features, out_features, **options)


@dataclasses.dataclass(frozen=True)
class Layers:
  """Builds the layers of one model, with the options they all share.

  Attributes:
    kind: the model's kind, one of :data:`KINDS`; each call may override it
      (``kind="conv"`` for the layers a model keeps multiplicative).
    rngs: rng key, shared by every layer.
    dtype: the dtype of the computation.
    param_dtype: the dtype of the parameters.
    grad_mode: the adder layers' backward pass.
    implementation: the adder op's implementation.

  Example:
    >>> from flax import nnx
    >>> from adderjax.models.layers import Layers
    >>> make = Layers(kind="adder", rngs=nnx.Rngs(0))
    >>> type(make.conv(3, 16, 3)).__name__, type(make.conv(3, 16, 3, kind="conv")).__name__
    ('AdderConv', 'Conv')
  """

  kind: Kind
  rngs: nnx.Rngs
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  grad_mode: GradMode = "full_precision"
  implementation: ImplementationLike = None

  def __post_init__(self):
    check_kind(self.kind)
    check_grad_mode(self.grad_mode)
    check_implementation(self.implementation)

  def _options(self) -> dict[str, Any]:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype, grad_mode=self.grad_mode,
                implementation=self.implementation, rngs=self.rngs)

  def conv(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
           strides: int | Sequence[int] = 1, *, padding: PaddingLike | None = None,
           use_bias: bool = False, kind: Kind | None = None) -> nnx.Module:
    """:func:`conv_layer`, padded by ``kernel_size // 2`` unless ``padding`` is given."""
    if padding is None:
      sizes = (kernel_size,) * 2 if isinstance(kernel_size, int) else tuple(kernel_size)
      padding = tuple((k // 2, k // 2) for k in sizes)
    return conv_layer(kind or self.kind, in_features, out_features, kernel_size, strides,
                      padding=padding, use_bias=use_bias, **self._options())

  def dense(self, in_features: int, out_features: int, *, use_bias: bool = False,
            kind: Kind | None = None) -> nnx.Module:
    """:func:`dense_layer` of this model's kind, or of ``kind``."""
    return dense_layer(kind or self.kind, in_features, out_features, use_bias=use_bias,
                       **self._options())

  def batch_norm(self, features: int) -> nnx.BatchNorm:
    """:func:`batch_norm` with this model's dtypes."""
    return batch_norm(features, rngs=self.rngs, dtype=self.dtype, param_dtype=self.param_dtype)

  @property
  def activation(self) -> Callable[[jax.Array], jax.Array]:
    """:func:`activation` of this model's kind."""
    return activation(self.kind)


def batch_norm_activation(bn: nnx.BatchNorm, y: jax.Array,
                          activation: Callable[[jax.Array], jax.Array] | None, *,
                          residual: jax.Array | None = None) -> jax.Array:
  """``activation(bn(y) + residual)``: with ReLU, :func:`adderjax.nn.batch_norm_relu`.

  That is one native op in training mode on the CPU, as is ``bn(y)`` with no
  activation and no residual (:func:`adderjax.nn.batch_norm`); the numbers are
  those of the unfused layers to float32 rounding.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from adderjax.models.layers import batch_norm, batch_norm_activation
    >>> bn = batch_norm(2, rngs=nnx.Rngs(0))
    >>> y = jnp.array([[-3000.0, 1.0], [-3002.0, 3.0]])
    >>> batch_norm_activation(bn, y, nnx.hard_tanh, residual=jnp.ones_like(y)).round(3).tolist()
    [[1.0, 0.0], [0.0, 1.0]]

  Args:
    bn: the BatchNorm.
    y: its input.
    activation: applied last (:func:`activation` of the model's kind), or None.
    residual: added after the BatchNorm (``y``'s shape), or None.
  """
  if activation is nnx.relu:
    return batch_norm_relu(bn, y, residual=residual)
  if activation is None and residual is None:
    return fused_batch_norm(bn, y)
  out = bn(y) if residual is None else bn(y) + residual
  return out if activation is None else activation(out)


def conv_batch_norm_activation(conv: nnx.Module, bn: nnx.BatchNorm,
                               x: jax.Array | PendingBatchNormRelu,
                               activation: Callable[[jax.Array], jax.Array] | None, *,
                               residual: jax.Array | None = None,
                               defer: bool = False) -> jax.Array | PendingBatchNormRelu:
  """``activation(bn(conv(x)) + residual)``: after an adder convolution, one fused op.

  With an :class:`adderjax.nn.AdderConv` and a ReLU or no activation, this is
  :func:`adderjax.nn.adder_conv_batch_norm`, whose adder forward sums the
  BatchNorm's statistics in training mode on the CPU, and which with
  ``defer=True`` may leave the BatchNorm and ReLU to the next adder layer (a
  :class:`adderjax.nn.PendingBatchNormRelu`, for ``x`` of the next call of
  this function only); otherwise :func:`batch_norm_activation` of
  ``conv(x)``. The numbers are those of the unfused layers to float32
  rounding.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from adderjax.models.layers import Layers, conv_batch_norm_activation
    >>> make = Layers(kind="adder", rngs=nnx.Rngs(0))
    >>> conv, bn = make.conv(3, 4, 3), make.batch_norm(4)
    >>> conv_batch_norm_activation(conv, bn, jnp.ones((2, 8, 8, 3)), nnx.relu).shape
    (2, 8, 8, 4)

  Args:
    conv: the convolution.
    bn: the BatchNorm after it.
    x: the convolution's input (a :class:`adderjax.nn.PendingBatchNormRelu` from a ``defer``
      call).
    activation: applied last (:func:`activation` of the model's kind), or None.
    residual: added after the BatchNorm (the output's shape), or None.
    defer: whether the next adder layer may apply the BatchNorm and ReLU (see above).
  """
  if isinstance(conv, AdderConv) and activation in (nnx.relu, None):
    return adder_conv_batch_norm(conv, bn, x, residual=residual, relu=activation is not None,
                                 defer=defer)
  return batch_norm_activation(bn, conv(materialize(x)), activation, residual=residual)


def global_average_pool(x: jax.Array) -> jax.Array:
  """The mean over the two spatial axes of an NHWC batch: ``(N, C)``."""
  return jnp.mean(x, axis=(-3, -2))


def max_pool(x: jax.Array, size: int, stride: int, padding: int = 0) -> jax.Array:
  """Max pooling of an NHWC batch over ``size x size`` windows, padded with -inf."""
  return nnx.max_pool(x, (size, size), strides=(stride, stride),
                      padding=((padding, padding), (padding, padding)))


def check_inputs(inputs: jax.Array, *, channels: int,
                 spatial: tuple[int, int] | None = None) -> None:
  """Raises a ValueError naming ``inputs`` unless it is an NHWC batch of this shape.

  Args:
    inputs: the model's input.
    channels: the number of channels it must have.
    spatial: the ``(height, width)`` it must have, or None for any.
  """
  want = f"(batch, {spatial[0]}, {spatial[1]}, {channels})" if spatial else \
      f"(batch, height, width, {channels})"
  if (inputs.ndim != 4 or inputs.shape[-1] != channels
      or (spatial is not None and tuple(inputs.shape[1:3]) != tuple(spatial))):
    raise ValueError(f"inputs must be an NHWC batch of shape {want}, "
                     f"got shape {tuple(inputs.shape)}.")

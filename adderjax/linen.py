"""Flax Linen adder layers.

The Linen counterparts of :mod:`adderjax.nn`: :class:`AdderConv` and
:class:`AdderDense` mirror :class:`flax.linen.Conv` and
:class:`flax.linen.Dense`, with outputs given by :func:`adderjax.ops.adder_conv`
and :func:`adderjax.ops.adder_dense`. Their kernel parameter is named
``"adder_kernel"`` (the bias, ``"bias"``), the name by which
:func:`adderjax.optim.addernet_sgd` finds the adder kernels in a plain params
dict.

An exponent ``p`` (``-sum |x - k|^p``, ``1 <= p <= 2``) is the attribute
``p`` or, as ``deterministic`` is for :class:`flax.linen.Dropout`, an argument
of the call, which may be a traced array: a schedule passes it to ``apply``
in a jitted step, which compiles once for every value.
"""

from collections.abc import Sequence
import dataclasses

from flax import linen as nn
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import PromoteDtypeFn
from flax.typing import Dtype, Initializer, PaddingLike
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from adderjax._checks import canonical_padding, check_groups, positive_int, positive_pair
from adderjax._layer_common import (
    PADDING_MODES,
    apply_adder_conv,
    check_op_options,
    default_bias_init,
    default_kernel_init,
    full_precision_operands,
)
from adderjax.ops import adder_dense
from adderjax.ops.dispatch import ImplementationLike
from adderjax.ops.spec import GradMode, check_p

__all__ = ["AdderConv", "AdderDense"]


def _merged_p(attribute: ArrayLike | None, argument: ArrayLike | None) -> ArrayLike | None:
  """The exponent of one call: the attribute or the call's ``p``, not both; None for L1."""
  if attribute is None and argument is None:
    return None
  p = nn.merge_param("p", attribute, argument)
  check_p(p)
  return p


class AdderConv(nn.Module):
  """A 2-D adder convolution, the AdderNet counterpart of :class:`flax.linen.Conv`.

  Each output is the negative L1 distance between an input patch and a filter,
  computed by :func:`adderjax.ops.adder_conv` with the paper's gradients. The
  kernel, of shape ``(kh, kw, in_features // feature_group_count, features)``,
  is the param ``"adder_kernel"``, so that :func:`adderjax.optim.addernet_sgd`
  gives it the adaptive rate; it is initialized from N(0, 1) as in the
  official code. The optional bias is the param ``"bias"``.

  Follow the layer with ``nn.BatchNorm(momentum=0.9)``: the outputs have a
  large negative mean (around -160 with a std of about 9 for a 3x3 kernel
  over 16 channels) that Flax's default ``momentum=0.99`` tracks too slowly,
  which collapses the accuracy in eval mode to chance.

  Inputs are channels-last, ``(*batch_dims, height, width, features)`` with
  any number of batch dims or none.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from adderjax.linen import AdderConv
    >>> layer = AdderConv(features=4, kernel_size=3)
    >>> params = layer.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    >>> jax.tree.map(jnp.shape, params)
    {'params': {'adder_kernel': (3, 3, 3, 4)}}
    >>> apply = jax.jit(layer.apply)  # p an argument: one compilation for every value
    >>> apply(params, jnp.ones((1, 8, 8, 3)), p=jnp.float32(1.5)).shape
    (1, 8, 8, 4)

  Attributes:
    features: number of output channels (filters).
    kernel_size: an int ``k`` for a ``(k, k)`` kernel, or a pair ``(kh, kw)``.
    strides: an int or a pair (default: 1).
    padding: ``"SAME"``, ``"SAME_LOWER"``, ``"VALID"``, ``"CIRCULAR"``,
      ``"REFLECT"``, an int, or a sequence of 2 ints or ``(low, high)`` pairs,
      as in :class:`adderjax.nn.AdderConv`.
    kernel_dilation: an int or a pair (default: 1).
    feature_group_count: number of channel groups; must divide the input
      channels and ``features``.
    use_bias: whether to add a bias to the output (default: False).
    dtype: the dtype of the computation (default: infer from input and params).
    param_dtype: the dtype passed to parameter initializers (default: float32).
    kernel_init: initializer for the kernel (default: N(0, 1)).
    bias_init: initializer for the bias (default: zeros).
    promote_dtype: function to promote the dtype of the arrays to the desired
      dtype, called as ``promote_dtype(inputs, kernel, bias, dtype=dtype)``.
    grad_mode: ``"full_precision"`` (default), ``"unclipped"`` or ``"sign"``;
      at ``p > 1`` all three give the exact gradient
      (:func:`adderjax.ops.adder_conv`).
    p: the exponent, in ``[1, 2]``; None (default) for L1 or for ``p``
      given to the call instead.
    implementation: the :func:`adderjax.ops.adder_conv` implementation, None
      for the fastest available.
  """

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: PaddingLike = "SAME"
  _: dataclasses.KW_ONLY
  kernel_dilation: int | Sequence[int] = 1
  feature_group_count: int = 1
  use_bias: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = default_bias_init
  promote_dtype: PromoteDtypeFn = promote_dtype
  grad_mode: GradMode = "full_precision"
  p: ArrayLike | None = None
  implementation: ImplementationLike = None

  def __post_init__(self):
    positive_int(self.features, "features")
    positive_pair(self.kernel_size, "kernel_size")
    positive_pair(self.strides, "strides")
    canonical_padding(self.padding, PADDING_MODES)
    positive_pair(self.kernel_dilation, "kernel_dilation")
    positive_int(self.feature_group_count, "feature_group_count")
    check_op_options(self.grad_mode, self.implementation)
    if self.p is not None:
      check_p(self.p)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: jax.Array, p: ArrayLike | None = None) -> jax.Array:
    """Applies the adder convolution.

    Args:
      inputs: ``(*batch_dims, height, width, in_features)`` or
        ``(height, width, in_features)``.
      p: the exponent for this call, if the attribute ``p`` is None.

    Returns:
      ``(*batch_dims, out_height, out_width, features)``, without batch dims
      for an unbatched input.
    """
    if inputs.ndim < 3:
      raise ValueError(f"inputs must have shape (*batch, height, width, features) or "
                       f"(height, width, features), got shape {tuple(inputs.shape)}.")
    in_features = inputs.shape[-1]
    check_groups(in_features, self.features, self.feature_group_count, out_name="features")
    kernel_shape = positive_pair(self.kernel_size, "kernel_size") + (
        in_features // self.feature_group_count, self.features)
    kernel = self.param("adder_kernel", self.kernel_init, kernel_shape, self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = full_precision_operands(
        self.promote_dtype(inputs, kernel, bias, dtype=self.dtype), kernel, bias)
    return apply_adder_conv(
        inputs, kernel, bias, strides=positive_pair(self.strides, "strides"),
        padding=canonical_padding(self.padding, PADDING_MODES),
        kernel_dilation=positive_pair(self.kernel_dilation, "kernel_dilation"),
        feature_group_count=self.feature_group_count, grad_mode=self.grad_mode,
        p=_merged_p(self.p, p), implementation=self.implementation)


class AdderDense(nn.Module):
  """A fully connected adder layer, the AdderNet counterpart of :class:`flax.linen.Dense`.

  ``y[..., n] = -sum_k |x[..., k] - adder_kernel[k, n]|``, computed by
  :func:`adderjax.ops.adder_dense`. The kernel, of shape
  ``(in_features, features)``, is the param ``"adder_kernel"`` (found by
  :func:`adderjax.optim.addernet_sgd`), initialized from N(0, 1); the optional
  bias is the param ``"bias"``. Follow it with ``nn.BatchNorm(momentum=0.9)``,
  for the reason given in :class:`AdderConv`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from adderjax.linen import AdderDense
    >>> layer = AdderDense(features=4, use_bias=True)
    >>> params = layer.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> jax.tree.map(jnp.shape, params)
    {'params': {'adder_kernel': (3, 4), 'bias': (4,)}}

  Attributes:
    features: the number of output features.
    use_bias: whether to add a bias to the output (default: False).
    dtype: the dtype of the computation (default: infer from input and params).
    param_dtype: the dtype passed to parameter initializers (default: float32).
    kernel_init: initializer for the kernel (default: N(0, 1)).
    bias_init: initializer for the bias (default: zeros).
    promote_dtype: function to promote the dtype of the arrays to the desired
      dtype, called as ``promote_dtype(inputs, kernel, bias, dtype=dtype)``.
    grad_mode: ``"full_precision"`` (default), ``"unclipped"`` or ``"sign"``;
      at ``p > 1`` all three give the exact gradient.
    p: the exponent, in ``[1, 2]``; None (default) for L1 or for ``p``
      given to the call instead.
    implementation: the :func:`adderjax.ops.adder_dense` implementation, None
      for the fastest available.
  """

  features: int
  _: dataclasses.KW_ONLY
  use_bias: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = default_bias_init
  promote_dtype: PromoteDtypeFn = promote_dtype
  grad_mode: GradMode = "full_precision"
  p: ArrayLike | None = None
  implementation: ImplementationLike = None

  def __post_init__(self):
    positive_int(self.features, "features")
    check_op_options(self.grad_mode, self.implementation)
    if self.p is not None:
      check_p(self.p)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: jax.Array, p: ArrayLike | None = None) -> jax.Array:
    """Applies the adder layer along the last dimension.

    Args:
      inputs: ``(..., in_features)``.
      p: the exponent for this call, if the attribute ``p`` is None.

    Returns:
      ``(..., features)``.
    """
    kernel = self.param("adder_kernel", self.kernel_init, (inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = full_precision_operands(
        self.promote_dtype(inputs, kernel, bias, dtype=self.dtype), kernel, bias)
    y = adder_dense(inputs, kernel, grad_mode=self.grad_mode, p=_merged_p(self.p, p),
                    implementation=self.implementation)
    return y if bias is None else y + bias

"""Flax NNX adder layers.

:class:`AdderConv` and :class:`AdderDense` are the counterparts of
:class:`flax.nnx.Conv` and :class:`flax.nnx.Linear` whose output is the
negative L1 distance between input patches and filters (Chen et al.,
"AdderNet: Do We Really Need Multiplications in Deep Learning?", CVPR 2020),
computed by :func:`adderjax.ops.adder_conv` and :func:`adderjax.ops.adder_dense`.
Their kernels are :class:`AdderKernel` parameters, which
:func:`adderjax.optim.addernet_sgd` trains with the paper's adaptive rate.
:mod:`adderjax.linen` has the same layers for Flax Linen.

:class:`BinaryConv` and :class:`BinaryDense` are the binary (BNN) baseline the
paper compares against: weights and inputs binarised to +-1 by
:func:`adderjax.ops.sign_ste`, then an ordinary convolution or product.
"""

from collections.abc import Callable, Mapping, Sequence
import math
from types import MappingProxyType
from typing import Any

from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Dtype, Initializer, PaddingLike, PromoteDtypeFn
import jax
import jax.numpy as jnp

from adderjax.ops import adder_conv, adder_dense, sign_ste
from adderjax.ops.adder_conv import check_implementation
from adderjax.ops.spec import check_grad_mode, is_int, positive_pair

__all__ = ["AdderConv", "AdderDense", "AdderKernel", "BinaryConv", "BinaryDense"]

default_kernel_init = nnx.initializers.normal(stddev=1.0)
binary_default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()

_ZERO_PADDINGS = ("SAME", "SAME_LOWER", "VALID")
_PAD_MODES = {"CIRCULAR": "wrap", "REFLECT": "reflect"}
_PADDING_STRINGS = _ZERO_PADDINGS + tuple(_PAD_MODES)

_Padding2D = str | tuple[tuple[int, int], tuple[int, int]]


class AdderKernel(nnx.Param):
  """The kernel of an adder layer.

  A subclass of :class:`flax.nnx.Param`, so ``nnx.Optimizer(model, tx,
  wrt=nnx.Param)`` trains it like any parameter, while filters such as
  ``nnx.state(model, AdderKernel)`` and :func:`adderjax.optim.addernet_sgd`
  find the adder kernels alone.
  """


def _positive_int(value: Any, name: str) -> int:
  if not is_int(value) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {name}={value!r}.")
  return int(value)


def _canonical_padding(padding: Any) -> _Padding2D:
  """Validates ``padding`` and returns an upper-case string or 2 ``(low, high)`` pairs."""
  if isinstance(padding, str):
    if padding.upper() not in _PADDING_STRINGS:
      raise ValueError(f"padding must be one of {_PADDING_STRINGS}, an int, or a sequence of "
                       f"2 ints or (low, high) pairs, got padding={padding!r}.")
    return padding.upper()
  if is_int(padding):
    pads = [padding, padding]
  elif isinstance(padding, Sequence) and len(padding) == 2:
    pads = list(padding)
  else:
    raise ValueError(f"padding must be one of {_PADDING_STRINGS}, an int, or a sequence of "
                     f"2 ints or (low, high) pairs (adder layers are 2-D), "
                     f"got padding={padding!r}.")
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


def _check_op_options(grad_mode: Any, implementation: Any) -> None:
  check_grad_mode(grad_mode)
  check_implementation(implementation)


def _check_groups(in_features: int, out_features: int, feature_group_count: int, *,
                  out_name: str = "out_features") -> None:
  if in_features % feature_group_count:
    raise ValueError(f"in_features={in_features} is not divisible by "
                     f"feature_group_count={feature_group_count}.")
  if out_features % feature_group_count:
    raise ValueError(f"{out_name}={out_features} is not divisible by "
                     f"feature_group_count={feature_group_count}.")


def _conv_2d(
    conv: Callable[[jax.Array, jax.Array, _Padding2D], jax.Array],
    inputs: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    *,
    padding: _Padding2D,
    kernel_dilation: tuple[int, int],
) -> jax.Array:
  """``conv(x, kernel, padding)`` on ``(*batch, H, W, C)`` or ``(H, W, C)`` inputs, plus a bias.

  The batch dims are flattened into one, or one is added, then restored.
  ``"CIRCULAR"`` and ``"REFLECT"`` pad the input as `flax.nnx.Conv` does, then
  convolve with ``"VALID"``.
  """
  batch_shape = inputs.shape[:-3]
  x = jnp.reshape(inputs, (math.prod(batch_shape),) + inputs.shape[-3:])
  if padding in _PAD_MODES:
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:2], kernel_dilation)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    x = jnp.pad(x, pads, mode=_PAD_MODES[padding])
    padding = "VALID"
  y = conv(x, kernel, padding)
  if bias is not None:
    y = y + bias
  return jnp.reshape(y, batch_shape + y.shape[1:])


def _apply_adder_conv(
    inputs: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    *,
    strides: tuple[int, int],
    padding: _Padding2D,
    kernel_dilation: tuple[int, int],
    feature_group_count: int,
    grad_mode: str,
    implementation: str | None,
) -> jax.Array:
  """`adder_conv` through `_conv_2d`: any batch dims, every padding mode, a bias."""
  def conv(x, w, pad):
    return adder_conv(x, w, strides=strides, padding=pad, rhs_dilation=kernel_dilation,
                      feature_group_count=feature_group_count, grad_mode=grad_mode,
                      implementation=implementation)
  return _conv_2d(conv, inputs, kernel, bias, padding=padding, kernel_dilation=kernel_dilation)


def _bias(use_bias: bool, bias_init: Initializer, out_features: int, param_dtype: Dtype,
          rngs: nnx.Rngs, metadata: Mapping[str, Any]) -> nnx.Param | None:
  if not use_bias:
    return nnx.data(None)
  return nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype), **metadata)


class AdderConv(nnx.Module):
  """A 2-D adder convolution, the AdderNet counterpart of :class:`flax.nnx.Conv`.

  Each output is the negative L1 distance between an input patch and a filter,
  ``y[b, h, w, o] = -sum_{i, j, c} |x_pad[b, h*s + i*d, w*s + j*d, c] - k[i, j, c, o]|``,
  computed by :func:`adderjax.ops.adder_conv` with the paper's gradients
  (``grad_mode``). Zero padding takes part in the distance, as in the official
  code. The kernel is an :class:`AdderKernel`, found by
  :func:`adderjax.optim.addernet_sgd`, and is initialized from N(0, 1) as in
  the official code; there is no bias by default.

  Follow the layer with a BatchNorm of ``momentum=0.9``: the outputs are
  distances, with a large negative mean (around -160 with a std of about 9
  for a 3x3 kernel over 16 channels) that drifts as the kernel trains. With
  Flax's default ``momentum=0.99`` the running mean lags far behind the batch
  mean, and the accuracy in eval mode collapses to chance.

  Inputs are channels-last, ``(*batch_dims, height, width, in_features)`` with
  any number of batch dims (flattened for the convolution and restored) or
  none.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from adderjax.nn import AdderConv
    >>> rngs = nnx.Rngs(0)
    >>> layer = AdderConv(3, 16, kernel_size=3, rngs=rngs)
    >>> layer.kernel.shape
    (3, 3, 3, 16)
    >>> bn = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
    >>> y = bn(layer(jnp.ones((2, 8, 8, 3))))
    >>> y.shape
    (2, 8, 8, 16)

  Args:
    in_features: number of input channels.
    out_features: number of output channels (filters).
    kernel_size: an int ``k`` for a ``(k, k)`` kernel, or a pair ``(kh, kw)``.
    strides: an int or a pair (default: 1).
    padding: ``"SAME"``, ``"SAME_LOWER"`` or ``"VALID"`` as in
      :func:`jax.lax.conv_general_dilated`; ``"CIRCULAR"`` (periodic) or
      ``"REFLECT"``, which pad the input like :class:`flax.nnx.Conv` before a
      ``"VALID"`` convolution; an int for the same zero padding on every side;
      or a sequence of 2 entries, each an int or a ``(low, high)`` pair.
    kernel_dilation: an int or a pair (default: 1).
    feature_group_count: number of channel groups; must divide
      ``in_features`` and ``out_features``.
    use_bias: whether to add a bias to the output (default: False, as in the
      official code).
    dtype: the dtype of the computation (default: infer from input and params).
    param_dtype: the dtype passed to parameter initializers (default: float32).
    kernel_init: initializer for the kernel (default: N(0, 1)).
    bias_init: initializer for the bias (default: zeros).
    promote_dtype: function to promote the dtype of the arrays to the desired
      dtype, called as ``promote_dtype((inputs, kernel, bias), dtype=dtype)``.
    grad_mode: the backward pass of :func:`adderjax.ops.adder_conv`:
      ``"full_precision"`` (default), ``"unclipped"`` or ``"sign"``.
    implementation: the :func:`adderjax.ops.adder_conv` implementation, None
      for the fastest available.
    rngs: rng key.
    kernel_metadata: metadata for the kernel :class:`AdderKernel`.
    bias_metadata: metadata for the bias :class:`flax.nnx.Param`.

  Raises:
    ValueError: if an argument is out of its range, naming it.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: int | Sequence[int],
      strides: int | Sequence[int] = 1,
      *,
      padding: PaddingLike = "SAME",
      kernel_dilation: int | Sequence[int] = 1,
      feature_group_count: int = 1,
      use_bias: bool = False,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      kernel_init: Initializer = default_kernel_init,
      bias_init: Initializer = default_bias_init,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      grad_mode: str = "full_precision",
      implementation: str | None = None,
      rngs: nnx.Rngs,
      kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
  ):
    in_features = _positive_int(in_features, "in_features")
    out_features = _positive_int(out_features, "out_features")
    feature_group_count = _positive_int(feature_group_count, "feature_group_count")
    _check_groups(in_features, out_features, feature_group_count)
    kernel_size = positive_pair(kernel_size, "kernel_size")
    strides = positive_pair(strides, "strides")
    padding = _canonical_padding(padding)
    kernel_dilation = positive_pair(kernel_dilation, "kernel_dilation")
    _check_op_options(grad_mode, implementation)

    self.kernel = AdderKernel(
        kernel_init(rngs.params(),
                    kernel_size + (in_features // feature_group_count, out_features),
                    param_dtype),
        **kernel_metadata,
    )
    self.bias: nnx.Param[jax.Array] | None = _bias(use_bias, bias_init, out_features,
                                                  param_dtype, rngs, bias_metadata)

    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = kernel_size
    self.strides = strides
    self.padding = padding
    self.kernel_dilation = kernel_dilation
    self.feature_group_count = feature_group_count
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype
    self.grad_mode = grad_mode
    self.implementation = implementation

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Applies the adder convolution.

    Args:
      inputs: ``(*batch_dims, height, width, in_features)`` or
        ``(height, width, in_features)``.

    Returns:
      ``(*batch_dims, out_height, out_width, out_features)``, without batch
      dims for an unbatched input.
    """
    if inputs.ndim < 3 or inputs.shape[-1] != self.in_features:
      raise ValueError(f"inputs must have shape (*batch, height, width, {self.in_features}) for "
                       f"in_features={self.in_features}, got shape {tuple(inputs.shape)}.")
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
    return _apply_adder_conv(
        inputs, kernel, bias, strides=self.strides, padding=self.padding,
        kernel_dilation=self.kernel_dilation, feature_group_count=self.feature_group_count,
        grad_mode=self.grad_mode, implementation=self.implementation)


class AdderDense(nnx.Module):
  """A fully connected adder layer, the AdderNet counterpart of :class:`flax.nnx.Linear`.

  ``y[..., n] = -sum_k |x[..., k] - kernel[k, n]|``, computed by
  :func:`adderjax.ops.adder_dense` with the paper's gradients. The kernel, of
  shape ``(in_features, out_features)``, is an :class:`AdderKernel` initialized
  from N(0, 1); there is no bias by default.

  As after :class:`AdderConv`, follow the layer with a BatchNorm of
  ``momentum=0.9``: its outputs have a large negative mean that Flax's
  default ``momentum=0.99`` tracks too slowly, which collapses the accuracy in
  eval mode to chance. The official code ends its networks with such an adder
  classifier followed by a BatchNorm.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from adderjax.nn import AdderDense
    >>> rngs = nnx.Rngs(0)
    >>> layer = AdderDense(3, 4, rngs=rngs)
    >>> layer.kernel.shape
    (3, 4)
    >>> bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
    >>> bn(layer(jnp.ones((2, 3)))).shape
    (2, 4)

  Args:
    in_features: the number of input features.
    out_features: the number of output features.
    use_bias: whether to add a bias to the output (default: False).
    dtype: the dtype of the computation (default: infer from input and params).
    param_dtype: the dtype passed to parameter initializers (default: float32).
    kernel_init: initializer for the kernel (default: N(0, 1)).
    bias_init: initializer for the bias (default: zeros).
    promote_dtype: function to promote the dtype of the arrays to the desired
      dtype, called as ``promote_dtype((inputs, kernel, bias), dtype=dtype)``.
    grad_mode: the backward pass of :func:`adderjax.ops.adder_dense`:
      ``"full_precision"`` (default), ``"unclipped"`` or ``"sign"``.
    implementation: the :func:`adderjax.ops.adder_dense` implementation, None
      for the fastest available.
    rngs: rng key.
    kernel_metadata: metadata for the kernel :class:`AdderKernel`.
    bias_metadata: metadata for the bias :class:`flax.nnx.Param`.

  Raises:
    ValueError: if an argument is out of its range, naming it.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      use_bias: bool = False,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      kernel_init: Initializer = default_kernel_init,
      bias_init: Initializer = default_bias_init,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      grad_mode: str = "full_precision",
      implementation: str | None = None,
      rngs: nnx.Rngs,
      kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
  ):
    in_features = _positive_int(in_features, "in_features")
    out_features = _positive_int(out_features, "out_features")
    _check_op_options(grad_mode, implementation)

    self.kernel = AdderKernel(
        kernel_init(rngs.params(), (in_features, out_features), param_dtype), **kernel_metadata)
    self.bias: nnx.Param[jax.Array] | None = _bias(use_bias, bias_init, out_features,
                                                  param_dtype, rngs, bias_metadata)

    self.in_features = in_features
    self.out_features = out_features
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype
    self.grad_mode = grad_mode
    self.implementation = implementation

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Applies the adder layer along the last dimension.

    Args:
      inputs: ``(..., in_features)``.

    Returns:
      ``(..., out_features)``.
    """
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
    y = adder_dense(inputs, kernel, grad_mode=self.grad_mode, implementation=self.implementation)
    return y if bias is None else y + bias


class BinaryConv(nnx.Module):
  """A 2-D binary convolution, the BNN counterpart of :class:`flax.nnx.Conv`.

  Both the kernel and the input are binarised to ``+1``/``-1`` by
  :func:`adderjax.ops.sign_ste` (``sign(0) = +1``), then convolved by
  :func:`jax.lax.conv_general_dilated`; gradients reach the real-valued
  kernel and input through the straight-through estimator
  ``g * 1{|.| <= 1}``, as in BNN (Hubara et al., NeurIPS 2016), the binary
  baseline of the AdderNet paper. Zero padding is applied after the
  binarisation, so padded positions contribute 0. There is no scaling
  factor: follow the layer with a BatchNorm. The kernel is a plain
  :class:`flax.nnx.Param` named ``kernel`` of shape ``(kh, kw, in_features //
  feature_group_count, out_features)``, initialized small (LeCun normal, as
  :class:`flax.nnx.Conv`) so that it starts inside the estimator's window.

  Inputs after a ReLU are all binarised to ``+1``: use an activation that
  keeps the sign, such as ``HardTanh`` (BNN's), in front of the layer.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from adderjax.nn import BinaryConv
    >>> layer = BinaryConv(3, 16, kernel_size=3, rngs=nnx.Rngs(0))
    >>> layer.kernel.shape
    (3, 3, 3, 16)
    >>> y = layer(jnp.ones((2, 8, 8, 3)))
    >>> y.shape, bool(jnp.all(jnp.abs(y[:, 1:-1, 1:-1]) <= 27))
    ((2, 8, 8, 16), True)

  Args:
    in_features: number of input channels.
    out_features: number of output channels (filters).
    kernel_size: an int ``k`` for a ``(k, k)`` kernel, or a pair ``(kh, kw)``.
    strides: an int or a pair (default: 1).
    padding: as in :class:`adderjax.nn.AdderConv`: ``"SAME"``,
      ``"SAME_LOWER"``, ``"VALID"``, ``"CIRCULAR"``, ``"REFLECT"``, an int, or
      a sequence of 2 entries, each an int or a ``(low, high)`` pair.
    kernel_dilation: an int or a pair (default: 1).
    feature_group_count: number of channel groups; must divide
      ``in_features`` and ``out_features``.
    use_bias: whether to add a (real-valued) bias to the output (default:
      False).
    dtype: the dtype of the computation (default: infer from input and params).
    param_dtype: the dtype passed to parameter initializers (default: float32).
    kernel_init: initializer for the real-valued kernel (default: LeCun
      normal).
    bias_init: initializer for the bias (default: zeros).
    promote_dtype: function to promote the dtype of the arrays to the desired
      dtype, called as ``promote_dtype((inputs, kernel, bias), dtype=dtype)``.
    rngs: rng key.
    kernel_metadata: metadata for the kernel :class:`flax.nnx.Param`.
    bias_metadata: metadata for the bias :class:`flax.nnx.Param`.

  Raises:
    ValueError: if an argument is out of its range, naming it.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: int | Sequence[int],
      strides: int | Sequence[int] = 1,
      *,
      padding: PaddingLike = "SAME",
      kernel_dilation: int | Sequence[int] = 1,
      feature_group_count: int = 1,
      use_bias: bool = False,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      kernel_init: Initializer = binary_default_kernel_init,
      bias_init: Initializer = default_bias_init,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
      kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
  ):
    in_features = _positive_int(in_features, "in_features")
    out_features = _positive_int(out_features, "out_features")
    feature_group_count = _positive_int(feature_group_count, "feature_group_count")
    _check_groups(in_features, out_features, feature_group_count)
    kernel_size = positive_pair(kernel_size, "kernel_size")
    strides = positive_pair(strides, "strides")
    padding = _canonical_padding(padding)
    kernel_dilation = positive_pair(kernel_dilation, "kernel_dilation")

    self.kernel = nnx.Param(
        kernel_init(rngs.params(),
                    kernel_size + (in_features // feature_group_count, out_features),
                    param_dtype),
        **kernel_metadata,
    )
    self.bias: nnx.Param[jax.Array] | None = _bias(use_bias, bias_init, out_features,
                                                  param_dtype, rngs, bias_metadata)

    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = kernel_size
    self.strides = strides
    self.padding = padding
    self.kernel_dilation = kernel_dilation
    self.feature_group_count = feature_group_count
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Binarises the inputs and the kernel, and convolves them.

    Args:
      inputs: ``(*batch_dims, height, width, in_features)`` or
        ``(height, width, in_features)``.

    Returns:
      ``(*batch_dims, out_height, out_width, out_features)``, without batch
      dims for an unbatched input.
    """
    if inputs.ndim < 3 or inputs.shape[-1] != self.in_features:
      raise ValueError(f"inputs must have shape (*batch, height, width, {self.in_features}) for "
                       f"in_features={self.in_features}, got shape {tuple(inputs.shape)}.")
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)

    def conv(x, w, pad):
      pad = pad if isinstance(pad, str) else list(pad)
      return jax.lax.conv_general_dilated(
          sign_ste(x), sign_ste(w), window_strides=self.strides, padding=pad,
          rhs_dilation=self.kernel_dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=self.feature_group_count)

    return _conv_2d(conv, inputs, kernel, bias, padding=self.padding,
                    kernel_dilation=self.kernel_dilation)


class BinaryDense(nnx.Module):
  """A fully connected binary layer, the BNN counterpart of :class:`flax.nnx.Linear`.

  ``y[..., n] = sum_k sign(x[..., k]) * sign(kernel[k, n])``, with
  :func:`adderjax.ops.sign_ste` (``sign(0) = +1``) and its straight-through
  gradient, as in BNN (Hubara et al., NeurIPS 2016). The kernel is a plain
  :class:`flax.nnx.Param` named ``kernel`` of shape ``(in_features,
  out_features)``, initialized with LeCun normal; there is no bias by default
  and no scaling factor: follow the layer with a BatchNorm.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from adderjax.nn import BinaryDense
    >>> layer = BinaryDense(3, 4, rngs=nnx.Rngs(0))
    >>> layer.kernel.shape
    (3, 4)
    >>> y = layer(jnp.array([[0.3, -2.0, 0.0]]))
    >>> y.shape, set(abs(int(v)) for v in y.ravel()) <= {1, 3}
    ((1, 4), True)

  Args:
    in_features: the number of input features.
    out_features: the number of output features.
    use_bias: whether to add a (real-valued) bias to the output (default:
      False).
    dtype: the dtype of the computation (default: infer from input and params).
    param_dtype: the dtype passed to parameter initializers (default: float32).
    kernel_init: initializer for the real-valued kernel (default: LeCun
      normal).
    bias_init: initializer for the bias (default: zeros).
    promote_dtype: function to promote the dtype of the arrays to the desired
      dtype, called as ``promote_dtype((inputs, kernel, bias), dtype=dtype)``.
    rngs: rng key.
    kernel_metadata: metadata for the kernel :class:`flax.nnx.Param`.
    bias_metadata: metadata for the bias :class:`flax.nnx.Param`.

  Raises:
    ValueError: if an argument is out of its range, naming it.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      use_bias: bool = False,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      kernel_init: Initializer = binary_default_kernel_init,
      bias_init: Initializer = default_bias_init,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
      kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
  ):
    in_features = _positive_int(in_features, "in_features")
    out_features = _positive_int(out_features, "out_features")

    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (in_features, out_features), param_dtype), **kernel_metadata)
    self.bias: nnx.Param[jax.Array] | None = _bias(use_bias, bias_init, out_features,
                                                  param_dtype, rngs, bias_metadata)

    self.in_features = in_features
    self.out_features = out_features
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Binarises the inputs and the kernel and multiplies them along the last dimension.

    Args:
      inputs: ``(..., in_features)``.

    Returns:
      ``(..., out_features)``.
    """
    if inputs.ndim < 1 or inputs.shape[-1] != self.in_features:
      raise ValueError(f"inputs must have shape (..., {self.in_features}) for "
                       f"in_features={self.in_features}, got shape {tuple(inputs.shape)}.")
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
    y = jax.lax.dot_general(sign_ste(inputs), sign_ste(kernel),
                            (((inputs.ndim - 1,), (0,)), ((), ())))
    return y if bias is None else y + bias

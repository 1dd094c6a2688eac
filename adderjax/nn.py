"""Flax NNX adder layers.

:class:`AdderConv` and :class:`AdderDense` are the counterparts of
:class:`flax.nnx.Conv` and :class:`flax.nnx.Linear` whose output is the
negative L1 distance between input patches and filters (Chen et al.,
"AdderNet: Do We Really Need Multiplications in Deep Learning?", CVPR 2020),
computed by :func:`adderjax.ops.adder_conv` and :func:`adderjax.ops.adder_dense`.
Their kernels are :class:`AdderKernel` parameters, which
:func:`adderjax.optim.addernet_sgd` trains with the paper's adaptive rate.
An exponent ``p`` (``-sum |x - k|^p``), given at construction, is an
:class:`AdderExponent` variable that :func:`set_exponent` changes, inside a
jitted step too.
:mod:`adderjax.linen` has the same layers for Flax Linen.

:class:`BinaryConv` and :class:`BinaryDense` are the binary (BNN) baseline the
paper compares against: weights and inputs binarised to +-1 by
:func:`adderjax.ops.sign_ste`, then an ordinary convolution or product.
"""

from collections.abc import Iterator, Mapping, Sequence
import contextlib
import contextvars
from types import MappingProxyType
from typing import Any, NamedTuple

from flax import nnx
from flax.nnx.nn import dtypes
from flax.typing import Dtype, Initializer, PaddingLike, PromoteDtypeFn
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
  pad_input,
)
from adderjax.attention import adder_attention, adder_attention_weights
from adderjax.ops import adder_batch_norm, adder_dense, sign_ste
from adderjax.ops import batch_norm as batch_norm_ops
from adderjax.ops.dispatch import ImplementationLike
from adderjax.ops.sharding import explicit_batch_axes
from adderjax.ops.spec import GradMode, check_p

__all__ = ["AdderConv", "AdderDense", "AdderExponent", "AdderKernel", "BinaryConv", "BinaryDense",
           "PendingBatchNormRelu", "adder_attention", "adder_attention_weights",
           "adder_conv_batch_norm", "batch_norm", "batch_norm_fusion", "batch_norm_relu",
           "float32_statistics", "materialize", "set_exponent"]

binary_default_kernel_init = nnx.initializers.lecun_normal()


class AdderKernel(nnx.Param):
  """The kernel of an adder layer.

  A subclass of :class:`flax.nnx.Param`, so ``nnx.Optimizer(model, tx,
  wrt=nnx.Param)`` trains it like any parameter, while filters such as
  ``nnx.state(model, AdderKernel)`` and :func:`adderjax.optim.addernet_sgd`
  find the adder kernels alone.
  """


class AdderExponent(nnx.Variable):
  """The exponent ``p`` of an adder layer built with one: a float32 scalar.

  Not a :class:`flax.nnx.Param`, so optimizers leave it alone; a schedule sets
  it with :func:`set_exponent`, and ``nnx.state(model, AdderExponent)`` finds
  every layer's.
  """


def _exponent(p: ArrayLike | None) -> AdderExponent | None:
  if p is None:
    return nnx.data(None)
  check_p(p)
  return AdderExponent(jnp.asarray(p, jnp.float32))


def _exponent_value(layer: nnx.Module) -> jax.Array | None:
  return None if layer.p is None else layer.p[...]


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

  With ``p``, ``y = -sum |x_pad - k|^p`` (``1 <= p <= 2``, gradients as in
  :func:`adderjax.ops.adder_conv`: exact for ``p > 1``); the layer keeps it in
  ``layer.p``, an :class:`AdderExponent`, which :func:`set_exponent` changes.
  Without ``p`` (the default) ``layer.p`` is None and the layer is the L1
  AdderNet layer, with the fastest kernels.

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
    p: the exponent, a number or scalar array in ``[1, 2]``; None (default)
      for the L1 layer without an :class:`AdderExponent`.
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
      grad_mode: GradMode = "full_precision",
      p: ArrayLike | None = None,
      implementation: ImplementationLike = None,
      rngs: nnx.Rngs,
      kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
  ):
    in_features = positive_int(in_features, "in_features")
    out_features = positive_int(out_features, "out_features")
    feature_group_count = positive_int(feature_group_count, "feature_group_count")
    check_groups(in_features, out_features, feature_group_count)
    kernel_size = positive_pair(kernel_size, "kernel_size")
    strides = positive_pair(strides, "strides")
    padding = canonical_padding(padding, PADDING_MODES)
    kernel_dilation = positive_pair(kernel_dilation, "kernel_dilation")
    check_op_options(grad_mode, implementation)
    self.p = _exponent(p)

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
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = full_precision_operands(
        self.promote_dtype((inputs, kernel, bias), dtype=self.dtype), kernel, bias)
    return apply_adder_conv(
        inputs, kernel, bias, strides=self.strides, padding=self.padding,
        kernel_dilation=self.kernel_dilation, feature_group_count=self.feature_group_count,
        grad_mode=self.grad_mode, p=_exponent_value(self), implementation=self.implementation)


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

  With ``p``, ``y[..., n] = -sum_k |x[..., k] - kernel[k, n]|^p``, the exponent
  kept in ``layer.p`` as in :class:`AdderConv`.

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
    p: the exponent, a number or scalar array in ``[1, 2]``; None (default)
      for the L1 layer without an :class:`AdderExponent`.
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
      grad_mode: GradMode = "full_precision",
      p: ArrayLike | None = None,
      implementation: ImplementationLike = None,
      rngs: nnx.Rngs,
      kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
  ):
    in_features = positive_int(in_features, "in_features")
    out_features = positive_int(out_features, "out_features")
    check_op_options(grad_mode, implementation)
    self.p = _exponent(p)

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
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = full_precision_operands(
        self.promote_dtype((inputs, kernel, bias), dtype=self.dtype), kernel, bias)
    y = adder_dense(inputs, kernel, grad_mode=self.grad_mode, p=_exponent_value(self),
                    implementation=self.implementation)
    return y if bias is None else y + bias


def set_exponent(model: nnx.Module, p: ArrayLike) -> int:
  """Sets the exponent ``p`` of every :class:`AdderConv` and :class:`AdderDense` in ``model``.

  For a schedule of ``p`` (2 annealed to 1 in the lp AdderNets of Chen et
  al., TPAMI, arXiv:2105.14202): inside a jitted step, a traced ``p`` only
  changes the value of each layer's :class:`AdderExponent`, so the step
  compiles once for every value. A layer built without ``p`` gets its
  exponent variable here, which changes the model's structure: do that
  outside `jax.jit` (or build the layers with ``p=1.0``) before the state is
  split off, as the trainer of ``experiments/`` does.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from adderjax.nn import AdderConv, AdderExponent, set_exponent
    >>> layer = AdderConv(3, 4, 3, rngs=nnx.Rngs(0))
    >>> layer.p is None
    True
    >>> set_exponent(layer, 2.0)
    1
    >>> float(nnx.state(layer, AdderExponent)["p"][...])
    2.0
    >>> @nnx.jit
    ... def forward(layer, x, p):
    ...   set_exponent(layer, p)
    ...   return layer(x)
    >>> forward(layer, jnp.ones((1, 5, 5, 3)), jnp.float32(1.5)).shape
    (1, 5, 5, 4)
    >>> float(layer.p[...])
    1.5

  Args:
    model: any NNX module (or graph of modules).
    p: a number or a scalar array in ``[1, 2]``, possibly traced; stored as
      float32.

  Returns:
    The number of adder layers set (0 for a model without any).

  Raises:
    TypeError, ValueError: a bad ``p``, named as in :func:`adderjax.ops.adder_conv`.
    ValueError: a traced ``p`` reaching a layer built without ``p``.
  """
  check_p(p)
  value = jnp.asarray(p, jnp.float32)
  count = 0
  for path, module in nnx.iter_modules(model):
    if not isinstance(module, (AdderConv, AdderDense)):
      continue
    if module.p is not None:
      module.p[...] = value
    elif isinstance(p, jax.core.Tracer):
      name = ".".join(str(k) for k in path) or type(module).__name__
      raise ValueError(
          f"set_exponent got a traced p, but the adder layer {name} was built without p: "
          f"call set_exponent(model, p) once outside jax.jit first (or build the layer with "
          f"p=1.0), so that its state holds an AdderExponent.")
    else:
      module.p = AdderExponent(value)
    count += 1
  return count


def _binary_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, *args: Any,
                                 **kwargs: Any) -> jax.Array:
  """`jax.lax.conv_general_dilated` of the binarised input and kernel: BinaryConv's hook."""
  return jax.lax.conv_general_dilated(sign_ste(lhs), sign_ste(rhs), *args, **kwargs)


def _binary_dot_general(lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
  """`jax.lax.dot_general` of the binarised input and kernel: BinaryDense's hook."""
  return jax.lax.dot_general(sign_ste(lhs), sign_ste(rhs), *args, **kwargs)


def float32_statistics(args: tuple[Any, ...], /, *, dtype: Dtype | None = None,
                       inexact: bool = True) -> tuple[Any, ...]:
  """A ``promote_dtype`` for :class:`flax.nnx.BatchNorm` after adder layers: normalise in float32.

  Flax's BatchNorm casts its input and its running mean and variance to
  ``dtype`` before it normalises. After an adder layer that loses the signal
  in half precision: the input is an offset near ``-sum |w|`` (in a trained
  network up to thousands) plus a spread of a few units, and bfloat16's
  spacing at 2,000 is 16. With this hook the normalisation runs in float32
  (or the promoted dtype if wider) and only its result, of order one, is cast
  to ``dtype``. The models of :mod:`adderjax.models` use it for every
  BatchNorm.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from adderjax.nn import AdderConv, float32_statistics
    >>> rngs = nnx.Rngs(0)
    >>> layer = AdderConv(3, 8, 3, dtype=jnp.bfloat16, rngs=rngs)
    >>> bn = nnx.BatchNorm(8, momentum=0.9, dtype=jnp.bfloat16,
    ...                    promote_dtype=float32_statistics, rngs=rngs)
    >>> y = layer(jnp.ones((2, 8, 8, 3), jnp.bfloat16))
    >>> y.dtype, bn(y).dtype
    (dtype('float32'), dtype(bfloat16))

  Args:
    args: the input, running mean and variance, scale and bias (None entries
      pass through).
    dtype: the layer's ``dtype``; None infers it from the arrays.
    inexact: as in :func:`flax.nnx.nn.dtypes.promote_dtype`.

  Returns:
    The arrays, all in ``promote_types(dtype, float32)``.
  """
  wide = jnp.promote_types(dtypes.canonicalize_dtype(*args, dtype=dtype, inexact=inexact),
                           jnp.float32)
  return tuple(None if a is None else jnp.asarray(a, wide) for a in args)


_FUSION = contextvars.ContextVar("adderjax_batch_norm_fusion", default=True)


@contextlib.contextmanager
def batch_norm_fusion(enabled: bool) -> Iterator[None]:
  """Turns :func:`batch_norm_relu`'s fused op on or off for the programs traced in the block.

  Off, every BatchNorm of the models runs as the module call
  ``bn(y)`` even in training mode: what needs that call (an interception of the
  modules' outputs, as :func:`adderjax.analysis.features` makes) or Flax's own
  BatchNorm numbers. It applies where a function is traced (the first call of
  a jitted function), not where a compiled one runs.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from adderjax.nn import batch_norm_fusion, batch_norm_relu
    >>> bn = nnx.BatchNorm(2, momentum=0.9, rngs=nnx.Rngs(0))
    >>> with batch_norm_fusion(False):
    ...   out = batch_norm_relu(bn, jnp.array([[1.0, 2.0], [3.0, 6.0]]))
    >>> out.round(3).tolist()
    [[0.0, 0.0], [1.0, 1.0]]

  Args:
    enabled: whether :func:`batch_norm_relu` may fuse (the default outside any block).
  """
  token = _FUSION.set(bool(enabled))
  try:
    yield
  finally:
    _FUSION.reset(token)


def _fused_unsupported_reason(bn: nnx.BatchNorm, y: jax.Array,
                              residual: jax.Array | None = None) -> str | None:
  """Why `batch_norm_relu` runs ``bn`` unfused on ``y``, or None where it fuses it."""
  if not _FUSION.get():
    return "batch_norm_fusion(False) turns it off"
  if bn.axis_name is not None:
    return "its statistics are averaged over a named axis (axis_name)"
  if bn.scale is None or bn.bias is None:
    return "it has no scale or no bias"
  if not isinstance(bn.axis, int) or bn.axis not in (-1, y.ndim - 1):
    return "its features are not the last axis"
  if bn.dtype not in (None, jnp.float32):
    return f"it computes in {jnp.dtype(bn.dtype).name}, the fused op in float32"
  if explicit_batch_axes(y):
    return "its input is sharded over explicit mesh axes"
  # The backend, every operand's dtype (float32) and the native library.
  return batch_norm_ops.native_supported(y, bn.scale[...], bn.bias[...], residual)


def batch_norm_relu(bn: nnx.BatchNorm, y: jax.Array, *, residual: jax.Array | None = None,
                    use_running_average: bool | None = None) -> jax.Array:
  """``relu(bn(y) + residual)``, one native op in training mode on the CPU.

  In training mode (batch statistics) on the CPU backend, for float32, this is
  :func:`adderjax.ops.batch_norm.batch_norm_act`: the statistics, the
  normalisation, the residual add and the ReLU in two passes over ``y``
  (XLA's graph takes a reduction and three elementwise passes, and writes
  ``y - mean`` out for the gradient), its gradient in two more; ``bn``'s
  running mean and variance are updated as :class:`flax.nnx.BatchNorm` updates
  them. Elsewhere (evaluation, other backends and dtypes, statistics over a
  named axis, explicitly sharded inputs, inside ``batch_norm_fusion(False)``)
  it is ``nnx.relu(bn(y) + residual)``.
  The batch statistics are summed around each channel's first value, so the
  two paths agree to float32 rounding where `nnx.BatchNorm`'s default
  ``E[y^2] - E[y]^2`` keeps its precision, and the fused one keeps it where
  an adder layer's large offset would not. The models of
  :mod:`adderjax.models` use it after every layer followed by a ReLU.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from adderjax.nn import batch_norm_relu
    >>> bn = nnx.BatchNorm(2, momentum=0.9, rngs=nnx.Rngs(0))
    >>> y = jnp.array([[-3000.0, 1.0], [-3002.0, 3.0]])
    >>> batch_norm_relu(bn, y).round(3).tolist(), bn.mean[...].tolist()
    ([[1.0, 0.0], [0.0, 1.0]], [-300.1000061035156, 0.20000000298023224])

  Args:
    bn: the BatchNorm (features last).
    y: its input.
    residual: added after the normalisation, before the ReLU (``y``'s shape), or None.
    use_running_average: as in :class:`flax.nnx.BatchNorm` (None: ``bn``'s own).

  Returns:
    ``relu(bn(y) + residual)``.
  """
  return _batch_norm_act(bn, y, residual, True, use_running_average)


def batch_norm(bn: nnx.BatchNorm, y: jax.Array, *,
               use_running_average: bool | None = None) -> jax.Array:
  """``bn(y)``, one native op in training mode on the CPU: :func:`batch_norm_relu` without the ReLU.

  For a BatchNorm that no activation follows, such as a ResNet shortcut's
  (:class:`adderjax.models.resnet.Downsample`): in training mode on the CPU
  backend, for float32, :func:`adderjax.ops.batch_norm.batch_norm_act` with
  ``relu=False``, which sums the statistics around each channel's first value
  and reads ``y`` twice (XLA's graph reads it three times and writes ``y -
  mean`` out for the gradient); elsewhere ``bn(y)``, as for
  :func:`batch_norm_relu`, whose conditions and running statistics it shares.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from adderjax.nn import batch_norm
    >>> bn = nnx.BatchNorm(2, momentum=0.9, rngs=nnx.Rngs(0))
    >>> y = jnp.array([[-3000.0, 1.0], [-3002.0, 3.0]])
    >>> batch_norm(bn, y).round(3).tolist()
    [[1.0, -1.0], [-1.0, 1.0]]

  Args:
    bn: the BatchNorm (features last).
    y: its input.
    use_running_average: as in :class:`flax.nnx.BatchNorm` (None: ``bn``'s own).

  Returns:
    ``bn(y)``.
  """
  return _batch_norm_act(bn, y, None, False, use_running_average)


def _batch_norm_act(bn: nnx.BatchNorm, y: jax.Array, residual: jax.Array | None, relu: bool,
                    use_running_average: bool | None) -> jax.Array:
  """``bn(y) + residual``, then the ReLU if ``relu``: fused where it can be, else unfused."""
  if use_running_average is None:
    use_running_average = bn.use_running_average
  if use_running_average or _fused_unsupported_reason(bn, y, residual) is not None:
    out = bn(y, use_running_average=use_running_average)
    out = out if residual is None else out + residual
    return nnx.relu(out) if relu else out
  out, mean, var = batch_norm_ops.batch_norm_act(y, bn.scale[...], bn.bias[...], residual,
                                                 relu=relu, epsilon=bn.epsilon,
                                                 implementation="cpu")
  _follow_batch_statistics(bn, mean, var)
  return out


def _follow_batch_statistics(bn: nnx.BatchNorm, mean: jax.Array, var: jax.Array) -> None:
  """Moves ``bn``'s running statistics towards the batch's, as `flax.nnx.BatchNorm` does."""
  bn.mean[...] = bn.momentum * bn.mean[...] + (1 - bn.momentum) * mean
  bn.var[...] = bn.momentum * bn.var[...] + (1 - bn.momentum) * var


class PendingBatchNormRelu(NamedTuple):
  """An adder layer's output whose BatchNorm and ReLU the next adder layer applies as it reads it.

  What :func:`adder_conv_batch_norm` returns with ``defer=True``: the layer's
  output ``y`` before its BatchNorm, and the BatchNorm (with the batch
  statistics of ``y``, its running statistics already updated) and ReLU, as
  an :class:`adderjax.ops.adder_batch_norm.InputNorm`. Passed as the input of
  another :func:`adder_conv_batch_norm`, its kernels read
  ``relu(BatchNorm(y))`` as they copy their input, forward and backward, and
  it is never written out; :meth:`materialize` writes it out, with the same
  numbers, for anything else.

  Attributes:
    y: the layer's output.
    norm: the BatchNorm and ReLU it is to go through.
  """

  y: jax.Array
  norm: adder_batch_norm.InputNorm

  @property
  def shape(self) -> tuple[int, ...]:
    """The shape of ``y`` (and of the normalised output)."""
    return self.y.shape

  def materialize(self) -> jax.Array:
    """``relu(BatchNorm(y))``, written out."""
    return adder_batch_norm.apply_input_norm(self.y, self.norm)


def materialize(x: jax.Array | PendingBatchNormRelu) -> jax.Array:
  """``x`` itself, or a :class:`PendingBatchNormRelu` written out."""
  return x.materialize() if isinstance(x, PendingBatchNormRelu) else x


def adder_conv_batch_norm(conv: nnx.Module, bn: nnx.BatchNorm,
                          inputs: jax.Array | PendingBatchNormRelu, *,
                          residual: jax.Array | None = None, relu: bool = True,
                          use_running_average: bool | None = None,
                          defer: bool = False) -> jax.Array | PendingBatchNormRelu:
  """``relu(bn(conv(inputs)) + residual)``, BatchNorm's statistics summed in the adder kernel.

  In training mode on the CPU, for an :class:`AdderConv` that runs the native
  kernels in float32 (no bias, no exponent ``p``), this is
  :func:`adderjax.ops.adder_batch_norm.adder_conv_batch_norm_act`: the adder
  forward sums the batch statistics of its output in each output row's
  epilogue, and the BatchNorm (with its residual add and ReLU) takes one pass
  over that output instead of two; ``bn``'s running mean and variance follow
  as :class:`flax.nnx.BatchNorm` updates them, and the gradients are those of
  the layers one after the other. Elsewhere it is
  ``batch_norm_relu(bn, conv(inputs), residual=residual)`` (or
  :func:`batch_norm` plus ``residual`` for ``relu=False``), under the same
  conditions (``batch_norm_fusion(False)`` turns both off). The two agree to
  float32 rounding. The models of :mod:`adderjax.models` use it after every
  adder convolution.

  With ``defer=True`` (a ReLU and no residual), where the fused kernels run,
  the BatchNorm and ReLU are not applied here: the result is a
  :class:`PendingBatchNormRelu`, which the next call reads through them
  (``inputs``), its kernels applying them as they copy their input, so that
  the normalised activation is never written out; the numbers are the same
  bits. Elsewhere ``defer`` is ignored.

  Over a mesh of several devices (``jax.jit`` with sharded inputs), XLA cannot
  split the fused ops' custom calls and gathers the whole batch onto every
  device: trace such a step inside ``batch_norm_fusion(False)``, as the trainer
  of ``experiments/`` does, and the adder layers' own kernels run per batch
  shard. (Inputs sharded over explicit mesh axes run unfused by themselves.)

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from adderjax.nn import AdderConv, adder_conv_batch_norm, materialize
    >>> rngs = nnx.Rngs(0)
    >>> conv1, conv2 = AdderConv(3, 8, 3, rngs=rngs), AdderConv(8, 8, 3, rngs=rngs)
    >>> bn1, bn2 = (nnx.BatchNorm(8, momentum=0.9, rngs=rngs) for _ in range(2))
    >>> hidden = adder_conv_batch_norm(conv1, bn1, jnp.ones((2, 8, 8, 3)), defer=True)
    >>> out = adder_conv_batch_norm(conv2, bn2, hidden)
    >>> out.shape, bool((out >= 0).all()), materialize(hidden).shape
    ((2, 8, 8, 8), True, (2, 8, 8, 8))

  Args:
    conv: the convolution; another layer than an :class:`AdderConv` runs unfused.
    bn: the BatchNorm after it (features last).
    inputs: the convolution's input, or a :class:`PendingBatchNormRelu` it reads through its
      BatchNorm and ReLU.
    residual: added after the normalisation, before the ReLU (the output's shape), or None.
    relu: whether to apply the ReLU.
    use_running_average: as in :class:`flax.nnx.BatchNorm` (None: ``bn``'s own).
    defer: whether to leave the BatchNorm and ReLU to the next layer (see above).

  Returns:
    ``relu(bn(conv(inputs)) + residual)``, without the ReLU for ``relu=False``; or, with
    ``defer``, possibly a :class:`PendingBatchNormRelu` of it.
  """
  if use_running_average is None:
    use_running_average = bn.use_running_average
  fused = None
  if not use_running_average and _fused_unsupported_reason(bn, inputs.y if isinstance(
      inputs, PendingBatchNormRelu) else inputs, residual) is None:
    fused = _fused_adder_conv_operands(conv, inputs, bn, residual)
  if fused is None:
    return _batch_norm_act(bn, conv(materialize(inputs)), residual, relu, use_running_average)
  x, kernel, input_norm, options = fused
  scale, bias = bn.scale[...], bn.bias[...]
  y, mean, var = adder_batch_norm.adder_conv_with_statistics(x, kernel, input_norm=input_norm,
                                                             **options)
  _follow_batch_statistics(bn, mean, var)
  norm = adder_batch_norm.InputNorm(mean, var, scale, bias, bn.epsilon)
  if defer and relu and residual is None:
    return PendingBatchNormRelu(y, norm)
  return batch_norm_ops.apply_batch_statistics(y, mean, var, scale, bias, residual,
                                               epsilon=bn.epsilon, relu=relu)


def _fused_adder_conv_operands(conv: nnx.Module, inputs: jax.Array | PendingBatchNormRelu,
                               bn: nnx.BatchNorm, residual: jax.Array | None):
  """``(x, kernel, input_norm, options)`` of the fused op for ``conv`` on ``inputs``, or None
  where it does not run (`adder_conv_batch_norm`'s conditions)."""
  x, input_norm = (inputs.y, inputs.norm) if isinstance(inputs, PendingBatchNormRelu) else (
      inputs, None)
  if (not isinstance(conv, AdderConv) or conv.bias is not None or conv.p is not None
      or x.ndim != 4 or x.shape[-1] != conv.in_features):
    return None
  kernel = conv.kernel[...]
  x, kernel, _ = full_precision_operands(conv.promote_dtype((x, kernel, None), dtype=conv.dtype),
                                         kernel, None)
  padded, padding = pad_input(x, kernel.shape[:2], conv.kernel_dilation, conv.padding)
  if padded is not x and input_norm is not None:  # "CIRCULAR" or "REFLECT": pads the input.
    x, input_norm = adder_batch_norm.apply_input_norm(x, input_norm), None
    padded, padding = pad_input(x, kernel.shape[:2], conv.kernel_dilation, conv.padding)
  x = padded
  options = dict(strides=conv.strides, padding=padding, rhs_dilation=conv.kernel_dilation,
                 feature_group_count=conv.feature_group_count, implementation=conv.implementation)
  if adder_batch_norm.fused_unsupported_reason(x, kernel, bn.scale[...], bn.bias[...], residual,
                                               **options) is not None:
    return None
  return x, kernel, input_norm, dict(options, grad_mode=conv.grad_mode)


class BinaryConv(nnx.Conv):
  """A 2-D binary convolution: :class:`flax.nnx.Conv` on binarised operands.

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

  The layer is an :class:`flax.nnx.Conv` whose ``conv_general_dilated`` hook
  binarises both operands; the arguments are checked as for
  :class:`AdderConv`, and the defaults differ (no bias, 2-D only).

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
    in_features = positive_int(in_features, "in_features")
    out_features = positive_int(out_features, "out_features")
    feature_group_count = positive_int(feature_group_count, "feature_group_count")
    check_groups(in_features, out_features, feature_group_count)
    super().__init__(
        in_features, out_features, positive_pair(kernel_size, "kernel_size"),
        positive_pair(strides, "strides"), padding=canonical_padding(padding, PADDING_MODES),
        kernel_dilation=positive_pair(kernel_dilation, "kernel_dilation"),
        feature_group_count=feature_group_count, use_bias=use_bias, dtype=dtype,
        param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init,
        conv_general_dilated=_binary_conv_general_dilated, promote_dtype=promote_dtype,
        rngs=rngs, kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)

  def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
    """Binarises the inputs and the kernel, and convolves them.

    Args:
      inputs: ``(*batch_dims, height, width, in_features)`` or
        ``(height, width, in_features)``.
      out_sharding: as in :class:`flax.nnx.Conv`.

    Returns:
      ``(*batch_dims, out_height, out_width, out_features)``, without batch
      dims for an unbatched input.
    """
    if inputs.ndim < 3 or inputs.shape[-1] != self.in_features:
      raise ValueError(f"inputs must have shape (*batch, height, width, {self.in_features}) for "
                       f"in_features={self.in_features}, got shape {tuple(inputs.shape)}.")
    return super().__call__(inputs, out_sharding=out_sharding)


class BinaryDense(nnx.Linear):
  """A fully connected binary layer: :class:`flax.nnx.Linear` on binarised operands.

  ``y[..., n] = sum_k sign(x[..., k]) * sign(kernel[k, n])``, with
  :func:`adderjax.ops.sign_ste` (``sign(0) = +1``) and its straight-through
  gradient, as in BNN (Hubara et al., NeurIPS 2016). The kernel is a plain
  :class:`flax.nnx.Param` named ``kernel`` of shape ``(in_features,
  out_features)``, initialized with LeCun normal; there is no bias by default
  and no scaling factor: follow the layer with a BatchNorm. The layer is an
  :class:`flax.nnx.Linear` whose ``dot_general`` hook binarises both operands.

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
    super().__init__(
        positive_int(in_features, "in_features"), positive_int(out_features, "out_features"),
        use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
        bias_init=bias_init, dot_general=_binary_dot_general, promote_dtype=promote_dtype,
        rngs=rngs, kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)

  def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
    """Binarises the inputs and the kernel and multiplies them along the last dimension.

    Args:
      inputs: ``(..., in_features)``.
      out_sharding: as in :class:`flax.nnx.Linear`.

    Returns:
      ``(..., out_features)``.
    """
    if inputs.ndim < 1 or inputs.shape[-1] != self.in_features:
      raise ValueError(f"inputs must have shape (..., {self.in_features}) for "
                       f"in_features={self.in_features}, got shape {tuple(inputs.shape)}.")
    return super().__call__(inputs, out_sharding=out_sharding)

"""Integer adder layers: the quantized counterparts of AdderConv and AdderDense.

Each output channel belongs to a group ``g`` with scale ``s_g``; the layer
quantizes its input once per group (`quantize_activations`), accumulates
``-sum |a_q - m w_q|`` over the fan-in in int32 with the XLA loops of
`adderjax.ops.xla` (integer operands: subtract, abs, add), and only then
returns to floating point: ``y = step_g * acc + b_c (+ bias)``. The layers
run anywhere XLA does and export with `jax.export`.
"""

from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from adderjax._layer_common import pad_input
from adderjax.ops import xla
from adderjax.ops.spec import conv_spec
from adderjax.quant.quantizers import activation_step, input_multiplier, quantize_activations

__all__ = ["QuantizedAdderConv", "QuantizedAdderDense", "QuantizedConstant"]


class QuantizedConstant(nnx.Variable):
  """A constant of a quantized layer: integer kernel, scales, correction. Not trained."""


class _QuantizedAdder(nnx.Module):
  """What both integer layers share: the constants and the grouped integer sum.

  Args:
    kernel_codes: the weight codes ``w_q``, int, output channels last.
    channel_group: the group of each output channel, ``(out,)`` ints in ``0..G-1``.
    scales: each group's scale ``s_g``, ``(G,)``.
    correction: ``b_c`` of each output channel, ``(out,)``.
    bits: the number of bits; kept as an int32 array (a `QuantizedConstant`),
      not a static attribute, so that models quantized to different bits share
      their compiled functions.
    signed_inputs: whether the input quantizer is signed.
    bias: the float layer's bias, or None.
  """

  def __init__(self, kernel_codes: np.ndarray, channel_group: np.ndarray, scales: np.ndarray,
               correction: np.ndarray, *, bits: int, signed_inputs: bool,
               bias: jax.Array | None):
    channel_group = np.asarray(channel_group, np.int64)
    groups = len(scales)
    # The kernel is kept sorted by group, so that each group is a static slice.
    order = np.argsort(channel_group, kind="stable")
    storage = jnp.int8 if bits <= 8 else jnp.int16
    self.kernel = QuantizedConstant(jnp.asarray(np.asarray(kernel_codes)[..., order], storage))
    self.scales = QuantizedConstant(jnp.asarray(scales, jnp.float32))
    self.correction = QuantizedConstant(jnp.asarray(correction, jnp.float32))
    self.channel_group = QuantizedConstant(jnp.asarray(channel_group, jnp.int32))
    self.bias = nnx.data(None) if bias is None else QuantizedConstant(jnp.asarray(bias))
    self.group_sizes = tuple(int(np.sum(channel_group == g)) for g in range(groups))
    self.inverse_order = tuple(int(i) for i in np.argsort(order))
    self.bits = QuantizedConstant(jnp.asarray(bits, jnp.int32))
    self.signed_inputs = signed_inputs

  def integer_kernel(self) -> jax.Array:
    """The weight codes ``w_q`` in the original channel order (int32)."""
    return self.kernel[...].astype(jnp.int32)[..., jnp.asarray(self.inverse_order)]

  def _accumulate(self, x: jax.Array, spec_of) -> jax.Array:
    """``-sum |a_q - m w_q|`` of each output channel, int32, original channel order."""
    m = input_multiplier(self.signed_inputs)
    kernel = self.kernel[...].astype(jnp.int32) * m
    x = x.astype(jnp.float32)  # half precision would round the codes
    sums, start = [], 0
    for g, size in enumerate(self.group_sizes):
      codes = quantize_activations(x, self.scales[g], self.bits[...],
                                   signed=self.signed_inputs)
      w = kernel[..., start:start + size]
      sums.append(xla.forward(codes, w, spec_of(codes, w)))
      start += size
    acc = jnp.concatenate(sums, axis=-1)
    return jnp.take(acc, jnp.asarray(self.inverse_order, jnp.int32), axis=-1)

  def _dequantize(self, acc: jax.Array) -> jax.Array:
    step = activation_step(self.scales[...], self.bits[...], signed=self.signed_inputs)
    y = acc.astype(jnp.float32) * step[self.channel_group[...]] + self.correction[...]
    return y if self.bias is None else y + self.bias[...]


def _float_struct(a: jax.Array) -> jax.ShapeDtypeStruct:
  # conv_spec validates float operands; the geometry is the same for the codes.
  return jax.ShapeDtypeStruct(a.shape, jnp.float32)


class QuantizedAdderConv(_QuantizedAdder):
  """An :class:`adderjax.nn.AdderConv` computing in integers; built by `adderjax.quant.quantize`.

  ``y = step_g * (-sum |a_q - m w_q|) + b_c (+ bias)``, the sum in int32 over
  each patch (zero padding is the code 0, the activation 0, as in the float
  layer). Grouped convolutions (``feature_group_count > 1``) are not supported.

  Args:
    layer: the float layer, whose geometry and bias it takes.
    kernel_codes, channel_group, scales, correction, bits, signed_inputs: as
      computed by `adderjax.quant.quantize`.
  """

  def __init__(self, layer, kernel_codes: np.ndarray, channel_group: np.ndarray,
               scales: np.ndarray, correction: np.ndarray, *, bits: int, signed_inputs: bool):
    if layer.feature_group_count != 1:
      raise ValueError(f"quantizing a grouped AdderConv is not supported (feature_group_count="
                       f"{layer.feature_group_count}).")
    bias = None if layer.bias is None else layer.bias[...]
    super().__init__(kernel_codes, channel_group, scales, correction, bits=bits,
                     signed_inputs=signed_inputs, bias=bias)
    self.in_features = layer.in_features
    self.out_features = layer.out_features
    self.strides = layer.strides
    self.padding = layer.padding
    self.kernel_dilation = layer.kernel_dilation

  def accumulate(self, inputs: jax.Array) -> jax.Array:
    """The int32 sums ``-sum |a_q - m w_q|``, ``(batch, out_height, out_width, out)``.

    Args:
      inputs: ``(batch, height, width, in_features)`` floats.
    """
    x, padding = pad_input(inputs, self.kernel.shape[:2], self.kernel_dilation, self.padding)

    def spec_of(codes, w):
      return conv_spec(_float_struct(codes), _float_struct(w), strides=self.strides,
                       padding=padding, rhs_dilation=self.kernel_dilation, feature_group_count=1)

    return self._accumulate(x, spec_of)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """The layer's output, ``(*batch, out_height, out_width, out_features)`` floats."""
    if inputs.ndim < 3 or inputs.shape[-1] != self.in_features:
      raise ValueError(f"inputs must have shape (*batch, height, width, {self.in_features}), got "
                       f"shape {tuple(inputs.shape)}.")
    batch_shape = inputs.shape[:-3]
    x = inputs.reshape((math.prod(batch_shape),) + inputs.shape[-3:])
    y = self._dequantize(self.accumulate(x))
    return y.reshape(batch_shape + y.shape[1:])


class QuantizedAdderDense(_QuantizedAdder):
  """An :class:`adderjax.nn.AdderDense` computing in integers; built by `adderjax.quant.quantize`.

  ``y = step_g * (-sum_k |a_q[k] - m w_q[k, n]|) + b_c (+ bias)``.

  Args:
    layer: the float layer, whose bias it takes.
    kernel_codes, channel_group, scales, correction, bits, signed_inputs: as
      computed by `adderjax.quant.quantize`.
  """

  def __init__(self, layer, kernel_codes: np.ndarray, channel_group: np.ndarray,
               scales: np.ndarray, correction: np.ndarray, *, bits: int, signed_inputs: bool):
    bias = None if layer.bias is None else layer.bias[...]
    # Stored as a 1x1 convolution's kernel, (1, 1, in, out).
    super().__init__(np.asarray(kernel_codes)[None, None], channel_group, scales, correction,
                     bits=bits, signed_inputs=signed_inputs, bias=bias)
    self.in_features = layer.in_features
    self.out_features = layer.out_features

  def integer_kernel(self) -> jax.Array:
    """The weight codes ``w_q``, ``(in_features, out_features)`` int32."""
    return super().integer_kernel()[0, 0]

  def accumulate(self, inputs: jax.Array) -> jax.Array:
    """The int32 sums ``-sum_k |a_q[k] - m w_q[k, n]|``, ``(..., out_features)``."""
    x = inputs.reshape(-1, 1, 1, inputs.shape[-1])

    def spec_of(codes, w):
      return conv_spec(_float_struct(codes), _float_struct(w), strides=1, padding="VALID",
                       rhs_dilation=1, feature_group_count=1)

    acc = self._accumulate(x, spec_of)
    return acc.reshape(*inputs.shape[:-1], acc.shape[-1])

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """The layer's output, ``(..., out_features)`` floats."""
    if inputs.ndim < 1 or inputs.shape[-1] != self.in_features:
      raise ValueError(f"inputs must have shape (..., {self.in_features}), got shape "
                       f"{tuple(inputs.shape)}.")
    return self._dequantize(self.accumulate(inputs))

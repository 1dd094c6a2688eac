"""Integer adder layers: the quantized counterparts of AdderConv and AdderDense.

Each output channel belongs to a group ``g`` with scale ``s_g``; the layer
quantizes its input once per group (`quantize_activations`), accumulates
``-sum |a_q - m w_q|`` over the fan-in in int32 with the XLA loops
(`adderjax.ops.xla.integer_forward`: subtract, abs, add), and only then
returns to floating point: ``y = step_g * acc + b_c (+ bias)``. The layers
run anywhere XLA does and export with `jax.export`.

On a CPU backend where the native kernels build, the sums (and the float
epilogue) run instead in the native kernels of `adderjax.ops.cpu_native_int`,
in uint8 lanes (``vpsadbw``) up to 8 bits and int16 lanes up to 14 bits (15
for signed inputs); ``implementation=`` chooses (see `_QuantizedAdder`).
"""

from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from adderjax._layer_common import pad_input
from adderjax.ops import cpu_native, cpu_native_int, xla
from adderjax.ops.spec import ConvSpec, conv_spec
from adderjax.quant.quantizers import (
    activation_code_range,
    activation_multiplier,
    activation_step,
    input_multiplier,
    quantize_activations,
)

__all__ = ["IMPLEMENTATIONS", "QuantizedAdderConv", "QuantizedAdderDense", "QuantizedConstant",
           "check_implementation"]

IMPLEMENTATIONS = ("xla", "cpu")
"""The names ``implementation=`` of the integer layers takes (besides None)."""


def check_implementation(implementation: object) -> str | None:
  """Returns ``implementation`` if the integer layers accept it, else raises a ValueError."""
  if implementation is not None and (not isinstance(implementation, str)
                                     or implementation not in IMPLEMENTATIONS):
    raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got "
                     f"implementation={implementation!r}.")
  return implementation


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
    implementation: where the integer sums run: None (default) for the native
      CPU kernels on a CPU backend where they build and have lanes for these
      bits, else the XLA loops; ``"xla"`` for the XLA loops (any backend; what
      `adderjax.export.save` uses); ``"cpu"`` for the native kernels (a CPU
      backend where they build; bits without native lanes still take the XLA
      loops). An attribute: it can be changed after construction.

  The native kernels' lanes depend on the bits, so each layer keeps them as a
  static attribute, ``lanes`` (``"uint8"`` up to 8 bits, ``"int16"`` up to 14,
  or 15 for signed inputs, else None): models of 2 to 8 bits share their
  compiled functions on either path, as do models of 9 to 14 bits.
  """

  def __init__(self, kernel_codes: np.ndarray, channel_group: np.ndarray, scales: np.ndarray,
               correction: np.ndarray, *, bits: int, signed_inputs: bool,
               bias: jax.Array | None, implementation: str | None = None):
    channel_group = np.asarray(channel_group, np.int64)
    scale_groups = len(scales)
    # The kernel is kept sorted by group, so that each group is a static slice.
    order = np.argsort(channel_group, kind="stable")
    storage = jnp.int8 if bits <= 8 else jnp.int16
    self.kernel = QuantizedConstant(jnp.asarray(np.asarray(kernel_codes)[..., order], storage))
    self.scales = QuantizedConstant(jnp.asarray(scales, jnp.float32))
    self.correction = QuantizedConstant(jnp.asarray(correction, jnp.float32))
    self.channel_group = QuantizedConstant(jnp.asarray(channel_group, jnp.int32))
    self.bias = nnx.data(None) if bias is None else QuantizedConstant(jnp.asarray(bias))
    self.group_sizes = tuple(int(np.sum(channel_group == g)) for g in range(scale_groups))
    self.inverse_order = tuple(int(i) for i in np.argsort(order))
    self.bits = QuantizedConstant(jnp.asarray(bits, jnp.int32))
    self.signed_inputs = signed_inputs
    self.lanes = cpu_native_int.lanes_for(bits, signed=signed_inputs)
    self.implementation = check_implementation(implementation)

  def integer_kernel(self) -> jax.Array:
    """The weight codes ``w_q`` in the original channel order (int32)."""
    return self.kernel[...].astype(jnp.int32)[..., jnp.asarray(self.inverse_order)]

  def _native(self) -> bool:
    """Whether this call runs the native kernels (see ``implementation``, checked here)."""
    implementation = check_implementation(self.implementation)
    if implementation == "xla":
      return False
    if implementation is None:
      return (jax.default_backend() == "cpu" and self.lanes is not None
              and cpu_native.available())
    cpu_native.check_usable()
    return self.lanes is not None

  def _codes(self, x: jax.Array) -> list[jax.Array]:
    """The input quantized with each group's scale (int32 codes)."""
    x = x.astype(jnp.float32)  # half precision would round the codes
    return [quantize_activations(x, self.scales[g], self.bits[...], signed=self.signed_inputs)
            for g in range(len(self.group_sizes))]

  def _quantizer(self) -> jax.Array:
    """Each group's multiplier and the codes' range, for the native kernels (float32)."""
    signed = self.signed_inputs
    multipliers = [activation_multiplier(self.scales[g], self.bits[...], signed=signed)
                   for g in range(len(self.group_sizes))]
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in
                      (*multipliers, *activation_code_range(self.bits[...], signed=signed))])

  def _restore_order(self, y: jax.Array) -> jax.Array:
    return jnp.take(y, jnp.asarray(self.inverse_order, jnp.int32), axis=-1)

  def _accumulate(self, x: jax.Array, spec: ConvSpec, *, native: bool) -> jax.Array:
    """``-sum |a_q - m w_q|`` of each output channel, int32, original channel order."""
    if native:
      return self._native_call(x, spec)
    codes = self._codes(x)
    kernel = self.kernel[...].astype(jnp.int32) * input_multiplier(self.signed_inputs)
    sums, start = [], 0
    for g, size in enumerate(self.group_sizes):
      sums.append(xla.integer_forward(codes[g], kernel[..., start:start + size], spec))
      start += size
    return self._restore_order(jnp.concatenate(sums, axis=-1))

  def _channel_step(self) -> jax.Array:
    step = activation_step(self.scales[...], self.bits[...], signed=self.signed_inputs)
    return step[self.channel_group[...]]

  def _dequantize(self, acc: jax.Array) -> jax.Array:
    y = acc.astype(jnp.float32) * self._channel_step() + self.correction[...]
    return y if self.bias is None else y + self.bias[...]

  def _output(self, x: jax.Array, spec: ConvSpec, *, native: bool) -> jax.Array:
    """The layer's float output: the native kernels' fused epilogue, or the sums dequantized.

    The epilogue rounds as XLA's fusion of `_dequantize` does (the product and
    the correction as one fused multiply-add, then the bias), so both paths
    give the same floats when jitted; a zero bias where there is none adds
    nothing (``y + 0 = y``).
    """
    if not native:
      return self._dequantize(self._accumulate(x, spec, native=False))
    order = self._sorted_channels()
    bias = jnp.zeros_like(self.correction[...]) if self.bias is None else self.bias[...]
    epilogue = tuple(jnp.asarray(a, jnp.float32)[order]
                     for a in (self._channel_step(), self.correction[...], bias))
    return self._native_call(x, spec, epilogue)

  def _native_call(self, x: jax.Array, spec: ConvSpec, epilogue=None) -> jax.Array:
    """The native kernels' int32 sums, or with ``epilogue`` their float outputs, original order."""
    return cpu_native_int.integer_forward(
        x.astype(jnp.float32), self.kernel[...], spec, quantizer=self._quantizer(),
        group_sizes=self.group_sizes, lanes=self.lanes, signed=self.signed_inputs,
        channels=self._sorted_channels(), epilogue=epilogue)

  def _sorted_channels(self) -> np.ndarray:
    """The original channel of each channel in the kernel's (group-sorted) order."""
    return np.argsort(self.inverse_order)


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
    implementation: None, ``"xla"`` or ``"cpu"``: where the sums run (see
      `_QuantizedAdder`).
  """

  def __init__(self, layer, kernel_codes: np.ndarray, channel_group: np.ndarray,
               scales: np.ndarray, correction: np.ndarray, *, bits: int, signed_inputs: bool,
               implementation: str | None = None):
    if layer.feature_group_count != 1:
      raise ValueError(f"quantizing a grouped AdderConv is not supported (feature_group_count="
                       f"{layer.feature_group_count}).")
    bias = None if layer.bias is None else layer.bias[...]
    super().__init__(kernel_codes, channel_group, scales, correction, bits=bits,
                     signed_inputs=signed_inputs, bias=bias, implementation=implementation)
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
    return self._accumulate(*self._padded(inputs), native=self._native())

  def _padded(self, inputs: jax.Array) -> tuple[jax.Array, ConvSpec]:
    """The input (padded here for the periodic and reflecting modes) and the layer's spec on it."""
    x, padding = pad_input(inputs, self.kernel.shape[:2], self.kernel_dilation, self.padding)
    spec = conv_spec(_float_struct(x), _float_struct(self.kernel), strides=self.strides,
                     padding=padding, rhs_dilation=self.kernel_dilation, feature_group_count=1)
    return x, spec

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """The layer's output, ``(*batch, out_height, out_width, out_features)`` floats."""
    if inputs.ndim < 3 or inputs.shape[-1] != self.in_features:
      raise ValueError(f"inputs must have shape (*batch, height, width, {self.in_features}), got "
                       f"shape {tuple(inputs.shape)}.")
    batch_shape = inputs.shape[:-3]
    x = inputs.reshape((math.prod(batch_shape),) + inputs.shape[-3:])
    y = self._output(*self._padded(x), native=self._native())
    return y.reshape(batch_shape + y.shape[1:])


class QuantizedAdderDense(_QuantizedAdder):
  """An :class:`adderjax.nn.AdderDense` computing in integers; built by `adderjax.quant.quantize`.

  ``y = step_g * (-sum_k |a_q[k] - m w_q[k, n]|) + b_c (+ bias)``.

  Args:
    layer: the float layer, whose bias it takes.
    kernel_codes, channel_group, scales, correction, bits, signed_inputs: as
      computed by `adderjax.quant.quantize`.
    implementation: None, ``"xla"`` or ``"cpu"``: where the sums run (see
      `_QuantizedAdder`).
  """

  def __init__(self, layer, kernel_codes: np.ndarray, channel_group: np.ndarray,
               scales: np.ndarray, correction: np.ndarray, *, bits: int, signed_inputs: bool,
               implementation: str | None = None):
    bias = None if layer.bias is None else layer.bias[...]
    # Stored as a 1x1 convolution's kernel, (1, 1, in, out).
    super().__init__(np.asarray(kernel_codes)[None, None], channel_group, scales, correction,
                     bits=bits, signed_inputs=signed_inputs, bias=bias,
                     implementation=implementation)
    self.in_features = layer.in_features
    self.out_features = layer.out_features

  def integer_kernel(self) -> jax.Array:
    """The weight codes ``w_q``, ``(in_features, out_features)`` int32."""
    return super().integer_kernel()[0, 0]

  def accumulate(self, inputs: jax.Array) -> jax.Array:
    """The int32 sums ``-sum_k |a_q[k] - m w_q[k, n]|``, ``(..., out_features)``."""
    native = self._native()
    acc = self._accumulate(*self._as_pixels(inputs, native), native=native)
    return acc.reshape(*inputs.shape[:-1], acc.shape[-1])

  def _as_pixels(self, inputs: jax.Array, native: bool) -> tuple[jax.Array, ConvSpec]:
    """The inputs as 1x1 convolution inputs, and the layer's spec on them.

    An image per row for the XLA loops; one row of pixels for the native
    kernels, whose tiles span consecutive pixels of a row.
    """
    features = inputs.shape[-1]
    x = inputs.reshape((1, 1, -1, features) if native else (-1, 1, 1, features))
    spec = conv_spec(_float_struct(x), _float_struct(self.kernel), strides=1, padding="VALID",
                     rhs_dilation=1, feature_group_count=1)
    return x, spec

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """The layer's output, ``(..., out_features)`` floats."""
    if inputs.ndim < 1 or inputs.shape[-1] != self.in_features:
      raise ValueError(f"inputs must have shape (..., {self.in_features}), got shape "
                       f"{tuple(inputs.shape)}.")
    native = self._native()
    y = self._output(*self._as_pixels(inputs, native), native=native)
    return y.reshape(*inputs.shape[:-1], y.shape[-1])

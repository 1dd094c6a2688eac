"""Native CPU kernels of the integer adder layers: ``-sum |a_q - m w_q|`` in narrow lanes.

The integer layers of `adderjax.quant` sum ``|a_q - m w_q|`` (``m = 2`` for
unsigned inputs, 1 for signed ones) in int32. The XLA loops do it in int32
lanes, at the float adder's rate at best; the FFI handlers of
``csrc/adder_int_cpu.cc``, built into the library of `adderjax.ops.native_build`,
do it in narrower lanes, exactly:

- ``"uint8"`` (bits <= 8): ``vpsadbw``, 32 pairs per AVX2 instruction. Unsigned
  inputs: ``|a - 2w| = |a - W| + c`` with ``W = 2w, c = 0`` for ``w >= 0`` and
  ``W = 0, c = -2w`` for ``w < 0``, the ``c`` of each output channel summed
  here once; signed inputs: ``|(a + 128) - (w + 128)|``.
- ``"int16"`` (``|a_q - m w_q| < 2^15``: bits <= 14 for unsigned inputs, 15
  for signed ones): ``max - min`` of 16-bit lanes, widened to int32 each step.

Other bit widths have no native kernel (:func:`lanes_for` is None). The kernel
takes the float input and quantizes it itself, per scale group, a window of
rows at a time (rounding as XLA does; the padding is the code of 0.0), so that
no code tensor is written out, and writes each output channel to its place
in the layer's order, either as the int32 sums or with the layer's float
epilogue ``step * acc + correction + bias`` applied.

Example:
  >>> from adderjax.ops import cpu_native_int
  >>> cpu_native_int.lanes_for(8, signed=False), cpu_native_int.lanes_for(15, signed=False)
  ('uint8', None)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from adderjax.ops import native_build
from adderjax.ops.spec import ConvSpec

__all__ = ["Lanes", "integer_forward", "lanes_for"]

Lanes = Literal["uint8", "int16"]


def lanes_for(bits: int, *, signed: bool) -> Lanes | None:
  """The narrowest lanes that hold the layer's codes and their differences exactly, or None."""
  if bits <= 8:
    return "uint8"
  # |a_q - m w_q| <= 2^(b+1) - 1 (unsigned inputs) or 2^b - 1 (signed) must fit int16.
  return "int16" if bits + (0 if signed else 1) <= 15 else None


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _channels_per_vector() -> int:
  return int(native_build.load()[0].AdderjaxIntegerChannelsPerVector())


def _pad_groups(a, group_sizes: Sequence[int], multiple: int, fill: int = 0):
  """``a`` (channels last) with each group's channels padded with ``fill`` to a ``multiple``.

  A NumPy array stays one (static attributes); anything else becomes a JAX array.
  """
  xp = np if isinstance(a, np.ndarray) else jnp
  parts, start = [], 0
  for size in group_sizes:
    widths = [(0, 0)] * (a.ndim - 1) + [(0, _round_up(size, multiple) - size)]
    parts.append(xp.pad(a[..., start:start + size], widths, constant_values=fill))
    start += size
  return xp.concatenate(parts, axis=-1)


def _filters(kernel: jax.Array, group_sizes: Sequence[int], lanes: Lanes,
             signed: bool) -> tuple[jax.Array, jax.Array]:
  """The packed filters and each (padded) output channel's constant ``C_o`` (int32).

  Filters as ``(V, chunks, N, chunk)``: V vectors of N output channels (each
  group padded to whole vectors with zero channels), the fan-in in chunks of
  8 bytes (zeros past it), a vector's chunk ``q`` holding chunk ``q`` of each
  of its channels: one ``vpsadbw`` of a broadcast chunk of a patch against it
  adds to N channels at once, each in its own 64-bit lane.
  """
  kh, kw, c, _ = kernel.shape
  w = kernel.astype(jnp.int32).reshape(kh * kw * c, -1)
  constant = jnp.zeros(w.shape[1:], jnp.int32)
  if lanes == "uint8":
    if signed:
      packed = w + 128
    else:
      packed = jnp.where(w >= 0, 2 * w, 0)
      constant = jnp.sum(jnp.where(w < 0, -2 * w, 0), axis=0)
    dtype = jnp.uint8
  else:
    packed, dtype = w * (1 if signed else 2), jnp.int16
  n = _channels_per_vector()
  chunk = 8 // np.dtype(dtype).itemsize
  k = packed.shape[0]
  # Zero lanes past the fan-in, against zero lanes of the patches: |0 - 0| adds nothing.
  packed = _pad_groups(jnp.pad(packed, ((0, _round_up(k, chunk) - k), (0, 0))), group_sizes, n)
  chunks = packed.shape[0] // chunk
  packed = packed.reshape(chunks, chunk, -1, n).transpose(2, 0, 3, 1)
  return packed.astype(dtype), _pad_groups(constant, group_sizes, n)


def integer_forward(x: jax.Array, w: jax.Array, spec: ConvSpec, *, quantizer: jax.Array,
                    group_sizes: Sequence[int], lanes: Lanes, signed: bool,
                    channels: Sequence[int] | None = None,
                    epilogue: tuple[jax.Array, jax.Array, jax.Array] | None = None) -> jax.Array:
  """``-sum |a_q - m w_q|`` over each patch, each group against its own codes of ``x``.

  The native counterpart of `adderjax.ops.xla.integer_forward`, with the same
  leading arguments, except that ``x`` is the float input: the kernel
  quantizes it itself, a window of rows at a time, as
  `adderjax.quant.quantize_activations` does: ``clip(round(x * mult_g), lo,
  hi)``, rounding half to even; the padding is the code of 0.0. The sums are
  bit for bit those of `adderjax.ops.xla.integer_forward` on the codes.

  Args:
    x: the layer's input, ``(B, H, W, C)`` float32, not padded.
    w: the weight codes ``w_q``, ``(kh, kw, C, O)``, output channels sorted
      by group (``group_sizes[0]`` of the first, ...).
    spec: the layer's geometry (``groups == 1``).
    quantizer: ``(G + 2,)`` float32: each group's multiplier
      (`adderjax.quant.activation_multiplier`), then the lowest and the highest
      code.
    group_sizes: the number of output channels of each group.
    lanes: `lanes_for` the layer's bits (not None).
    signed: whether the codes are signed (``m = 1``), else unsigned (``m = 2``).
    channels: where each of ``w``'s output channels goes in the result (a
      permutation of ``range(O)``); None keeps ``w``'s order.
    epilogue: None for the int32 sums, or ``(step, correction, bias)`` of each
      output channel (float32, ``(O,)``, sorted as ``w``) for the float32
      ``step * acc + correction + bias``.

  Returns:
    ``(B, Ho, Wo, O)``, int32 or float32, channels placed by ``channels``.
  """
  kh, kw, _, out = w.shape
  batch = x.shape[0]
  ho, wo = spec.output_spatial(x.shape[1:3], (kh, kw))
  out_dtype = jnp.int32 if epilogue is None else jnp.float32
  if not batch * ho * wo:
    return jnp.zeros((batch, ho, wo, out), out_dtype)
  ((top, _), (left, _)) = spec.padding
  # Signed codes in uint8 lanes are shifted by 128, the padding (the code 0) with them.
  shift = 128 if lanes == "uint8" and signed else 0
  packed, constant = _filters(w, group_sizes, lanes, signed)
  n = _channels_per_vector()
  channels = np.arange(out) if channels is None else np.asarray(channels, np.int64)
  if sorted(channels.tolist()) != list(range(out)):
    raise ValueError(f"channels must be a permutation of range({out}), got channels={channels}.")
  # The padding lanes of each group's last vector go nowhere (-1).
  lanes_to_channels = _pad_groups(channels, group_sizes, n, fill=-1)
  target, _ = native_build.INTEGER_TARGETS[(lanes, epilogue is not None)]
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((batch, ho, wo, out), out_dtype),
                          vmap_method="sequential")
  (sh, sw), (dh, dw) = spec.strides, spec.dilation
  extra = () if epilogue is None else tuple(
      _pad_groups(jnp.asarray(e, jnp.float32), group_sizes, n) for e in epilogue)
  return call(jnp.asarray(x, jnp.float32), jnp.asarray(quantizer, jnp.float32), packed, constant,
              *extra, kh=np.int64(kh), kw=np.int64(kw), sh=np.int64(sh), sw=np.int64(sw),
              dh=np.int64(dh), dw=np.int64(dw), top=np.int64(top), left=np.int64(left),
              shift=np.int64(shift), group_sizes=np.asarray(group_sizes, np.int64),
              channels=lanes_to_channels.astype(np.int64))

"""A quantized AdderNet lowered to an integer-only program, and its exact NumPy executor.

`lower` turns the output of `adderjax.quant.quantize` (LeNet-5-BN,
:class:`adderjax.models.CifarResNet`) into an `IntegerProgram`: a list of
integer operations with integer constants only, from raw uint8 pixels to
integer logits. `IntegerProgram.run` executes it in NumPy int64 arithmetic:
it is the exact definition of the program (the C code of
`adderjax.export.save_c` computes the same integers bit for bit). It is not
bit-equal to the quantized JAX model, whose epilogue is in floating point,
but close: the input codes of every adder layer are the same up to the
rounding of values at a code boundary.

Tensors hold one image's ``(height, width, channels)`` in one of two storages
(`Tensor.storage`):

- **codes**: the input codes of one adder layer, one copy per scale group of
  that layer (``(groups, H, W, C)``): unsigned ``0..2^b - 1`` or signed
  ``-2^(b-1)..2^(b-1) - 1``, as `adderjax.quant.quantize_activations`. The
  C code stores them as uint8 for ``b <= 8`` (signed codes offset by 128)
  and int32 above. A tensor that several adder layers read (a ResNet block's
  input: its first convolution and its projection shortcut) is requantized
  once per consumer.
- **wide**: a fixed-point int32 tensor, ``value = t * 2^-fraction_bits``,
  with one ``fraction_bits`` per tensor chosen at lowering from the range of
  the tensor that the constants prove (``|t| <= 2^29``, at most 24 fraction
  bits). Every value between the layers (after BatchNorm, ReLU, residual
  additions and pools) is a wide tensor.

Operations:

- `InputTable`: the pixel ``p`` of channel ``c`` through a 256-entry table:
  the normalisation ``x = (p / 255 - mean_c) / std_c`` and the consumer's
  input quantization (per scale group: the codes of the first adder layer),
  or the fixed-point ``x`` for a multiplicative first layer (the ResNet stem).
- `AdderSum`: ``acc_c = -sum |a_q - m w_q|`` over each patch, in int32,
  exactly as :class:`adderjax.quant.QuantizedAdderConv` and
  :class:`adderjax.quant.QuantizedAdderDense` (a dense layer is a 1x1
  convolution on a flattened tensor; zero padding is the code 0).
- `MulSum`: ``acc_c = sum t * w_c`` with symmetric per-output-channel int8
  weights, in int64: the multiplicative layers (the ResNet stem and
  classifier, any ``nnx.Conv`` / ``nnx.Linear``), which `lower` quantizes
  itself. These are the network's only multiplications inside a patch sum,
  as in the paper's networks.
- `Epilogue` (part of both sums): ``t = clamp(rshift((acc * M_c + O_c), k_c))``,
  the per-channel fixed-point form of the group's step, the clamp
  correction, the bias, the BatchNorm and the ReLU.
- `Quantize`: a wide tensor to the codes of one adder layer,
  ``clip(rshift(t * M_g, k_g), lo, hi)`` per scale group.
- `Add` (residual, with ReLU), `MaxPool`, `MeanPool` (global average) and
  `Flatten`.

``rshift(x, k)`` is ``floor((x + 2^(k-1)) / 2^k)`` (rounding half up; ``x``
for ``k = 0``). Multipliers have up to 31 bits (at least 2^-16 relative
precision where the range leaves less room), so the fixed-point rounding is
negligible next to the codes'. `lower` proves from the constants that no
int32 tensor and no int64 intermediate overflows, and raises a ValueError
naming the layer where one could.

Example (pixels in [0, 1], no normalisation):
  >>> import numpy as np
  >>> from flax import nnx
  >>> from adderjax import models, quant
  >>> model = models.lenet5_bn(kind="adder", rngs=nnx.Rngs(0))
  >>> pixels = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), np.uint8)
  >>> qmodel, _ = quant.quantize(model, [pixels / np.float32(255)], bits=8, scale_groups=2)
  >>> program = quant.lower(qmodel, input_shape=(28, 28, 1))
  >>> logits = program.run(pixels)
  >>> logits.shape, logits.dtype
  ((8, 10), dtype('int64'))
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math
from typing import Any

import jax
import numpy as np

from adderjax._checks import positive_pair
from adderjax.ops.spec import ConvSpec, conv_spec

__all__ = [
    "Add",
    "AdderSum",
    "Epilogue",
    "Flatten",
    "InputTable",
    "IntegerProgram",
    "MaxPool",
    "MeanPool",
    "MulSum",
    "Quantize",
    "Tensor",
    "lower",
    "rshift_round",
]

MAX_FRACTION_BITS = 24
"""The most fraction bits of a wide tensor."""
WIDE_BITS = 29
"""Wide tensors are chosen to hold ``|t| <= 2^29`` (int32 with room for rounding)."""
INPUT_BITS = 15
"""The fixed-point input of a multiplicative first layer holds ``|t| <= 2^15``."""
_INT32 = (-2 ** 31, 2 ** 31 - 1)
_INT64_LIMIT = 2 ** 63 - 1


def rshift_round(x: Any, shift: Any) -> Any:
  """``floor((x + 2^(shift-1)) / 2^shift)``, ``x`` where ``shift`` is 0 (ints or int64 arrays).

  Example:
    >>> import numpy as np
    >>> rshift_round(np.array([-3, -2, -1, 1, 2, 3]), 1).tolist()
    [-1, -1, 0, 1, 1, 2]
  """
  if isinstance(x, int) and isinstance(shift, int):
    return x if shift == 0 else (x + (1 << (shift - 1))) >> shift
  x = np.asarray(x, np.int64)
  shift = np.asarray(shift, np.int64)
  half = np.where(shift > 0, np.left_shift(np.int64(1), np.maximum(shift - 1, 0)), 0)
  return np.right_shift(x + half, shift)


@dataclasses.dataclass(eq=False)
class Tensor:
  """One image's activation: ``(height, width, channels)``, codes or wide.

  Attributes:
    name: unique name.
    shape: ``(height, width, channels)``.
    storage: ``"codes"`` (input codes of an adder layer) or ``"wide"``
      (fixed point, ``value = t * 2^-fraction_bits``, int32).
    scale_groups: codes: the number of copies (the scale groups of the consumer).
    bits: codes: their bits.
    signed: codes: signed quantizer.
    fraction_bits: wide: the fixed point's fraction bits.
    low: the least value each channel can take (int64 array, ``(channels,)``).
    high: the largest.
  """

  name: str
  shape: tuple[int, int, int]
  storage: str
  low: np.ndarray
  high: np.ndarray
  scale_groups: int = 1
  bits: int = 0
  signed: bool = False
  fraction_bits: int = 0

  @property
  def size(self) -> int:
    """Elements per image (all scale groups)."""
    return self.scale_groups * math.prod(self.shape)


@dataclasses.dataclass(eq=False)
class Epilogue:
  """``t_c = rshift(acc_c * multiplier_c + offset_c, shift_c)``, then ``max(t, 0)`` if relu."""

  multiplier: np.ndarray
  offset: np.ndarray
  shift: np.ndarray
  relu: bool

  def apply(self, acc: np.ndarray) -> np.ndarray:
    t = rshift_round(acc * self.multiplier + self.offset, self.shift)
    return np.maximum(t, 0) if self.relu else t


@dataclasses.dataclass(eq=False)
class InputTable:
  """Pixels through ``table[g, c, p]`` to codes (``storage="codes"``) or a wide tensor."""

  path: str
  output: str
  table: np.ndarray  # (groups, channels, 256) int64


@dataclasses.dataclass(eq=False)
class AdderSum:
  """``-sum |a_q - multiplier * w_q|`` per patch, the group's codes for each channel; epilogue."""

  path: str
  input: str
  output: str
  kernel: np.ndarray  # (kh, kw, in, out) int64 weight codes
  group: np.ndarray  # (out,) int64
  multiplier: int
  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  dilation: tuple[int, int]
  epilogue: Epilogue


@dataclasses.dataclass(eq=False)
class MulSum:
  """``sum t * w`` per patch (int8 weights, int64 sum; zero padding); epilogue."""

  path: str
  input: str
  output: str
  kernel: np.ndarray  # (kh, kw, in, out) int64 in -127..127
  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  dilation: tuple[int, int]
  epilogue: Epilogue


@dataclasses.dataclass(eq=False)
class Quantize:
  """A wide tensor to codes, per group: ``clip(rshift(t * multiplier_g, shift_g), low, high)``."""

  path: str
  input: str
  output: str
  multiplier: np.ndarray  # (groups,)
  shift: np.ndarray  # (groups,)
  low: int
  high: int


@dataclasses.dataclass(eq=False)
class Add:
  """``rshift(a * multipliers[0] + b * multipliers[1], shift)``, then ReLU if relu."""

  path: str
  inputs: tuple[str, str]
  output: str
  multipliers: tuple[int, int]
  shift: int
  relu: bool


@dataclasses.dataclass(eq=False)
class MaxPool:
  """Max over ``size x size`` windows with ``stride``, ``padding`` never chosen."""

  path: str
  input: str
  output: str
  size: int
  stride: int
  padding: int


@dataclasses.dataclass(eq=False)
class MeanPool:
  """Global average pool: ``rshift(sum_hw t * multiplier, shift)``, to ``(1, 1, C)``."""

  path: str
  input: str
  output: str
  multiplier: int
  shift: int


@dataclasses.dataclass(eq=False)
class Flatten:
  """``(H, W, C)`` to ``(1, 1, H * W * C)`` in NHWC order (no data moves)."""

  path: str
  input: str
  output: str


Operation = InputTable | AdderSum | MulSum | Quantize | Add | MaxPool | MeanPool | Flatten


@dataclasses.dataclass(eq=False)
class IntegerProgram:
  """An integer-only inference program; build it with `lower`.

  Attributes:
    input_shape: one image's ``(height, width, channels)`` of uint8 pixels.
    mean, std: the normalisation folded into the input tables.
    tensors: every tensor by name.
    operations: in execution order.
    output: the name of the logits tensor (wide, ``(1, 1, classes)``).
  """

  input_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  tensors: dict[str, Tensor]
  operations: list[Operation]
  output: str

  @property
  def output_fraction_bits(self) -> int:
    """The logits are ``t * 2^-output_fraction_bits``."""
    return self.tensors[self.output].fraction_bits

  @property
  def num_classes(self) -> int:
    return self.tensors[self.output].shape[-1]

  def run(self, pixels: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """The integer logits of ``(N, H, W, C)`` uint8 pixels: ``(N, classes)`` int64.

    Raises:
      ValueError: if ``pixels`` is not uint8 of shape ``(N, *input_shape)``.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.shape[1:] != self.input_shape or pixels.ndim != 4:
      raise ValueError("pixels must be uint8 of shape "
                       f"(N, {', '.join(map(str, self.input_shape))}), "
                       f"got {pixels.dtype} of shape {pixels.shape}.")
    out = [self._run(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]
    if not out:
      return np.zeros((0, self.num_classes), np.int64)
    return np.concatenate(out)

  def predict(self, pixels: np.ndarray) -> np.ndarray:
    """The predicted class of each image (argmax of `run`, the first on ties)."""
    return np.argmax(self.run(pixels), axis=-1)

  def _run(self, pixels: np.ndarray) -> np.ndarray:
    values: dict[str, np.ndarray] = {}
    for op in self.operations:
      values[op.output] = _execute(op, values, pixels, self.tensors)
    return values[self.output].reshape(len(pixels), -1)


# ---------------------------------------------------------------------------------------------
# The NumPy executor. Codes tensors are (groups, N, H, W, C) arrays, wide ones (N, H, W, C).


def _windows(x: np.ndarray, kh: int, kw: int, strides, dilation, out_hw):
  """``(i, j, view)``: the input under kernel tap ``(i, j)`` for every output position."""
  (sh, sw), (dh, dw), (ho, wo) = strides, dilation, out_hw
  for i in range(kh):
    for j in range(kw):
      yield i, j, x[..., i * dh:i * dh + (ho - 1) * sh + 1:sh,
                    j * dw:j * dw + (wo - 1) * sw + 1:sw, :]


def _pad(x: np.ndarray, padding, value: int) -> np.ndarray:
  pads = [(0, 0)] * (x.ndim - 3) + [tuple(padding[0]), tuple(padding[1]), (0, 0)]
  return np.pad(x, pads, constant_values=value)


def _execute(op: Operation, values: dict, pixels: np.ndarray, tensors: dict) -> np.ndarray:
  out = tensors[op.output]
  if isinstance(op, InputTable):
    channels = np.arange(pixels.shape[-1])
    codes = op.table[:, channels, pixels.astype(np.int64)]  # (G, N, H, W, C)
    return codes if out.storage == "codes" else codes[0]
  if isinstance(op, (AdderSum, MulSum)):
    x = values[op.input]
    kh, kw, _, cout = op.kernel.shape
    ho, wo = out.shape[:2]
    x = _pad(x, op.padding, 0)
    n = x.shape[-4]
    if isinstance(op, MulSum):
      acc = np.zeros((n, ho, wo, cout), np.int64)
      for i, j, view in _windows(x, kh, kw, op.strides, op.dilation, (ho, wo)):
        acc += view @ op.kernel[i, j]
      return op.epilogue.apply(acc)
    # The adder sums fit int32 (`lower` checks): int32 is exact here, and faster.
    x = x.astype(np.int32)
    kernel = (op.multiplier * op.kernel).astype(np.int32)
    groups = [np.flatnonzero(op.group == g) for g in range(x.shape[0])]
    acc = np.zeros((cout, n, ho, wo), np.int32)
    for i, j, view in _windows(x, kh, kw, op.strides, op.dilation, (ho, wo)):
      for g, cs in enumerate(groups):
        for ci in range(view.shape[-1]):
          acc[cs] -= np.abs(view[g, None, ..., ci] - kernel[i, j, ci, cs, None, None, None])
    return op.epilogue.apply(np.moveaxis(acc, 0, -1).astype(np.int64))
  if isinstance(op, Quantize):
    t = values[op.input]
    return np.stack([np.clip(rshift_round(t * m, s), op.low, op.high)
                     for m, s in zip(op.multiplier, op.shift)])
  if isinstance(op, Add):
    a, b = (values[name] for name in op.inputs)
    t = rshift_round(a * op.multipliers[0] + b * op.multipliers[1], op.shift)
    return np.maximum(t, 0) if op.relu else t
  if isinstance(op, MaxPool):
    x = _pad(values[op.input], ((op.padding,) * 2,) * 2, np.iinfo(np.int64).min)
    ho, wo = out.shape[:2]
    views = [v for _, _, v in _windows(x, op.size, op.size, (op.stride,) * 2, (1, 1), (ho, wo))]
    return np.max(np.stack(views), axis=0)
  if isinstance(op, MeanPool):
    total = values[op.input].sum(axis=(-3, -2), keepdims=True)
    return rshift_round(total * op.multiplier, op.shift)
  if isinstance(op, Flatten):
    x = values[op.input]
    return x.reshape(x.shape[:-3] + (1, 1, -1))
  raise TypeError(f"unknown operation {op!r}")


# ---------------------------------------------------------------------------------------------
# Lowering.


def _fraction_bits(max_abs: float, bits: int = WIDE_BITS) -> int:
  """The fraction bits that put ``max_abs`` at or under ``2^bits``."""
  if not max_abs > 0:
    return MAX_FRACTION_BITS
  return min(MAX_FRACTION_BITS, bits - math.ceil(math.log2(max_abs)))


def _fixed_point(a: float, max_input: int, path: str) -> tuple[int, int]:
  """``(M, k)`` with ``M * 2^-k ~ a``, ``|M| < 2^31`` and ``max_input * |M| < 2^62``."""
  if a == 0:
    return 0, 0
  mbits = min(31, 62 - int(max_input).bit_length())
  if mbits < 16:
    raise ValueError(f"layer {path}: inputs up to {max_input} leave {mbits} bits for a "
                     f"fixed-point multiplier; the int64 product could overflow.")
  shift = min(62, mbits - math.frexp(abs(a))[1])
  shift = max(shift, 0)
  m = int(round(a * 2.0 ** shift))
  while abs(m) >= 2 ** mbits and shift > 0:
    shift -= 1
    m = int(round(a * 2.0 ** shift))
  if abs(m) >= 2 ** 31 or abs(m) * max_input >= 2 ** 62:
    raise ValueError(f"layer {path}: the multiplier {a:.6g} does not fit a 31-bit fixed-point "
                     f"number for inputs up to {max_input}: the int64 product could overflow.")
  return m, shift


def _check_int32(low: np.ndarray, high: np.ndarray, path: str) -> None:
  if int(np.min(low)) < _INT32[0] or int(np.max(high)) > _INT32[1]:
    raise ValueError(f"layer {path}: its output could reach [{int(np.min(low))}, "
                     f"{int(np.max(high))}], beyond int32.")


def _epilogue(path: str, acc_low: np.ndarray, acc_high: np.ndarray, a: np.ndarray,
              b: np.ndarray, relu: bool) -> tuple[Epilogue, int, np.ndarray, np.ndarray]:
  """The fixed-point form of ``z = a * acc + b`` (then ReLU); its fraction bits and range."""
  ends = np.stack([a * acc_low + b, a * acc_high + b])
  if relu:
    ends = np.maximum(ends, 0)
  fraction = _fraction_bits(float(np.abs(ends).max()))
  channels = len(a)
  mult, offset, shift = (np.zeros(channels, np.int64) for _ in range(3))
  low, high = np.zeros(channels, np.int64), np.zeros(channels, np.int64)
  for c in range(channels):
    max_input = max(abs(int(acc_low[c])), abs(int(acc_high[c])), 1)
    m, k = _fixed_point(float(a[c]) * 2.0 ** fraction, max_input, path)
    o = int(round(float(b[c]) * 2.0 ** (fraction + k)))
    if max_input * abs(m) + abs(o) + 2 ** k > _INT64_LIMIT:
      raise ValueError(f"layer {path}: channel {c}'s fixed-point epilogue could overflow int64.")
    ends = [rshift_round(int(acc_low[c]) * m + o, k), rshift_round(int(acc_high[c]) * m + o, k)]
    lo, hi = min(ends), max(ends)
    if relu:
      lo, hi = max(lo, 0), max(hi, 0)
    mult[c], offset[c], shift[c], low[c], high[c] = m, o, k, lo, hi
  _check_int32(low, high, path)
  return Epilogue(mult, offset, shift, relu), fraction, low, high


def _conv_geometry(layer: Any, in_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                   path: str) -> ConvSpec:
  """The layer's strides, explicit zero padding and dilation, checked as the adder op does."""
  try:
    return conv_spec(jax.ShapeDtypeStruct((1, *in_shape), np.float32),
                     jax.ShapeDtypeStruct(kernel_shape, np.float32), strides=layer.strides,
                     padding=layer.padding, rhs_dilation=layer.kernel_dilation,
                     feature_group_count=1)
  except ValueError as e:
    raise ValueError(f"layer {path}: {e} (the C export supports zero padding only)") from None


def _out_size(size: int, pad: tuple[int, int], k: int, s: int, d: int) -> int:
  return (size + pad[0] + pad[1] - ((k - 1) * d + 1)) // s + 1


def _batch_norm_affine(bn: Any, features: int, path: str) -> tuple[np.ndarray, np.ndarray]:
  """``(a, b)`` with ``bn(y) = a * y + b`` (running statistics)."""
  if bn is None:
    return np.ones(features), np.zeros(features)
  mean = np.asarray(bn.mean[...], np.float64)
  var = np.asarray(bn.var[...], np.float64)
  if mean.shape != (features,):
    raise ValueError(f"module {path}: a BatchNorm over {mean.shape} after {features} channels "
                     "is not supported.")
  scale = np.ones(features) if bn.scale is None else np.asarray(bn.scale[...], np.float64)
  bias = np.zeros(features) if bn.bias is None else np.asarray(bn.bias[...], np.float64)
  a = scale / np.sqrt(var + float(bn.epsilon))
  return a, bias - mean * a


class _Lowering:
  """Builds the program layer by layer; values are tensor names (``None``: the pixels)."""

  def __init__(self, input_shape, mean, std):
    self.input_shape = input_shape
    self.mean, self.std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    self.tensors: dict[str, Tensor] = {}
    self.ops: list[Operation] = []

  def tensor(self, prefix: str, **kwargs) -> Tensor:
    name = f"t{len(self.tensors)}_{prefix.replace('/', '_')}"
    self.tensors[name] = Tensor(name=name, **kwargs)
    return self.tensors[name]

  def shape(self, value: str | None) -> tuple[int, int, int]:
    return self.input_shape if value is None else self.tensors[value].shape

  def pixel_values(self) -> np.ndarray:
    """``x`` of every pixel value for each channel, ``(C, 256)``."""
    p = np.arange(256, dtype=np.float64) / 255
    return (p[None, :] - self.mean[:, None]) / self.std[:, None]

  def flatten(self, value: str, path: str) -> str:
    t = self.tensors[value]
    if t.shape[:2] == (1, 1):
      return value
    hw = t.shape[0] * t.shape[1]
    out = self.tensor(path + "/flatten", shape=(1, 1, math.prod(t.shape)), storage="wide",
                      low=np.tile(t.low, hw), high=np.tile(t.high, hw),
                      fraction_bits=t.fraction_bits)
    self.ops.append(Flatten(path, value, out.name))
    return out.name

  def codes(self, value: str | None, layer: Any, path: str) -> str:
    """The input codes of an adder layer (per group), from the pixels or a wide tensor."""
    bits, signed = int(layer.bits[...]), bool(layer.signed_inputs)
    scales = np.asarray(layer.scales[...], np.float64)
    levels = 2 ** bits - 1
    # codes = round(x * per_unit_g)
    per_unit = levels / (scales * (2 if signed else 1))
    lo, hi = (-2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, levels)
    shape = self.shape(value)
    out = self.tensor(path + "/codes", shape=shape, storage="codes", scale_groups=len(scales),
                      bits=bits, signed=signed, low=np.full(shape[-1], lo),
                      high=np.full(shape[-1], hi))
    if value is None:
      x = self.pixel_values()
      table = np.clip(np.round(x[None] * per_unit[:, None, None]), lo, hi).astype(np.int64)
      self.ops.append(InputTable(path, out.name, table))
      return out.name
    t = self.tensors[value]
    max_input = max(int(np.abs(t.low).max()), int(np.abs(t.high).max()), 1)
    fixed = [_fixed_point(float(u) * 2.0 ** -t.fraction_bits, max_input, path) for u in per_unit]
    self.ops.append(Quantize(path, value, out.name, np.array([m for m, _ in fixed], np.int64),
                             np.array([k for _, k in fixed], np.int64), lo, hi))
    return out.name

  def wide_input(self, value: str | None, path: str) -> str:
    """A wide tensor for a multiplicative layer: the pixels through a table, or ``value``."""
    if value is not None:
      return value
    x = self.pixel_values()
    fraction = _fraction_bits(float(np.abs(x).max()), INPUT_BITS)
    table = np.round(x * 2.0 ** fraction).astype(np.int64)
    out = self.tensor(path + "/input", shape=self.input_shape, storage="wide",
                      low=table.min(axis=1), high=table.max(axis=1), fraction_bits=fraction)
    self.ops.append(InputTable(path, out.name, table[None]))
    return out.name

  def layer(self, value: str | None, layer: Any, path: str, bn: Any = None, bn_path: str = "",
            relu: bool = False) -> str:
    """A sum layer (adder or multiplicative, conv or dense), its BatchNorm and ReLU folded in."""
    from flax import nnx

    from adderjax.nn import AdderConv, AdderDense
    from adderjax.quant.layers import QuantizedAdderConv, QuantizedAdderDense

    if isinstance(layer, (AdderConv, AdderDense)):
      raise ValueError(f"layer {path} is a float {type(layer).__name__} (left in float, "
                       "keep_float?): the C export needs every adder layer quantized.")
    if bn is not None and not isinstance(bn, nnx.BatchNorm):
      raise ValueError(f"unsupported module {bn_path} ({type(bn).__name__}): expected a "
                       "BatchNorm.")
    dense = isinstance(layer, (QuantizedAdderDense, nnx.Linear))
    if isinstance(layer, (QuantizedAdderConv, nnx.Conv)):
      if getattr(layer, "feature_group_count", 1) != 1:
        raise ValueError(f"layer {path}: grouped convolutions are not supported.")
      if positive_pair(getattr(layer, "input_dilation", 1), "input_dilation") != (1, 1):
        raise ValueError(f"layer {path}: input dilation is not supported.")
    elif not dense:
      raise ValueError(f"unsupported module {path} ({type(layer).__module__}."
                       f"{type(layer).__qualname__}).")
    adder = isinstance(layer, (QuantizedAdderConv, QuantizedAdderDense))
    if adder:
      kernel = np.asarray(layer.integer_kernel(), np.int64)
    else:
      kernel = np.asarray(layer.kernel[...], np.float64)
    if dense:
      if value is not None:
        value = self.flatten(value, path)
      kernel = kernel[None, None]
      strides, dilation, padding = (1, 1), (1, 1), ((0, 0), (0, 0))
    else:
      spec = _conv_geometry(layer, self.shape(value), kernel.shape, path)
      strides, padding, dilation = spec.strides, spec.padding, spec.dilation
    in_shape = self.shape(value)
    kh, kw, cin, cout = kernel.shape
    if in_shape[-1] != cin or (dense and in_shape[:2] != (1, 1)):
      raise ValueError(f"layer {path} takes {cin} input features, its input has shape "
                       f"{in_shape}.")
    out_hw = tuple(_out_size(in_shape[i], padding[i], kernel.shape[i], strides[i], dilation[i])
                   for i in range(2))
    if min(out_hw) < 1:
      raise ValueError(f"layer {path}: input {in_shape} is too small for its kernel.")
    bn_a, bn_b = _batch_norm_affine(bn, cout, bn_path)
    bias = getattr(layer, "bias", None)
    bias = np.zeros(cout) if bias is None else np.asarray(bias[...], np.float64)
    if adder:
      from adderjax.quant.quantizers import input_multiplier

      codes = self.codes(value, layer, path)
      t = self.tensors[codes]
      signed, bits = t.signed, t.bits
      m = input_multiplier(signed)
      group = np.asarray(layer.channel_group[...], np.int64)
      levels = 2 ** bits - 1
      step = np.asarray(layer.scales[...], np.float64) * 2 / (m * levels)
      a = bn_a * step[group]
      b = bn_a * (np.asarray(layer.correction[...], np.float64) + bias) + bn_b
      v = m * kernel.reshape(-1, cout)
      code_lo, code_hi = int(t.low.min()), int(t.high.max())
      worst = np.maximum(np.abs(code_lo - v), np.abs(code_hi - v))
      best = np.where((v >= code_lo) & (v <= code_hi), 0,
                      np.minimum(np.abs(code_lo - v), np.abs(code_hi - v)))
      acc_low, acc_high = -worst.sum(axis=0), -best.sum(axis=0)
      if int(-acc_low.min()) > _INT32[1]:
        raise ValueError(f"layer {path}: its int32 sum could overflow.")
    else:
      source = self.wide_input(value, path)
      t = self.tensors[source]
      max_abs = np.abs(kernel).reshape(-1, cout).max(axis=0)
      weight_scale = np.where(max_abs > 0, max_abs / 127, 1.0)
      kernel = np.round(kernel / weight_scale).astype(np.int64)
      a = bn_a * weight_scale * 2.0 ** -t.fraction_bits
      b = bn_a * bias + bn_b
      lo = np.tile(np.minimum(t.low, 0), kh * kw)[:, None]
      hi = np.tile(np.maximum(t.high, 0), kh * kw)[:, None]
      w = kernel.reshape(-1, cout)
      acc_low = np.minimum(w * lo, w * hi).sum(axis=0)
      acc_high = np.maximum(w * lo, w * hi).sum(axis=0)
      codes = source
    epilogue, fraction, low, high = _epilogue(path, acc_low, acc_high, a, b, relu)
    out = self.tensor(path, shape=out_hw + (cout,), storage="wide", low=low, high=high,
                      fraction_bits=fraction)
    if adder:
      self.ops.append(AdderSum(path, codes, out.name, kernel, group, m, strides, padding,
                               dilation, epilogue))
    else:
      self.ops.append(MulSum(path, codes, out.name, kernel, strides, padding, dilation,
                             epilogue))
    return out.name

  def max_pool(self, value: str, size: int, stride: int, padding: int, path: str) -> str:
    t = self.tensors[value]
    out_hw = tuple(_out_size(s, (padding, padding), size, stride, 1) for s in t.shape[:2])
    out = self.tensor(path, shape=out_hw + t.shape[2:], storage="wide", low=t.low, high=t.high,
                      fraction_bits=t.fraction_bits)
    self.ops.append(MaxPool(path, value, out.name, size, stride, padding))
    return out.name

  def mean_pool(self, value: str, path: str) -> str:
    t = self.tensors[value]
    hw = t.shape[0] * t.shape[1]
    max_input = hw * max(int(np.abs(t.low).max()), int(np.abs(t.high).max()), 1)
    m, k = _fixed_point(1 / hw, max_input, path)
    low = np.array([rshift_round(int(v) * hw * m, k) for v in t.low], np.int64)
    high = np.array([rshift_round(int(v) * hw * m, k) for v in t.high], np.int64)
    out = self.tensor(path, shape=(1, 1, t.shape[2]), storage="wide", low=low, high=high,
                      fraction_bits=t.fraction_bits)
    self.ops.append(MeanPool(path, value, out.name, m, k))
    return out.name

  def add(self, a_name: str, b_name: str, path: str, relu: bool) -> str:
    a, b = self.tensors[a_name], self.tensors[b_name]
    if a.shape != b.shape:
      raise ValueError(f"{path}: adding shapes {a.shape} and {b.shape}.")
    top = max(a.fraction_bits, b.fraction_bits)
    ma, mb = 2 ** (top - a.fraction_bits), 2 ** (top - b.fraction_bits)
    ends = np.stack([a.low * 2.0 ** -a.fraction_bits + b.low * 2.0 ** -b.fraction_bits,
                     a.high * 2.0 ** -a.fraction_bits + b.high * 2.0 ** -b.fraction_bits])
    if relu:
      ends = np.maximum(ends, 0)
    fraction = min(_fraction_bits(float(np.abs(ends).max())), top)
    shift = top - fraction
    biggest = (max(abs(int(a.low.min())), int(a.high.max())) * ma
               + max(abs(int(b.low.min())), int(b.high.max())) * mb + 2 ** shift)
    if biggest > _INT64_LIMIT:
      raise ValueError(f"{path}: the residual addition could overflow int64.")
    low = np.array([rshift_round(int(x) * ma + int(y) * mb, shift)
                    for x, y in zip(a.low, b.low)], np.int64)
    high = np.array([rshift_round(int(x) * ma + int(y) * mb, shift)
                     for x, y in zip(a.high, b.high)], np.int64)
    if relu:
      low, high = np.maximum(low, 0), np.maximum(high, 0)
    _check_int32(low, high, path)
    out = self.tensor(path, shape=a.shape, storage="wide", low=low, high=high,
                      fraction_bits=fraction)
    self.ops.append(Add(path, (a_name, b_name), out.name, (ma, mb), shift, relu))
    return out.name


def _check_relu(activation: Any, path: str) -> None:
  from flax import nnx

  if activation is not nnx.relu:
    name = getattr(activation, "__name__", type(activation).__name__)
    raise ValueError(f"unsupported module {path} ({name}): the integer program supports ReLU "
                     "only.")


def _lower_lenet(lw: _Lowering, model: Any) -> str:
  _check_relu(model.activation, "activation")
  x = lw.layer(None, model.conv1, "conv1", model.bn1, "bn1", relu=True)
  x = lw.max_pool(x, 2, 2, 0, "pool1")
  x = lw.layer(x, model.conv2, "conv2", model.bn2, "bn2", relu=True)
  x = lw.max_pool(x, 2, 2, 0, "pool2")
  x = lw.layer(x, model.fc1, "fc1", model.bn3, "bn3", relu=True)
  x = lw.layer(x, model.fc2, "fc2", model.bn4, "bn4", relu=True)
  return lw.layer(x, model.fc3, "fc3", model.bn5, "bn5", relu=False)


def _lower_basic_block(lw: _Lowering, block: Any, x: str, path: str) -> str:
  from adderjax.models.resnet import BasicBlock, Downsample

  if type(block) is not BasicBlock:
    raise ValueError(f"unsupported module {path} ({type(block).__module__}."
                     f"{type(block).__qualname__}): only BasicBlock residual blocks.")
  _check_relu(block.activation, path + "/activation")
  out = lw.layer(x, block.conv1, path + "/conv1", block.bn1, path + "/bn1", relu=True)
  out = lw.layer(out, block.conv2, path + "/conv2", block.bn2, path + "/bn2", relu=False)
  identity = x
  if block.downsample is not None:
    if type(block.downsample) is not Downsample:
      raise ValueError(f"unsupported module {path}/downsample "
                       f"({type(block.downsample).__qualname__}).")
    identity = lw.layer(x, block.downsample.conv, path + "/downsample/conv",
                        block.downsample.bn, path + "/downsample/bn", relu=False)
  return lw.add(out, identity, path + "/add", relu=True)


def _lower_cifar_resnet(lw: _Lowering, model: Any) -> str:
  _check_relu(model.activation, "activation")
  x = lw.layer(None, model.conv1, "conv1", model.bn1, "bn1", relu=True)
  for name in ("layer1", "layer2", "layer3"):
    for i, block in enumerate(getattr(model, name)):
      x = _lower_basic_block(lw, block, x, f"{name}/{i}")
  x = lw.mean_pool(x, "pool")
  return lw.layer(x, model.fc, "fc", model.bn2, "bn2", relu=False)


def _check_normalisation(values: Sequence[float] | None, name: str, channels: int,
                         default: float) -> tuple[float, ...]:
  if values is None:
    return (default,) * channels
  try:
    values = tuple(float(v) for v in values)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a sequence of numbers, got {name}={values!r}.") from None
  if len(values) != channels or not all(math.isfinite(v) for v in values):
    raise ValueError(f"{name} must have one finite value per input channel ({channels}), got "
                     f"{name}={values!r}.")
  if name == "std" and not all(v > 0 for v in values):
    raise ValueError(f"std must be positive, got std={values!r}.")
  return values


def lower(model: Any, *, input_shape: Sequence[int], mean: Sequence[float] | None = None,
          std: Sequence[float] | None = None) -> IntegerProgram:
  """Lowers a quantized model to an integer-only `IntegerProgram`.

  The model is what `adderjax.quant.quantize` returns (every adder layer a
  :class:`~adderjax.quant.QuantizedAdderConv` or
  :class:`~adderjax.quant.QuantizedAdderDense`); BatchNorm uses its running
  statistics whatever the model's mode. Supported models:
  :class:`adderjax.models.LeNet5BN` and :class:`adderjax.models.CifarResNet`
  (any ``blocks_per_stage``, e.g. ResNet-20), with ReLU. Multiplicative
  layers (``nnx.Conv``, ``nnx.Linear``: the ResNet stem and classifier, or
  LeNet layers left in float) are quantized here to symmetric int8 weights
  per output channel.

  Args:
    model: the quantized model; not changed.
    input_shape: one image's ``(height, width, channels)``.
    mean: per channel, subtracted from ``pixels / 255``; None for 0.
    std: per channel, the divisor after; None for 1.

  Returns:
    The `IntegerProgram` from uint8 pixels to integer logits.

  Raises:
    ValueError: naming the argument for a bad ``input_shape``, ``mean`` or
      ``std``; naming the module for an unsupported model or module, a float
      adder layer (``keep_float``), or a layer whose fixed-point arithmetic
      could overflow int32/int64.

  Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from adderjax import models, quant
    >>> model = models.lenet5_bn(kind="adder", rngs=nnx.Rngs(0))
    >>> pixels = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), np.uint8)
    >>> qmodel, _ = quant.quantize(model, [pixels / np.float32(255)], bits=8, scale_groups=2)
    >>> program = quant.lower(qmodel, input_shape=(28, 28, 1))
    >>> [type(op).__name__ for op in program.operations[:4]]
    ['InputTable', 'AdderSum', 'MaxPool', 'Quantize']
    >>> program.predict(pixels).shape
    (8,)
  """
  from adderjax.models.lenet import LeNet5BN
  from adderjax.models.resnet import CifarResNet

  shape = tuple(input_shape) if isinstance(input_shape, Sequence) else ()
  if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
    raise ValueError(f"input_shape must be (height, width, channels) of positive ints, got "
                     f"input_shape={input_shape!r}.")
  mean = _check_normalisation(mean, "mean", shape[-1], 0.0)
  std = _check_normalisation(std, "std", shape[-1], 1.0)
  lw = _Lowering(shape, mean, std)
  if isinstance(model, LeNet5BN):
    if shape != (28, 28, 1):
      raise ValueError(f"input_shape must be (28, 28, 1) for LeNet-5-BN, got "
                       f"input_shape={input_shape!r}.")
    output = _lower_lenet(lw, model)
  elif isinstance(model, CifarResNet):
    output = _lower_cifar_resnet(lw, model)
  else:
    raise ValueError(f"unsupported module <model> ({type(model).__module__}."
                     f"{type(model).__qualname__}): lower supports LeNet5BN and CifarResNet.")
  return IntegerProgram(input_shape=shape, mean=mean, std=std, tensors=lw.tensors,
                        operations=lw.ops, output=output)

"""The adder convolution as XLA loops that never materialise the broadcast.

Counting the work: an adder layer touches ``B*Ho*Wo * kh*kw*Cg * O`` element
pairs, as many as a convolution has multiply-accumulates, but each costs a
subtract, an abs and an add where a convolution spends one FMA. What decides
the speed on CPU is whether XLA keeps the work in vector registers and how
often a step streams the accumulator through memory:

- Forward: a `lax.fori_loop` over (kernel row, chunk of channels, tile of at
  most 128 output channels). A step copies the chunk's input rows into a small
  contiguous window and adds its ``kw x chunk`` terms (about 24; chunks of 8
  to 16 channels), unrolled and summed as a balanced tree, into that tile of
  the accumulator: one fused loop that LLVM vectorises along the output
  channels. Larger steps spill registers, and fusions of a few hundred terms
  fall back to scalar code; slices of a few channels fuse into the step and
  run ~10x slower; a chain of adds instead of a tree waits on add latency; a
  tile wider than 128 channels spills the filters out of L1.
  `benchmarks/README.md` records each formulation tried and what it measured.
- Channels that do not fill the last chunk are padded with zeros on both
  sides: ``|0 - 0| = 0`` adds nothing; padded output channels are cut off.
- Input gradient, stride 1: the same loop with the roles of input and output
  channels swapped, gathering: ``X[y]`` is the same in every term of
  ``dX[y]``, only ``g`` shifts, so a step sums a kernel row straight into
  ``dX``. Strided layers scatter each tap's terms back instead.
- The full-precision weight gradient needs no new kernel:
  ``sum g * (X - F)`` is a convolution's weight gradient minus
  ``F * sum(g)``. So is the unclipped input gradient.

What the functions take: `forward`, `input_grad` and `weight_grad` (and the
``factor_*`` loops) take operands of one floating dtype, float32 or float64
(`adder_conv` casts half precision to float32 first), and keep it;
`integer_forward` takes integer operands and sums in int32, exactly (the
integer layers of `adderjax.quant`). `XlaAdderConv` is ``implementation="xla"``
of `adderjax.ops.adder_conv`: these loops on any backend.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses

import jax
from jax import lax
import jax.numpy as jnp

from adderjax.ops.spec import ConvSpec

__all__ = ["MAX_CHUNK", "MAX_TERMS", "MAX_TILE", "MIN_CHUNK", "XlaAdderConv", "factor_input_grad",
           "factor_weight_grad", "forward", "input_grad", "integer_forward", "weight_grad"]

MAX_CHUNK = 16
MIN_CHUNK = 8
MAX_TERMS = 24
MAX_TILE = 128
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _split(n: int, limit: int) -> tuple[int, int]:
  """Splits ``n`` into ``count`` equal parts of at most ``limit``: (count, size).

  ``count * size`` may exceed ``n``; callers zero-pad.
  """
  count = -(-n // limit)
  return count, -(-n // count)


def _chunking(n: int, taps: int = 1) -> tuple[int, int]:
  """Channel chunks for steps that also unroll ``taps`` kernel taps: (count, size).

  A chunk holds at most MAX_CHUNK channels, and fewer when the taps would take
  a step past MAX_TERMS terms, but not fewer than MIN_CHUNK: slices of a few
  channels out of many make XLA fuse the slice into the step, which then runs
  ~10x slower (benchmarks/README.md).
  """
  return _split(n, max(MIN_CHUNK, min(MAX_CHUNK, MAX_TERMS // taps)))


def _tree_sum(terms: list[jax.Array]) -> jax.Array:
  # XLA keeps float additions in the order written; a balanced tree instead of
  # a chain lets the CPU overlap the adds (latency 3-4 cycles, 2 per cycle).
  while len(terms) > 1:
    terms = [terms[k] + terms[k + 1] if k + 1 < len(terms) else terms[k]
             for k in range(0, len(terms), 2)]
  return terms[0]


def _batch_zeros(x: jax.Array, shape: tuple[int, ...], batch_axis: int) -> jax.Array:
  """Zeros of ``shape`` whose ``batch_axis`` is ``x``'s batch axis.

  Derived from ``x`` so that a batch sharded on an explicit mesh stays sharded
  the same way in the loop's accumulator.
  """
  z = jnp.zeros_like(x[:, 0, 0, 0])
  z = lax.expand_dims(z, [d for d in range(len(shape)) if d != batch_axis])
  return jnp.broadcast_to(z, shape)


def _add_to_tile(acc: jax.Array, tile: jax.Array, update: jax.Array) -> jax.Array:
  """``acc[tile] += update`` for an accumulator tiled on its leading axis."""
  start = (tile,) + (0,) * (acc.ndim - 1)
  block = lax.dynamic_slice(acc, start, (1, *acc.shape[1:]))
  return lax.dynamic_update_slice(acc, block + update[None], start)


def _untile(acc: jax.Array, size: int) -> jax.Array:
  """(tiles, B, H, W, G, tile) -> (B, H, W, G, size), dropping the zero-padded tail."""
  tiles, *middle, tile = acc.shape
  return acc.transpose(1, 2, 3, 4, 0, 5).reshape(*middle, tiles * tile)[..., :size]


def _pad_axis(a: jax.Array, axis: int, size: int) -> jax.Array:
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, size - a.shape[axis])
  return jnp.pad(a, widths)


def _grouped_padded_input(x: jax.Array, spec: ConvSpec, channels: int) -> jax.Array:
  """``x`` as ``(B, Hp, Wp, G, channels)``: spatially padded, channels zero-filled."""
  b, h, w, c = x.shape
  xg = x.reshape(b, h, w, spec.groups, c // spec.groups)
  return _pad_axis(jnp.pad(xg, ((0, 0), *spec.padding, (0, 0), (0, 0))), 4, channels)


def _window(xp: jax.Array, tap: jax.Array, c0: jax.Array | int, size: int, kw: int,
            out_hw: tuple[int, int], spec: ConvSpec) -> jax.Array:
  """The input values kernel tap ``tap`` meets, channels ``c0:c0+size``: (B, Ho, Wo, G, size)."""
  (sh, sw), (dh, dw) = spec.strides, spec.dilation
  ho, wo = out_hw
  start = (0, (tap // kw) * dh, (tap % kw) * dw, 0, c0)
  extent = (xp.shape[0], (ho - 1) * sh + 1, (wo - 1) * sw + 1, xp.shape[3], size)
  window = lax.dynamic_slice(xp, start, extent)
  if (sh, sw) != (1, 1):
    window = window[:, ::sh, ::sw]
  return window


def _row_window(xp: jax.Array, row: jax.Array, c0: jax.Array | int, size: int,
                out_hw: tuple[int, int], spec: ConvSpec) -> jax.Array:
  """The rows of ``xp`` kernel row ``row`` meets, channels ``c0:c0+size``: (B, Ho, Wp, G, size)."""
  sh, dh = spec.strides[0], spec.dilation[0]
  extent = (xp.shape[0], (out_hw[0] - 1) * sh + 1, xp.shape[2], xp.shape[3], size)
  window = lax.dynamic_slice(xp, (0, row * dh, 0, 0, c0), extent)
  return window[:, ::sh] if sh != 1 else window


def _columns(window: jax.Array, j: int, wo: int, spec: ConvSpec) -> jax.Array:
  """Kernel column ``j``'s view of a row window: (B, Ho, Wo, G, size)."""
  sw, dw = spec.strides[1], spec.dilation[1]
  return window[:, :, j * dw: j * dw + (wo - 1) * sw + 1: sw]


def forward(x: jax.Array, w: jax.Array, spec: ConvSpec,
            distance: Callable[[jax.Array], jax.Array] = jnp.abs) -> jax.Array:
  """``-sum distance(Xpad - F)`` over each patch: (B, Ho, Wo, O); ``|Xpad - F|`` by default.

  ``distance`` is elementwise with ``distance(0) = 0`` (the padded channels
  add nothing); `adderjax.ops.lp` passes ``|d|^p``.
  """
  kh, kw, cg, out = w.shape
  groups, per_group = spec.groups, out // spec.groups
  out_hw = spec.output_spatial(x.shape[1:3], (kh, kw))
  count, size = _chunking(cg, kw)
  tiles, tile = _split(per_group, MAX_TILE)
  xp = _grouped_padded_input(x, spec, count * size)
  filters = w.reshape(kh, kw, cg, groups, per_group)
  filters = _pad_axis(_pad_axis(filters, 2, count * size), 4, tiles * tile)
  # (row, tile, column, channel, group, out channel within the tile)
  filters = filters.reshape(*filters.shape[:4], tiles, tile).transpose(0, 4, 1, 2, 3, 5)

  def step(it, acc):
    # The tile varies fastest, so consecutive steps read the same input window.
    row, c0, t = it // (count * tiles), (it // tiles) % count * size, it % tiles
    window = _row_window(xp, row, c0, size, out_hw, spec)
    fs = lax.dynamic_slice(filters, (row, t, 0, c0, 0, 0), (1, 1, kw, size, groups, tile))[0, 0]
    terms = []
    for j in range(kw):
      xs = _columns(window, j, out_hw[1], spec)
      terms += [distance(xs[..., c, None] - fs[j, c]) for c in range(size)]
    return _add_to_tile(acc, t, _tree_sum(terms))

  acc = _batch_zeros(x, (tiles, x.shape[0], *out_hw, groups, tile), batch_axis=1)
  acc = lax.fori_loop(0, kh * count * tiles, step, acc)
  return -_untile(acc, per_group).reshape(*acc.shape[1:4], out)


def integer_forward(x: jax.Array, w: jax.Array, spec: ConvSpec) -> jax.Array:
  """``-sum |Xpad - F|`` over each patch of integer operands, in int32: ``(B, Ho, Wo, O)``.

  The loops of `forward` on integers: subtract, abs and add, exact as long as
  every partial sum fits int32 (the caller bounds the codes: the integer
  layers of `adderjax.quant` sum ``|a_q - m w_q|`` of at most 16 bits each).
  The zero padding is the integer 0.

  Args:
    x: ``(B, H, W, C)`` of an integer dtype (codes), not padded.
    w: ``(kh, kw, C // groups, O)`` of an integer dtype.
    spec: the layer's geometry (`adderjax.ops.spec.conv_spec` of float
      stand-ins of the same shapes).

  Returns:
    The int32 sums, ``(B, Ho, Wo, O)``.

  Raises:
    TypeError: for an operand that is not of an integer dtype.

  Example::

    >>> import jax.numpy as jnp
    >>> from adderjax.ops import xla
    >>> from adderjax.ops.spec import ConvSpec
    >>> spec = ConvSpec(strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1)
    >>> x = jnp.array([3, -1], jnp.int32).reshape(1, 1, 1, 2)
    >>> w = jnp.array([1, 2], jnp.int8).reshape(1, 1, 2, 1)
    >>> xla.integer_forward(x, w, spec)  # -(|3 - 1| + |-1 - 2|)
    Array([[[[-5]]]], dtype=int32)
  """
  for name, a in (("x", x), ("w", w)):
    if not jnp.issubdtype(a.dtype, jnp.integer):
      raise TypeError(f"{name} must have an integer dtype (use forward for floats), got "
                      f"{name} of dtype {a.dtype}.")
  return forward(x.astype(jnp.int32), w.astype(jnp.int32), spec)


@dataclasses.dataclass(frozen=True)
class XlaAdderConv:
  """``implementation="xla"`` of `adderjax.ops.adder_conv`: the loops of this module.

  It runs every layer on every backend, in float32 or float64.
  """

  def unsupported_reason(self, x: jax.Array, w: jax.Array, spec: ConvSpec) -> str | None:
    """None: the loops run any layer anywhere."""
    del x, w, spec
    return None

  def forward(self, x: jax.Array, w: jax.Array, spec: ConvSpec) -> jax.Array:
    """`forward`."""
    return forward(x, w, spec)

  def input_grad(self, x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
                 grad_mode: str) -> jax.Array:
    """`input_grad`."""
    return input_grad(x, w, g, spec, grad_mode)

  def weight_grad(self, x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
                  grad_mode: str) -> jax.Array:
    """`weight_grad`."""
    return weight_grad(x, w, g, spec, grad_mode)


def _conv(x: jax.Array, w: jax.Array, spec: ConvSpec) -> jax.Array:
  return lax.conv_general_dilated(
      x, w, spec.strides, spec.padding, rhs_dilation=spec.dilation,
      feature_group_count=spec.groups, dimension_numbers=_DIMENSION_NUMBERS,
      precision=lax.Precision.HIGHEST)


# The transposes go through jax.vjp of the real operands (XLA drops the unused
# forward) so that arrays typed with explicit mesh shardings keep them.
def _conv_weight_grad(x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec) -> jax.Array:
  return jax.vjp(lambda w: _conv(x, w, spec), w)[1](g)[0]


def _conv_input_grad(x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec) -> jax.Array:
  return jax.vjp(lambda x: _conv(x, w, spec), x)[1](g)[0]


def weight_grad(x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
                grad_mode: str) -> jax.Array:
  """The filter gradient: full precision ``sum g*(X - F)``, or ``sum g*sign(X - F)``."""
  if grad_mode == "sign":
    return factor_weight_grad(x, w, g, spec, jnp.sign)
  # sum_{b,h,w} g * (X - F) = (conv weight gradient) - F * sum_{b,h,w} g.
  return _conv_weight_grad(x, w, g, spec) - w * jnp.sum(g, axis=(0, 1, 2))


def factor_weight_grad(x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
                       factor: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """``sum g * factor(X - F)`` over the outputs: the sign gradient, or `adderjax.ops.lp`'s.

  ``factor`` is elementwise with ``factor(0) = 0`` where a padded channel meets
  a zero-padded filter channel (its rows are cut off, so any value does).
  """
  kh, kw, cg, out = w.shape
  groups, per_group = spec.groups, out // spec.groups
  out_hw = g.shape[1:3]
  count, size = _chunking(cg)
  xp = _grouped_padded_input(x, spec, count * size)
  filters = _pad_axis(w.reshape(kh * kw, cg, groups, per_group), 1, count * size)
  gg = g.reshape(*g.shape[:3], groups, per_group)

  def step(it, dw):
    tap, c0 = it // count, (it % count) * size
    xs = _window(xp, tap, c0, size, kw, out_hw, spec)
    fs = lax.dynamic_slice(filters, (tap, c0, 0, 0), (1, size, groups, per_group))[0]
    rows = [jnp.sum(gg * factor(xs[..., c, None] - fs[c]), axis=(0, 1, 2))
            for c in range(size)]
    return lax.dynamic_update_slice(dw, jnp.stack(rows)[None], (tap, c0, 0, 0))

  dw = lax.fori_loop(0, kh * kw * count, step, jnp.zeros_like(filters))
  return dw[:, :cg].reshape(kh, kw, cg, out)


_INPUT_FACTORS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "full_precision": lambda d: jnp.clip(d, -1.0, 1.0),
    "sign": jnp.sign,
}


def input_grad(x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
               grad_mode: str) -> jax.Array:
  """The input gradient: ``sum g * h(F - Xpad)`` over the outputs each input feeds."""
  if grad_mode == "unclipped":
    return _unclipped_input_grad(x, w, g, spec)
  return factor_input_grad(x, w, g, spec, _INPUT_FACTORS[grad_mode])


def factor_input_grad(x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
                      factor: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """``sum g * factor(F - Xpad)`` over the outputs each input feeds (`input_grad`'s loops).

  ``factor`` is elementwise; HardTanh or sign for `input_grad`, `adderjax.ops.lp`'s
  exact factor for other exponents.
  """
  if spec.strides == (1, 1):
    return _gathered_input_grad(x, w, g, spec, factor)
  b, h, wd, c = x.shape
  kh, kw, cg, out = w.shape
  groups, per_group = spec.groups, out // spec.groups
  out_hw = g.shape[1:3]
  (sh, sw), (dh, dw) = spec.strides, spec.dilation
  count, size = _chunking(per_group)
  xp = _grouped_padded_input(x, spec, cg)
  # Filters as (tap, G, Og, Cg): one output channel's filter is a row over Cg.
  filters = _pad_axis(w.reshape(kh * kw, cg, groups, per_group).transpose(0, 2, 3, 1), 2,
                      count * size)
  gg = _pad_axis(g.reshape(*g.shape[:3], groups, per_group), 4, count * size)

  def step(it, dxp):
    tap, o0 = it // count, (it % count) * size
    xs = _window(xp, tap, 0, cg, kw, out_hw, spec)
    gs = lax.dynamic_slice_in_dim(gg, o0, size, axis=4)
    fs = lax.dynamic_slice(filters, (tap, 0, o0, 0), (1, groups, size, cg))[0]
    acc = _tree_sum([gs[..., o, None] * factor(fs[:, o] - xs) for o in range(size)])
    if (sh, sw) != (1, 1):
      acc = lax.pad(acc, jnp.zeros((), acc.dtype),
                    ((0, 0, 0), (0, 0, sh - 1), (0, 0, sw - 1), (0, 0, 0), (0, 0, 0)))
    start = (0, (tap // kw) * dh, (tap % kw) * dw, 0, 0)
    return lax.dynamic_update_slice(dxp, lax.dynamic_slice(dxp, start, acc.shape) + acc, start)

  dxp = lax.fori_loop(0, kh * kw * count, step, jnp.zeros_like(xp))
  (top, _), (left, _) = spec.padding
  return dxp[:, top:top + h, left:left + wd].reshape(b, h, wd, c)


def _gathered_input_grad(x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
                         factor: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """The stride-1 input gradient, gathered: each step reads shifted ``g``.

  With stride 1, input ``X[y]`` meets kernel row ``i`` at output row
  ``y + top - i*d``: every term of ``dX[y]`` has the same ``X[y]``, so a
  step can sum a whole kernel row of taps straight into ``dX`` (no scatter).
  """
  b, h, wd, c = x.shape
  kh, kw, cg, out = w.shape
  groups, per_group = spec.groups, out // spec.groups
  (dh, dw), ((top, _), (left, _)) = spec.dilation, spec.padding
  ho, wo = g.shape[1:3]
  count, size = _chunking(per_group, kw)
  tiles, tile = _split(cg, MAX_TILE)
  # Input channels in tiles on a leading axis: (tile, B, H, W, G, channel within the tile).
  xt = _pad_axis(x.reshape(b, h, wd, groups, cg), 4, tiles * tile)
  xt = xt.reshape(b, h, wd, groups, tiles, tile).transpose(4, 0, 1, 2, 3, 5)
  # (row, column, G, Og, Cg): one output channel's filter is a row over Cg.
  filters = w.reshape(kh, kw, cg, groups, per_group).transpose(0, 1, 3, 4, 2)
  filters = _pad_axis(_pad_axis(filters, 3, count * size), 4, tiles * tile)
  # g padded so that row y + (kh-1)*dh - i*dh of it is output row y + top - i*dh.
  low_h, low_w = (kh - 1) * dh - top, (kw - 1) * dw - left
  g_pad = lax.pad(_pad_axis(g.reshape(b, ho, wo, groups, per_group), 4, count * size),
                  jnp.zeros((), g.dtype),
                  ((0, 0, 0), (low_h, h + top - ho, 0), (low_w, wd + left - wo, 0),
                   (0, 0, 0), (0, 0, 0)))

  def step(it, dx):
    row, o0, t = it // (count * tiles), (it // tiles) % count * size, it % tiles
    g_rows = lax.dynamic_slice(g_pad, (0, (kh - 1 - row) * dh, 0, 0, o0),
                               (b, h, g_pad.shape[2], groups, size))
    fs = lax.dynamic_slice(filters, (row, 0, 0, o0, t * tile), (1, kw, groups, size, tile))[0]
    xs = lax.dynamic_index_in_dim(xt, t, keepdims=False)
    terms = []
    for j in range(kw):
      gs = g_rows[:, :, (kw - 1 - j) * dw:(kw - 1 - j) * dw + wd]
      terms += [gs[..., o, None] * factor(fs[j, :, o] - xs) for o in range(size)]
    return _add_to_tile(dx, t, _tree_sum(terms))

  dx = lax.fori_loop(0, kh * count * tiles, step, jnp.zeros_like(xt))
  return _untile(dx, cg).reshape(b, h, wd, c)


def _unclipped_input_grad(x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec) -> jax.Array:
  # sum g * (F - X) = (conv input gradient) - X * (sum of g over the outputs X feeds,
  # per group), the latter a grouped transposed convolution with a kernel of ones.
  kh, kw, cg, out = w.shape
  groups = spec.groups
  b, h, wd, c = x.shape
  g_sum = g.reshape(*g.shape[:3], groups, out // groups).sum(-1)
  ones = jnp.ones((kh, kw, 1, groups), g.dtype)
  fan = _conv_input_grad(jnp.zeros_like(x[..., :groups]), ones, g_sum, spec)
  linear = _conv_input_grad(x, w, g, spec)
  return linear - (x.reshape(b, h, wd, groups, cg) * fan[..., None]).reshape(x.shape)

"""The adder convolution as XLA loops that never materialise the broadcast.

Counting the work: an adder layer touches ``B*Ho*Wo * kh*kw*Cg * O`` element
pairs, as many as a convolution has multiply-accumulates, but each costs a
subtract, an abs and an add instead of one FMA. What decides the speed on
CPU is whether XLA keeps every intermediate in vector registers:

- A `lax.fori_loop` runs over (kernel tap, chunk of at most 16 channels).
  Its body slices the chunk out of the padded input into a small contiguous
  buffer and then adds the chunk's terms, unrolled, to the accumulator of
  output shape: one fused elementwise loop that LLVM vectorises along the
  output channels. Bodies much larger than ~16 terms, or one fusion over the
  whole patch, fall back to scalar code; slicing inside the fused loop
  (chunks of 8) defeats the vectoriser too. `benchmarks/README.md` records
  the formulations tried and what each measured.
- Channels that do not fill the last chunk are padded with zeros on both
  sides: ``|0 - 0| = 0`` adds nothing.
- The input gradient is the same loop turned around (a chunk of output
  channels per step), scattered back to the input positions of its tap.
- The full-precision weight gradient needs no new kernel:
  ``sum g * (X - F)`` is a convolution's weight gradient minus
  ``F * sum(g)``. So is the unclipped input gradient.

Operands arrive in one dtype (float32 for half-precision inputs); the caller casts.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from adderjax.ops.spec import ConvSpec

MAX_CHUNK = 16
MAX_TERMS = 64
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _chunking(n: int, taps: int = 1) -> tuple[int, int]:
  """Splits ``n`` channels into ``count`` equal chunks: (count, size).

  A chunk holds at most MAX_CHUNK channels, and fewer when each step also
  unrolls ``taps`` kernel taps, so that a step stays near MAX_TERMS terms.
  """
  limit = max(1, min(MAX_CHUNK, MAX_TERMS // taps))
  count = -(-n // limit)
  return count, -(-n // count)


def _tree_sum(terms: list[jax.Array]) -> jax.Array:
  # XLA keeps float additions in the order written; a balanced tree instead of
  # a chain lets the CPU overlap the adds (latency 3-4 cycles, 2 per cycle).
  while len(terms) > 1:
    terms = [terms[k] + terms[k + 1] if k + 1 < len(terms) else terms[k]
             for k in range(0, len(terms), 2)]
  return terms[0]


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


def forward(x: jax.Array, w: jax.Array, spec: ConvSpec) -> jax.Array:
  """``-sum |Xpad - F|`` over each patch: (B, Ho, Wo, O)."""
  kh, kw, cg, out = w.shape
  groups = spec.groups
  out_hw = spec.output_spatial(x.shape[1:3], (kh, kw))
  count, size = _chunking(cg, kw)
  xp = _grouped_padded_input(x, spec, count * size)
  filters = _pad_axis(w.reshape(kh, kw, cg, groups, out // groups), 2, count * size)

  def step(it, acc):
    row, c0 = it // count, (it % count) * size
    window = _row_window(xp, row, c0, size, out_hw, spec)
    fs = lax.dynamic_slice(filters, (row, 0, c0, 0, 0), (1, kw, size, *filters.shape[3:]))[0]
    terms = []
    for j in range(kw):
      xs = _columns(window, j, out_hw[1], spec)
      terms += [jnp.abs(xs[..., c, None] - fs[j, c]) for c in range(size)]
    return acc + _tree_sum(terms)

  acc = jnp.zeros((x.shape[0], *out_hw, groups, out // groups), x.dtype)
  acc = lax.fori_loop(0, kh * count, step, acc)
  return -acc.reshape(*acc.shape[:3], out)


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
    return _sign_weight_grad(x, w, g, spec)
  # sum_{b,h,w} g * (X - F) = (conv weight gradient) - F * sum_{b,h,w} g.
  return _conv_weight_grad(x, w, g, spec) - w * jnp.sum(g, axis=(0, 1, 2))


def _sign_weight_grad(x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec) -> jax.Array:
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
    rows = [jnp.sum(gg * jnp.sign(xs[..., c, None] - fs[c]), axis=(0, 1, 2))
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
  factor = _INPUT_FACTORS[grad_mode]
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

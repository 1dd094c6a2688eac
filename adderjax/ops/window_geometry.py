"""The index geometry of the Pallas adder kernels' windows, and its references in plain jnp.

`adderjax.ops.pallas_kernels` indexes a flat, zero-padded input with the
offsets computed here (`forward_geometry`, `input_grad_phases`);
`forward_reference` and `input_grad_reference` do the same index arithmetic
on materialised arrays, so that the tests check it without Pallas.
"""

from __future__ import annotations

import dataclasses

import jax
from jax import lax
import jax.numpy as jnp

from adderjax.ops.spec import ConvSpec

__all__ = [
    "AxisPhase",
    "ForwardGeometry",
    "InputGradGeometry",
    "axis_phases",
    "forward_geometry",
    "forward_reference",
    "input_grad_phases",
    "input_grad_reference",
    "next_power_of_2",
    "patch_offsets",
]


def next_power_of_2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


# ----------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ForwardGeometry:
  """Static sizes of the forward's L1 GEMM: M x K times K x N, per group."""

  rows: int           # M = B * Ho * Wo output positions
  out_hw: tuple[int, int]
  padded_hw: tuple[int, int]
  channels: int       # C, the input's channels (all groups)
  group_channels: int  # Cg
  group_outputs: int  # Og
  padded_outputs: int  # Og rounded up to block_n
  groups: int
  strides: tuple[int, int]
  tap_offsets: tuple[int, ...]  # flat offset of each kernel tap in the padded input


def forward_geometry(x_shape, w_shape, spec: ConvSpec, block_n: int) -> ForwardGeometry:
  b, h, w, c = x_shape
  kh, kw, cg, o = w_shape
  (top, bottom), (left, right) = spec.padding
  hp, wp = h + top + bottom, w + left + right
  ho, wo = spec.output_spatial((h, w), (kh, kw))
  dh, dw = spec.dilation
  og = o // spec.groups
  return ForwardGeometry(
      rows=b * ho * wo, out_hw=(ho, wo), padded_hw=(hp, wp), channels=c, group_channels=cg,
      group_outputs=og, padded_outputs=-(-og // block_n) * block_n, groups=spec.groups,
      strides=spec.strides,
      tap_offsets=tuple((i * dh * wp + j * dw) * c for i in range(kh) for j in range(kw)))


def patch_offsets(m: jax.Array, geo: ForwardGeometry) -> jax.Array:
  """Flat offset in the padded input of the first element of each output position's patch."""
  ho, wo = geo.out_hw
  hp, wp = geo.padded_hw
  sh, sw = geo.strides
  b, r = m // (ho * wo), m % (ho * wo)
  oh, ow = r // wo, r % wo
  return ((b * hp + oh * sh) * wp + ow * sw) * geo.channels


def forward_reference(x: jax.Array, w: jax.Array, *, spec: ConvSpec) -> jax.Array:
  """`forward`'s L1 GEMM in plain jnp, with the kernel's offsets, materialised.

  Gathers the implicit im2col matrix ``A`` (``M x taps x Cg`` per group) with
  the kernel's flat offsets and sums ``|A - F|``: it checks the index
  arithmetic without Pallas. Small shapes only.
  """
  kh, kw, cg, o = w.shape
  geo = forward_geometry(x.shape, w.shape, spec, 1)
  xp = jnp.pad(x, ((0, 0), *spec.padding, (0, 0))).reshape(-1)
  patch = patch_offsets(jnp.arange(geo.rows), geo)
  group = jnp.arange(spec.groups)[:, None, None, None] * cg
  tap = jnp.asarray(geo.tap_offsets)[None, None, :, None]
  a = xp[patch[None, :, None, None] + group + tap + jnp.arange(cg)]   # (G, M, taps, Cg)
  f = w.reshape(kh * kw, cg, spec.groups, geo.group_outputs).transpose(2, 0, 1, 3)
  y = -jnp.abs(a[..., None] - f[:, None]).sum(axis=(2, 3))           # (G, M, Og)
  ho, wo = geo.out_hw
  return y.transpose(1, 0, 2).reshape(x.shape[0], ho, wo, o)


# ----------------------------------------------------------------------------
# Input gradient
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AxisPhase:
  """Input positions ``r, r + s, r + 2s, ...`` along one spatial axis.

  Attributes:
    count: how many such positions the input has.
    taps: ``(kernel index, first output index)``: the kernel taps that reach
      an output from this phase, and the output the phase's first position
      feeds through each (later positions feed the next outputs, one apart).
  """

  count: int
  taps: tuple[tuple[int, int], ...]


def axis_phases(size: int, out: int, kernel: int, stride: int, dilation: int,
                 low: int) -> list[AxisPhase]:
  phases = []
  for r in range(stride):
    count = len(range(r, size, stride))
    taps = []
    for i in range(kernel):
      shift = r + low - i * dilation       # = stride * (output) - ... for the first position
      if shift % stride == 0:
        first = shift // stride
        if count and first + count - 1 >= 0 and first < out:  # reaches some output
          taps.append((i, first))
    phases.append(AxisPhase(count=count, taps=tuple(taps)))
  return phases


@dataclasses.dataclass(frozen=True)
class InputGradGeometry:
  """Static sizes of one phase's gathered L1 GEMM."""

  rows: int                  # positions of the phase: B * Hu * Wu
  phase_hw: tuple[int, int]  # (Hu, Wu)
  g_hw: tuple[int, int]      # spatial size of the padded g
  g_low: tuple[int, int]     # low padding of g
  channels: int              # C
  group_channels: int        # Cg
  padded_channels: int       # Cg rounded up to block_n
  out_channels: int          # O
  group_outputs: int         # Og
  groups: int
  num_taps: int              # kh * kw
  taps: tuple[tuple[int, int], ...]  # (tap index, flat offset in g of the tap's output)


def input_grad_phases(x_shape, w_shape, g_shape, spec: ConvSpec):
  """Per spatial axis, the phases; and g's low and high padding covering every tap."""
  _, h, w, _ = x_shape
  kh, kw = w_shape[:2]
  ho, wo = g_shape[1:3]
  axes = []
  for size, out, k, s, d, (low, _) in zip((h, w), (ho, wo), (kh, kw), spec.strides,
                                          spec.dilation, spec.padding):
    phases = axis_phases(size, out, k, s, d, low)
    firsts = [first for p in phases for _, first in p.taps]
    lasts = [first + p.count - 1 for p in phases for _, first in p.taps]
    pad = (max([0] + [-f for f in firsts]), max([0] + [l - (out - 1) for l in lasts]))
    axes.append((phases, pad))
  return axes


def input_grad_reference(x: jax.Array, w: jax.Array, g: jax.Array, *,
                         spec: ConvSpec) -> jax.Array:
  """`input_grad`'s phases, taps and saturation in plain jnp, materialised.

  For each stride phase and each tap that reaches an output, gathers the
  shifted ``g`` from the same padded array the kernel reads and adds
  ``g * (2 sat(0.5 F + 0.5 - 0.5 X) - 1)``: it checks the phase
  decomposition and the HardTanh rewrite without Pallas. Small shapes only.
  """
  b, h, wd, _ = x.shape
  kh, kw, cg, o = w.shape
  groups, og = spec.groups, o // spec.groups
  sh, sw = spec.strides
  (row_phases, (low_h, high_h)), (col_phases, (low_w, high_w)) = input_grad_phases(
      x.shape, w.shape, g.shape, spec)
  g_pad = jnp.pad(g, ((0, 0), (low_h, high_h), (low_w, high_w), (0, 0)))
  f = w.reshape(kh, kw, cg, groups, og)
  dx = jnp.zeros_like(x).reshape(b, h, wd, groups, cg)
  for rh, row in enumerate(row_phases):
    for rw, col in enumerate(col_phases):
      xs = x[:, rh::sh, rw::sw].reshape(b, row.count, col.count, groups, cg, 1)
      acc = jnp.zeros(xs.shape[:-1], x.dtype)
      for i, qh in row.taps:
        for j, qw in col.taps:
          gs = lax.slice_in_dim(lax.slice_in_dim(g_pad, qh + low_h, qh + low_h + row.count, axis=1),
                                qw + low_w, qw + low_w + col.count, axis=2)
          gs = gs.reshape(b, row.count, col.count, groups, 1, og)
          sat = jnp.clip(0.5 * f[i, j].transpose(1, 0, 2) + (0.5 - 0.5 * xs), 0, 1)
          acc += jnp.sum(gs * (2 * sat - 1), axis=-1)
      dx = dx.at[:, rh::sh, rw::sw].set(acc)
  return dx.reshape(x.shape)

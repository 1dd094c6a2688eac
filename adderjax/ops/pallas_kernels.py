"""The adder layer's Pallas kernels (Triton lowering), runnable in Pallas' interpreter.

`forward` and `input_grad` (``grad_mode="full_precision"``) each launch an
"L1 GEMM" with implicit im2col; `adderjax.ops.pallas_gpu` explains them and
`adderjax.ops.window_geometry` holds their window geometry and jnp references.
Both take their launch options as a `adderjax.ops.pallas_gpu.PallasAdderConv`.
This module imports Pallas' Triton lowering: import it only where that is
available (`adderjax.ops.pallas_gpu.UNAVAILABLE_REASON` is ``None``).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from adderjax.ops.spec import ConvSpec
from adderjax.ops.window_geometry import (
  ForwardGeometry,
  InputGradGeometry,
  forward_geometry,
  input_grad_phases,
  next_power_of_2,
  patch_offsets,
)

if TYPE_CHECKING:
  from adderjax.ops.pallas_gpu import PallasAdderConv

__all__ = ["compiler_params", "forward", "input_grad"]


def compiler_params(options: PallasAdderConv) -> plgpu.CompilerParams:
  """Triton's launch parameters for ``options`` (4 warps and 2 stages by default)."""
  return plgpu.CompilerParams(num_warps=options.num_warps or 4,
                              num_stages=options.num_stages or 2)


# ----------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------


def _forward_filters(w: jax.Array, geo: ForwardGeometry) -> jax.Array:
  """Filters as a flat ``(G, Cg, taps, Og padded)``: a step's taps are adjacent."""
  kh, kw, cg, _ = w.shape
  f = w.reshape(kh * kw, cg, geo.groups, geo.group_outputs).transpose(2, 1, 0, 3)
  return jnp.pad(f, ((0, 0),) * 3 + ((0, geo.padded_outputs - geo.group_outputs),)).reshape(-1)


def _forward_kernel(x_ref, f_ref, y_ref, *, geo: ForwardGeometry, block_m: int, block_n: int,
                    method: str):
  pid_m, pid_n, group = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  taps, cg = len(geo.tap_offsets), geo.group_channels
  m = pid_m * block_m + jnp.arange(block_m, dtype=jnp.int32)
  # Rows past the end repeat the last one (loads stay in bounds, stores are masked).
  patch = patch_offsets(jnp.minimum(m, geo.rows - 1), geo) + group * cg
  n = pid_n * block_n + jnp.arange(block_n, dtype=jnp.int32)
  filters = group * (cg * taps * geo.padded_outputs) + n
  dtype = y_ref.dtype

  def step(c, carry):
    acc, row_sum, col_sum = carry
    for t, tap in enumerate(geo.tap_offsets):
      a = x_ref[patch + (tap + c)]                                 # a column of A: (block_m,)
      f = f_ref[filters + (c * taps + t) * geo.padded_outputs]     # a row of F: (block_n,)
      if method == "abs":
        acc += jnp.abs(a[:, None] - f[None, :])
      else:
        acc += jnp.maximum(a[:, None], f[None, :])
        row_sum, col_sum = row_sum + a, col_sum + f
    return acc, row_sum, col_sum

  init = (jnp.zeros((block_m, block_n), dtype), jnp.zeros((block_m,), dtype),
          jnp.zeros((block_n,), dtype))
  acc, row_sum, col_sum = lax.fori_loop(0, cg, step, init)
  if method == "abs":
    y = -acc
  else:
    y = row_sum[:, None] + col_sum[None, :] - 2 * acc
  width = geo.groups * geo.padded_outputs
  offsets = m[:, None] * width + (group * geo.padded_outputs + n)[None, :]
  plgpu.store(y_ref.at[offsets], y, mask=(m < geo.rows)[:, None])


@functools.partial(jax.jit, static_argnames=("spec", "options"))
def forward(x: jax.Array, w: jax.Array, *, spec: ConvSpec,
            options: PallasAdderConv) -> jax.Array:
  """The adder forward as one Pallas kernel: ``-sum |Xpad - F|`` over each patch.

  Args:
    x: ``(B, H, W, C)``, float32 or float64.
    w: ``(kh, kw, C // groups, O)``, the dtype of ``x``.
    spec: the layer's validated geometry.
    options: tiles, warps, ``method`` and ``interpret``.

  Returns:
    ``(B, Ho, Wo, O)``.
  """
  kh, kw, cg, o = w.shape
  ho, wo = spec.output_spatial(x.shape[1:3], (kh, kw))
  out_shape = (x.shape[0], ho, wo, o)
  if math.prod(out_shape) == 0 or cg == 0:
    return jnp.zeros(out_shape, x.dtype)
  block_m, block_n = options.tiles(x.shape[0] * ho * wo, o // spec.groups, spec.groups)
  geo = forward_geometry(x.shape, w.shape, spec, block_n)
  xp = jnp.pad(x, ((0, 0), *spec.padding, (0, 0))).reshape(-1)
  kernel = functools.partial(_forward_kernel, geo=geo, block_m=block_m, block_n=block_n,
                             method=options.method)
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((geo.rows * geo.groups * geo.padded_outputs,), x.dtype),
      grid=(pl.cdiv(geo.rows, block_m), geo.padded_outputs // block_n, geo.groups),
      compiler_params=compiler_params(options),
      interpret=options.interpret,
      name="adder_conv_forward",
  )(xp, _forward_filters(w, geo))
  y = y.reshape(x.shape[0], ho, wo, geo.groups, geo.padded_outputs)
  return y[..., :geo.group_outputs].reshape(out_shape)


# ----------------------------------------------------------------------------
# Input gradient
# ----------------------------------------------------------------------------


def _input_grad_filters(w: jax.Array, groups: int, padded_channels: int) -> jax.Array:
  """Filters as a flat ``(G, Og, taps, Cg padded)``: one output channel's filters are rows."""
  kh, kw, cg, o = w.shape
  f = w.reshape(kh * kw, cg, groups, o // groups).transpose(2, 3, 0, 1)
  return jnp.pad(f, ((0, 0),) * 3 + ((0, padded_channels - cg),)).reshape(-1)


def _saturate(v_scale: jax.Array, v_offset: jax.Array, fused: bool) -> jax.Array:
  """``min(max(0.5 * f + offset, 0), 1)``; with ``fused`` (float32), one ``fma.rn.sat.f32``."""
  if fused and v_offset.dtype == jnp.float32:
    return plgpu.elementwise_inline_asm(
        "fma.rn.sat.f32 $0, $1, 0f3F000000, $2;",   # 0f3F000000 = 0.5
        args=[v_scale, v_offset], constraints="=f,f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(v_offset.shape, v_offset.dtype)])[0]
  return jnp.minimum(jnp.maximum(0.5 * v_scale + v_offset, 0), 1)


def _input_grad_kernel(x_ref, g_ref, f_ref, dx_ref, *, geo: InputGradGeometry, block_m: int,
                       block_n: int, fused_saturate: bool):
  pid_m, pid_n, group = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  hu, wu = geo.phase_hw
  hg, wg = geo.g_hw
  m = pid_m * block_m + jnp.arange(block_m, dtype=jnp.int32)
  mc = jnp.minimum(m, geo.rows - 1)
  b, r = mc // (hu * wu), mc % (hu * wu)
  u, v = r // wu, r % wu
  g_rows = ((b * hg + u + geo.g_low[0]) * wg + v + geo.g_low[1]) * geo.out_channels
  g_rows += group * geo.group_outputs
  c = pid_n * block_n + jnp.arange(block_n, dtype=jnp.int32)
  channel = group * geo.group_channels + jnp.minimum(c, geo.group_channels - 1)
  x = x_ref[mc[:, None] * geo.channels + channel[None, :]]        # (block_m, block_n), once
  dtype = x.dtype
  offset = 0.5 - 0.5 * x           # HardTanh(f - x) = 2 sat(0.5 f + offset) - 1
  filters = group * (geo.group_outputs * geo.num_taps * geo.padded_channels) + c

  def step(o, carry):
    acc, g_sum = carry
    for t, g_offset in geo.taps:
      gs = g_ref[g_rows + (g_offset + o)]                                     # (block_m,)
      f = f_ref[filters + (o * geo.num_taps + t) * geo.padded_channels]      # (block_n,)
      acc += gs[:, None] * _saturate(jnp.broadcast_to(f[None, :], offset.shape), offset,
                                     fused_saturate)
      g_sum += gs
    return acc, g_sum

  acc, g_sum = lax.fori_loop(
      0, geo.group_outputs, step,
      (jnp.zeros((block_m, block_n), dtype), jnp.zeros((block_m,), dtype)))
  dx = 2 * acc - g_sum[:, None]
  # Stored with padded channels: masked lanes must not alias real ones (the
  # interpreter stores masked lanes too, as their old values).
  width = geo.groups * geo.padded_channels
  offsets = m[:, None] * width + (group * geo.padded_channels + c)[None, :]
  plgpu.store(dx_ref.at[offsets], dx, mask=(m < geo.rows)[:, None])


@functools.partial(jax.jit, static_argnames=("spec", "options"))
def input_grad(x: jax.Array, w: jax.Array, g: jax.Array, *, spec: ConvSpec,
               options: PallasAdderConv) -> jax.Array:
  """The full-precision input gradient, ``sum g * HardTanh(F - X)``, as Pallas kernels.

  One kernel launch per stride phase (one for stride 1); `adderjax.ops.pallas_gpu`
  explains the phases.

  Args:
    x: ``(B, H, W, C)``, float32 or float64.
    w: ``(kh, kw, C // groups, O)``.
    g: the output's cotangent, ``(B, Ho, Wo, O)``.
    spec: the layer's validated geometry.
    options: tiles, warps, ``fused_saturate`` and ``interpret``.

  Returns:
    ``(B, H, W, C)``.
  """
  b, h, wd, c = x.shape
  kh, kw, cg, o = w.shape
  sh, sw = spec.strides
  (row_phases, (low_h, high_h)), (col_phases, (low_w, high_w)) = input_grad_phases(
      x.shape, w.shape, g.shape, spec)
  if x.size == 0 or cg == 0:
    return jnp.zeros_like(x)
  g_pad = jnp.pad(g, ((0, 0), (low_h, high_h), (low_w, high_w), (0, 0)))
  g_hw = g_pad.shape[1:3]
  g_flat = g_pad.reshape(-1) if g_pad.size else jnp.zeros((1,), g.dtype)
  block_m, block_n = options.tiles(b * h * wd, cg, spec.groups)
  padded_channels = -(-cg // block_n) * block_n
  filters = _input_grad_filters(w, spec.groups, padded_channels)
  hc, wc = -(-h // sh), -(-wd // sw)
  rows = []
  for rh, row in enumerate(row_phases):
    cols = []
    for rw, col in enumerate(col_phases):
      taps = tuple((i * kw + j, (qh * g_hw[1] + qw) * o)
                   for i, qh in row.taps for j, qw in col.taps)
      if row.count == 0 or col.count == 0 or not taps or o == 0:
        dx = jnp.zeros((b, row.count, col.count, c), x.dtype)
      else:
        xs = x if (sh, sw) == (1, 1) else x[:, rh::sh, rw::sw]
        geo = InputGradGeometry(
            rows=b * row.count * col.count, phase_hw=(row.count, col.count), g_hw=g_hw,
            g_low=(low_h, low_w), channels=c, group_channels=cg,
            padded_channels=padded_channels, out_channels=o, group_outputs=o // spec.groups,
            groups=spec.groups, num_taps=kh * kw, taps=taps)
        bm = min(block_m, next_power_of_2(geo.rows))
        kernel = functools.partial(_input_grad_kernel, geo=geo, block_m=bm, block_n=block_n,
                                   fused_saturate=options.fused_saturate and not options.interpret)
        dx = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((geo.rows * spec.groups * padded_channels,), x.dtype),
            grid=(pl.cdiv(geo.rows, bm), padded_channels // block_n, spec.groups),
            compiler_params=compiler_params(options),
            interpret=options.interpret,
            name="adder_conv_input_grad",
        )(xs.reshape(-1), g_flat, filters)
        dx = dx.reshape(b, row.count, col.count, spec.groups, padded_channels)
        dx = dx[..., :cg].reshape(b, row.count, col.count, c)
      if (sh, sw) == (1, 1):
        return _nan_where_a_term_is_nan(dx, x, w, spec.groups)
      cols.append(jnp.pad(dx, ((0, 0), (0, hc - row.count), (0, wc - col.count), (0, 0))))
    rows.append(jnp.stack(cols, axis=3))                      # (B, Hc, Wc, sw, C)
  dx = jnp.stack(rows, axis=2).reshape(b, hc * sh, wc * sw, c)  # (B, Hc, sh, Wc, sw, C)
  return _nan_where_a_term_is_nan(dx[:, :h, :wd], x, w, spec.groups)


def _nan_where_a_term_is_nan(dx: jax.Array, x: jax.Array, w: jax.Array,
                             groups: int) -> jax.Array:
  """``dx`` with NaN where a term ``HardTanh(F - X)`` is NaN, as the XLA loops give.

  Compiled for a GPU, the kernel's saturation drops NaNs: PTX's ``min`` and
  ``max`` return the number of a (NaN, number) pair, and ``fma.rn.sat`` makes
  a NaN 0. So a NaN in ``X``, a NaN filter, or an infinite ``X`` meeting a
  filter of the same infinity (``inf - inf``) is put back here: at that pixel
  and channel, and for a non-finite filter over its whole input channel (the
  XLA loops spread a NaN filter there too, through the zero cotangents).
  """
  kh, kw, cg, o = w.shape

  def any_per_channel(mask):  # (kh, kw, Cg, O) -> (C,), channel = group * Cg + c
    return jnp.any(mask.reshape(kh * kw, cg, groups, o // groups), axis=(0, 3)).T.reshape(-1)

  nan = (jnp.isnan(x) | any_per_channel(jnp.isnan(w))
         | ((x == jnp.inf) & any_per_channel(w == jnp.inf))
         | ((x == -jnp.inf) & any_per_channel(w == -jnp.inf)))
  return jnp.where(nan, jnp.nan, dx)

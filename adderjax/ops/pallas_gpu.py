"""The adder layer as Pallas kernels for GPUs (Triton lowering), runnable in Pallas' interpreter.

Two kernels, each an "L1 GEMM" with implicit im2col, and each with a pure-jnp
reference beside it that does the same index arithmetic on materialised
matrices (`forward_reference`, `input_grad_reference`):

- Forward: ``Y[m, n] = -sum_k |A[m, k] - F[k, n]|`` with ``m`` an output
  position ``(b, oh, ow)``, ``n`` an output channel of the group, and ``k`` a
  (channel, kernel tap) pair. ``A`` is never built: each program owns a
  ``block_m x block_n`` tile of ``Y``, computes once the offsets of its
  ``block_m`` patches in the zero-padded NHWC input, and then walks ``k``:
  per step it loads one column of ``A`` (``block_m`` values at those offsets
  plus the tap's shift) and one row of filters (``block_n`` values) and adds
  ``|a[:, None] - f[None, :]|`` to the tile. Triton spreads the tile over the
  threads' registers, so every loaded value is reused ``block_n`` (or
  ``block_m``) times from registers: the register tiling of an SGEMM.
  ``method="max"`` uses ``|a - f| = 2 max(a, f) - a - f`` instead, with the
  row and column sums kept beside the tile.
- Input gradient (``grad_mode="full_precision"``):
  ``dX[p, c] = sum_{t, o} g[q(p, t), o] * HardTanh(F[t, c, o] - X[p, c])``
  where ``q(p, t)`` is the output position that reads input ``p`` through tap
  ``t``. It is gathered, not scattered: a strided layer is split into
  ``sh * sw`` phases (input positions with the same ``(h % sh, w % sw)``),
  and within a phase the taps that reach an output are known statically, so
  each phase is a stride-1 gather with its own list of taps (no wasted terms
  on the taps a strided layer skips). ``X[p, c]`` is the same in every term,
  so the tile of ``X`` is loaded once, and the HardTanh is written as a
  saturation, ``HardTanh(d) = 2 sat((d + 1) / 2) - 1`` with
  ``sat(v) = min(max(v, 0), 1)``: per term one ``fma(0.5, F, 0.5 - 0.5 X)``
  whose saturation PTX can fold into the FMA (``fma.rn.sat.f32``,
  ``fused_saturate=True``), and one FMA with ``g``;
  ``dX = 2 sum g*sat(...) - sum g``.
- The weight gradient needs no kernel: ``sum g * (X - F)`` is a
  convolution's weight gradient minus ``F * sum(g)``
  (`adderjax.ops.xla.weight_grad`, computed at ``Precision.HIGHEST`` so that
  TF32 does not round its products on GPUs). The ``"unclipped"`` input
  gradient is a transposed convolution and the ``"sign"`` gradients are rare
  ablations: both use the XLA formulations of `adderjax.ops.xla`.

Counting the work, and the ceiling it implies (a prediction; none of this has
been measured on a GPU yet). An adder layer has as many element pairs as a
convolution has multiply-accumulates, ``B*Ho*Wo * kh*kw*Cg * O``. An fp32 FMA
is one CUDA-core instruction and tensor cores cannot compute ``|a - b|``, so:

- forward: ``FADD d = a - f`` then ``FADD acc = acc + |d|`` (the absolute
  value is a free operand modifier on NVIDIA GPUs): 2 instructions per pair,
  both on the FMA pipe. The max form is ``FMNMX`` plus ``FADD``: also 2 issue
  slots, with the min/max on another pipe, so it can only win if that
  relieves the FMA pipe (it also keeps the row and column sums, and cancels
  more in float32). Either way the forward is at least **2x** an fp32
  (``Precision.HIGHEST``, no TF32) convolution that runs at the same fraction
  of the CUDA-core peak.
- input gradient: 2 instructions per pair if ptxas emits ``FFMA.SAT``
  (``fused_saturate=True``), else 4 (``FFMA``, two ``FMNMX``, ``FFMA``):
  **2-4x** the convolution's input gradient.
- weight gradient: the convolution's own, **1x**.

So forward+backward is predicted at ``(2 + 2..4 + 1) / 3 = 1.7-2.3x`` the fp32
convolution's when both are compute-bound at the same efficiency. On an H100
SXM (132 SMs x 128 fp32 lanes x 1.98 GHz = 33.5 T instructions/s), ResNet-20
on CIFAR (40.4 M element pairs per image in its adder layers) needs 5 x 40.4 M
to 7 x 40.4 M = 0.20-0.28 G instructions per training image, a ceiling of
118k-166k images/s at 100% of the CUDA-core peak; 20k images/s needs about
12-17% of it across the whole step. `benchmarks/adder_conv_gpu.py` measures
all of this (``benchmarks/README.md``, section "GPU kernels (issue 5)").

Why Pallas with the Triton lowering: an L1 GEMM runs on CUDA cores, so Mosaic
GPU's strengths (warpgroup MMA, TMA pipelines on Hopper) buy nothing, while
Triton lays a ``[block_m, block_n]`` tile out over the threads' registers by
itself and runs on Ampere as well as Hopper; Pallas also interprets the very
same kernel on CPU (``interpret=True``), which is how the tests check it
without a GPU; jax-triton would add a dependency and has no interpreter. This
is reasoning, not a measurement: the choice is to be confirmed on a GPU.

Multi-device: XLA cannot partition a Pallas custom call, so under a mesh the
kernels run per batch shard: in `jax.shard_map` where the operands' types
carry an explicit sharding, else through `custom_partitioning` (see
`_per_batch_shard`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import custom_batching, lax
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as plgpu
from jax.sharding import AxisType, NamedSharding

from adderjax.ops import xla
from adderjax.ops.spec import ConvSpec

FORWARD_METHODS = ("abs", "max")
MIN_PROGRAMS = 256
"""The default ``block_m`` shrinks (to 16 at least) until a launch has this many
programs: about two per SM of an H100 (132) or an A100 (108)."""
_INT32_LIMIT = 2**31 - 1


def _next_power_of_2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def _is_power_of_2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class PallasAdderConv:
  """The adder kernels with their launch options, as an `adder_conv` implementation.

  `adderjax.ops.IMPLEMENTATIONS` holds ``"pallas"`` (compiled for the GPU)
  and ``"pallas_interpret"`` (the same kernels in Pallas' interpreter, on any
  backend, for tests and debugging). Other instances can be built to tune the
  options, called directly or registered under a new name.

  Attributes:
    interpret: run the kernels in Pallas' interpreter instead of compiling them.
    block_m: rows (output or input positions) of a program's tile, a power of
      2; ``None`` picks ``8192 // block_n`` within ``[16, 256]``, halved
      while the launch would have fewer than `MIN_PROGRAMS` programs.
    block_n: columns (channels) of a program's tile, a power of 2; ``None``
      picks the channel count rounded up to a power of 2, at most 64.
    num_warps: Triton warps per program (``None``: 4).
    num_stages: Triton software-pipelining stages (``None``: 2).
    method: the forward's distance, ``"abs"`` (``|a - f|``) or ``"max"``
      (``2 max(a, f) - a - f``).
    fused_saturate: compute the input gradient's saturation with the PTX
      instruction ``fma.rn.sat.f32`` (inline assembly) instead of min/max.
      Compiled float32 runs only; the interpreter and float64 use min/max.

  Example::

    >>> import jax.numpy as jnp
    >>> from adderjax.ops.pallas_gpu import PallasAdderConv
    >>> from adderjax.ops.spec import conv_spec
    >>> x, w = jnp.ones((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 4))
    >>> spec = conv_spec(x, w, strides=1, padding="VALID", rhs_dilation=1, feature_group_count=1)
    >>> PallasAdderConv(interpret=True).forward(x, w, spec)[0, 0, 0]
    Array([-18., -18., -18., -18.], dtype=float32)
  """

  interpret: bool = False
  block_m: int | None = None
  block_n: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  method: str = "abs"
  fused_saturate: bool = False

  def __post_init__(self):
    for name in ("block_m", "block_n"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or not _is_power_of_2(value)):
        raise ValueError(f"{name} must be None or a power of 2 (Triton's blocks are), "
                         f"got {name}={value!r}.")
    for name in ("num_warps", "num_stages"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or a positive int, got {name}={value!r}.")
    if self.method not in FORWARD_METHODS:
      raise ValueError(f"method must be one of {FORWARD_METHODS}, got method={self.method!r}.")

  def forward(self, x: jax.Array, w: jax.Array, spec: ConvSpec) -> jax.Array:
    """``-sum |Xpad - F|`` over each patch: (B, Ho, Wo, O); see `forward`."""
    return _per_batch_shard("forward", spec, self, x, w)

  def input_grad(self, x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
                 grad_mode: str) -> jax.Array:
    """The input gradient: the kernel of `input_grad` for ``"full_precision"``.

    ``"unclipped"`` (a transposed convolution) and ``"sign"`` use
    `adderjax.ops.xla.input_grad`.
    """
    if grad_mode != "full_precision":
      return xla.input_grad(x, w, g, spec, grad_mode)
    return _per_batch_shard("input_grad", spec, self, x, w, g)

  def weight_grad(self, x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
                  grad_mode: str) -> jax.Array:
    """The filter gradient: `adderjax.ops.xla.weight_grad` (a convolution's, at HIGHEST)."""
    return xla.weight_grad(x, w, g, spec, grad_mode)

  def tiles(self, rows: int, columns: int, groups: int = 1) -> tuple[int, int]:
    """The ``(block_m, block_n)`` for ``groups`` outputs of ``rows x columns`` each."""
    block_n = self.block_n or min(64, _next_power_of_2(columns))
    block_m = self.block_m
    if block_m is None:
      block_m = max(16, min(256, 8192 // block_n))
      column_tiles = -(-columns // block_n) * groups
      while block_m > 16 and -(-rows // block_m) * column_tiles < MIN_PROGRAMS:
        block_m //= 2
    return min(block_m, _next_power_of_2(rows)), block_n

  def compiler_params(self) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=self.num_warps or 4, num_stages=self.num_stages or 2)


DEFAULT = PallasAdderConv()


def unsupported_reason(x_shape: Sequence[int], w_shape: Sequence[int],
                       spec: ConvSpec) -> str | None:
  """Why the kernels cannot run this layer, or ``None`` if they can.

  The kernels compute flat int32 offsets, so every array they index must have
  fewer than 2**31 elements, counting the channel padding of the tiles (up
  to 128 or the next power of 2) and one block of rows past the end. Every
  geometry (strides, dilation, padding, groups) is supported.
  """
  b, h, w, c = x_shape
  kh, kw, cg, o = w_shape
  groups = spec.groups
  (top, bottom), (left, right) = spec.padding
  (dh, dw), (ho, wo) = spec.dilation, spec.output_spatial((h, w), (kh, kw))
  padded = lambda n: max(128, _next_power_of_2(n))
  sizes = {"padded input": b * (h + top + bottom) * (w + left + right) * c,
           "padded output gradient": b * (ho + kh * dh) * (wo + kw * dw) * o,
           "output": (b * ho * wo + 256) * groups * padded(o // groups),
           "input gradient": (b * h * w + 256) * groups * padded(cg)}
  for what, size in sizes.items():
    if size > _INT32_LIMIT:
      return (f"the {what} has {size} elements (x shape {tuple(x_shape)}, w shape "
              f"{tuple(w_shape)}), more than the 2**31 - 1 the kernels' int32 offsets reach")
  return None


# ----------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ForwardGeometry:
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


def _forward_geometry(x_shape, w_shape, spec: ConvSpec, block_n: int) -> _ForwardGeometry:
  b, h, w, c = x_shape
  kh, kw, cg, o = w_shape
  (top, bottom), (left, right) = spec.padding
  hp, wp = h + top + bottom, w + left + right
  ho, wo = spec.output_spatial((h, w), (kh, kw))
  dh, dw = spec.dilation
  og = o // spec.groups
  return _ForwardGeometry(
      rows=b * ho * wo, out_hw=(ho, wo), padded_hw=(hp, wp), channels=c, group_channels=cg,
      group_outputs=og, padded_outputs=-(-og // block_n) * block_n, groups=spec.groups,
      strides=spec.strides,
      tap_offsets=tuple((i * dh * wp + j * dw) * c for i in range(kh) for j in range(kw)))


def _patch_offsets(m: jax.Array, geo: _ForwardGeometry) -> jax.Array:
  """Flat offset in the padded input of the first element of each output position's patch."""
  ho, wo = geo.out_hw
  hp, wp = geo.padded_hw
  sh, sw = geo.strides
  b, r = m // (ho * wo), m % (ho * wo)
  oh, ow = r // wo, r % wo
  return ((b * hp + oh * sh) * wp + ow * sw) * geo.channels


def _forward_filters(w: jax.Array, geo: _ForwardGeometry) -> jax.Array:
  """Filters as a flat ``(G, Cg, taps, Og padded)``: a step's taps are adjacent."""
  kh, kw, cg, _ = w.shape
  f = w.reshape(kh * kw, cg, geo.groups, geo.group_outputs).transpose(2, 1, 0, 3)
  return jnp.pad(f, ((0, 0),) * 3 + ((0, geo.padded_outputs - geo.group_outputs),)).reshape(-1)


def _forward_kernel(x_ref, f_ref, y_ref, *, geo: _ForwardGeometry, block_m: int, block_n: int,
                    method: str):
  pid_m, pid_n, group = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  taps, cg = len(geo.tap_offsets), geo.group_channels
  m = pid_m * block_m + jnp.arange(block_m, dtype=jnp.int32)
  # Rows past the end repeat the last one (loads stay in bounds, stores are masked).
  patch = _patch_offsets(jnp.minimum(m, geo.rows - 1), geo) + group * cg
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
            options: PallasAdderConv = DEFAULT) -> jax.Array:
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
  geo = _forward_geometry(x.shape, w.shape, spec, block_n)
  xp = jnp.pad(x, ((0, 0), *spec.padding, (0, 0))).reshape(-1)
  kernel = functools.partial(_forward_kernel, geo=geo, block_m=block_m, block_n=block_n,
                             method=options.method)
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((geo.rows * geo.groups * geo.padded_outputs,), x.dtype),
      grid=(pl.cdiv(geo.rows, block_m), geo.padded_outputs // block_n, geo.groups),
      compiler_params=options.compiler_params(),
      interpret=options.interpret,
      name="adder_conv_forward",
  )(xp, _forward_filters(w, geo))
  y = y.reshape(x.shape[0], ho, wo, geo.groups, geo.padded_outputs)
  return y[..., :geo.group_outputs].reshape(out_shape)


def forward_reference(x: jax.Array, w: jax.Array, *, spec: ConvSpec) -> jax.Array:
  """`forward`'s L1 GEMM in plain jnp, with the kernel's offsets, materialised.

  Gathers the implicit im2col matrix ``A`` (``M x taps x Cg`` per group) with
  the kernel's flat offsets and sums ``|A - F|``: it checks the index
  arithmetic without Pallas. Small shapes only.
  """
  kh, kw, cg, o = w.shape
  geo = _forward_geometry(x.shape, w.shape, spec, 1)
  xp = jnp.pad(x, ((0, 0), *spec.padding, (0, 0))).reshape(-1)
  patch = _patch_offsets(jnp.arange(geo.rows), geo)
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
class _AxisPhase:
  """Input positions ``r, r + s, r + 2s, ...`` along one spatial axis.

  Attributes:
    count: how many such positions the input has.
    taps: ``(kernel index, first output index)``: the kernel taps that reach
      an output from this phase, and the output the phase's first position
      feeds through each (later positions feed the next outputs, one apart).
  """

  count: int
  taps: tuple[tuple[int, int], ...]


def _axis_phases(size: int, out: int, kernel: int, stride: int, dilation: int,
                 low: int) -> list[_AxisPhase]:
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
    phases.append(_AxisPhase(count=count, taps=tuple(taps)))
  return phases


@dataclasses.dataclass(frozen=True)
class _InputGradGeometry:
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


def _input_grad_kernel(x_ref, g_ref, f_ref, dx_ref, *, geo: _InputGradGeometry, block_m: int,
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


def _input_grad_phases(x_shape, w_shape, g_shape, spec: ConvSpec):
  """Per spatial axis, the phases; and g's low and high padding covering every tap."""
  _, h, w, _ = x_shape
  kh, kw = w_shape[:2]
  ho, wo = g_shape[1:3]
  axes = []
  for size, out, k, s, d, (low, _) in zip((h, w), (ho, wo), (kh, kw), spec.strides,
                                          spec.dilation, spec.padding):
    phases = _axis_phases(size, out, k, s, d, low)
    firsts = [first for p in phases for _, first in p.taps]
    lasts = [first + p.count - 1 for p in phases for _, first in p.taps]
    pad = (max([0] + [-f for f in firsts]), max([0] + [l - (out - 1) for l in lasts]))
    axes.append((phases, pad))
  return axes


@functools.partial(jax.jit, static_argnames=("spec", "options"))
def input_grad(x: jax.Array, w: jax.Array, g: jax.Array, *, spec: ConvSpec,
               options: PallasAdderConv = DEFAULT) -> jax.Array:
  """The full-precision input gradient, ``sum g * HardTanh(F - X)``, as Pallas kernels.

  One kernel launch per stride phase (one for stride 1); see the module
  docstring.

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
  (row_phases, (low_h, high_h)), (col_phases, (low_w, high_w)) = _input_grad_phases(
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
        geo = _InputGradGeometry(
            rows=b * row.count * col.count, phase_hw=(row.count, col.count), g_hw=g_hw,
            g_low=(low_h, low_w), channels=c, group_channels=cg,
            padded_channels=padded_channels, out_channels=o, group_outputs=o // spec.groups,
            groups=spec.groups, num_taps=kh * kw, taps=taps)
        bm = min(block_m, _next_power_of_2(geo.rows))
        kernel = functools.partial(_input_grad_kernel, geo=geo, block_m=bm, block_n=block_n,
                                   fused_saturate=options.fused_saturate and not options.interpret)
        dx = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((geo.rows * spec.groups * padded_channels,), x.dtype),
            grid=(pl.cdiv(geo.rows, bm), padded_channels // block_n, spec.groups),
            compiler_params=options.compiler_params(),
            interpret=options.interpret,
            name="adder_conv_input_grad",
        )(xs.reshape(-1), g_flat, filters)
        dx = dx.reshape(b, row.count, col.count, spec.groups, padded_channels)
        dx = dx[..., :cg].reshape(b, row.count, col.count, c)
      if (sh, sw) == (1, 1):
        return dx
      cols.append(jnp.pad(dx, ((0, 0), (0, hc - row.count), (0, wc - col.count), (0, 0))))
    rows.append(jnp.stack(cols, axis=3))                      # (B, Hc, Wc, sw, C)
  dx = jnp.stack(rows, axis=2).reshape(b, hc * sh, wc * sw, c)  # (B, Hc, sh, Wc, sw, C)
  return dx[:, :h, :wd]


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
  (row_phases, (low_h, high_h)), (col_phases, (low_w, high_w)) = _input_grad_phases(
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


# ----------------------------------------------------------------------------
# Several devices
# ----------------------------------------------------------------------------


def _explicit_batch_axes(x: jax.Array):
  """``(mesh, batch axes)`` if ``x``'s type carries an explicit sharding, else ``None``.

  The batch axes are ``None`` where the batch is not split.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or AxisType.Explicit not in getattr(mesh, "axis_types", ()):
    return None
  return mesh, sharding.spec[0] if sharding.spec else None


def _per_batch_shard(kind: str, spec: ConvSpec, options: PallasAdderConv,
                     *operands: jax.Array) -> jax.Array:
  """Runs the ``kind`` kernel on ``operands`` (``x, w`` or ``x, w, g``), per batch shard.

  XLA's partitioner cannot split a Pallas call: left alone, it would gather
  the whole batch onto every device and run it there. So:

  - where the type of ``x`` carries its sharding (mesh axes of type
    ``AxisType.Explicit``), the call runs in `jax.shard_map` over the
    batch's mesh axes, ``x`` and ``g`` split, ``w`` replicated;
  - otherwise (``AxisType.Auto`` meshes, the sharding decided by the
    compiler) it is wrapped in `custom_partitioning`, which tells the SPMD
    partitioner to keep the batch split and the rest replicated, with a
    `jax.custom_batching.custom_vmap` rule (custom_partitioning cannot be
    batched itself). On one device both lower to the plain kernel.
  """
  fn = functools.partial(_KERNELS[kind], spec=spec, options=options)
  explicit = _explicit_batch_axes(operands[0])
  if explicit is not None:
    mesh, axes = explicit
    if axes is None:
      return fn(*operands)
    batched = jax.P(axes)
    in_specs = tuple(batched if b else jax.P() for b in _BATCHED[kind])
    # check_vma=False: pallas_call outputs carry no varying-axes annotation.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=batched,
                         check_vma=False)(*operands)
  return _auto_partitioned(kind, spec, options)(*operands)


_KERNELS = {"forward": forward, "input_grad": input_grad}
_BATCHED = {"forward": (True, False), "input_grad": (True, False, True)}
# Shardy rules: only the batch factor "b" may stay sharded.
_SHARDING_RULES = {
    "forward": ("b h w c, i j k o -> b y z n", ("h", "w", "c", "i", "j", "k", "o", "y", "z", "n")),
    "input_grad": ("b h w c, i j k o, b y z n -> b h w c",
                   ("h", "w", "c", "i", "j", "k", "o", "y", "z", "n")),
}


@functools.cache
def _auto_partitioned(kind: str, spec: ConvSpec, options: PallasAdderConv) -> Callable:
  def fn(*operands):  # positional only: custom_partitioning binds the signature
    return _KERNELS[kind](*operands, spec=spec, options=options)

  batched_args = _BATCHED[kind]

  def batch_sharding(mesh, arg_shapes):
    x_spec = getattr(arg_shapes[0].sharding, "spec", None)
    axes = x_spec[0] if x_spec else None
    return NamedSharding(mesh, jax.P(axes)), NamedSharding(mesh, jax.P())

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    batched, replicated = batch_sharding(mesh, arg_shapes)
    return mesh, fn, batched, tuple(batched if b else replicated for b in batched_args)

  def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
    del result_shape
    return batch_sharding(mesh, arg_shapes)[0]

  partitioned = custom_partitioning(fn)
  rule, replicated_factors = _SHARDING_RULES[kind]
  partitioned.def_partition(partition=partition,
                            infer_sharding_from_operands=infer_sharding_from_operands,
                            sharding_rule=rule, need_replication_factors=replicated_factors)

  @custom_batching.custom_vmap
  def call(*operands):
    return partitioned(*operands)

  @call.def_vmap
  def _vmap_rule(axis_size, in_batched, *operands):
    del axis_size
    return jax.vmap(fn, in_axes=tuple(0 if b else None for b in in_batched))(*operands), True

  return call

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

The counting of instructions that predicts their speed against a
convolution, and the commands that measure it on a GPU, are in
``benchmarks/README.md`` (section "GPU kernels (issue 5)").

Why Pallas with the Triton lowering: an L1 GEMM runs on CUDA cores, so Mosaic
GPU's strengths (warpgroup MMA, TMA pipelines on Hopper) buy nothing, while
Triton lays a ``[block_m, block_n]`` tile out over the threads' registers by
itself and runs on Ampere as well as Hopper; Pallas also interprets the very
same kernel on CPU (``interpret=True``), which is how the tests check it
without a GPU; jax-triton would add a dependency and has no interpreter. This
is reasoning, not a measurement: the choice is to be confirmed on a GPU.

Where the code is, the tokamax way:

- this module: `PallasAdderConv`, the kernels' options and the entry point
  of `adderjax.ops.adder_conv`, and `shape_unsupported_reason`;
- `adderjax.ops.pallas_kernels`: the kernels and their ``pallas_call``;
- `adderjax.ops.window_geometry`: their window geometry and jnp references;
- `adderjax.ops.sharding`: the multi-device wrapper shared with the native
  CPU kernels (XLA cannot partition a custom call, so under a mesh the
  kernels run per batch shard).

Pallas' Triton lowering is deprecated since JAX 0.11. Where a JAX lacks it,
this module still imports, `UNAVAILABLE_REASON` says why, ``adder_conv``'s
``implementation=None`` runs XLA, and an explicit Pallas implementation raises
with that reason.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import importlib
from typing import Any, Literal

import jax

from adderjax._checks import is_int
from adderjax.ops import sharding
from adderjax.ops.spec import ConvSpec, GradMode
from adderjax.ops.window_geometry import next_power_of_2

__all__ = ["DEFAULT", "FORWARD_METHODS", "MIN_PROGRAMS", "UNAVAILABLE_REASON", "PallasAdderConv",
           "shape_unsupported_reason"]


def _unavailable_reason() -> str | None:
  """Why this JAX cannot run the kernels, or ``None`` where it can."""
  for module in ("jax.experimental.pallas", "jax.experimental.pallas.triton"):
    try:
      importlib.import_module(module)
    except ImportError as e:
      return (f"this JAX ({jax.__version__}) has no {module} (Pallas' Triton lowering, "
              f"deprecated since JAX 0.11): {e}")
  return None


UNAVAILABLE_REASON: str | None = _unavailable_reason()
"""``None`` where Pallas' Triton lowering imports, else why not: then only the
XLA implementations run."""


FORWARD_METHODS = ("abs", "max")
MIN_PROGRAMS = 256
"""The default ``block_m`` shrinks (to 16 at least) until a launch has this many
programs: about two per SM of an H100 (132) or an A100 (108)."""
_INT32_LIMIT = 2**31 - 1


def _is_power_of_2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class PallasAdderConv(sharding.KernelImplementation):
  """The adder kernels with their launch options, as an `adder_conv` implementation.

  `adderjax.ops.IMPLEMENTATIONS` holds ``"pallas"`` (compiled for the GPU)
  and ``"pallas_interpret"`` (the same kernels in Pallas' interpreter, on any
  backend, for tests and debugging). Other instances can be built to tune the
  options, called directly or passed as ``implementation=``.

  The kernels compute the forward pass and the ``"full_precision"`` input
  gradient; the ``"unclipped"`` input gradient (a transposed convolution),
  the ``"sign"`` one and the weight gradient (a convolution's, at
  ``Precision.HIGHEST``) are those of `adderjax.ops.xla`
  (`adderjax.ops.sharding.KernelImplementation`).

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
  method: Literal["abs", "max"] = "abs"
  fused_saturate: bool = False

  def __post_init__(self):
    for name in ("block_m", "block_n"):
      value = getattr(self, name)
      if value is not None and (not is_int(value) or not _is_power_of_2(value)):
        raise ValueError(f"{name} must be None or a power of 2 (Triton's blocks are), "
                         f"got {name}={value!r}.")
    for name in ("num_warps", "num_stages"):
      value = getattr(self, name)
      if value is not None and (not is_int(value) or value < 1):
        raise ValueError(f"{name} must be None or a positive int, got {name}={value!r}.")
    if self.method not in FORWARD_METHODS:
      raise ValueError(f"method must be one of {FORWARD_METHODS}, got method={self.method!r}.")

  def unsupported_reason(self, x: jax.Array, w: jax.Array, spec: ConvSpec) -> str | None:
    """Why the kernels cannot run this layer here, or None.

    Without Pallas' Triton lowering (`UNAVAILABLE_REASON`), compiled on a
    backend other than GPU, or past the kernels' int32 offsets
    (`shape_unsupported_reason`).
    """
    if UNAVAILABLE_REASON is not None:
      return (f"runs Pallas kernels, but {UNAVAILABLE_REASON}. Use implementation='xla' (or None, "
              f"which picks it).")
    if not self.interpret and jax.default_backend() != "gpu":
      return (f"compiles Triton kernels for a GPU, but JAX's default backend is "
              f"{jax.default_backend()!r}. Use implementation='pallas_interpret' to run the same "
              f"kernels in Pallas' interpreter, or 'xla' (or None, which picks 'xla' here).")
    reason = shape_unsupported_reason(x.shape, w.shape, spec)
    return None if reason is None else f"cannot run this layer: {reason}. Use implementation='xla'."

  def has_kernel(self, kind: sharding.KernelName, dtype, grad_mode: GradMode | None) -> bool:
    del dtype  # float32 and float64 alike
    return kind == "forward" or (kind == "input_grad" and grad_mode == "full_precision")

  def kernel(self, kind: sharding.KernelName):
    """`pallas_kernels.forward` or `pallas_kernels.input_grad` with these options."""
    from adderjax.ops import pallas_kernels  # imports the Triton lowering
    run = pallas_kernels.forward if kind == "forward" else pallas_kernels.input_grad
    return functools.partial(run, options=self)

  def tiles(self, rows: int, columns: int, groups: int = 1) -> tuple[int, int]:
    """The ``(block_m, block_n)`` for ``groups`` outputs of ``rows x columns`` each."""
    block_n = self.block_n or min(64, next_power_of_2(columns))
    block_m = self.block_m
    if block_m is None:
      block_m = max(16, min(256, 8192 // block_n))
      column_tiles = -(-columns // block_n) * groups
      while block_m > 16 and -(-rows // block_m) * column_tiles < MIN_PROGRAMS:
        block_m //= 2
    return min(block_m, next_power_of_2(rows)), block_n

  def compiler_params(self) -> Any:
    """Triton's launch parameters (``plgpu.CompilerParams``) for these options."""
    from adderjax.ops import pallas_kernels  # needs the Triton lowering
    return pallas_kernels.compiler_params(self)


DEFAULT = PallasAdderConv()


def shape_unsupported_reason(x_shape: Sequence[int], w_shape: Sequence[int],
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
  padded = lambda n: max(128, next_power_of_2(n))
  sizes = {"padded input": b * (h + top + bottom) * (w + left + right) * c,
           "padded output gradient": b * (ho + kh * dh) * (wo + kw * dw) * o,
           "output": (b * ho * wo + 256) * groups * padded(o // groups),
           "input gradient": (b * h * w + 256) * groups * padded(cg)}
  for what, size in sizes.items():
    if size > _INT32_LIMIT:
      return (f"the {what} has {size} elements (x shape {tuple(x_shape)}, w shape "
              f"{tuple(w_shape)}), more than the 2**31 - 1 the kernels' int32 offsets reach")
  return None

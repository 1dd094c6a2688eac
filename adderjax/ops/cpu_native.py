"""Native CPU kernels for the adder convolution: XLA FFI handlers built on first use.

The forward pass, the full-precision input gradient (at any stride: each input
row's pixels split into column phases that feed through the same taps, a
gather, no scatter) and the full-precision weight gradient run as C++
micro-kernels (``csrc/adder_forward_cpu.cc``, ``adder_input_grad_cpu.cc``,
``adder_weight_grad_cpu.cc``, sharing ``vec.h``): a tile of outputs held in vector registers
(6 output pixels by 16 channels with AVX2, 8 by 32 with AVX-512; for layers with at most one
vector of output channels per group on AVX-512, 8 output channels by 32
pixels; for the weight gradient, 4 (AVX2) or 8 (AVX-512) output channels by
three vectors of input channels), the reduction streamed
through it with implicit im2col and the zero padding read in place, the max
trick ``|a - b| = 2 max(a, b) - a - b`` in the forward (the patch and filter
sums it needs are taken in the kernel, in a fixed order, so an output does not
depend on the batch it is in; an output where it is not finite, from an
infinite input or one whose double overflows, is summed again term by term),
and the work shared out over XLA's intra-op threads. Non-finite inputs give
what the XLA loops give: -inf for an infinity, NaN where a NaN enters (the
input gradient's clip keeps a NaN). The rest (the ``"sign"`` and ``"unclipped"`` input gradients,
the ``"sign"`` weight gradient, float64) uses :mod:`adderjax.ops.xla`.

The integer layers of `adderjax.quant` have their own kernels
(``csrc/adder_int_cpu.cc``, called by `adderjax.ops.cpu_native_int`), and so
does BatchNorm in training mode with its ReLU (``csrc/batch_norm_cpu.cc``,
called by `adderjax.ops.batch_norm`), built into the same library: the
sources (and the thread-pool helper they share, ``csrc/parallel_for.h``) are
compiled together and are all part of the cache key.

The handlers are compiled (by `adderjax.ops.native_build`) the first time
they are needed with the system's C++ compiler (``$CXX``, else ``c++``) for
this CPU (``-O3 -march=native``, AVX2+FMA or AVX-512) against the headers jaxlib ships
(``jax.ffi.include_dir()``), and the library is cached per source, compiler
flags, CPU features and jaxlib version under ``$ADDERJAX_CACHE_DIR``, else
``$XDG_CACHE_HOME/adderjax``, else ``~/.cache/adderjax`` (in ``native/``). Where
no compiler is found, the CPU lacks AVX2, or the build fails,
:func:`available` is False, one warning says why, and ``implementation=None``
uses the XLA loops. ``ADDERJAX_NATIVE=0`` turns the kernels off. A build logs
one ``INFO`` line through the ``adderjax.ops.cpu_native`` logger when it
starts and one with its time when it ends (silence them with
``logging.getLogger("adderjax").setLevel(logging.WARNING)``).

Example:
  >>> from adderjax.ops import cpu_native
  >>> isinstance(cpu_native.available(), bool)
  True
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from adderjax.ops import native_build, sharding, xla
from adderjax.ops.spec import ConvSpec

__all__ = ["InputNorm", "NativeCpuAdderConv", "available", "check_usable",
           "forward_with_statistics", "library_path", "unavailable_reason"]

def available() -> bool:
  """Whether the native kernels are built and loaded (building them if needed).

  The first call on a machine compiles them (a few seconds); a failure warns
  once, saying why, and returns False.
  """
  library, reason = native_build.load()
  if library is None and not native_build.disabled():
    _warn_once(reason)
  return library is not None


def unavailable_reason() -> str:
  """Why :func:`available` is False (empty when it is True)."""
  return native_build.load()[1]


def _unusable_reason() -> str | None:
  """Why the kernels cannot run here, completing ``implementation='cpu' ...``; None if they can."""
  if jax.default_backend() != "cpu":
    return (f"runs native CPU kernels, but JAX's default backend is {jax.default_backend()!r}. "
            f"Use None or 'xla'.")
  if not available():
    return f"is not available here: {unavailable_reason()}. Use 'xla' (or None, which picks it)."
  return None


def check_usable() -> None:
  """Raises the ValueError of ``implementation="cpu"`` where the kernels cannot run here."""
  reason = _unusable_reason()
  if reason is not None:
    raise ValueError(f"implementation='cpu' {reason}")


def library_path() -> str | None:
  """The loaded library's file, or None."""
  library = native_build.load()[0]
  return None if library is None else library._name


@functools.cache
def _warn_once(reason: str) -> None:
  warnings.warn(f"adderjax: the native CPU adder kernels are not available ({reason}); "
                "using the XLA loops instead.", RuntimeWarning, stacklevel=3)


def _vector_width() -> int:
  return int(native_build.load()[0].AdderjaxVectorWidth())


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def forward(x: jax.Array, w: jax.Array, spec: ConvSpec) -> jax.Array:
  """The native forward: ``-sum |Xpad - F|`` as ``(B, Ho, Wo, O)`` (float32)."""
  return _forward(native_build.FORWARD_TARGET, x, w, spec)


class InputNorm(NamedTuple):
  """A BatchNorm in training mode and a ReLU that a layer's input goes through first.

  A kernel given one reads ``relu((x - mean) * scale * rsqrt(var + epsilon) + bias)`` where it
  reads ``x``, computed as `adderjax.ops.batch_norm` computes it (the same bits), in the copies
  it makes anyway, so that the normalised input is never written out.
  """

  mean: jax.Array
  var: jax.Array
  scale: jax.Array
  bias: jax.Array
  epsilon: float


def forward_with_statistics(x: jax.Array, w: jax.Array, spec: ConvSpec,
                            input_norm: InputNorm | None = None,
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """:func:`forward`, and the batch mean and biased variance of its output per channel.

  The kernel sums each output row's statistics in its epilogue and combines the rows in double
  (``csrc/adder_forward_cpu.cc``); with ``input_norm``, ``x`` goes through it first. No
  gradient is defined here (`adderjax.ops.adder_batch_norm` gives one). ``x`` must have at
  least one output pixel.
  """
  return _forward(native_build.FORWARD_STATS_TARGET, x, w, spec, statistics=True,
                  input_norm=input_norm)


def _norm_operands(input_norm: InputNorm | None) -> tuple[tuple[jax.Array, ...], np.float32]:
  """The four buffers (f32[0] each for none) and ``epsilon`` of a kernel's ``input_norm``."""
  if input_norm is None:
    return (jnp.zeros((0,), jnp.float32),) * 4, np.float32(0.0)
  return tuple(input_norm[:4]), np.float32(input_norm.epsilon)


def _forward(target: str, x: jax.Array, w: jax.Array, spec: ConvSpec, *,
             statistics: bool = False, input_norm: InputNorm | None = None):
  kh, kw, cg, out = w.shape
  groups, per_group = spec.groups, out // spec.groups
  ho, wo = spec.output_spatial(x.shape[1:3], (kh, kw))
  opad = _round_up(per_group, _vector_width())
  # Filters as (G, K, Opad), K in (row, column, channel) order.
  wt = xla._pad_axis(w.reshape(kh * kw * cg, groups, per_group).transpose(1, 0, 2), -1, opad)
  (sh, sw), (dh, dw), ((top, _), (left, _)) = spec.strides, spec.dilation, spec.padding
  y = jax.ShapeDtypeStruct((x.shape[0], ho, wo, out), jnp.float32)
  geometry = dict(kh=np.int64(kh), kw=np.int64(kw), sh=np.int64(sh), sw=np.int64(sw),
                  dh=np.int64(dh), dw=np.int64(dw), top=np.int64(top), left=np.int64(left),
                  groups=np.int64(groups))
  # The kernel reads the zero padding in place of the rows and columns outside x.
  if not statistics:
    return jax.ffi.ffi_call(target, y, vmap_method="sequential")(x, wt, **geometry)
  channels = jax.ShapeDtypeStruct((out,), jnp.float32)
  norm, epsilon = _norm_operands(input_norm)
  call = jax.ffi.ffi_call(target, (y, channels, channels), vmap_method="sequential")
  return call(x, wt, *norm, epsilon=epsilon, **geometry)


def input_grad_full_precision(x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
                              input_norm: InputNorm | None = None) -> jax.Array:
  """The native ``sum g * HardTanh(F - Xpad)``, any stride: ``(B, H, W, C)`` (float32).

  With ``input_norm``, ``x`` is read through it (its gradient is still the normalised input's).
  """
  kh, kw, cg, _ = w.shape
  (sh, sw), (dh, dw), ((top, _), (left, _)) = spec.strides, spec.dilation, spec.padding
  # Input column x (of W) feeds output column (x + left - j*dw) / sw, which lies in
  # [-g_left, (W - 1 + left) // sw]: the kernel reads g's rows with g_left zero columns
  # before and zeros after (a copy per image, in its cache, not an XLA pad).
  g_left = max(0, -((left - (kw - 1) * dw) // sw))
  wt = _filters_by_output_channel(w, spec.groups, _round_up(cg, _vector_width()))
  options = dict(sh=np.int64(sh), sw=np.int64(sw), dh=np.int64(dh), dw=np.int64(dw),
                 top=np.int64(top), left=np.int64(left), g_left=np.int64(g_left),
                 groups=np.int64(spec.groups))
  return _call_gradient(native_build.INPUT_GRAD_TARGET, native_build.INPUT_GRAD_NORMED_TARGET,
                        jax.ShapeDtypeStruct(x.shape, jnp.float32), (x, g, wt), options,
                        input_norm)


def _call_gradient(target: str, normed_target: str, result: jax.ShapeDtypeStruct,
                   operands: tuple[jax.Array, ...], options: dict,
                   input_norm: InputNorm | None) -> jax.Array:
  """A gradient kernel on ``operands``; with ``input_norm``, its variant reading x through it."""
  if input_norm is None:
    return jax.ffi.ffi_call(target, result, vmap_method="sequential")(*operands, **options)
  norm, epsilon = _norm_operands(input_norm)
  call = jax.ffi.ffi_call(normed_target, result, vmap_method="sequential")
  return call(*operands, *norm, epsilon=epsilon, **options)


def _filters_by_output_channel(w: jax.Array, groups: int, cpad: int) -> jax.Array:
  """Filters as ``(G, kh, kw, Og, Cpad)``: one output channel's filter a row over the channels."""
  kh, kw, cg, out = w.shape
  wt = w.reshape(kh, kw, cg, groups, out // groups).transpose(3, 0, 1, 4, 2)
  return xla._pad_axis(wt, -1, cpad)


def weight_grad_full_precision(x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
                               input_norm: InputNorm | None = None) -> jax.Array:
  """The native ``sum g * (Xpad - F)`` over the batch and the output pixels: ``w``'s shape.

  With ``input_norm``, ``x`` is read through it.
  """
  kh, kw, cg, out = w.shape
  groups = spec.groups
  wt = _filters_by_output_channel(w, groups, _round_up(cg, _vector_width()))
  (sh, sw), (dh, dw), ((top, _), (left, _)) = spec.strides, spec.dilation, spec.padding
  options = dict(sh=np.int64(sh), sw=np.int64(sw), dh=np.int64(dh), dw=np.int64(dw),
                 top=np.int64(top), left=np.int64(left), groups=np.int64(groups))
  dwt = _call_gradient(native_build.WEIGHT_GRAD_TARGET, native_build.WEIGHT_GRAD_NORMED_TARGET,
                       jax.ShapeDtypeStruct(wt.shape, jnp.float32), (x, g, wt), options,
                       input_norm)
  return dwt[..., :cg].transpose(1, 2, 4, 0, 3).reshape(kh, kw, cg, out)


_KERNELS = {"forward": forward, "input_grad": input_grad_full_precision,
            "weight_grad": weight_grad_full_precision}


@dataclasses.dataclass(frozen=True)
class NativeCpuAdderConv(sharding.KernelImplementation):
  """The ``implementation="cpu"`` of `adder_conv`: native kernels where they apply, else XLA.

  The kernels take float32 operands and compute the forward pass, the
  full-precision input gradient and the full-precision (or unclipped: the
  same) weight gradient; float64 and the rest go to :mod:`adderjax.ops.xla`
  (`adderjax.ops.sharding.KernelImplementation`). Over a batch-sharded mesh
  each device runs the kernels on its own shard.
  """

  def unsupported_reason(self, x: jax.Array, w: jax.Array, spec: ConvSpec) -> str | None:
    """Why the kernels cannot run here (a backend other than CPU, a failed build), or None."""
    del x, w, spec
    return _unusable_reason()

  def has_kernel(self, kind: sharding.KernelName, dtype, grad_mode: str | None) -> bool:
    if dtype != jnp.float32:
      return False
    return {"forward": True, "input_grad": grad_mode == "full_precision",
            "weight_grad": grad_mode != "sign"}[kind]

  def kernel(self, kind: sharding.KernelName):
    return _KERNELS[kind]

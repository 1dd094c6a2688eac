"""Native CPU kernels for the adder convolution: XLA FFI handlers built on first use.

The forward pass, the full-precision input gradient (at any stride: each input
row's pixels split into column phases that feed through the same taps, a
gather, no scatter) and the full-precision weight gradient run as C++
micro-kernels (``csrc/adder_cpu.cc``): a tile of outputs held in vector
registers (8 output pixels by 16 or 32 channels; for the weight gradient, 8
output channels by three vectors of input channels), the reduction streamed
through it with implicit im2col and the zero padding read in place, the max
trick ``|a - b| = 2 max(a, b) - a - b`` in the forward (the patch and filter
sums it needs are taken in the kernel, in a fixed order, so an output does not
depend on the batch it is in; an output where it is not finite, from an
infinite input or one whose double overflows, is summed again term by term),
and the work shared out over XLA's intra-op threads. Non-finite inputs give
what the XLA loops give: -inf for an infinity, NaN where a NaN enters (the
input gradient's clip keeps a NaN). The rest (the ``"sign"`` and ``"unclipped"`` input gradients, the
``"sign"`` weight gradient, float64) uses :mod:`adderjax.ops.xla`.

The integer layers of `adderjax.quant` have their own kernels
(``csrc/adder_int_cpu.cc``, called by `adderjax.ops.cpu_native_int`), built
into the same library: both sources (and the thread-pool helper they share,
``csrc/parallel_for.h``) are compiled together and are all part of the cache key.

The handlers are compiled the first time they are needed with the system's
C++ compiler (``$CXX``, else ``c++``) for this CPU (``-O3 -march=native``,
AVX2+FMA or AVX-512) against the headers jaxlib ships
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

import ctypes
import dataclasses
import functools
import hashlib
import importlib.resources
import logging
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adderjax._paths import user_cache_dir
from adderjax.ops import sharding, xla
from adderjax.ops.spec import ConvSpec

__all__ = ["NativeCpuAdderConv", "available", "build_and_open", "check_usable", "library_path",
           "unavailable_reason"]

ENV_DISABLE = "ADDERJAX_NATIVE"
ENV_CACHE_DIR = "ADDERJAX_CACHE_DIR"
_FORWARD_TARGET = "adderjax_adder_forward"
_INPUT_GRAD_TARGET = "adderjax_adder_input_grad"
_WEIGHT_GRAD_TARGET = "adderjax_adder_weight_grad"
INTEGER_TARGETS = {
    # (lanes, scaled): (FFI target, symbol) of the integer layers' kernels (csrc/adder_int_cpu.cc,
    # called by adderjax.ops.cpu_native_int): int32 sums, or the float epilogue applied.
    ("uint8", False): ("adderjax_integer_sums_u8", "AdderjaxIntegerSumsU8"),
    ("int16", False): ("adderjax_integer_sums_i16", "AdderjaxIntegerSumsI16"),
    ("uint8", True): ("adderjax_integer_scaled_u8", "AdderjaxIntegerScaledU8"),
    ("int16", True): ("adderjax_integer_scaled_i16", "AdderjaxIntegerScaledI16"),
}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-Wno-attributes",
          "-Wno-return-type")
_BUILD_TIMEOUT_S = 300

logger = logging.getLogger(__name__)


def _disabled() -> bool:
  return os.environ.get(ENV_DISABLE, "1").lower() in ("0", "false", "no", "off")


def _compiler() -> list[str] | None:
  command = shlex.split(os.environ.get("CXX", "c++"))
  return command if command and shutil.which(command[0]) else None


# Compiled together into the one library; the header is included by both.
_SOURCES = ("adder_cpu.cc", "adder_int_cpu.cc")
_HEADERS = ("parallel_for.h",)


def _source(name: str) -> bytes:
  return (importlib.resources.files("adderjax.ops") / "csrc" / name).read_bytes()


def _build_key(compiler: list[str]) -> str:
  """What the library depends on: the source, flags, compiler, CPU features, jaxlib."""
  # The macros -march=native defines name this CPU's features as the compiler sees them.
  features = subprocess.run([*compiler, "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
                            capture_output=True, text=True, timeout=60, check=True).stdout
  version = subprocess.run([*compiler, "--version"], capture_output=True, text=True,
                           timeout=60).stdout
  digest = hashlib.sha256()
  sources = (_source(name) for name in _SOURCES + _HEADERS)
  for part in (*sources, " ".join(_FLAGS).encode(), version.encode(), features.encode(),
               jax.lib.__version__.encode(), platform.machine().encode()):
    digest.update(part)
    digest.update(b"\0")
  return digest.hexdigest()[:24]


def _build(compiler: list[str], target: pathlib.Path) -> None:
  """Compiles the handlers into ``target`` atomically (concurrent builds are harmless)."""
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
    for name in _SOURCES + _HEADERS:
      (pathlib.Path(scratch) / name).write_bytes(_source(name))
    output = pathlib.Path(scratch) / target.name
    result = subprocess.run(
        [*compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}",
         *(str(pathlib.Path(scratch) / name) for name in _SOURCES), "-o", str(output)],
        capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
    if result.returncode != 0:
      lines = [line for line in result.stderr.splitlines() if "error" in line] or [
          result.stderr.strip()[-500:]]
      raise RuntimeError(f"{' '.join(compiler)} failed: {lines[0]}")
    os.replace(output, target)


def build_and_open(cache_root: pathlib.Path | None = None) -> tuple[ctypes.CDLL | None, str]:
  """Builds the library if it is not cached yet and opens it: ``(library, "")`` or ``(None, why)``.

  Args:
    cache_root: Where the ``native/`` cache lives (default: see the module docstring).
  """
  if _disabled():
    return None, f"{ENV_DISABLE}={os.environ[ENV_DISABLE]} turns them off"
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return None, f"they are written for x86-64 (AVX2 or AVX-512), this is {platform.machine()}"
  compiler = _compiler()
  if compiler is None:
    return None, f"no C++ compiler was found ($CXX={os.environ.get('CXX', '')!r}, or c++)"
  try:
    root = user_cache_dir(ENV_CACHE_DIR) if cache_root is None else pathlib.Path(cache_root)
    target = root / "native" / _build_key(compiler) / "libadderjax_cpu.so"
    if not target.exists():
      logger.info("Building the native CPU kernels (first use, ~30 s)...")
      start = time.perf_counter()
      _build(compiler, target)
      logger.info("Built the native CPU kernels in %.1f s (cached in %s).",
                  time.perf_counter() - start, target.parent)
    return ctypes.CDLL(str(target)), ""
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    return None, f"the build failed: {e}"


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
  """The library of this process, built and opened once, its FFI targets registered."""
  library, reason = build_and_open()
  if library is not None:
    for name, symbol in ((_FORWARD_TARGET, library.AdderjaxAdderForward),
                         (_INPUT_GRAD_TARGET, library.AdderjaxAdderInputGrad),
                         (_WEIGHT_GRAD_TARGET, library.AdderjaxAdderWeightGrad),
                         *((name, getattr(library, symbol))
                           for name, symbol in INTEGER_TARGETS.values())):
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
  return library, reason


def available() -> bool:
  """Whether the native kernels are built and loaded (building them if needed).

  The first call on a machine compiles them (a few seconds); a failure warns
  once, saying why, and returns False.
  """
  library, reason = _load()
  if library is None and not _disabled():
    _warn_once(reason)
  return library is not None


def unavailable_reason() -> str:
  """Why :func:`available` is False (empty when it is True)."""
  return _load()[1]


def check_usable() -> None:
  """Raises the ValueError of ``implementation="cpu"`` where the kernels cannot run here."""
  if jax.default_backend() != "cpu":
    raise ValueError(f"implementation='cpu' runs native CPU kernels, but JAX's default backend "
                     f"is {jax.default_backend()!r}. Use None or 'xla'.")
  if not available():
    raise ValueError(f"implementation='cpu' is not available here: {unavailable_reason()}. Use "
                     "'xla' (or None, which picks it).")


def library_path() -> str | None:
  """The loaded library's file, or None."""
  library = _load()[0]
  return None if library is None else library._name


@functools.cache
def _warn_once(reason: str) -> None:
  warnings.warn(f"adderjax: the native CPU adder kernels are not available ({reason}); "
                "using the XLA loops instead.", RuntimeWarning, stacklevel=3)


def _vector_width() -> int:
  return int(_load()[0].AdderjaxVectorWidth())


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def forward(x: jax.Array, w: jax.Array, spec: ConvSpec) -> jax.Array:
  """The native forward: ``-sum |Xpad - F|`` as ``(B, Ho, Wo, O)`` (float32)."""
  kh, kw, cg, out = w.shape
  groups, per_group = spec.groups, out // spec.groups
  ho, wo = spec.output_spatial(x.shape[1:3], (kh, kw))
  opad = _round_up(per_group, _vector_width())
  # Filters as (G, K, Opad), K in (row, column, channel) order.
  wt = xla._pad_axis(w.reshape(kh * kw * cg, groups, per_group).transpose(1, 0, 2), -1, opad)
  (sh, sw), (dh, dw), ((top, _), (left, _)) = spec.strides, spec.dilation, spec.padding
  call = jax.ffi.ffi_call(_FORWARD_TARGET, jax.ShapeDtypeStruct((x.shape[0], ho, wo, out),
                                                                 jnp.float32),
                          vmap_method="sequential")
  # The kernel reads the zero padding in place of the rows and columns outside x.
  return call(x, wt, kh=np.int64(kh), kw=np.int64(kw), sh=np.int64(sh), sw=np.int64(sw),
              dh=np.int64(dh), dw=np.int64(dw), top=np.int64(top), left=np.int64(left),
              groups=np.int64(groups))


def input_grad_full_precision(x: jax.Array, w: jax.Array, g: jax.Array,
                              spec: ConvSpec) -> jax.Array:
  """The native ``sum g * HardTanh(F - Xpad)``, any stride: ``(B, H, W, C)`` (float32)."""
  wd = x.shape[2]
  kh, kw, cg, _ = w.shape
  (sh, sw), (dh, dw), ((top, _), (left, _)) = spec.strides, spec.dilation, spec.padding
  wo = g.shape[2]
  # Input column x feeds output column (x + left - j*dw) / sw, which lies in
  # [-g_left, columns): g gets g_left zero columns before and is padded (or
  # cropped) to `columns` after, so each column the kernel reads exists.
  g_left = max(0, -((left - (kw - 1) * dw) // sw))
  columns = (wd - 1 + left) // sw + 1
  gp = lax.pad(g, jnp.zeros((), g.dtype),
               ((0, 0, 0), (0, 0, 0), (g_left, columns - wo, 0), (0, 0, 0)))
  wt = _filters_by_output_channel(w, spec.groups, _round_up(cg, _vector_width()))
  call = jax.ffi.ffi_call(_INPUT_GRAD_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32),
                          vmap_method="sequential")
  return call(x, gp, wt, sh=np.int64(sh), sw=np.int64(sw), dh=np.int64(dh), dw=np.int64(dw),
              top=np.int64(top), left=np.int64(left), g_left=np.int64(g_left),
              groups=np.int64(spec.groups))


def _filters_by_output_channel(w: jax.Array, groups: int, cpad: int) -> jax.Array:
  """Filters as ``(G, kh, kw, Og, Cpad)``: one output channel's filter a row over the channels."""
  kh, kw, cg, out = w.shape
  wt = w.reshape(kh, kw, cg, groups, out // groups).transpose(3, 0, 1, 4, 2)
  return xla._pad_axis(wt, -1, cpad)


def weight_grad_full_precision(x: jax.Array, w: jax.Array, g: jax.Array,
                               spec: ConvSpec) -> jax.Array:
  """The native ``sum g * (Xpad - F)`` over the batch and the output pixels: ``w``'s shape."""
  kh, kw, cg, out = w.shape
  groups = spec.groups
  wt = _filters_by_output_channel(w, groups, _round_up(cg, _vector_width()))
  (sh, sw), (dh, dw), ((top, _), (left, _)) = spec.strides, spec.dilation, spec.padding
  call = jax.ffi.ffi_call(_WEIGHT_GRAD_TARGET, jax.ShapeDtypeStruct(wt.shape, jnp.float32),
                          vmap_method="sequential")
  dwt = call(x, g, wt, sh=np.int64(sh), sw=np.int64(sw), dh=np.int64(dh), dw=np.int64(dw),
             top=np.int64(top), left=np.int64(left), groups=np.int64(groups))
  return dwt[..., :cg].transpose(1, 2, 4, 0, 3).reshape(kh, kw, cg, out)


_KERNELS = {"forward": forward, "input_grad": input_grad_full_precision,
            "weight_grad": weight_grad_full_precision}


@dataclasses.dataclass(frozen=True)
class _Kernel:
  """A native kernel bound to a layer's geometry: hashable, for `sharding.per_batch_shard`."""

  kind: str
  spec: ConvSpec

  def __call__(self, *operands: jax.Array) -> jax.Array:
    return _KERNELS[self.kind](*operands, self.spec)


class NativeCpuAdderConv:
  """The ``implementation="cpu"`` of `adder_conv`: native kernels where they apply, else XLA.

  The native kernels take float32 operands; float64 (and whatever they do not
  cover: see the module docstring) goes to :mod:`adderjax.ops.xla`. Over a
  batch-sharded mesh each device runs the kernels on its own shard
  (`adderjax.ops.sharding`).
  """

  def forward(self, x: jax.Array, w: jax.Array, spec: ConvSpec) -> jax.Array:
    if x.dtype != jnp.float32:
      return xla.forward(x, w, spec)
    return sharding.per_batch_shard(_Kernel("forward", spec), "forward", x, w)

  def input_grad(self, x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
                 grad_mode: str) -> jax.Array:
    if x.dtype == jnp.float32 and grad_mode == "full_precision":
      return sharding.per_batch_shard(_Kernel("input_grad", spec), "input_grad", x, w, g)
    return xla.input_grad(x, w, g, spec, grad_mode)

  def weight_grad(self, x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
                  grad_mode: str) -> jax.Array:
    if x.dtype == jnp.float32 and grad_mode != "sign":
      return sharding.per_batch_shard(_Kernel("weight_grad", spec), "weight_grad", x, w, g)
    return xla.weight_grad(x, w, g, spec, grad_mode)

"""The build of the native CPU kernels: compiled on first use, cached, loaded, registered.

The C++ sources in ``csrc/`` (:data:`SOURCES`, with the headers they include,
:data:`HEADERS`) are compiled together into one shared library with the
system's C++ compiler (``$CXX``, else ``c++``) and :data:`FLAGS`, against the
headers jaxlib ships (``jax.ffi.include_dir()``). The library is cached per
source, compiler flags, compiler version, CPU features and jaxlib version
under ``$ADDERJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/adderjax``, else
``~/.cache/adderjax`` (in ``native/<key>/libadderjax_cpu.so``), built
atomically (concurrent builds are harmless). :func:`load` builds and opens it
once per process and registers its XLA FFI targets, those of the float
kernels (`adderjax.ops.cpu_native`) and of the integer ones
(`adderjax.ops.cpu_native_int`). ``ADDERJAX_NATIVE=0`` turns them off.

A build logs one ``INFO`` line through the ``adderjax.ops.cpu_native`` logger
when it starts and one with its time when it ends.

Example:
  >>> from adderjax.ops import native_build
  >>> native_build.disabled() in (True, False) and "adder_forward_cpu.cc" in native_build.SOURCES
  True
"""

from __future__ import annotations

import ctypes
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

import jax

from adderjax._paths import user_cache_dir

__all__ = ["BATCH_NORM_APPLY_TARGET", "BATCH_NORM_GRAD_TARGET", "BATCH_NORM_TARGET",
           "ENV_CACHE_DIR", "ENV_DISABLE", "FLAGS", "FORWARD_STATS_TARGET", "FORWARD_TARGET",
           "HEADERS", "INPUT_GRAD_NORMED_TARGET", "INPUT_GRAD_TARGET", "INTEGER_TARGETS",
           "SOURCES", "WEIGHT_GRAD_NORMED_TARGET", "WEIGHT_GRAD_TARGET", "build_and_open",
           "compiler", "disabled", "load"]

ENV_DISABLE = "ADDERJAX_NATIVE"
ENV_CACHE_DIR = "ADDERJAX_CACHE_DIR"

# The XLA FFI targets of the float kernels and the library symbols of their handlers.
FORWARD_TARGET = "adderjax_adder_forward"
FORWARD_STATS_TARGET = "adderjax_adder_forward_stats"  # and the batch mean and variance of y
INPUT_GRAD_TARGET = "adderjax_adder_input_grad"
WEIGHT_GRAD_TARGET = "adderjax_adder_weight_grad"
# The gradients with the input read through a BatchNorm and ReLU (adderjax.ops.adder_batch_norm).
INPUT_GRAD_NORMED_TARGET = "adderjax_adder_input_grad_normed"
WEIGHT_GRAD_NORMED_TARGET = "adderjax_adder_weight_grad_normed"
# BatchNorm in training mode with its ReLU and residual add (csrc/batch_norm_cpu.cc, called by
# adderjax.ops.batch_norm): the forward, its gradient, and the forward's second pass alone for
# statistics the adder forward summed (adderjax.ops.adder_batch_norm).
BATCH_NORM_TARGET = "adderjax_batch_norm_act"
BATCH_NORM_GRAD_TARGET = "adderjax_batch_norm_act_grad"
BATCH_NORM_APPLY_TARGET = "adderjax_batch_norm_apply"
_FLOAT_SYMBOLS = {FORWARD_TARGET: "AdderjaxAdderForward",
                  FORWARD_STATS_TARGET: "AdderjaxAdderForwardStats",
                  INPUT_GRAD_TARGET: "AdderjaxAdderInputGrad",
                  WEIGHT_GRAD_TARGET: "AdderjaxAdderWeightGrad",
                  INPUT_GRAD_NORMED_TARGET: "AdderjaxAdderInputGradNormed",
                  WEIGHT_GRAD_NORMED_TARGET: "AdderjaxAdderWeightGradNormed",
                  BATCH_NORM_TARGET: "AdderjaxBatchNormAct",
                  BATCH_NORM_GRAD_TARGET: "AdderjaxBatchNormActGrad",
                  BATCH_NORM_APPLY_TARGET: "AdderjaxBatchNormApply"}
INTEGER_TARGETS = {
    # (lanes, scaled): (FFI target, symbol) of the integer layers' kernels (csrc/adder_int_cpu.cc,
    # called by adderjax.ops.cpu_native_int): int32 sums, or the float epilogue applied.
    ("uint8", False): ("adderjax_integer_sums_u8", "AdderjaxIntegerSumsU8"),
    ("int16", False): ("adderjax_integer_sums_i16", "AdderjaxIntegerSumsI16"),
    ("uint8", True): ("adderjax_integer_scaled_u8", "AdderjaxIntegerScaledU8"),
    ("int16", True): ("adderjax_integer_scaled_i16", "AdderjaxIntegerScaledI16"),
}

# Compiled one process each, then linked into the one library.
SOURCES = (
    "adder_forward_cpu.cc",  # The float forward (two tilings); the library's vector width.
    "adder_input_grad_cpu.cc",  # The float input gradient (direct and bounds tiles).
    "adder_weight_grad_cpu.cc",  # The float weight gradient.
    "adder_int_cpu.cc",  # The integer layers' kernels.
    "batch_norm_cpu.cc",  # BatchNorm in training mode with its ReLU and residual add.
)
# What the sources include, part of the cache key like them.
HEADERS = (
    "batch_norm.h",  # BatchNorm's normalisation and ReLU, for its kernels and the adder ones.
    "parallel_for.h",  # The work sharing over XLA's intra-op thread pool.
    "vec.h",  # The float kernels' SIMD layer (Vec) and tile-height dispatch.
)
FLAGS = (
    "-O3",  # Speed: the kernels' tile loops are written for the optimizer to unroll.
    # The vector width (AVX2 or AVX-512) is chosen at compile time from this CPU's macros
    # (the Vec of csrc/vec.h): a library per machine, its features part of the cache key.
    "-march=native",
    "-std=c++17",  # if constexpr, fold expressions, structured bindings; jaxlib's FFI headers.
    "-shared", "-fPIC",  # A shared library, opened with ctypes.
)
_BUILD_TIMEOUT_S = 300

# The logger the build has always logged to (silenced with the "adderjax" logger).
logger = logging.getLogger("adderjax.ops.cpu_native")


def disabled() -> bool:
  """Whether ``$ADDERJAX_NATIVE`` turns the native kernels off (``0``, ``false``, ``no``,
  ``off``)."""
  return os.environ.get(ENV_DISABLE, "1").lower() in ("0", "false", "no", "off")


def compiler() -> list[str] | None:
  """The C++ compiler's command (``$CXX``, split as a shell would, else ``c++``), or None."""
  command = shlex.split(os.environ.get("CXX", "c++"))
  return command if command and shutil.which(command[0]) else None


def _source(name: str) -> bytes:
  return (importlib.resources.files("adderjax.ops") / "csrc" / name).read_bytes()


def _build_key(command: list[str]) -> str:
  """What the library depends on: the source, flags, compiler, CPU features, jaxlib."""
  # The macros -march=native defines name this CPU's features as the compiler sees them.
  features = subprocess.run([*command, "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
                            capture_output=True, text=True, timeout=60, check=True).stdout
  version = subprocess.run([*command, "--version"], capture_output=True, text=True,
                           timeout=60).stdout
  digest = hashlib.sha256()
  sources = (_source(name) for name in SOURCES + HEADERS)
  for part in (*sources, " ".join(FLAGS).encode(), version.encode(), features.encode(),
               jax.lib.__version__.encode(), platform.machine().encode()):
    digest.update(part)
    digest.update(b"\0")
  return digest.hexdigest()[:24]


def _build(command: list[str], target: pathlib.Path) -> None:
  """Compiles the handlers into ``target`` atomically (concurrent builds are harmless).

  One compiler process per source, all at once (each parses jaxlib's FFI
  headers, the larger part of its time), then one link.
  """
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as scratch_name:
    scratch = pathlib.Path(scratch_name)
    for name in SOURCES + HEADERS:
      (scratch / name).write_bytes(_source(name))
    compile_flags = [flag for flag in FLAGS if flag != "-shared"]
    objects = [scratch / f"{name}.o" for name in SOURCES]
    jobs = [subprocess.Popen([*command, *compile_flags, f"-I{jax.ffi.include_dir()}", "-c",
                              str(scratch / name), "-o", str(obj)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, obj in zip(SOURCES, objects)]
    results = []
    try:
      for job in jobs:
        _, stderr = job.communicate(timeout=_BUILD_TIMEOUT_S)
        results.append((job.returncode, stderr))
    finally:
      for job in jobs:
        if job.poll() is None:
          job.kill()
          job.wait()
    output = scratch / target.name
    if all(code == 0 for code, _ in results):
      link = subprocess.run([*command, *FLAGS, *map(str, objects), "-o", str(output)],
                            capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
      results.append((link.returncode, link.stderr))
    for code, stderr in results:
      if code != 0:
        lines = [line for line in stderr.splitlines() if "error" in line] or [
            stderr.strip()[-500:]]
        raise RuntimeError(f"{' '.join(command)} failed: {lines[0]}")
    os.replace(output, target)


def build_and_open(cache_root: pathlib.Path | None = None) -> tuple[ctypes.CDLL | None, str]:
  """Builds the library if it is not cached yet and opens it: ``(library, "")`` or ``(None, why)``.

  Args:
    cache_root: Where the ``native/`` cache lives (default: see the module docstring).
  """
  if disabled():
    return None, f"{ENV_DISABLE}={os.environ[ENV_DISABLE]} turns them off"
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return None, f"they are written for x86-64 (AVX2 or AVX-512), this is {platform.machine()}"
  command = compiler()
  if command is None:
    return None, f"no C++ compiler was found ($CXX={os.environ.get('CXX', '')!r}, or c++)"
  try:
    root = user_cache_dir(ENV_CACHE_DIR) if cache_root is None else pathlib.Path(cache_root)
    target = root / "native" / _build_key(command) / "libadderjax_cpu.so"
    if not target.exists():
      logger.info("Building the native CPU kernels (first use, ~30 s)...")
      start = time.perf_counter()
      _build(command, target)
      logger.info("Built the native CPU kernels in %.1f s (cached in %s).",
                  time.perf_counter() - start, target.parent)
    return ctypes.CDLL(str(target)), ""
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    return None, f"the build failed: {e}"


@functools.cache
def load() -> tuple[ctypes.CDLL | None, str]:
  """The library of this process, built and opened once, its FFI targets registered.

  Returns:
    ``(library, "")``, or ``(None, why)`` where it cannot be built or opened (see
    :func:`build_and_open`).
  """
  library, reason = build_and_open()
  if library is not None:
    for name, symbol in (*_FLOAT_SYMBOLS.items(), *INTEGER_TARGETS.values()):
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
  return library, reason

"""A trained model's inference function as one portable file, with `jax.export`.

`save` traces ``model(images)`` (float or quantized by `adderjax.quant`) in eval
mode with a symbolic batch dimension, lowers it to StableHLO for CPU and CUDA
with `jax.export`, and writes it with the input spec and the preprocessing
constants to one zip file:

- ``function.bin``: `jax.export.Exported.serialize` of the function; the
  weights are constants inside it.
- ``spec.json``: the input shape (``null`` for the batch) and dtype, the
  preprocessing ``x = (pixels / 255 - mean) / std`` per channel, the platforms
  and the versions it was made with, and any metadata passed to `save`.

Loading needs only JAX (with ``flatbuffers``, which `jax.export` serialization
uses), not adderjax (`load` itself imports nothing else)::

    import json, zipfile, jax
    with zipfile.ZipFile("model.jaxexport") as f:
      spec = json.loads(f.read("spec.json"))
      exported = jax.export.deserialize(bytearray(f.read("function.bin")))
    logits = exported.call(images)  # images: (batch, *spec["input_shape"][1:]) float32

Compatibility: JAX guarantees that a serialized function keeps loading and
running in JAX releases up to about 6 months newer than the one that saved it
(its backward-compatibility window, see the `jax.export` documentation); re-export
from the checkpoint after that. Custom calls are not stable across versions:
the Pallas GPU kernels (``implementation="pallas"``) and the native CPU kernels
(``"cpu"``, XLA FFI, float and integer) cannot be exported, so `save` exports
every adder layer, float or integer (`adderjax.quant`), with the XLA
implementation (``implementation="xla"``), which lowers to plain StableHLO
loops on any platform.

`save_c` writes a quantized model as integer-only C99 source instead
(`adderjax.c_export`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import json
import pathlib
from typing import Any
import zipfile
import zlib

import jax
import jax.numpy as jnp

__all__ = ["FORMAT", "PLATFORMS", "load", "save", "save_c"]

FORMAT = "adderjax.export/1"
"""The ``format`` field of ``spec.json``."""

PLATFORMS = ("cpu", "cuda")
"""The platforms `save` lowers for by default."""

_FUNCTION = "function.bin"
_SPEC = "spec.json"


def _with_xla_adder_layers(model: Any) -> Any:
  """A copy of ``model`` in eval mode whose adder layers, float and integer, use
  ``implementation="xla"``."""
  from flax import nnx

  from adderjax.nn import AdderConv, AdderDense
  from adderjax.quant import QuantizedAdderConv, QuantizedAdderDense

  model = nnx.clone(model)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, (AdderConv, AdderDense, QuantizedAdderConv, QuantizedAdderDense)):
      module.implementation = "xla"
  model.eval()
  return model


def _check_floats(values: Sequence[float] | None, name: str, channels: int) -> list[float] | None:
  if values is None:
    return None
  values = [float(v) for v in values]
  if len(values) != channels:
    raise ValueError(f"{name} must have one value per input channel ({channels}), got "
                     f"{name}={values!r}.")
  return values


def save(
    model: Any,
    path: str | pathlib.Path,
    *,
    input_shape: Sequence[int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    platforms: Sequence[str] = PLATFORMS,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Exports ``model``'s inference function with its input spec to ``path``.

  Args:
    model: a Flax NNX model called as ``model(images)`` on NHWC float32
      batches: an adderjax model, float or quantized (`adderjax.quant`). It is
      not changed: a copy is put in eval mode, its adder layers on the XLA
      implementation.
    path: the file to write (e.g. ``model.jaxexport``).
    input_shape: one image's ``(height, width, channels)``; the batch
      dimension is symbolic.
    mean: the per-channel mean subtracted from pixels in [0, 1] before the
      model (e.g. ``adderjax.data.DATASETS["mnist"].mean``), recorded in the
      spec; None for none.
    std: the per-channel divisor, likewise.
    platforms: the platforms to lower for (``"cpu"``, ``"cuda"``, ``"rocm"``,
      ``"tpu"``).
    metadata: JSON-serializable facts to record (model name, accuracy, ...).

  Returns:
    The spec written to ``spec.json``.

  Raises:
    ValueError: for a bad ``input_shape``, ``mean``, ``std`` or ``platforms``.

  Example:
    >>> import tempfile, numpy as np
    >>> from flax import nnx
    >>> from adderjax import export, models
    >>> model = models.lenet5_bn(kind="adder", rngs=nnx.Rngs(0))
    >>> path = tempfile.mkdtemp() + "/lenet.jaxexport"
    >>> spec = export.save(model, path, input_shape=(28, 28, 1), mean=(0.1307,), std=(0.3081,),
    ...                    platforms=("cpu",))
    >>> spec["input_shape"]
    [None, 28, 28, 1]
    >>> function, spec = export.load(path)
    >>> function(np.zeros((3, 28, 28, 1), np.float32)).shape
    (3, 10)
  """
  shape = tuple(input_shape)
  if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
    raise ValueError(f"input_shape must be (height, width, channels) of positive ints, got "
                     f"input_shape={input_shape!r}.")
  mean = _check_floats(mean, "mean", shape[-1])
  std = _check_floats(std, "std", shape[-1])
  platforms = tuple(platforms)
  if not platforms or not all(isinstance(p, str) for p in platforms):
    raise ValueError(f"platforms must be a non-empty sequence of names, got "
                     f"platforms={platforms!r}.")
  from flax import nnx

  graphdef, state = nnx.split(_with_xla_adder_layers(model))

  def infer(images: jax.Array) -> Any:
    return nnx.merge(graphdef, state)(images)

  batch, = jax.export.symbolic_shape("batch")
  exported = jax.export.export(jax.jit(infer), platforms=platforms)(
      jax.ShapeDtypeStruct((batch, *shape), jnp.float32))
  spec = {
      "format": FORMAT,
      "input_shape": [None, *shape],
      "input_dtype": "float32",
      "preprocessing": {"pixel_scale": 1 / 255, "mean": mean, "std": std,
                        "formula": "(pixels * pixel_scale - mean) / std"},
      "platforms": list(exported.platforms),
      "jax_version": jax.__version__,
      "calling_convention_version": exported.calling_convention_version,
      "metadata": dict(metadata or {}),
  }
  text = json.dumps(spec, indent=2)  # fails here, before writing, if metadata is not JSON
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + ".partial")
  with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as f:
    f.writestr(_SPEC, text)
    f.writestr(_FUNCTION, bytes(exported.serialize()))
  partial.replace(path)
  return spec


def load(path: str | pathlib.Path) -> tuple[Callable[..., Any], dict[str, Any]]:
  """Reads a file written by `save`: ``(function, spec)``.

  ``function(images)`` runs the exported model on a ``(batch, *input_shape)``
  float32 array on the default device (JIT compiled on first call per batch
  size). Only JAX is needed.

  Raises:
    FileNotFoundError: if there is no such file.
    ValueError: if the file is not one `save` wrote, or is damaged (not a zip
      file, truncated, a member that does not read back); the message names
      the path and what is wrong.
  """
  try:
    with zipfile.ZipFile(path) as f:
      names = set(f.namelist())
      if not {_FUNCTION, _SPEC} <= names:
        raise ValueError(f"{path} is not an adderjax export: it lacks {_FUNCTION} or {_SPEC}.")
      spec_bytes, function_bytes = f.read(_SPEC), f.read(_FUNCTION)
  except (zipfile.BadZipFile, zlib.error, EOFError) as e:
    raise ValueError(f"{path} is not an adderjax export, or is damaged (truncated?): it does not "
                     f"read as a zip file ({e}).") from None
  try:
    spec = json.loads(spec_bytes)
  except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
    raise ValueError(f"{path} is damaged: its {_SPEC} is not JSON ({e}).") from None
  if not isinstance(spec, dict) or spec.get("format") != FORMAT:
    found = spec.get("format") if isinstance(spec, dict) else spec
    raise ValueError(f"{path} has format {found!r}, not {FORMAT!r}.")
  try:
    exported = jax.export.deserialize(bytearray(function_bytes))
  except Exception as e:
    raise ValueError(f"{path} is damaged: its {_FUNCTION} does not deserialize "
                     f"({type(e).__name__}: {str(e)[:200]}).") from None
  return exported.call, spec


def save_c(model: Any, directory: str | pathlib.Path, *, input_shape: Sequence[int],
           mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
           verbose: bool = True) -> dict[str, Any]:
  """Writes a quantized model as integer-only C99: ``model.h``, ``model.c``, ``main.c``.

  See `adderjax.c_export.save_c`, its arguments and its example (imported here
  on first use, so that `load` needs nothing beyond JAX).
  """
  from adderjax.c_export import save_c as _save_c

  return _save_c(model, directory, input_shape=input_shape, mean=mean, std=std, verbose=verbose)

"""Reads PyTorch checkpoints (``torch.save`` files) into NumPy arrays, without PyTorch.

Both of ``torch.save``'s formats are read:

- the zip archive (PyTorch 1.6 and later): ``<folder>/data.pkl``, the pickled
  object, whose tensors name their storages ``<folder>/data/<key>``, raw
  bytes in the order ``<folder>/byteorder`` gives (little-endian if absent);
- the legacy stream (earlier versions, and ``_use_new_zipfile_serialization=False``):
  five pickles (a magic number, the protocol version, the system information,
  the object, the list of storage keys), then each storage's raw
  little-endian bytes preceded by its element count as an 8-byte
  little-endian integer.

The pickles are read by a restricted unpickler that knows only the globals a
state dict needs: ``collections.OrderedDict``, the tensor and parameter
rebuild functions of ``torch._utils``, the storage classes and the dtypes,
each replaced by a NumPy stand-in. Any other global (a class, a function) is
refused with a ValueError naming it: a checkpoint never runs code here.

bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays (the dtype JAX
uses), the others as the NumPy dtype of the same name.

Example (the official ResNet-20 checkpoint, in the legacy format):
  >>> from adderjax.models.pretrained_models import PRETRAINED
  >>> from adderjax.models.torch_checkpoint import load_torch_state_dict
  >>> state = load_torch_state_dict(PRETRAINED["resnet20_cifar10"].path())
  >>> len(state), state["layer1.0.conv1.adder"].shape, state["bn1.running_var"].dtype
  (132, (16, 16, 3, 3), dtype('float32'))
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
import contextlib
from importlib.resources.abc import Traversable
import io
import os
import pickle
import struct
from typing import Any, BinaryIO
import zipfile

import ml_dtypes
import numpy as np

__all__ = ["load_torch_state_dict", "unwrap_state_dict"]

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001

_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": _BFLOAT16,
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
"""The dtype of each of PyTorch's typed storage classes (``torch.<name>``)."""

_TORCH_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "float": np.dtype(np.float32),
    "float64": np.dtype(np.float64), "double": np.dtype(np.float64),
    "float16": np.dtype(np.float16), "half": np.dtype(np.float16),
    "bfloat16": _BFLOAT16,
    "int64": np.dtype(np.int64), "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32), "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
"""The dtype of each ``torch.<name>`` dtype a checkpoint may name."""

_STATE_DICT_KEYS = ("state_dict", "model")
"""The keys under which training scripts commonly store the state dict."""


class _ForbiddenGlobal(pickle.UnpicklingError):
  """A pickle named a global the restricted unpickler does not know."""


class _TorchGlobal:
  """A stand-in for a torch global (a storage class, a dtype, a rebuild function).

  Immutable: pickle's BUILD cannot change it (a ``__setstate__`` that raises).
  """

  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype: np.dtype):
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "dtype", dtype)

  def __setattr__(self, name: str, value: Any) -> None:
    raise AttributeError(name)

  def __setstate__(self, state: Any) -> None:
    raise pickle.UnpicklingError(f"cannot set the state of {self!r}")

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _StorageType(_TorchGlobal):
  """``torch.FloatStorage`` and the like, or ``UntypedStorage`` (of bytes)."""

  __slots__ = ()


class _DType(_TorchGlobal):
  """A ``torch.<dtype>`` global."""

  __slots__ = ()


class _Storage:
  """One storage: a flat array of ``numel`` elements, filled once its bytes are read."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key = key
    self.dtype = dtype
    self.numel = numel
    self.data: np.ndarray | None = None
    self.root: _Storage | None = None  # a legacy storage view: a slice of ``root``
    self.offset = 0

  def array(self) -> np.ndarray:
    if self.root is not None:
      return self.root.array()[self.offset:self.offset + self.numel]
    if self.data is None:
      raise pickle.UnpicklingError(f"the bytes of storage {self.key!r} are missing")
    return self.data


class _Tensor:
  """A tensor to build once its storage is read: ``_rebuild_tensor_v2``'s arguments."""

  def __init__(self, storage: Any, offset: Any, size: Any, stride: Any,
               dtype: np.dtype | None = None):
    if not isinstance(storage, _Storage):
      raise pickle.UnpicklingError(f"a tensor's storage must be a storage, got {storage!r}")
    self.storage = storage
    self.offset = offset
    self.size = tuple(size)
    self.stride = tuple(stride)
    self.dtype = storage.dtype if dtype is None else dtype
    if not all(isinstance(n, int) and n >= 0 for n in (offset, *self.size, *self.stride)):
      raise pickle.UnpicklingError(f"bad tensor geometry: offset {offset!r}, size {size!r}, "
                                   f"stride {stride!r}")
    if len(self.size) != len(self.stride):
      raise pickle.UnpicklingError(f"tensor size {self.size} and stride {self.stride} differ "
                                   f"in length")

  def build(self) -> np.ndarray:
    flat = self.storage.array()
    if flat.dtype != self.dtype:  # an untyped (byte) storage read as ``self.dtype``
      if flat.nbytes % self.dtype.itemsize:
        raise pickle.UnpicklingError(
            f"storage {self.storage.key!r} of {flat.nbytes} bytes does not hold {self.dtype} "
            f"elements")
      flat = flat.view(self.dtype)
    if 0 in self.size:
      return np.zeros(self.size, self.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if last >= flat.size:
      raise pickle.UnpicklingError(
          f"a tensor of size {self.size}, stride {self.stride} and offset {self.offset} needs "
          f"{last + 1} elements, but storage {self.storage.key!r} has {flat.size}")
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size,
        strides=tuple(s * flat.itemsize for s in self.stride), writeable=False)
    return np.array(view, copy=True, order="C")


def _check_metadata(metadata: Any) -> None:
  if metadata and any(metadata.values()):
    raise pickle.UnpicklingError(f"tensors with metadata {metadata!r} (conjugate or negative "
                                 f"views) are not supported")


def _rebuild_tensor(storage, offset, size, stride):
  return _Tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
  del requires_grad, hooks
  _check_metadata(metadata)
  return _Tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype,
                       metadata=None):
  del requires_grad, hooks
  _check_metadata(metadata)
  if not isinstance(dtype, _DType):
    raise pickle.UnpicklingError(f"the dtype of a tensor must be a torch dtype, got {dtype!r}")
  return _Tensor(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
  del requires_grad, hooks, state
  return data


_REBUILDERS = {
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_tensor_v3": _rebuild_tensor_v3,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter,
}
"""What stands for each rebuild function of ``torch._utils``: a tensor or parameter is its
`_Tensor` (a parameter's ``requires_grad``, hooks and state are dropped)."""


class _Call(_TorchGlobal):
  """A rebuild function of ``torch._utils``, called by pickle's REDUCE."""

  __slots__ = ()

  def __init__(self, name: str):
    super().__init__(name, None)

  def __repr__(self) -> str:
    return f"torch._utils.{self.name}"

  def __call__(self, *args: Any) -> Any:
    try:
      return _REBUILDERS[self.name](*args)
    except TypeError as error:
      raise pickle.UnpicklingError(f"bad arguments to {self!r}: {error}") from None


def _allowed_globals() -> dict[tuple[str, str], Any]:
  allowed: dict[tuple[str, str], Any] = {("collections", "OrderedDict"): collections.OrderedDict}
  for name in _REBUILDERS:
    allowed["torch._utils", name] = _Call(name)
  for name, dtype in _STORAGE_DTYPES.items():
    allowed["torch", name] = _StorageType(name, dtype)
  for module in ("torch", "torch.storage"):
    allowed[module, "UntypedStorage"] = _StorageType("UntypedStorage", np.dtype(np.uint8))
  for name, dtype in _TORCH_DTYPES.items():
    allowed["torch", name] = _DType(name, dtype)
  return allowed


_ALLOWED_GLOBALS = _allowed_globals()


def _text(value: Any) -> Any:
  return value.decode("ascii") if isinstance(value, bytes) else value


class _Unpickler(pickle.Unpickler):
  """Knows `_ALLOWED_GLOBALS` only; maps persistent storage ids to `_Storage` objects."""

  def __init__(self, file: BinaryIO, storages: dict[str, _Storage]):
    super().__init__(file, encoding="utf-8")
    self.storages = storages

  def find_class(self, module: str, name: str) -> Any:
    found = _ALLOWED_GLOBALS.get((module, name))
    if found is None:
      raise _ForbiddenGlobal(f"{module}.{name}")
    return found

  def persistent_load(self, pid: Any) -> _Storage:
    if not isinstance(pid, tuple) or len(pid) not in (5, 6) or _text(pid[0]) != "storage":
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
    storage_type, key, _, numel = pid[1:5]
    view = pid[5] if len(pid) == 6 else None
    key = str(_text(key))
    if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
      raise pickle.UnpicklingError(f"bad storage {pid!r}")
    storage = self.storages.get(key)
    if storage is None:
      storage = self.storages[key] = _Storage(key, storage_type.dtype, numel)
    elif storage.dtype != storage_type.dtype or storage.numel != numel:
      raise pickle.UnpicklingError(f"storage {key!r} is named with two types or sizes")
    if view is None:
      return storage
    view_key, offset, view_numel = view
    view_key = str(_text(view_key))
    if view_key not in self.storages:
      sliced = self.storages[view_key] = _Storage(view_key, storage.dtype, view_numel)
      sliced.root, sliced.offset = storage, offset
    return self.storages[view_key]


def _resolve(value: Any) -> Any:
  """``value`` with every `_Tensor` built, through dicts, lists and tuples."""
  if isinstance(value, _Tensor):
    return value.build()
  if isinstance(value, dict):
    resolved = type(value)() if isinstance(value, collections.OrderedDict) else {}
    for key, item in value.items():
      resolved[key] = _resolve(item)
    return resolved
  if isinstance(value, (list, tuple)):
    return type(value)(_resolve(item) for item in value)
  return value


def _read_exactly(file: BinaryIO, size: int, what: str) -> bytes:
  data = file.read(size)
  if len(data) != size:
    raise pickle.UnpicklingError(f"the file ends in {what} ({len(data)} of {size} bytes)")
  return data


def _storage_array(data: bytes, storage: _Storage, byteorder: str) -> np.ndarray:
  expected = storage.numel * storage.dtype.itemsize
  if len(data) != expected:
    raise pickle.UnpicklingError(f"storage {storage.key!r} has {len(data)} bytes, expected "
                                 f"{expected} ({storage.numel} x {storage.dtype})")
  array = np.frombuffer(data, storage.dtype)
  if byteorder == "big" and storage.dtype.itemsize > 1:
    array = array.byteswap()
  return array


def _load_legacy(file: BinaryIO) -> Any:
  """The object of a legacy (pre-zip) checkpoint."""
  if _Unpickler(file, {}).load() != _MAGIC_NUMBER:
    raise pickle.UnpicklingError("no PyTorch magic number: not a PyTorch checkpoint")
  protocol = _Unpickler(file, {}).load()
  if protocol != _PROTOCOL_VERSION:
    raise pickle.UnpicklingError(f"unknown protocol version {protocol!r}")
  _Unpickler(file, {}).load()  # the system information: plain data
  storages: dict[str, _Storage] = {}
  result = _Unpickler(file, storages).load()
  keys = _Unpickler(file, {}).load()
  if not isinstance(keys, list):
    raise pickle.UnpicklingError(f"the storage keys must be a list, got {type(keys).__name__}")
  for key in keys:
    storage = storages.get(str(key))
    if storage is None:
      raise pickle.UnpicklingError(f"storage key {key!r} is not used by the checkpoint")
    numel, = struct.unpack("<q", _read_exactly(file, 8, f"the size of storage {key!r}"))
    if numel != storage.numel:
      raise pickle.UnpicklingError(f"storage {key!r} has {numel} elements, expected "
                                   f"{storage.numel}")
    data = _read_exactly(file, numel * storage.dtype.itemsize, f"storage {key!r}")
    storage.data = _storage_array(data, storage, "little")
  return _resolve(result)


def _load_zip(file: BinaryIO) -> Any:
  """The object of a zip-format checkpoint."""
  with zipfile.ZipFile(file) as archive:
    names = set(archive.namelist())
    pickles = sorted(n for n in names if n.endswith("data.pkl") and n.count("/") == 1)
    if len(pickles) != 1:
      raise pickle.UnpicklingError(f"expected one '<folder>/data.pkl' in the archive, found "
                                   f"{pickles or 'none'}")
    folder = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if folder + "byteorder" in names:
      byteorder = archive.read(folder + "byteorder").decode("ascii").strip()
      if byteorder not in ("little", "big"):
        raise pickle.UnpicklingError(f"unknown byteorder {byteorder!r}")
    storages: dict[str, _Storage] = {}
    result = _Unpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
    for storage in storages.values():
      if storage.root is not None:
        continue
      record = f"{folder}data/{storage.key}"
      if record not in names:
        raise pickle.UnpicklingError(f"the archive has no record {record!r}")
      storage.data = _storage_array(archive.read(record), storage, byteorder)
  return _resolve(result)


def unwrap_state_dict(value: Any, *, source: str = "state_dict") -> dict[str, np.ndarray]:
  """The state dict in a loaded checkpoint, as a dict of NumPy arrays.

  ``value`` is the state dict itself (a mapping of names to arrays), or a
  mapping whose ``"state_dict"`` or ``"model"`` entry is (as training scripts
  save it, beside the epoch and optimizer). A ``"module."`` prefix on every
  key (``torch.nn.DataParallel``) is removed.

  Args:
    value: what the checkpoint holds, or a state dict.
    source: where ``value`` comes from, for error messages.

  Returns:
    A new dict from parameter names to arrays, in the state dict's order.

  Raises:
    ValueError: naming ``source``, if no state dict is found, or naming the
      key whose value is not an array.

  Example:
    >>> import numpy as np
    >>> from adderjax.models.torch_checkpoint import unwrap_state_dict
    >>> checkpoint = {"epoch": 3, "state_dict": {"module.fc.weight": np.ones((2, 4))}}
    >>> {k: v.shape for k, v in unwrap_state_dict(checkpoint).items()}
    {'fc.weight': (2, 4)}
  """
  for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
    if not isinstance(value, Mapping):
      break
    inner = [value[k] for k in _STATE_DICT_KEYS if isinstance(value.get(k), Mapping)]
    if not inner:
      break
    value = inner[0]
  if not isinstance(value, Mapping) or not value:
    kind = f"keys {sorted(map(str, value))[:8]}" if isinstance(value, Mapping) else \
        type(value).__name__
    raise ValueError(f"{source}: no state dict found (a non-empty mapping of names to tensors, "
                     f"or one under a {' or '.join(map(repr, _STATE_DICT_KEYS))} key), got "
                     f"{kind}.")
  state: dict[str, np.ndarray] = {}
  for key, array in value.items():
    if not isinstance(key, str):
      raise ValueError(f"{source}: state dict keys must be strings, got {key!r}.")
    try:
      if isinstance(array, (Mapping, str, bytes)) or array is None:
        raise TypeError(type(array).__name__)
      state[key] = np.asarray(array)
      if state[key].dtype == object:
        raise TypeError(type(array).__name__)
    except (TypeError, ValueError, RuntimeError) as error:
      raise ValueError(f"{source}: the value of key {key!r} is not a numeric array: "
                       f"{error}.") from None
  if all(key.startswith("module.") for key in state):
    state = {key[len("module."):]: array for key, array in state.items()}
  return state


def _describe(path_or_file: Any) -> str:
  if isinstance(path_or_file, (str, os.PathLike)):
    return os.fspath(path_or_file)
  return str(getattr(path_or_file, "name", None) or f"<{type(path_or_file).__name__}>")


def load_torch_state_dict(path_or_file: str | os.PathLike | BinaryIO | Traversable
                          ) -> dict[str, np.ndarray]:
  """Reads the state dict of a PyTorch checkpoint, without PyTorch.

  Reads either format of ``torch.save`` (see the module docstring), and
  unwraps the state dict with :func:`unwrap_state_dict`: from under a
  ``"state_dict"`` or ``"model"`` key, without a ``"module."`` prefix. Each
  tensor is copied into its own contiguous array, whatever its strides and
  whatever storage it shares.

  Args:
    path_or_file: the file's path (or an ``importlib.resources`` file), or a
      binary file object open for reading.

  Returns:
    A dict from parameter names to NumPy arrays, in the checkpoint's order.

  Raises:
    ValueError: naming the file, if it is not a PyTorch checkpoint, is
      truncated or corrupted, names a global other than tensors, storages,
      dtypes and ``collections.OrderedDict`` (the message names it), or holds
      no state dict.
  """
  where = _describe(path_or_file)
  opened = _open(path_or_file)
  try:
    with opened as file:
      value = _load(file)
  except _ForbiddenGlobal as error:
    raise ValueError(f"{where}: the checkpoint names the global {error}, which is not allowed "
                     f"(only tensors, storages, dtypes and collections.OrderedDict are read; no "
                     f"pickled code is run).") from None
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, ValueError,
          TypeError, KeyError, IndexError, AttributeError, OverflowError, UnicodeDecodeError,
          zipfile.LargeZipFile) as error:
    raise ValueError(f"{where}: not a readable PyTorch checkpoint (corrupted or truncated?): "
                     f"{type(error).__name__}: {error}") from None
  return unwrap_state_dict(value, source=where)


def _open(path_or_file: Any) -> contextlib.AbstractContextManager[BinaryIO]:
  """The file to read, opened if it is a path, as a context manager."""
  if isinstance(path_or_file, (str, os.PathLike)):
    return open(path_or_file, "rb")
  if hasattr(path_or_file, "read"):
    return contextlib.nullcontext(path_or_file)
  if hasattr(path_or_file, "open"):  # an importlib.resources.abc.Traversable
    return path_or_file.open("rb")
  raise ValueError(f"path_or_file must be a path or a binary file object, got "
                   f"{type(path_or_file).__name__}.")


def _load(file: BinaryIO) -> Any:
  if not file.seekable():
    file = io.BytesIO(file.read())
  start = file.tell()
  head = file.read(4)
  file.seek(start)
  if head.startswith(b"PK"):
    return _load_zip(file)
  return _load_legacy(file)

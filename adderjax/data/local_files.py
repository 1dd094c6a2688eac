"""Datasets in the files their authors distribute: MNIST as IDX, CIFAR as python pickles.

Everything here reads whole files into memory and returns ``(images,
labels)``: images uint8 ``(N, H, W, C)``, labels int64 ``(N,)``. Missing or
malformed files raise a :class:`DataError` naming the path.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import pickle
import zlib

import numpy as np

__all__ = ["DataError", "load_cifar_python", "load_mnist_idx", "mnist_arrays", "parse_idx",
           "read_idx"]

PathLike = str | os.PathLike


class DataError(ValueError):
  """A data directory or file is missing or not what it should be."""


_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _gunzipped(data: bytes, where: object) -> bytes:
  """``data``, gunzipped if it is gzip data (whatever the file's name)."""
  if data[:2] == _GZIP_MAGIC:
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(f"{where} is not a valid gzip file: {e}") from e
  return data


def read_idx(path: PathLike) -> np.ndarray:
  """Reads an IDX file (the format of the MNIST files), optionally gzipped.

  The header is two zero bytes, a type code, the number of dimensions and
  each dimension as a big-endian uint32; the values follow, big-endian.

  Args:
    path: The file, raw or gzipped (detected from its content).

  Returns:
    The array, with the header's shape and the native-endian dtype of its
    type code (uint8 for the MNIST files).

  Raises:
    DataError: If the file is missing, its header is malformed or it holds
      fewer or more values than its header says.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"{path} does not exist or is not a file.")
  return parse_idx(path.read_bytes(), where=path)


def parse_idx(data: bytes, *, where: object = "the IDX data") -> np.ndarray:
  """Decodes the content of an IDX file, optionally gzipped: :func:`read_idx` without the file.

  Args:
    data: The file's bytes.
    where: What to call the data in error messages (its path).

  Returns:
    The array, as :func:`read_idx` returns it.

  Raises:
    DataError: If the data is malformed; the message names ``where``.
  """
  data = _gunzipped(data, where)
  if len(data) < 4:
    raise DataError(f"{where} is not an IDX file: {len(data)} bytes, too short for a header.")
  if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise DataError(f"{where} is not an IDX file: bad magic number {data[:4].hex()} "
                    f"(expected 0000 then a type code in "
                    f"{[f'{c:02x}' for c in _IDX_DTYPES]} and the rank).")
  dtype, ndim = _IDX_DTYPES[data[2]], data[3]
  offset = 4 + 4 * ndim
  if len(data) < offset:
    raise DataError(f"{where} is truncated: its header of rank {ndim} needs {offset} bytes, "
                    f"the file has {len(data)}.")
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(data) - offset != expected:
    problem = "truncated" if len(data) - offset < expected else "longer than its header says"
    raise DataError(f"{where} is {problem}: shape {shape} needs {expected} bytes of values, "
                    f"the file has {len(data) - offset}.")
  array = np.frombuffer(data, dtype, offset=offset).reshape(shape)
  return array.astype(dtype.newbyteorder("="))


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _existing_dir(data_dir: PathLike, expected: str) -> pathlib.Path:
  path = pathlib.Path(data_dir).expanduser()
  if not path.is_dir():
    raise DataError(f"data_dir {path} does not exist or is not a directory (expected {expected}).")
  return path


def _find_file(directory: pathlib.Path, name: str) -> pathlib.Path:
  """``directory/name``, or ``directory/name.gz`` if only that exists."""
  for candidate in (directory / name, directory / f"{name}.gz"):
    if candidate.is_file():
      return candidate
  raise DataError(f"{directory / name} does not exist (nor {directory / name}.gz).")


def load_mnist_idx(data_dir: PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads an MNIST split from its original IDX files.

  Args:
    data_dir: The directory holding ``train-images-idx3-ubyte``,
      ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
      ``t10k-labels-idx1-ubyte``, each raw or with a ``.gz`` suffix.
    split: ``"train"`` or ``"test"`` (the ``t10k`` files).

  Returns:
    ``(images, labels)``: uint8 ``(N, 28, 28, 1)`` and int64 ``(N,)``.

  Raises:
    DataError: If the directory or a file is missing or malformed, or the
      images and labels do not match.
    ValueError: If ``split`` is neither ``"train"`` nor ``"test"``.
  """
  if split not in _MNIST_FILES:
    raise ValueError(f"split must be 'train' or 'test' for MNIST IDX files, got split={split!r}.")
  image_name, label_name = _MNIST_FILES[split]
  directory = _existing_dir(data_dir, f"the MNIST IDX files {image_name}[.gz], {label_name}[.gz]")
  image_path, label_path = _find_file(directory, image_name), _find_file(directory, label_name)
  return mnist_arrays(read_idx(image_path), read_idx(label_path), image_path, label_path)


def mnist_arrays(images: np.ndarray, labels: np.ndarray, image_where: object,
                 label_where: object) -> tuple[np.ndarray, np.ndarray]:
  """Checks decoded MNIST images and labels and returns them as ``(N, 28, 28, 1)`` uint8, int64."""
  if images.dtype != np.uint8 or images.ndim != 3:
    raise DataError(f"{image_where} holds {images.dtype} values of shape {images.shape}, "
                    "expected uint8 images of shape (N, height, width).")
  if labels.dtype != np.uint8 or labels.ndim != 1:
    raise DataError(f"{label_where} holds {labels.dtype} values of shape {labels.shape}, "
                    "expected uint8 labels of shape (N,).")
  if len(images) != len(labels):
    raise DataError(f"{image_where} holds {len(images)} images but {label_where} holds "
                    f"{len(labels)} labels.")
  if labels.size and labels.max() > 9:
    raise DataError(f"{label_where} holds label {labels.max()}, expected labels in 0..9.")
  return images[..., None], labels.astype(np.int64)


_CIFAR_LAYOUT = {
    # dataset: (subdirectory, {split: files}, label key, number of classes)
    "cifar10": ("cifar-10-batches-py",
                {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
                "labels", 10),
    "cifar100": ("cifar-100-python", {"train": ("train",), "test": ("test",)},
                 "fine_labels", 100),
}

# The pickles hold numpy arrays (or lists): these are all the globals they need.
# (`_codecs.encode` rebuilds bytes pickled by Python 3 with protocol 2.)
_SAFE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *((f"numpy.{core}.{module}", name) for core in ("core", "_core") for module, name in (
        ("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))),
}


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles plain containers and numpy arrays, refusing any other object.

  A pickle can run arbitrary code when loaded; the CIFAR batches only need
  the numpy array constructors.
  """

  def find_class(self, module: str, name: str):
    if (module, name) not in _SAFE_GLOBALS:
      raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
    return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


def _load_batch(path: pathlib.Path, label_key: str, num_classes: int):
  try:
    with open(path, "rb") as f:
      batch = _ArrayUnpickler(f, encoding="bytes").load()
  except OSError as e:
    raise DataError(f"{path} could not be read: {e}") from e
  except Exception as e:  # Malformed pickles raise many kinds of errors.
    raise DataError(f"{path} is not a CIFAR python batch (unpickling failed: {e!r}).") from e
  if not isinstance(batch, dict):
    raise DataError(f"{path} holds a {type(batch).__name__}, expected a dict.")
  batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
  for key in ("data", label_key):
    if key not in batch:
      raise DataError(f"{path} has no key {key!r} (keys: {sorted(map(str, batch))}).")
  data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key])
  if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or not np.issubdtype(data.dtype, np.integer):
    raise DataError(f"{path}: 'data' is {data.dtype} of shape {data.shape}, "
                    "expected integers of shape (N, 3072).")
  if data.size and (data.min() < 0 or data.max() > 255):
    raise DataError(f"{path}: 'data' holds values outside 0..255.")
  if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"{path}: {label_key!r} has shape {labels.shape} ({labels.dtype}), "
                    f"expected {len(data)} integer labels.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(f"{path}: {label_key!r} holds labels outside 0..{num_classes - 1}.")
  # Each row is the red plane, then green, then blue, each 32x32 row-major.
  images = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int64)


def load_cifar_python(data_dir: PathLike, dataset: str,
                      split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads a CIFAR split from the "python version" batches of its authors.

  Only the numpy array constructors are allowed while unpickling, so the
  files cannot run code.

  Args:
    data_dir: The directory holding the batches (``data_batch_1`` ..
      ``data_batch_5`` and ``test_batch`` for CIFAR-10, ``train`` and ``test``
      for CIFAR-100), or its parent holding ``cifar-10-batches-py`` or
      ``cifar-100-python`` (as the archives unpack).
    dataset: ``"cifar10"`` or ``"cifar100"`` (its fine labels).
    split: ``"train"`` or ``"test"``.

  Returns:
    ``(images, labels)``: uint8 ``(N, 32, 32, 3)`` and int64 ``(N,)``.

  Raises:
    DataError: If the directory or a file is missing or malformed.
    ValueError: If ``dataset`` or ``split`` is not one of the above.
  """
  if dataset not in _CIFAR_LAYOUT:
    raise ValueError(f"dataset must be one of {tuple(_CIFAR_LAYOUT)} for CIFAR python batches, "
                     f"got dataset={dataset!r}.")
  subdir, files, label_key, num_classes = _CIFAR_LAYOUT[dataset]
  if split not in files:
    raise ValueError("split must be 'train' or 'test' for CIFAR python batches, "
                     f"got split={split!r}.")
  directory = _existing_dir(data_dir, f"the {dataset} python batches or {subdir}/")
  if (directory / subdir).is_dir():
    directory = directory / subdir
  missing = [name for name in files[split] if not (directory / name).is_file()]
  if missing:
    raise DataError(f"{directory} lacks the {dataset} python batches {missing} "
                    f"(expected {list(files[split])} there or in {directory / subdir}).")
  batches = [_load_batch(directory / name, label_key, num_classes) for name in files[split]]
  return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))

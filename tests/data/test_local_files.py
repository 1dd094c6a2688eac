"""MNIST IDX files and CIFAR python batches: reading, layout and malformed files."""

import gzip
import os
import pathlib
import pickle

import numpy as np
import pytest

from adderjax import data

MNIST_DIR = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"
_TYPE_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
               np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
  """The IDX encoding of ``array``, written out from the format's description."""
  header = bytes([0, 0, _TYPE_CODES[array.dtype.type], array.ndim])
  header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path: pathlib.Path, content: bytes, *, gz: bool = False) -> pathlib.Path:
  path.write_bytes(gzip.compress(content) if gz else content)
  return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_round_trips(tmp_path, gz, dtype):
  array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
  if dtype == np.uint8:
    array = np.arange(30, dtype=np.uint8).reshape(2, 3, 5) * 8
  out = data.read_idx(write(tmp_path / "a.idx", idx_bytes(array), gz=gz))
  assert out.dtype == dtype and out.dtype.isnative
  np.testing.assert_array_equal(out, array)


def test_read_idx_accepts_str_paths_and_empty_arrays(tmp_path):
  path = write(tmp_path / "e", idx_bytes(np.zeros((0, 4), np.uint8)))
  assert data.read_idx(str(path)).shape == (0, 4)


@pytest.mark.parametrize("content, message", [
    (b"\x00\x00", "too short"),
    (b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc", "bad magic"),
    (b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc", "bad magic"),
    (b"\x00\x00\x08\x03" + (3).to_bytes(4, "big"), "truncated"),
    (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc", "truncated"),
    (b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"abc", "longer than its header"),
    (b"\x1f\x8bnot really gzip", "gzip"),
])
def test_read_idx_malformed_names_the_path(tmp_path, content, message):
  path = write(tmp_path / "bad-idx", content)
  with pytest.raises(data.DataError, match=message) as info:
    data.read_idx(path)
  assert str(path) in str(info.value)


def test_read_idx_missing_file(tmp_path):
  with pytest.raises(data.DataError, match="does not exist") as info:
    data.read_idx(tmp_path / "nope")
  assert str(tmp_path / "nope") in str(info.value)


def write_mnist(directory: pathlib.Path, split: str, images: np.ndarray, labels: np.ndarray,
                *, gz: bool) -> None:
  prefix = "train" if split == "train" else "t10k"
  suffix = ".gz" if gz else ""
  write(directory / f"{prefix}-images-idx3-ubyte{suffix}", idx_bytes(images), gz=gz)
  write(directory / f"{prefix}-labels-idx1-ubyte{suffix}", idx_bytes(labels), gz=gz)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_source(tmp_path, gz):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, 12).astype(np.uint8)
  write_mnist(tmp_path, "test", images, labels, gz=gz)
  write_mnist(tmp_path, "train", images[:5], labels[:5], gz=not gz)
  source = data.load_source("mnist", "test", source="idx", data_dir=tmp_path)
  assert isinstance(source, data.ArraySource) and len(source) == 12
  assert source.images.shape == (12, 28, 28, 1) and source.images.dtype == np.uint8
  np.testing.assert_array_equal(source.images[..., 0], images)
  np.testing.assert_array_equal(source.labels, labels)
  assert source[3]["label"] == labels[3] and isinstance(source[3]["label"], int)
  assert len(data.load_source("mnist", "train", source="idx", data_dir=tmp_path)) == 5
  part = data.load_source("mnist", "test[2:-3]", source="idx", data_dir=str(tmp_path))
  np.testing.assert_array_equal(part.labels, labels[2:9])


def test_idx_source_errors_name_the_path(tmp_path):
  missing = tmp_path / "missing"
  with pytest.raises(data.DataError, match="does not exist") as info:
    data.load_source("mnist", "test", source="idx", data_dir=missing)
  assert str(missing) in str(info.value)
  with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte"):
    data.load_source("mnist", "test", source="idx", data_dir=tmp_path)
  images = np.zeros((4, 28, 28), np.uint8)
  write_mnist(tmp_path, "test", images, np.zeros(3, np.uint8), gz=False)
  with pytest.raises(data.DataError, match="4 images but .* 3 labels") as info:
    data.load_source("mnist", "test", source="idx", data_dir=tmp_path)
  assert str(tmp_path / "t10k-images-idx3-ubyte") in str(info.value)
  write_mnist(tmp_path, "test", images, np.full(4, 10, np.uint8), gz=False)
  with pytest.raises(data.DataError, match="label 10"):
    data.load_source("mnist", "test", source="idx", data_dir=tmp_path)
  write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(images)[:-1])
  with pytest.raises(data.DataError, match="truncated") as info:
    data.load_source("mnist", "test", source="idx", data_dir=tmp_path)
  assert str(tmp_path / "t10k-images-idx3-ubyte") in str(info.value)


@pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                    reason=f"the MNIST test set is not in {MNIST_DIR}")
def test_real_mnist_test_set():
  full = data.load_source("mnist", "test", source="idx", data_dir=MNIST_DIR)
  assert full.images.shape == (10_000, 28, 28, 1)
  # The published statistics of the MNIST test set: mean pixel 0.1325 * 255.
  assert full.images.mean() == pytest.approx(33.79, abs=0.01)
  np.testing.assert_array_equal(np.unique(full.labels), np.arange(10))
  first = data.load_source("mnist", "test[:8000]", source="idx", data_dir=MNIST_DIR)
  rest = data.load_source("mnist", "test[8000:]", source="idx", data_dir=MNIST_DIR)
  assert len(first) == 8000 and len(rest) == 2000
  np.testing.assert_array_equal(rest.images, full.images[8000:])


def cifar_data(n: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_pickle(path: pathlib.Path, obj) -> None:
  with open(path, "wb") as f:
    pickle.dump(obj, f, protocol=2)  # Python 2 era files, as distributed.


def test_cifar10_python_batches(tmp_path):
  directory = tmp_path / "cifar-10-batches-py"
  directory.mkdir()
  rows = [cifar_data(3, i) for i in range(6)]
  labels = [[(2 * i + j) % 10 for j in range(3)] for i in range(6)]
  for i in range(5):
    write_pickle(directory / f"data_batch_{i + 1}",
                 {b"batch_label": b"training batch", b"data": rows[i], b"labels": labels[i]})
  write_pickle(directory / "test_batch", {b"data": rows[5], b"labels": labels[5]})
  for data_dir in (tmp_path, directory):  # The archive's parent or the directory itself.
    train = data.load_source("cifar10", "train", source="cifar_python", data_dir=data_dir)
    assert train.images.shape == (15, 32, 32, 3) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.labels, np.concatenate(labels[:5]))
  flat = np.concatenate(rows[:5])
  # Each row is 1024 red values, 1024 green, 1024 blue, each plane row-major.
  for n, y, x, c in [(0, 0, 0, 0), (4, 31, 0, 1), (14, 5, 17, 2), (7, 31, 31, 2)]:
    assert train.images[n, y, x, c] == flat[n, c * 1024 + y * 32 + x]
  test = data.load_source("cifar10", "test[1:]", source="cifar_python", data_dir=tmp_path)
  np.testing.assert_array_equal(test.images[0, :, :, 1], rows[5][1, 1024:2048].reshape(32, 32))
  np.testing.assert_array_equal(test.labels, labels[5][1:])


def test_cifar100_python_batches_use_fine_labels(tmp_path):
  rows = cifar_data(4, 0)
  write_pickle(tmp_path / "test", {b"data": rows, b"fine_labels": [99, 0, 5, 42],
                                   b"coarse_labels": [19, 0, 1, 2]})
  test = data.load_source("cifar100", "test", source="cifar_python", data_dir=tmp_path)
  np.testing.assert_array_equal(test.labels, [99, 0, 5, 42])
  np.testing.assert_array_equal(test.images[2, 3, 4],
                                rows[2, [3 * 32 + 4 + 1024 * c for c in range(3)]])


class _Mkdir:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.mkdir, (self.path,)


@pytest.mark.parametrize("content, message", [
    (b"garbage, not a pickle", "unpickling failed"),
    ([1, 2, 3], "expected a dict"),
    ({b"data": cifar_data(2, 0)}, "no key 'fine_labels'"),
    ({b"data": cifar_data(2, 0)[:, :100], b"fine_labels": [0, 1]}, "shape"),
    ({b"data": cifar_data(2, 0), b"fine_labels": [0]}, "2 integer labels"),
    ({b"data": cifar_data(2, 0), b"fine_labels": [0, 100]}, "outside 0..99"),
])
def test_cifar_python_malformed_names_the_path(tmp_path, content, message):
  if isinstance(content, bytes):
    (tmp_path / "test").write_bytes(content)
  else:
    write_pickle(tmp_path / "test", content)
  with pytest.raises(data.DataError, match=message) as info:
    data.load_source("cifar100", "test", source="cifar_python", data_dir=tmp_path)
  assert str(tmp_path / "test") in str(info.value)


def test_cifar_python_refuses_to_run_code(tmp_path):
  target = tmp_path / "created-by-the-pickle"
  write_pickle(tmp_path / "test", {b"data": _Mkdir(str(target))})
  with pytest.raises(data.DataError, match="not allowed"):
    data.load_source("cifar100", "test", source="cifar_python", data_dir=tmp_path)
  assert not target.exists()


def test_cifar_python_missing_files(tmp_path):
  with pytest.raises(data.DataError, match="does not exist") as info:
    data.load_source("cifar10", "test", source="cifar_python", data_dir=tmp_path / "nope")
  assert str(tmp_path / "nope") in str(info.value)
  write_pickle(tmp_path / "data_batch_1", {b"data": cifar_data(1, 0), b"labels": [0]})
  with pytest.raises(data.DataError, match="data_batch_2") as info:
    data.load_source("cifar10", "train", source="cifar_python", data_dir=tmp_path)
  assert str(tmp_path) in str(info.value)

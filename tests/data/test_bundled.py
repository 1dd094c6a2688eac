"""The MNIST test set shipped in the package."""

import gzip
import hashlib
import importlib.resources

import numpy as np
import pytest

from adderjax import data
from adderjax.data import bundled
from tests.data.test_local_files import MNIST_DIR


def test_the_bundled_files_are_those_in_shared():
  if not MNIST_DIR.is_dir():
    pytest.skip(f"{MNIST_DIR} is not here")
  folder = importlib.resources.files("adderjax.data") / "bundled"
  for name in bundled.BUNDLED_MNIST_FILES:
    assert (folder / name).read_bytes() == (MNIST_DIR / name).read_bytes()


def test_the_package_ships_the_official_files():
  folder = importlib.resources.files("adderjax.data") / "bundled"
  assert bundled.BUNDLED_MNIST_FILES == {
      "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
      "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
  }
  for name, expected in bundled.BUNDLED_MNIST_FILES.items():
    assert hashlib.md5((folder / name).read_bytes()).hexdigest() == expected


def test_bundled_images_are_the_mnist_test_set():
  images, labels = data.load_bundled_mnist()
  assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (10000,) and labels.dtype == np.int64
  assert images.sum() == 264_923_200 and images.mean() == pytest.approx(33.7912245)
  assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
  # Decoded independently: a 16-byte header, then the pixels row-major.
  folder = importlib.resources.files("adderjax.data") / "bundled"
  raw = gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes())
  np.testing.assert_array_equal(images.ravel(), np.frombuffer(raw, np.uint8, offset=16))
  assert not images.flags.writeable and not labels.flags.writeable


def test_bundled_source_splits_8000_and_2000():
  train = data.load_source("mnist", bundled.TRAIN_SPLIT, source="bundled")
  test = data.load_source("mnist", bundled.EVAL_SPLIT, source="bundled")
  assert (len(train), len(test)) == (8000, 2000)
  images, labels = data.load_bundled_mnist()
  np.testing.assert_array_equal(test.images, images[8000:])
  np.testing.assert_array_equal(train.labels, labels[:8000])


@pytest.mark.parametrize("dataset, split, message", [
    ("mnist", "train", "holds MNIST's 10,000 test images only"),
    ("cifar10", "test", "holds MNIST only"),
])
def test_bundled_source_bad_arguments_are_named(dataset, split, message):
  with pytest.raises(ValueError, match=message):
    data.load_source(dataset, split, source="bundled")

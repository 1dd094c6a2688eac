"""The real MNIST test set, shipped inside the package: real digits on a machine with no network.

The files are the official ``t10k-images-idx3-ubyte.gz`` and
``t10k-labels-idx1-ubyte.gz`` (10,000 images of 28x28 handwritten digits and
their labels, MD5 ``9fb629c4189551a2d022fa330f9573f3`` and
``ec29112dd5afa0611ce80d1b7f02629c`` as published), 1.6 MB in all. The
convention for training on them (``source="bundled"``, the main job's offline
default) is the first 8,000 images to train on and the other 2,000 to test on:
``split="test[:8000]"`` and ``split="test[8000:]"``.

Example:
  >>> from adderjax.data import bundled
  >>> images, labels = bundled.load_bundled_mnist()
  >>> images.shape, images.dtype, labels[:5].tolist()
  ((10000, 28, 28, 1), dtype('uint8'), [7, 2, 1, 0, 4])
"""

from __future__ import annotations

import functools
import importlib.resources

import numpy as np

from adderjax.data.local_files import mnist_arrays, parse_idx

__all__ = ["BUNDLED_MNIST_FILES", "TRAIN_SPLIT", "EVAL_SPLIT", "load_bundled_mnist"]

BUNDLED_MNIST_FILES = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
"""The bundled files and their published MD5s."""

TRAIN_SPLIT = "test[:8000]"
"""The bundled images to train on."""

EVAL_SPLIT = "test[8000:]"
"""The bundled images to test on."""


@functools.cache
def load_bundled_mnist() -> tuple[np.ndarray, np.ndarray]:
  """The 10,000 MNIST test images and labels shipped in the package.

  Returns:
    ``(images, labels)``: read-only uint8 ``(10000, 28, 28, 1)`` and int64
    ``(10000,)``.
  """
  folder = importlib.resources.files("adderjax.data") / "bundled"
  image_file, label_file = (folder / name for name in BUNDLED_MNIST_FILES)
  images, labels = mnist_arrays(parse_idx(image_file.read_bytes(), where=image_file),
                                parse_idx(label_file.read_bytes(), where=label_file),
                                image_file, label_file)
  for array in (images, labels):
    array.setflags(write=False)
  return images, labels

"""Input pipelines: MNIST, CIFAR-10/100 and ImageNet as normalised, sharded numpy batches.

:func:`load_source` opens a split for random access and :func:`train_batches`
/ :func:`eval_batches` turn it into batches for one process. Training batches
depend only on the seed and the step, whatever the number of processes, so
runs resume exactly (see :mod:`adderjax.data.pipeline`).

What each source needs:

- ``source="tfds"`` (all datasets): ``pip install tensorflow-datasets`` to
  read data prepared as ArrayRecord. Preparing it (``download=True``) also
  needs ``pip install tensorflow``; or prepare it on another machine with
  ``tfds build <name> --file_format=array_record`` and pass its
  ``data_dir``. ImageNet cannot be downloaded: put ``ILSVRC2012_img_train.tar``
  and ``ILSVRC2012_img_val.tar`` in TFDS' manual directory first. ImageNet's
  crops are resized with Pillow (``pip install pillow``; TFDS needs it, or
  OpenCV, to decode the JPEGs), or without it in numpy (slower, and without
  antialiasing: see :mod:`adderjax.data.resize`).
- ``source="idx"`` (MNIST): nothing; the four original IDX files, gzipped
  or not, in ``data_dir``; with ``download=True`` they are fetched from
  their authors' site or a mirror and checked against the published MD5s
  (:func:`download`, into a cache, ``~/.cache/adderjax`` or
  ``$ADDERJAX_DATA_DIR``).
- ``source="cifar_python"`` (CIFAR-10/100): nothing; the unpacked "python
  version" archive (``cifar-10-batches-py`` / ``cifar-100-python``); with
  ``download=True``, fetched and unpacked the same way.
- ``source="bundled"`` (MNIST): nothing; the 10,000 real MNIST test images
  shipped in the package (:mod:`adderjax.data.bundled`), by convention the
  first 8,000 to train on (``"test[:8000]"``) and the other 2,000 to test
  on (``"test[8000:]"``).
- ``source="synthetic"`` (all datasets): nothing; random class-dependent
  images for tests and smoke runs.
- ``source="digits"`` (MNIST): ``pip install scikit-learn``; its 8x8 digits,
  bundled with it, upscaled to 28x28.

Example:
  >>> from adderjax import data
  >>> source = data.load_source("cifar10", "train", source="synthetic", num_examples=64)
  >>> batches = data.train_batches("cifar10", source, global_batch_size=32, seed=0,
  ...                              process_index=0, process_count=1)
  >>> batch = next(batches)
  >>> batch["image"].shape, batch["image"].dtype, batch["label"].dtype
  ((32, 32, 32, 3), dtype('float32'), dtype('int32'))
"""

from adderjax.data.bundled import load_bundled_mnist
from adderjax.data.local_files import DataError, read_idx
from adderjax.data.pipeline import (
    epoch_permutation,
    eval_batches,
    num_eval_batches,
    steps_per_epoch,
    train_batches,
)
from adderjax.data.remote import REMOTES, DownloadError, data_home, download, is_downloaded
from adderjax.data.sources import SOURCES, ArraySource, Source, load_source, parse_split
from adderjax.data.specs import DATASETS, DatasetSpec

__all__ = [
    "DATASETS",
    "SOURCES",
    "ArraySource",
    "DataError",
    "DatasetSpec",
    "DownloadError",
    "REMOTES",
    "Source",
    "data_home",
    "download",
    "epoch_permutation",
    "eval_batches",
    "is_downloaded",
    "load_bundled_mnist",
    "load_source",
    "num_eval_batches",
    "parse_split",
    "read_idx",
    "steps_per_epoch",
    "train_batches",
]

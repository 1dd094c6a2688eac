"""Random-access sources of examples: TFDS, local files, synthetic data, scikit-learn's digits.

A source has ``len(source)`` and ``source[i] -> {"image": uint8 (H, W, C),
"label": int}``. TFDS data sources are ones; the others load whole splits
into an :class:`ArraySource`, whose ``images`` and ``labels`` arrays the
pipeline batches without a Python loop.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Protocol

import numpy as np

from adderjax.data import remote
from adderjax.data.bundled import load_bundled_mnist
from adderjax.data.local_files import DataError, load_cifar_python, load_mnist_idx
from adderjax.data.specs import DatasetSpec, get_spec

__all__ = [
    "SOURCES",
    "ArraySource",
    "Source",
    "load_source",
    "parse_split",
]

SOURCES = ("tfds", "idx", "cifar_python", "bundled", "synthetic", "digits")
"""Where examples come from: TFDS ArrayRecord data, MNIST IDX files, CIFAR
python batches, the MNIST test set shipped in the package, class-dependent
random images, scikit-learn's 8x8 digits."""

SPLIT_NAMES = ("train", "test", "validation")

_SPLIT_RE = re.compile(r"^(?P<name>[a-z]+)(\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")

_SYNTHETIC_SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3), "cifar100": (32, 32, 3),
                     "imagenet2012": (64, 64, 3)}
_SYNTHETIC_GRID = 4  # Prototypes are random 4x4 colour grids: they survive crops and flips.
_SYNTHETIC_NOISE = 40.0  # The std of the pixel noise around the prototype, in 0..255 units.
_SYNTHETIC_CHUNK_VALUES = 1 << 22  # Generate the noise in chunks of about this many pixels.

_DIGITS_TRAIN_FRACTION = 0.8
_DIGITS_SPLIT_SEED = 0


class Source(Protocol):
  """Random access to the examples of a split."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, Any]:
    ...


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """A split held in memory.

  Attributes:
    images: uint8 array of shape ``(N, H, W, C)``.
    labels: integer array of shape ``(N,)``.
  """

  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8 \
        or self.images.ndim != 4:
      raise ValueError("images must be a uint8 array of shape (N, H, W, C), got "
                       f"images={_describe(self.images)}.")
    if not isinstance(self.labels, np.ndarray) or self.labels.shape != self.images.shape[:1] \
        or not np.issubdtype(self.labels.dtype, np.integer):
      raise ValueError(f"labels must be an integer array of shape {self.images.shape[:1]}, "
                       f"got labels={_describe(self.labels)}.")

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}


def _describe(value: Any) -> str:
  if isinstance(value, np.ndarray):
    return f"<{value.dtype} array of shape {value.shape}>"
  return repr(value)


def parse_split(split: Any) -> tuple[str, str | None, str | None]:
  """Splits a TFDS-style split string into its name and slice bounds.

  Args:
    split: ``"train"``, ``"test"`` or ``"validation"``, optionally followed
      by a slice of examples, ``"test[:8000]"``, ``"train[-100:]"``, or of
      percents, ``"train[:10%]"``.

  Returns:
    ``(name, start, stop)``, the bounds as written (``None`` if absent).

  Raises:
    ValueError: If ``split`` is not of that form.
  """
  match = _SPLIT_RE.match(split) if isinstance(split, str) else None
  if match is None or match["name"] not in SPLIT_NAMES:
    raise ValueError(f"split must be one of {SPLIT_NAMES}, optionally sliced as in "
                     f"'train[100:200]' or 'test[:50%]', got split={split!r}.")
  return match["name"], match["start"], match["stop"]


def _slice_bounds(split: str, num_examples: int) -> tuple[int, int]:
  """The ``[start, stop)`` range of examples that ``split`` selects out of its whole split."""
  _, start, stop = parse_split(split)

  def bound(text: str | None, default: int) -> int:
    if text is None:
      return default
    value = round(float(text[:-1]) * num_examples / 100) if text.endswith("%") else int(text)
    if abs(value) > num_examples:
      raise ValueError(f"split={split!r} is out of range: the split has {num_examples} examples.")
    return value + num_examples if value < 0 else value

  lo, hi = bound(start, 0), bound(stop, num_examples)
  return lo, max(lo, hi)


def _sliced(images: np.ndarray, labels: np.ndarray, split: str) -> ArraySource:
  lo, hi = _slice_bounds(split, len(labels))
  return ArraySource(images[lo:hi], labels[lo:hi])


def load_source(dataset: str, split: str, *, source: str = "tfds",
                data_dir: str | os.PathLike | None = None, download: bool = False,
                num_examples: int | None = None, seed: int = 0) -> Source:
  """Opens a split of a dataset for random access.

  Args:
    dataset: A name in :data:`adderjax.data.DATASETS`.
    split: ``"train"``, ``"test"`` or ``"validation"``, optionally sliced as
      in TFDS: ``"test[:8000]"``, ``"test[8000:]"``, ``"train[:10%]"``.
    source: One of :data:`SOURCES`:

      - ``"tfds"``: ``tfds.data_source`` over ArrayRecord data prepared in
        ``data_dir`` (TFDS' default directory if None). Reading needs
        ``tensorflow-datasets`` only; preparing also needs ``tensorflow``.
      - ``"idx"``: MNIST in its original IDX files in ``data_dir``.
      - ``"cifar_python"``: CIFAR-10/100 in its original python batches in
        ``data_dir``.
      - ``"bundled"``: MNIST only: the 10,000 official test images shipped
        in the package (:mod:`adderjax.data.bundled`); its only split is
        "test", by convention sliced as ``"test[:8000]"`` to train on and
        ``"test[8000:]"`` to test on.
      - ``"synthetic"``: ``num_examples`` random images of the dataset's
        shape (64x64 for ImageNet), each its class's fixed random
        prototype plus noise, so that a model can learn them.
      - ``"digits"``: MNIST only: scikit-learn's 1,797 8x8 digits scaled
        to 28x28, "train" a fixed 80% of them and "test" the rest.

    data_dir: The data directory (``"tfds"``, ``"idx"``, ``"cifar_python"``);
      for ``"idx"`` and ``"cifar_python"`` it defaults to the download cache,
      :func:`adderjax.data.remote.dataset_dir`.
    download: Fetch what is missing: ``"idx"`` and ``"cifar_python"`` get
      the authors' files, checksummed, with
      :func:`adderjax.data.download` (no TensorFlow needed);
      ``"tfds"`` lets TFDS download and prepare the data (needs TensorFlow).
      The other sources hold their data and have nothing to fetch.
    num_examples: The size of the whole split (``"synthetic"`` only; default
      1024 for "train", 256 otherwise); a slice applies on top.
    seed: The seed of the synthetic data: the class prototypes depend on it
      only, the examples on it and the split's name.

  Returns:
    A source: ``len(source)`` and ``source[i] -> {"image": uint8 (H, W, C),
    "label": int}``; an :class:`ArraySource` for all but ``"tfds"``.

  Raises:
    ValueError: If an argument, or the combination of dataset, split and
      source, is not supported; the message names the argument.
    DataError: If the data is missing or malformed, or a download failed
      (:class:`adderjax.data.DownloadError`).
    ImportError: If the source needs a package that is not installed.
  """
  spec = get_spec(dataset)
  if not isinstance(source, str) or source not in SOURCES:
    raise ValueError(f"source must be one of {SOURCES}, got source={source!r}.")
  name, _, _ = parse_split(split)
  if num_examples is not None and source != "synthetic":
    raise ValueError(f"num_examples applies to source='synthetic' only, got "
                     f"num_examples={num_examples!r} with source={source!r} (to take part of a "
                     "split, slice it: split='train[:1000]').")
  if source == "tfds":
    return _tfds_source(spec, split, data_dir=data_dir, download=download)
  if source == "synthetic":
    return _synthetic_source(spec, split, num_examples=num_examples, seed=seed)
  if source in ("idx", "digits", "bundled") and spec.name != "mnist":
    raise ValueError(f"source={source!r} holds MNIST only, got dataset={dataset!r}.")
  if source == "cifar_python" and spec.name not in ("cifar10", "cifar100"):
    raise ValueError(f"source='cifar_python' holds CIFAR-10/100 only, got dataset={dataset!r}.")
  if name not in ("train", "test"):
    raise ValueError(f"source={source!r} has the splits 'train' and 'test' only, "
                     f"got split={split!r}.")
  if source == "digits":
    return _sliced(*_digits_split(name), split)
  if source == "bundled":
    if name != "test":
      raise ValueError("source='bundled' holds MNIST's 10,000 test images only: its split is "
                       "'test', sliced as 'test[:8000]' to train on and 'test[8000:]' to test "
                       f"on; got split={split!r}.")
    return _sliced(*load_bundled_mnist(), split)
  if download:
    data_dir = remote.download(spec.name, splits=(name,), data_dir=data_dir)
  elif data_dir is None:
    data_dir = remote.dataset_dir(spec.name)
    if not remote.is_downloaded(spec.name, splits=(name,), data_dir=data_dir):
      raise DataError(f"source={source!r} with no data_dir reads the download cache {data_dir}, "
                      f"which lacks the {spec.name} {name} files: pass download=True (in the "
                      "trainer, --config.download=True) to fetch them, or give data_dir.")
  if source == "idx":
    return _sliced(*load_mnist_idx(data_dir, name), split)
  return _sliced(*load_cifar_python(data_dir, spec.name, name), split)


def _tfds_source(spec: DatasetSpec, split: str, *, data_dir, download: bool) -> Source:
  try:
    import tensorflow_datasets as tfds  # An optional dependency.
  except ImportError as e:
    raise ImportError("source='tfds' needs tensorflow-datasets: "
                      "pip install tensorflow-datasets") from e
  try:
    return tfds.data_source(spec.name, split=split, data_dir=data_dir, download=download)
  except Exception as e:  # TFDS raises many kinds of errors for missing data.
    where = "TFDS' default data directory" if data_dir is None else f"data_dir {data_dir}"
    raise DataError(
        f"tfds.data_source({spec.name!r}, split={split!r}) failed in {where} with download="
        f"{download}: {type(e).__name__}: {e}\nReading needs the data prepared as ArrayRecord; "
        "preparing it (download=True) also needs `pip install tensorflow`, or prepare it "
        f"elsewhere with `tfds build {spec.name} --file_format=array_record` and point "
        "data_dir at it.") from e


def _synthetic_source(spec: DatasetSpec, split: str, *, num_examples, seed) -> ArraySource:
  name, _, _ = parse_split(split)
  if num_examples is None:
    num_examples = 1024 if name == "train" else 256
  if not _is_int(num_examples) or num_examples < 1:
    raise ValueError(f"num_examples must be a positive int, got num_examples={num_examples!r}.")
  if not _is_int(seed) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got seed={seed!r}.")
  height, width, channels = _SYNTHETIC_SHAPES[spec.name]
  rng = np.random.default_rng([seed, 0])
  # Coarse grids upsampled to the image size: a class keeps its look under crops and flips.
  grids = rng.uniform(0, 255, (spec.num_classes, _SYNTHETIC_GRID, _SYNTHETIC_GRID, channels))
  grids = grids.astype(np.float32)
  rows = np.arange(height) * _SYNTHETIC_GRID // height
  cols = np.arange(width) * _SYNTHETIC_GRID // width
  labels = np.arange(num_examples) % spec.num_classes
  labels = np.random.default_rng([seed, 1, SPLIT_NAMES.index(name)]).permutation(labels)
  images = np.empty((num_examples, height, width, channels), np.uint8)
  chunk_size = max(1, _SYNTHETIC_CHUNK_VALUES // (height * width * channels))
  for chunk, start in enumerate(range(0, num_examples, chunk_size)):
    stop = min(start + chunk_size, num_examples)
    noise_rng = np.random.default_rng([seed, 2, SPLIT_NAMES.index(name), chunk])
    pixels = noise_rng.standard_normal((stop - start, height, width, channels), np.float32)
    pixels *= _SYNTHETIC_NOISE
    pixels += grids[labels[start:stop]][:, rows][:, :, cols]
    images[start:stop] = np.clip(np.rint(pixels), 0, 255)
  return _sliced(images, labels.astype(np.int64), split)


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
  """All of scikit-learn's digits as read-only uint8 28x28x1 images and int64 labels."""
  try:
    from sklearn.datasets import load_digits  # An optional dependency.
  except ImportError as e:
    raise ImportError("source='digits' needs scikit-learn: pip install scikit-learn") from e
  digits = load_digits()
  pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
  pixels = pixels.repeat(3, axis=1).repeat(3, axis=2)  # 8x8 -> 24x24, nearest
  images = np.pad(pixels, ((0, 0), (2, 2), (2, 2)))[..., None]  # -> 28x28, MNIST's size
  labels = digits.target.astype(np.int64)
  for array in (images, labels):
    array.setflags(write=False)
  return images, labels


def _digits_split(name: str) -> tuple[np.ndarray, np.ndarray]:
  images, labels = _digits()
  order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(labels))
  num_train = int(_DIGITS_TRAIN_FRACTION * len(labels))  # 1,437 of 1,797
  keep = np.sort(order[:num_train] if name == "train" else order[num_train:])
  return images[keep], labels[keep]

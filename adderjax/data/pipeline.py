"""Batches for training and evaluation: order, augmentation, sharding over processes.

Training is an endless sequence of global batches. Epoch ``e`` visits the
examples in a permutation drawn from ``(seed, e)`` only, step ``s`` takes the
``s % steps_per_epoch``-th run of ``global_batch_size`` of its epoch's
permutation (the remainder of an epoch is dropped), and its random
augmentation is drawn for the whole global batch from ``(seed, s)``. Each
process returns its contiguous slice of the global batch, so the data does
not depend on the number of processes, and a run restarted at step ``k``
sees exactly what the original run saw from step ``k`` on.

Evaluation visits every example once, in order; the last global batch is
padded with zero images whose ``"mask"`` is False.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
import concurrent.futures
import dataclasses
import functools
import sys
from typing import Any

import jax
import numpy as np

from adderjax.data import augment as aug
from adderjax.data.local_files import DataError
from adderjax.data.resize import default_backend
from adderjax.data.sources import Source
from adderjax.data.specs import DatasetSpec, get_spec

__all__ = [
    "epoch_permutation",
    "eval_batches",
    "num_eval_batches",
    "steps_per_epoch",
    "train_batches",
]

Batch = dict[str, np.ndarray]

# Domain separation of the seed sequences: permutations and augmentation.
_PERMUTATION_STREAM = 0
_AUGMENT_STREAM = 1


def _check_int(value: Any, name: str, *, minimum: int) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    raise ValueError(f"{name} must be {kind}, got {name}={value!r}.")
  return int(value)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """The number of full global batches in an epoch (the remainder is dropped).

  Args:
    num_examples: The size of the training split.
    global_batch_size: The batch size summed over processes.

  Returns:
    ``num_examples // global_batch_size``.

  Raises:
    ValueError: If an argument is not a positive int, or the split holds
      fewer examples than one batch.
  """
  num_examples = _check_int(num_examples, "num_examples", minimum=1)
  global_batch_size = _check_int(global_batch_size, "global_batch_size", minimum=1)
  if num_examples < global_batch_size:
    raise ValueError(f"global_batch_size={global_batch_size} is larger than the "
                     f"{num_examples} training examples: an epoch would have no step.")
  return num_examples // global_batch_size


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  """The number of global batches that hold every example once (the last one padded).

  Args:
    num_examples: The size of the evaluation split.
    global_batch_size: The batch size summed over processes.

  Returns:
    ``ceil(num_examples / global_batch_size)``.

  Raises:
    ValueError: If an argument is not a positive int.
  """
  num_examples = _check_int(num_examples, "num_examples", minimum=1)
  global_batch_size = _check_int(global_batch_size, "global_batch_size", minimum=1)
  return -(-num_examples // global_batch_size)


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
  """The order in which training visits the examples in epoch ``epoch``.

  Args:
    num_examples: The size of the training split.
    seed: The training seed, a non-negative int.
    epoch: The epoch, a non-negative int.

  Returns:
    A permutation of ``range(num_examples)`` that depends on ``(seed, epoch)`` only.
  """
  rng = np.random.default_rng([seed, _PERMUTATION_STREAM, epoch])
  return rng.permutation(num_examples)


@dataclasses.dataclass(frozen=True)
class _Shard:
  """This process's rows ``[start, stop)`` of each global batch."""

  start: int
  stop: int


def _shard(global_batch_size: int, process_index: int | None,
           process_count: int | None) -> _Shard:
  count = jax.process_count() if process_count is None else process_count
  count = _check_int(count, "process_count", minimum=1)
  index = jax.process_index() if process_index is None else process_index
  index = _check_int(index, "process_index", minimum=0)
  if index >= count:
    raise ValueError(f"process_index must be < process_count={count}, got process_index={index}.")
  if global_batch_size % count:
    raise ValueError(f"global_batch_size must be divisible by process_count={count}, "
                     f"got global_batch_size={global_batch_size}.")
  local = global_batch_size // count
  return _Shard(index * local, (index + 1) * local)


@dataclasses.dataclass(frozen=True, eq=False)
class _Transform:
  """Turns examples of a source into a normalised batch, with or without augmentation."""

  spec: DatasetSpec
  source: Source
  image_size: int
  augment: bool
  # Fixed when the iterator is made: one run resizes all its images alike.
  resize_backend: str = dataclasses.field(default_factory=default_backend)

  @property
  def output_shape(self) -> tuple[int, int, int]:
    if self.spec.augment == "imagenet":
      return (self.image_size, self.image_size, self.spec.image_shape[2])
    return self.spec.image_shape

  def draw(self, rng: np.random.Generator, batch_size: int):
    """The random parameters of a global batch (None without augmentation)."""
    if not self.augment or self.spec.augment == "none":
      return None
    if self.spec.augment == "cifar":
      return aug.draw_cifar_params(rng, batch_size)
    return aug.draw_imagenet_params(rng, batch_size)

  def _image(self, index: int) -> tuple[np.ndarray, int]:
    example = self.source[int(index)]
    image = np.asarray(example["image"])
    channels = self.spec.image_shape[2]
    if image.ndim == 2:
      image = image[..., None]
    if image.ndim != 3 or image.dtype != np.uint8 or image.shape[2] not in (1, channels):
      raise DataError(f"example {index} of the source has an image of {image.dtype} and shape "
                      f"{image.shape}, expected uint8 (height, width, {channels}).")
    if image.shape[2] != channels:  # Grayscale images in a colour dataset.
      image = np.repeat(image, channels, axis=2)
    return image, int(example["label"])

  def _imagenet_example(self, index: int, row: int, params, images: np.ndarray) -> int:
    """Writes the transformed example ``index`` to ``images[row]``, returns its label."""
    image, label = self._image(index)
    if params is None:
      images[row] = aug.imagenet_eval_transform(image, self.image_size,
                                                backend=self.resize_backend)
    else:
      uniforms, flips = params
      images[row] = aug.imagenet_train_transform(image, uniforms[row], flips[row],
                                                 self.image_size, backend=self.resize_backend)
    return label

  def __call__(self, indices: np.ndarray, params, pool) -> tuple[np.ndarray, np.ndarray]:
    """The normalised images and int32 labels of ``indices``, with their ``params`` rows."""
    run = map if pool is None else pool.map
    if self.spec.augment == "imagenet":
      images = np.empty((len(indices), *self.output_shape), np.float32)
      write = functools.partial(self._imagenet_example, params=params, images=images)
      labels = np.array(list(run(write, indices, range(len(indices)))))
      aug.normalize(images, self.spec.mean, self.spec.std, out=images)
      return images, labels.astype(np.int32)
    if hasattr(self.source, "images") and hasattr(self.source, "labels"):
      images, labels = self.source.images[indices], self.source.labels[indices]
    else:
      examples = list(run(self._image, indices))
      images = np.stack([e[0] for e in examples])
      labels = np.array([e[1] for e in examples])
    if images.shape[1:] != self.output_shape:
      raise DataError(f"the source's images have shape {images.shape[1:]}, "
                      f"expected {self.output_shape} for {self.spec.name}.")
    if params is not None and self.spec.augment == "cifar":
      images = aug.apply_cifar_crop_flip(images, *params)
    return aug.normalize(images, self.spec.mean, self.spec.std), labels.astype(np.int32)


def _slice_params(params, start: int, stop: int):
  return None if params is None else tuple(p[start:stop] for p in params)


def _image_size(spec: DatasetSpec, image_size: Any) -> int:
  if image_size is None:
    return spec.image_shape[0]
  size = _check_int(image_size, "image_size", minimum=1)
  if spec.augment != "imagenet" and size != spec.image_shape[0]:
    raise ValueError(f"image_size can only be {spec.image_shape[0]} (or None) for "
                     f"{spec.name}, got image_size={image_size!r}.")
  return size


def _num_examples(source: Any) -> int:
  if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
    raise ValueError("source must support len(source) and source[i], "
                     f"got source={type(source).__name__}.")
  return len(source)


def _iterate(make_batch: Callable[[Any, Any], Batch], keys: Iterable,
             num_threads: int) -> Iterator[Batch]:
  """``make_batch(key, pool)`` for each key; with threads, one batch is made ahead."""
  if num_threads == 0:
    for key in keys:
      yield make_batch(key, None)
    return
  pool = concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="adderjax-data")
  ahead = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="adderjax-prefetch")
  try:
    pending = None
    for key in keys:
      future = ahead.submit(make_batch, key, pool)
      if pending is not None:
        yield pending.result()
      pending = future
    if pending is not None:
      yield pending.result()
  finally:
    # A generator left open is closed when collected, which at interpreter
    # exit can be after concurrent.futures' own modules are torn down.
    if not sys.is_finalizing():
      ahead.shutdown(wait=False, cancel_futures=True)
      pool.shutdown(wait=False, cancel_futures=True)


def train_batches(dataset: str, source: Source, *, global_batch_size: int, seed: int,
                  start_step: int = 0, augment: bool = True, image_size: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  num_threads: int = 0) -> Iterator[Batch]:
  """This process's part of the training batches, from step ``start_step`` on, endlessly.

  Args:
    dataset: A name in :data:`adderjax.data.DATASETS`: sets the
      augmentation and normalisation.
    source: The training split (from :func:`adderjax.data.load_source`).
    global_batch_size: The batch size summed over processes; divisible by
      ``process_count``.
    seed: A non-negative int: the order and augmentation depend on it only.
    start_step: The first step to return (to resume a run).
    augment: Whether to apply the dataset's random augmentation (ImageNet
      without it gets the evaluation resize and centre crop).
    image_size: The output side for ImageNet (default 224); other datasets
      keep their size.
    process_index: This process (default ``jax.process_index()``).
    process_count: The number of processes (default ``jax.process_count()``).
    num_threads: With > 0, reads and transforms examples in that many
      threads and makes the next batch in the background (same batches).

  Returns:
    An endless iterator of ``{"image": float32 (B, H, W, C), "label": int32
    (B,)}`` with ``B = global_batch_size // process_count``.

  Raises:
    ValueError: If an argument is invalid (the message names it).
  """
  spec = get_spec(dataset)
  num_examples = _num_examples(source)
  steps = steps_per_epoch(num_examples, global_batch_size)
  shard = _shard(global_batch_size, process_index, process_count)
  seed = _check_int(seed, "seed", minimum=0)
  start_step = _check_int(start_step, "start_step", minimum=0)
  num_threads = _check_int(num_threads, "num_threads", minimum=0)
  if not isinstance(augment, bool):
    raise ValueError(f"augment must be a bool, got augment={augment!r}.")
  transform = _Transform(spec, source, _image_size(spec, image_size), augment)
  permutation_of = _cached_permutations(num_examples, seed)

  def make_batch(step: int, pool) -> Batch:
    epoch, position = divmod(step, steps)
    rows = slice(position * global_batch_size + shard.start,
                 position * global_batch_size + shard.stop)
    indices = permutation_of(epoch)[rows]
    rng = np.random.default_rng([seed, _AUGMENT_STREAM, step])
    params = _slice_params(transform.draw(rng, global_batch_size), shard.start, shard.stop)
    images, labels = transform(indices, params, pool)
    return {"image": images, "label": labels}

  return _iterate(make_batch, _count_from(start_step), num_threads)


def _count_from(start: int) -> Iterator[int]:
  step = start
  while True:
    yield step
    step += 1


def _cached_permutations(num_examples: int, seed: int) -> Callable[[int], np.ndarray]:
  """``epoch -> epoch_permutation(...)``, remembering the last epoch's."""
  cache: dict[int, np.ndarray] = {}

  def permutation_of(epoch: int) -> np.ndarray:
    if epoch not in cache:
      cache.clear()
      cache[epoch] = epoch_permutation(num_examples, seed=seed, epoch=epoch)
    return cache[epoch]

  return permutation_of


def eval_batches(dataset: str, source: Source, *, global_batch_size: int,
                 image_size: int | None = None, process_index: int | None = None,
                 process_count: int | None = None, num_threads: int = 0) -> Iterator[Batch]:
  """This process's part of the evaluation batches: every example once, in order.

  There are :func:`num_eval_batches` global batches; rows past the end of
  the split (in the last one) are zero images with label 0 and mask False.

  Args:
    dataset: A name in :data:`adderjax.data.DATASETS`: sets the
      normalisation (and, for ImageNet, the resize and centre crop).
    source: The evaluation split (from :func:`adderjax.data.load_source`).
    global_batch_size: The batch size summed over processes; divisible by
      ``process_count``.
    image_size: The output side for ImageNet (default 224); other datasets
      keep their size.
    process_index: This process (default ``jax.process_index()``).
    process_count: The number of processes (default ``jax.process_count()``).
    num_threads: With > 0, reads and transforms examples in that many
      threads and makes the next batch in the background (same batches).

  Returns:
    An iterator of ``{"image": float32 (B, H, W, C), "label": int32 (B,),
    "mask": bool (B,)}`` with ``B = global_batch_size // process_count``.

  Raises:
    ValueError: If an argument is invalid (the message names it).
  """
  spec = get_spec(dataset)
  num_examples = _num_examples(source)
  num_batches = num_eval_batches(num_examples, global_batch_size)
  shard = _shard(global_batch_size, process_index, process_count)
  num_threads = _check_int(num_threads, "num_threads", minimum=0)
  transform = _Transform(spec, source, _image_size(spec, image_size), augment=False)
  local = shard.stop - shard.start

  def make_batch(batch: int, pool) -> Batch:
    start = batch * global_batch_size + shard.start
    indices = np.arange(start, min(start + local, num_examples))
    if len(indices) == local:
      images, labels = transform(indices, None, pool)
    else:
      images = np.zeros((local, *transform.output_shape), np.float32)
      labels = np.zeros(local, np.int32)
      if len(indices):
        images[:len(indices)], labels[:len(indices)] = transform(indices, None, pool)
    return {"image": images, "label": labels, "mask": np.arange(local) < len(indices)}

  return _iterate(make_batch, range(num_batches), num_threads)

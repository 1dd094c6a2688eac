"""Top-1 and top-5 accuracy of a model on a test set, and the models and test sets to use.

Two kinds of model, as :mod:`experiments.evaluate` takes them:

- a pretrained model (``adderjax.models.pretrained(name)``) on the test split
  of its dataset: for CIFAR the authors' "python version" archive, fetched
  once with ``adderjax.data.download`` (checksummed) into the download cache,
  or read from a ``data_dir`` that already holds the batches; the images are
  normalised with the model's own ``mean`` and ``std``;
- the newest good checkpoint of a trainer workdir, on the split the run
  evaluated on (``config.eval_split``, read as the run's config says, e.g.
  downloaded), normalised as the trainer did.

The model runs in eval mode (BatchNorm's running statistics), jitted, on
batches of the compute dtype; the last batch is padded and its padding not
counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import dataclasses
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adderjax import data, models
from experiments import train
from experiments.train import make_model
from experiments.trained import TrainedRun

__all__ = ["DTYPES", "Accuracy", "first", "pretrained_test_set", "renormalizer",
           "top_k_accuracy", "workdir_model", "workdir_test_set"]

DTYPES = {**train.DTYPES, "float16": jnp.float16}
"""The compute dtypes to evaluate in, by name: the trainer's and float16 (parameters stay
float32)."""

TOP_K = 5


@dataclasses.dataclass(frozen=True)
class Accuracy:
  """What :func:`top_k_accuracy` counted.

  Attributes:
    num_images: The images evaluated.
    correct_top1: Those whose highest logit is their label.
    correct_top5: Those whose label is among the 5 highest logits (all of
      them when there are 5 classes or fewer).
    seconds: Wall time, compilation included.
  """

  num_images: int
  correct_top1: int
  correct_top5: int
  seconds: float

  @property
  def top1(self) -> float:
    return self.correct_top1 / max(self.num_images, 1)

  @property
  def top5(self) -> float:
    return self.correct_top5 / max(self.num_images, 1)


@jax.jit
def _hits(outputs: Any, labels: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  logits = train.logits_of(outputs)
  _, top = jax.lax.top_k(logits, min(TOP_K, logits.shape[-1]))
  hit = (top == labels[:, None]) & mask[:, None]
  return hit[:, 0].sum(), hit.any(-1).sum()


def top_k_accuracy(model: nnx.Module, batches: Iterable[dict[str, np.ndarray]], *,
                   dtype: Any = jnp.float32,
                   transform: Callable[[np.ndarray], np.ndarray] | None = None) -> Accuracy:
  """Top-1 and top-5 accuracy of ``model`` (put in eval mode) over the unpadded examples.

  Args:
    model: An NNX classifier (LeNet++'s ``(embedding, logits)`` is read as its logits).
    batches: ``{"image", "label", "mask"}`` batches, as ``adderjax.data.eval_batches``.
    dtype: The images are cast to it before the model sees them.
    transform: Applied to each batch's float32 images first (a renormalisation).
  """
  predict = models.inference_function(model)
  start = time.perf_counter()
  totals = np.zeros(3, np.int64)
  for batch in batches:
    images = batch["image"] if transform is None else transform(batch["image"])
    top1, top5 = _hits(predict(jnp.asarray(images, dtype)), jnp.asarray(batch["label"]),
                       jnp.asarray(batch["mask"]))
    totals += (int(batch["mask"].sum()), int(top1), int(top5))
  return Accuracy(int(totals[0]), int(totals[1]), int(totals[2]), time.perf_counter() - start)


class _First:
  """The first ``count`` examples of a source without random access to its arrays."""

  def __init__(self, source: data.Source, count: int):
    self.source, self.count = source, count

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.count:
      raise IndexError(index)
    return self.source[index]


def first(source: data.Source, limit: int | None) -> data.Source:
  """The first ``limit`` examples of ``source`` (all of them for None or more than it has)."""
  if limit is None or limit >= len(source):
    return source
  if isinstance(source, data.ArraySource):
    return data.ArraySource(source.images[:limit], source.labels[:limit])
  return _First(source, limit)


def renormalizer(dataset: str, mean: Iterable[float], std: Iterable[float]
                 ) -> Callable[[np.ndarray], np.ndarray] | None:
  """Maps images normalised with ``dataset``'s statistics to ``(pixels - mean) / std``.

  Returns None when those are ``dataset``'s own (nothing to do).
  """
  spec = data.DATASETS[dataset]
  mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
  if mean == spec.mean and std == spec.std:
    return None
  scale = np.asarray(spec.std, np.float32) / np.asarray(std, np.float32)
  shift = (np.asarray(spec.mean, np.float32) - np.asarray(mean, np.float32)) / np.asarray(
      std, np.float32)
  return lambda images: images * scale + shift


def pretrained_test_set(name: str, *, data_dir: str | None = None) -> tuple[str, data.Source]:
  """``(dataset, test split)`` of the pretrained model ``name``.

  Args:
    name: One of ``adderjax.models.pretrained_names()``.
    data_dir: A directory that holds the CIFAR python batches (or the folder
      they unpack to); None to download them once into the cache
      (``adderjax.data.download``).

  Raises:
    adderjax.data.DownloadError: If the files could not be downloaded.
    adderjax.data.DataError: If ``data_dir`` lacks them.
  """
  dataset = models.PRETRAINED[name].dataset
  if dataset not in ("cifar10", "cifar100"):
    raise ValueError(f"--pretrained={name} is a {dataset} model; only CIFAR test sets are read "
                     "here.")
  directory = data_dir or data.download(dataset, splits=("test",))
  return dataset, data.load_source(dataset, "test", source="cifar_python", data_dir=directory)


def workdir_model(run: TrainedRun, *, dtype: str | None = None,
                  implementation: str | None = None) -> nnx.Module:
  """``run``'s model, rebuilt for another compute ``dtype`` or adder ``implementation`` if given."""
  config = run.config
  if dtype in (None, config.dtype) and implementation in (None, config.implementation):
    return run.model
  config = ml_collections.ConfigDict(config.to_dict())
  if implementation is not None:
    config.implementation = implementation
  model = nnx.eval_shape(lambda: make_model(config, rngs=nnx.Rngs(config.seed),
                                            dtype=DTYPES[dtype or config.dtype]))
  nnx.update(model, nnx.state(run.model))  # Every variable: nothing abstract is left.
  model.eval()
  return model


def workdir_test_set(run: TrainedRun, *, data_dir: str | None = None) -> tuple[str, data.Source]:
  """``(split, source)``: the split ``run`` evaluated on, read as its config says.

  ``data_dir`` replaces the config's (data moved since); the files are then
  not downloaded.
  """
  config = run.config
  split = config.eval_split or data.DATASETS[config.dataset].eval_split
  source = data.load_source(config.dataset, split, source=config.data_source,
                            data_dir=data_dir or config.data_dir or None,
                            download=bool(config.download and not data_dir), seed=config.seed)
  return split, source


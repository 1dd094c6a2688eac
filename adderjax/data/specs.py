"""What the pipeline knows about each dataset: classes, input shape, normalisation, splits."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["AUGMENTATIONS", "DATASETS", "DatasetSpec", "get_spec"]

AUGMENTATIONS = ("none", "cifar", "imagenet")
"""The training augmentations: none, pad-crop-flip, random resized crop and flip."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A dataset as the models see it.

  Attributes:
    name: The TFDS name of the dataset.
    num_classes: The number of labels.
    image_shape: ``(height, width, channels)`` of the model input (for
      ImageNet the default crop size; the stored images vary in size).
    mean: The per-channel mean subtracted from the pixels, in [0, 1] units.
    std: The per-channel divisor, in [0, 1] units.
    train_split: The split to train on.
    eval_split: The split to evaluate on.
    augment: The training augmentation, one of :data:`AUGMENTATIONS`.
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_split: str
  eval_split: str
  augment: str


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist", num_classes=10, image_shape=(28, 28, 1),
        mean=(0.1307,), std=(0.3081,),
        train_split="train", eval_split="test", augment="none"),
    # The normalisation of the official AdderNet code (and of many CIFAR
    # recipes): its "std" is not quite the pixels' std (0.247, 0.243, 0.261).
    "cifar10": DatasetSpec(
        name="cifar10", num_classes=10, image_shape=(32, 32, 3),
        mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010),
        train_split="train", eval_split="test", augment="cifar"),
    "cifar100": DatasetSpec(
        name="cifar100", num_classes=100, image_shape=(32, 32, 3),
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        train_split="train", eval_split="test", augment="cifar"),
    "imagenet2012": DatasetSpec(
        name="imagenet2012", num_classes=1000, image_shape=(224, 224, 3),
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        train_split="train", eval_split="validation", augment="imagenet"),
}
"""The supported datasets by TFDS name."""


def get_spec(dataset: Any) -> DatasetSpec:
  """Returns the spec of ``dataset``, else raises a ValueError naming it.

  Args:
    dataset: A name in :data:`DATASETS`.

  Returns:
    The :class:`DatasetSpec` of ``dataset``.
  """
  if not isinstance(dataset, str) or dataset not in DATASETS:
    raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got dataset={dataset!r}.")
  return DATASETS[dataset]

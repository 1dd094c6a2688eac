"""Pretrained AdderNets shipped inside the package: :func:`pretrained`.

``"resnet20_cifar10"`` is the official AdderNet ResNet-20 trained on CIFAR-10
(github.com/huawei-noah/AdderNet at commit d94dc43,
``models/ResNet20-AdderNet.pth``, BSD-3-Clause: see
``adderjax/models/weights/NOTICE``), 91.82% top-1 on the CIFAR-10 test set by
the official ``test.py``. It expects images in [0, 1] normalised by the
official ``test.py``'s per-channel mean and std, which its record in
:data:`PRETRAINED` holds.

Example:
  >>> import numpy as np
  >>> from adderjax.models import PRETRAINED, pretrained
  >>> record = PRETRAINED["resnet20_cifar10"]
  >>> record.mean, record.std
  ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.201))
  >>> model = pretrained("resnet20_cifar10")  # in eval mode
  >>> images = np.full((2, 32, 32, 3), 0.5, np.float32)  # NHWC, in [0, 1]
  >>> model(record.normalize(images)).shape
  (2, 10)
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import hashlib
import importlib.resources
from importlib.resources.abc import Traversable
import pathlib
from types import MappingProxyType
from typing import Any

from flax import nnx
import numpy as np

from adderjax.models.convert import from_torch

__all__ = ["PRETRAINED", "PretrainedModel", "pretrained", "pretrained_names"]


@dataclasses.dataclass(frozen=True)
class PretrainedModel:
  """A pretrained model shipped in the package, and the inputs it expects.

  Attributes:
    name: its name in :data:`PRETRAINED`.
    model: the architecture, a name of :func:`adderjax.models.get`.
    dataset: the dataset it was trained on.
    num_classes: the number of classes.
    input_shape: the ``(height, width, channels)`` of one image.
    mean: the per-channel mean subtracted from images in [0, 1].
    std: the per-channel standard deviation they are then divided by.
    top1: the top-1 accuracy (%) reported on the dataset's test set.
    file: the checkpoint's file name in ``adderjax/models/weights``.
    sha256: the checkpoint's SHA-256, checked on load.
    source: where the checkpoint comes from.
    license: its licence.
  """

  name: str
  model: str
  dataset: str
  num_classes: int
  input_shape: tuple[int, int, int]
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  top1: float
  file: str
  sha256: str
  source: str
  license: str

  def path(self) -> Traversable:
    """The checkpoint file inside the package."""
    return importlib.resources.files("adderjax.models") / "weights" / self.file

  def normalize(self, images: Any) -> np.ndarray:
    """``(images - mean) / std`` over the last (channel) axis, as float32.

    Args:
      images: NHWC images with values in [0, 1].

    Returns:
      The model's input.
    """
    images = np.asarray(images, np.float32)
    return (images - np.float32(self.mean)) / np.float32(self.std)


PRETRAINED: Mapping[str, PretrainedModel] = MappingProxyType({
    "resnet20_cifar10": PretrainedModel(
        name="resnet20_cifar10",
        model="resnet20",
        dataset="cifar10",
        num_classes=10,
        input_shape=(32, 32, 3),
        # The official test.py's transforms.Normalize for CIFAR-10.
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010),
        top1=91.82,
        file="resnet20_cifar10.pth",
        sha256="fe3ad7c15573d34cddd9b3ec2eed12d9c2c818e59cd7d0797a954d6f76ea375b",
        source="github.com/huawei-noah/AdderNet, commit d94dc43, models/ResNet20-AdderNet.pth",
        license="BSD-3-Clause",
    ),
})
"""Each pretrained model's record by name."""


def pretrained_names() -> tuple[str, ...]:
  """The names :func:`pretrained` takes.

  Example:
    >>> from adderjax.models import pretrained_names
    >>> pretrained_names()
    ('resnet20_cifar10',)
  """
  return tuple(PRETRAINED)


def _check_sha256(path: pathlib.Path, sha256: str) -> None:
  digest = hashlib.sha256(path.read_bytes()).hexdigest()
  if digest != sha256:
    raise ValueError(f"the weights file {path} has sha256 {digest}, expected {sha256}: it is "
                     f"damaged or not the one shipped with adderjax.")


def pretrained(name: str, **model_kwargs: Any) -> nnx.Module:
  """The pretrained model ``name``, in eval mode.

  Args:
    name: one of :func:`pretrained_names`.
    **model_kwargs: the model's keyword arguments, as :func:`from_torch`
      (``rngs``, ``dtype``, ``param_dtype``, ``grad_mode``,
      ``implementation``).

  Returns:
    The model. Its inputs are NHWC images normalised by
    ``PRETRAINED[name].normalize``.

  Raises:
    ValueError: for an unknown ``name``; naming the file if its SHA-256 is
      not the one recorded.
  """
  if not isinstance(name, str) or name not in PRETRAINED:
    raise ValueError(f"name must be one of {pretrained_names()}, got name={name!r}.")
  record = PRETRAINED[name]
  with importlib.resources.as_file(record.path()) as path:
    _check_sha256(path, record.sha256)
    return from_torch(record.model, path, **model_kwargs)

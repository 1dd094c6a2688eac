"""The models by name, for configs and command lines."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from flax import nnx

from adderjax.models.lenet import lenet5_bn, lenet_pp
from adderjax.models.resnet import resnet18, resnet20, resnet32, resnet34, resnet50, resnet56
from adderjax.models.vgg import vgg_small
from adderjax.models.vit import vit_tiny

__all__ = ["INPUT_SHAPES", "MODELS", "get", "input_shape", "names"]

MODELS: Mapping[str, Callable[..., nnx.Module]] = MappingProxyType({
    "lenet5_bn": lenet5_bn,
    "lenet_pp": lenet_pp,
    "vgg_small": vgg_small,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "vit_tiny": vit_tiny,
})
"""Each model's constructor by name."""

INPUT_SHAPES: Mapping[str, tuple[int, int, int]] = MappingProxyType({
    "lenet5_bn": (28, 28, 1),
    "lenet_pp": (28, 28, 1),
    "vgg_small": (32, 32, 3),
    "resnet20": (32, 32, 3),
    "resnet32": (32, 32, 3),
    "resnet56": (32, 32, 3),
    "resnet18": (224, 224, 3),
    "resnet34": (224, 224, 3),
    "resnet50": (224, 224, 3),
    "vit_tiny": (28, 28, 1),
})
"""The ``(height, width, channels)`` of the images each model is made for
(MNIST, CIFAR, ImageNet). The ResNets take other sizes too, and ``vit_tiny``
others given as its ``image_size`` and ``channels``."""


def _check_name(name: Any) -> str:
  if not isinstance(name, str) or name not in MODELS:
    raise ValueError(f"name must be one of {names()}, got name={name!r}.")
  return name


def names() -> tuple[str, ...]:
  """The names of the models :func:`get` builds.

  Example:
    >>> from adderjax.models import names
    >>> names()[:3]
    ('lenet5_bn', 'lenet_pp', 'vgg_small')
  """
  return tuple(MODELS)


def get(name: str, **kwargs: Any) -> nnx.Module:
  """Builds the model called ``name``.

  Args:
    name: one of :func:`names`.
    **kwargs: the model's keyword arguments: ``kind``, ``num_classes``,
      ``rngs``, ``dtype``, ``param_dtype``, ``grad_mode``, ``implementation``
      (and ``embed_dim`` for ``"lenet_pp"``; the sizes of :class:`adderjax.models.ViTTiny`
      for ``"vit_tiny"``).

  Returns:
    The model, an :class:`flax.nnx.Module` called on NHWC batches.

  Raises:
    ValueError: for an unknown ``name``, or a bad keyword argument.

  Example:
    >>> from flax import nnx
    >>> from adderjax.models import get
    >>> model = nnx.eval_shape(lambda: get("resnet20", kind="conv", rngs=nnx.Rngs(0)))
    >>> type(model).__name__
    'CifarResNet'
  """
  return MODELS[_check_name(name)](**kwargs)


def input_shape(name: str) -> tuple[int, int, int]:
  """The ``(height, width, channels)`` of the images the model ``name`` is made for.

  Args:
    name: one of :func:`names`.

  Returns:
    The shape of one image, without the batch axis.

  Raises:
    ValueError: for an unknown ``name``.

  Example:
    >>> from adderjax.models import input_shape
    >>> input_shape("lenet5_bn")
    (28, 28, 1)
  """
  return INPUT_SHAPES[_check_name(name)]

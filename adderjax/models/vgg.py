"""VGG-small for CIFAR, the network of LQ-Nets (Zhang et al., ECCV 2018) the AdderNet paper uses."""

from __future__ import annotations

from typing import Any

from flax import nnx
from flax.typing import Dtype
import jax
import jax.numpy as jnp

from adderjax.models.layers import (
  Kind,
  Layers,
  check_inputs,
  check_positive_int,
  conv_batch_norm_activation,
  max_pool,
)
from adderjax.ops import ImplementationLike
from adderjax.ops.spec import GradMode

__all__ = ["VGGSmall", "vgg_small"]

_WIDTHS = (128, 128, 256, 256, 512, 512)


class VGGSmall(nnx.Module):
  """VGG-small for 32x32x3 CIFAR images.

  Six 3x3 convolutions (128, 128, 256, 256, 512, 512 channels, padding 1),
  each followed by BatchNorm and the activation, a 2x2 max pool after every
  second one (32 -> 16 -> 8 -> 4), and a fully connected classifier with bias
  on the flattened ``4 x 4 x 512`` features.

  - ``kind="adder"``: the five middle convolutions are adder layers; the
    first convolution and the classifier stay multiplicative, as in the
    paper's CIFAR networks.
  - ``kind="conv"``: the CNN.
  - ``kind="binary"``: the same five convolutions are binary, with HardTanh
    as the activation; the first and last layers stay full precision.

  Example (shapes only: ``nnx.eval_shape`` builds the model abstractly):
    >>> from flax import nnx
    >>> from adderjax.models import vgg_small
    >>> model = nnx.eval_shape(lambda: vgg_small(kind="adder", rngs=nnx.Rngs(0)))
    >>> [type(conv).__name__ for conv in model.convs[:2]], model.classifier.kernel.shape
    (['Conv', 'AdderConv'], (8192, 10))

  Args:
    kind: ``"adder"``, ``"conv"`` or ``"binary"``.
    num_classes: the number of classes.
    rngs: rng key.
    dtype: the dtype of the computation (default: infer from input and params).
    param_dtype: the dtype of the parameters (default: float32).
    grad_mode: the adder layers' backward pass (see
      :func:`adderjax.ops.adder_conv`).
    implementation: the adder op's implementation, None for the fastest.

  Raises:
    ValueError: for an unknown ``kind``, ``grad_mode`` or ``implementation``,
      or a ``num_classes`` that is not a positive int.
  """

  def __init__(self, *, kind: Kind = "adder", num_classes: int = 10, rngs: nnx.Rngs,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               grad_mode: GradMode = "full_precision", implementation: ImplementationLike = None):
    num_classes = check_positive_int(num_classes, "num_classes")
    make = Layers(kind=kind, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                  grad_mode=grad_mode, implementation=implementation)
    convs, norms = [], []
    in_features = 3
    for i, features in enumerate(_WIDTHS):
      convs.append(make.conv(in_features, features, 3, kind="conv" if i == 0 else None))
      norms.append(make.batch_norm(features))
      in_features = features
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.classifier = make.dense(4 * 4 * _WIDTHS[-1], num_classes, use_bias=True, kind="conv")
    self.activation = make.activation
    self.kind = kind
    self.num_classes = num_classes

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Classifies a batch.

    Args:
      inputs: ``(batch, 32, 32, 3)`` images.

    Returns:
      ``(batch, num_classes)`` logits.
    """
    check_inputs(inputs, channels=3, spatial=(32, 32))
    x = inputs
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      # Left to the next convolution where no pooling comes between.
      x = conv_batch_norm_activation(conv, norm, x, self.activation, defer=not i % 2)
      if i % 2:
        x = max_pool(x, 2, 2)
    return self.classifier(jnp.reshape(x, (x.shape[0], -1)))


def vgg_small(**kwargs: Any) -> VGGSmall:
  """VGG-small for CIFAR; keyword arguments as :class:`VGGSmall`.

  Example:
    >>> from flax import nnx
    >>> from adderjax.models import vgg_small
    >>> model = nnx.eval_shape(lambda: vgg_small(num_classes=100, rngs=nnx.Rngs(0)))
    >>> model.classifier.kernel.shape
    (8192, 100)
  """
  return VGGSmall(**kwargs)

"""ResNets for CIFAR (20, 32, 56) and ImageNet (18, 34, 50), as in the official AdderNet code.

The official code (github.com/huawei-noah/AdderNet, ``resnet20.py`` and
``resnet50.py``) replaces every convolution inside the residual blocks,
including the 1x1 projection shortcuts, by an adder layer, and keeps the stem
and the classifier multiplicative; a BatchNorm follows the classifier.
ResNet-18 and 34 are not in the official code: they use the same basic block
as the CIFAR networks with the ImageNet stem, as torchvision's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx
from flax.typing import Dtype
import jax
import jax.numpy as jnp

from adderjax._checks import is_int
from adderjax.models.layers import (
  Kind,
  Layers,
  batch_norm_activation,
  check_inputs,
  check_positive_int,
  conv_batch_norm_activation,
  global_average_pool,
  max_pool,
)
from adderjax.ops import ImplementationLike
from adderjax.ops.spec import GradMode

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "Downsample",
    "ResNet",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet50",
    "resnet56",
]


class Downsample(nnx.Module):
  """The projection shortcut: a 1x1 convolution with the block's stride, then BatchNorm.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from adderjax.models.layers import Layers
    >>> from adderjax.models.resnet import Downsample
    >>> shortcut = Downsample(Layers(kind="conv", rngs=nnx.Rngs(0)), 2, 3, 2)
    >>> shortcut(jnp.zeros((1, 8, 8, 2))).shape
    (1, 4, 4, 3)

  Args:
    make: builds the layers; the convolution is of its kind.
    in_features: input channels.
    out_features: output channels.
    strides: the stride of the block.
  """

  def __init__(self, make: Layers, in_features: int, out_features: int, strides: int):
    self.conv = make.conv(in_features, out_features, 1, strides, padding=0)
    self.bn = make.batch_norm(out_features)

  def __call__(self, x: jax.Array) -> jax.Array:
    return conv_batch_norm_activation(self.conv, self.bn, x, None)


def _shortcut(make: Layers, in_features: int, out_features: int,
              strides: int) -> Downsample | None:
  """A projection where the shape changes, else None (the identity)."""
  if strides != 1 or in_features != out_features:
    return Downsample(make, in_features, out_features, strides)
  return None


class BasicBlock(nnx.Module):
  """Two 3x3 convolutions with BatchNorm and a residual connection.

  ``act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x))``, the first
  convolution carrying the stride; the shortcut is the identity, or a
  :class:`Downsample` where the shape changes.

  Example (shapes only: ``nnx.eval_shape`` builds and runs the block abstractly):
    >>> from flax import nnx
    >>> import jax, jax.numpy as jnp
    >>> from adderjax.models.layers import Layers
    >>> from adderjax.models.resnet import BasicBlock
    >>> block = nnx.eval_shape(
    ...     lambda: BasicBlock(Layers(kind="adder", rngs=nnx.Rngs(0)), 16, 32, strides=2))
    >>> type(block.conv1).__name__, block.downsample.conv.kernel.shape
    ('AdderConv', (1, 1, 16, 32))
    >>> x = jax.ShapeDtypeStruct((1, 8, 8, 16), jnp.float32)
    >>> nnx.eval_shape(lambda block, x: block(x), block, x).shape
    (1, 4, 4, 32)

  Args:
    make: builds the layers; every convolution is of its kind.
    in_features: input channels.
    features: output channels.
    strides: the stride of the first convolution and of the shortcut.
  """

  expansion = 1

  def __init__(self, make: Layers, in_features: int, features: int, *, strides: int = 1):
    self.conv1 = make.conv(in_features, features, 3, strides)
    self.bn1 = make.batch_norm(features)
    self.conv2 = make.conv(features, features, 3)
    self.bn2 = make.batch_norm(features)
    self.downsample = _shortcut(make, in_features, features, strides)
    self.activation = make.activation

  def __call__(self, x: jax.Array) -> jax.Array:
    # The first BatchNorm and ReLU left to conv2's kernels where they can apply them.
    out = conv_batch_norm_activation(self.conv1, self.bn1, x, self.activation, defer=True)
    identity = x if self.downsample is None else self.downsample(x)
    return conv_batch_norm_activation(self.conv2, self.bn2, out, self.activation,
                                      residual=identity)


class Bottleneck(nnx.Module):
  """1x1, 3x3 and 1x1 convolutions with BatchNorm and a residual connection.

  The block widens ``features`` four times. The 3x3 convolution carries the
  stride, as in the official AdderNet ``resnet50.py`` (and torchvision's
  "ResNet v1.5"): ResNet-50 then counts 4.09G multiply-accumulates (adder
  operations in the blocks) at 224x224, where the original ResNet v1, with the
  stride on the first 1x1 convolution, counts 3.86G, the figure usually
  quoted as 3.9G.

  Example (shapes only: ``nnx.eval_shape`` builds and runs the block abstractly):
    >>> from flax import nnx
    >>> import jax, jax.numpy as jnp
    >>> from adderjax.models.layers import Layers
    >>> from adderjax.models.resnet import Bottleneck
    >>> block = nnx.eval_shape(
    ...     lambda: Bottleneck(Layers(kind="adder", rngs=nnx.Rngs(0)), 64, 32, strides=2))
    >>> [conv.kernel.shape for conv in (block.conv1, block.conv2, block.conv3)]
    [(1, 1, 64, 32), (3, 3, 32, 32), (1, 1, 32, 128)]
    >>> x = jax.ShapeDtypeStruct((1, 8, 8, 64), jnp.float32)
    >>> nnx.eval_shape(lambda block, x: block(x), block, x).shape
    (1, 4, 4, 128)

  Args:
    make: builds the layers; every convolution is of its kind.
    in_features: input channels.
    features: the width of the 3x3 convolution; the output has ``4 *
      features`` channels.
    strides: the stride of the 3x3 convolution and of the shortcut.
  """

  expansion = 4

  def __init__(self, make: Layers, in_features: int, features: int, *, strides: int = 1):
    out_features = features * self.expansion
    self.conv1 = make.conv(in_features, features, 1, padding=0)
    self.bn1 = make.batch_norm(features)
    self.conv2 = make.conv(features, features, 3, strides)
    self.bn2 = make.batch_norm(features)
    self.conv3 = make.conv(features, out_features, 1, padding=0)
    self.bn3 = make.batch_norm(out_features)
    self.downsample = _shortcut(make, in_features, out_features, strides)
    self.activation = make.activation

  def __call__(self, x: jax.Array) -> jax.Array:
    out = conv_batch_norm_activation(self.conv1, self.bn1, x, self.activation, defer=True)
    out = conv_batch_norm_activation(self.conv2, self.bn2, out, self.activation, defer=True)
    identity = x if self.downsample is None else self.downsample(x)
    return conv_batch_norm_activation(self.conv3, self.bn3, out, self.activation,
                                      residual=identity)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _stage(make: Layers, block: type[BasicBlock] | type[Bottleneck], in_features: int,
           features: int, count: int, strides: int) -> nnx.List:
  """``count`` blocks, the first with ``strides``."""
  blocks = []
  for i in range(count):
    blocks.append(block(make, in_features, features, strides=strides if i == 0 else 1))
    in_features = features * block.expansion
  return nnx.List(blocks)


def _check_blocks(blocks_per_stage: Any, stages: int) -> tuple[int, ...]:
  if (not isinstance(blocks_per_stage, Sequence) or len(blocks_per_stage) != stages
      or not all(is_int(n) and n >= 1 for n in blocks_per_stage)):
    raise ValueError(f"blocks_per_stage must be a sequence of {stages} positive ints, "
                     f"got blocks_per_stage={blocks_per_stage!r}.")
  return tuple(int(n) for n in blocks_per_stage)


class CifarResNet(nnx.Module):
  """The CIFAR ResNet of the official AdderNet ``resnet20.py``, of depth ``6n + 2``.

  A 3x3 stem convolution to 16 channels (multiplicative, no bias), BatchNorm
  and the activation; three stages of :class:`BasicBlock` at 16, 32 and 64
  channels (strides 1, 2, 2); global average pooling; a multiplicative
  classifier without bias (the official 1x1 convolution on the pooled
  features) followed by a BatchNorm on the logits.

  - ``kind="adder"``: every convolution in the blocks, shortcuts included, is
    an adder layer.
  - ``kind="conv"``: the CNN.
  - ``kind="binary"``: the same convolutions are binary (the 1x1 projection
    shortcuts too), the activation is HardTanh; stem and classifier stay full
    precision.

  Any input size the pooling allows works; CIFAR's is 32x32x3.

  Example (shapes only: ``nnx.eval_shape`` builds and runs the model abstractly):
    >>> from flax import nnx
    >>> import jax, jax.numpy as jnp
    >>> from adderjax.models import resnet20
    >>> model = nnx.eval_shape(lambda: resnet20(kind="adder", rngs=nnx.Rngs(0)))
    >>> type(model.conv1).__name__, type(model.layer1[0].conv1).__name__
    ('Conv', 'AdderConv')
    >>> images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    >>> nnx.eval_shape(lambda model, x: model(x), model, images).shape
    (2, 10)

  Args:
    blocks_per_stage: the number of blocks in each of the 3 stages (3 for
      ResNet-20, 5 for ResNet-32, 9 for ResNet-56).
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
      or bad ``blocks_per_stage`` or ``num_classes``.
  """

  def __init__(self, *, blocks_per_stage: Sequence[int], kind: Kind = "adder",
               num_classes: int = 10, rngs: nnx.Rngs, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, grad_mode: GradMode = "full_precision",
               implementation: ImplementationLike = None):
    blocks_per_stage = _check_blocks(blocks_per_stage, 3)
    num_classes = check_positive_int(num_classes, "num_classes")
    make = Layers(kind=kind, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                  grad_mode=grad_mode, implementation=implementation)
    self.conv1 = make.conv(3, 16, 3, kind="conv")
    self.bn1 = make.batch_norm(16)
    self.layer1 = _stage(make, BasicBlock, 16, 16, blocks_per_stage[0], 1)
    self.layer2 = _stage(make, BasicBlock, 16, 32, blocks_per_stage[1], 2)
    self.layer3 = _stage(make, BasicBlock, 32, 64, blocks_per_stage[2], 2)
    self.fc = make.dense(64, num_classes, kind="conv")
    self.bn2 = make.batch_norm(num_classes)
    self.activation = make.activation
    self.kind = kind
    self.num_classes = num_classes
    self.blocks_per_stage = blocks_per_stage

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Classifies a batch.

    Args:
      inputs: ``(batch, height, width, 3)`` images.

    Returns:
      ``(batch, num_classes)`` logits.
    """
    check_inputs(inputs, channels=3)
    x = batch_norm_activation(self.bn1, self.conv1(inputs), self.activation)
    for stage in (self.layer1, self.layer2, self.layer3):
      for block in stage:
        x = block(x)
    return self.bn2(self.fc(global_average_pool(x)))


class ResNet(nnx.Module):
  """The ImageNet ResNet of the official AdderNet ``resnet50.py``.

  A 7x7 stem convolution to 64 channels with stride 2 (multiplicative, no
  bias), BatchNorm, the activation and a 3x3 max pool with stride 2; four
  stages of blocks at widths 64, 128, 256 and 512 (strides 1, 2, 2, 2); global
  average pooling; a multiplicative classifier with bias followed by a
  BatchNorm on the logits (the official ``fc`` and ``bn2``; the BatchNorm adds
  ``2 * num_classes`` parameters to the torchvision counts).

  - ``kind="adder"``: every convolution in the blocks, the 1x1 projection
    shortcuts included, is an adder layer.
  - ``kind="conv"``: the CNN.
  - ``kind="binary"``: the same convolutions are binary (shortcuts too), the
    activation is HardTanh; stem and classifier stay full precision.

  The stride of a :class:`Bottleneck` sits on its 3x3 convolution, as in the
  official code (see there). Any input size works: ImageNet's is 224x224x3;
  at 32x32 the last stage works on 1x1 maps.

  Example (shapes only: ``nnx.eval_shape`` builds the model abstractly):
    >>> from flax import nnx
    >>> from adderjax.models import resnet50
    >>> model = nnx.eval_shape(lambda: resnet50(kind="adder", rngs=nnx.Rngs(0)))
    >>> type(model.layer2[0].downsample.conv).__name__, model.fc.kernel.shape
    ('AdderConv', (2048, 1000))

  Args:
    block: ``"basic"`` (:class:`BasicBlock`) or ``"bottleneck"``
      (:class:`Bottleneck`).
    blocks_per_stage: the number of blocks in each of the 4 stages.
    kind: ``"adder"``, ``"conv"`` or ``"binary"``.
    num_classes: the number of classes.
    rngs: rng key.
    dtype: the dtype of the computation (default: infer from input and params).
    param_dtype: the dtype of the parameters (default: float32).
    grad_mode: the adder layers' backward pass (see
      :func:`adderjax.ops.adder_conv`).
    implementation: the adder op's implementation, None for the fastest.

  Raises:
    ValueError: for an unknown ``block``, ``kind``, ``grad_mode`` or
      ``implementation``, or bad ``blocks_per_stage`` or ``num_classes``.
  """

  def __init__(self, *, block: str, blocks_per_stage: Sequence[int], kind: Kind = "adder",
               num_classes: int = 1000, rngs: nnx.Rngs, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, grad_mode: GradMode = "full_precision",
               implementation: ImplementationLike = None):
    if block not in _BLOCKS:
      raise ValueError(f"block must be one of {tuple(_BLOCKS)}, got block={block!r}.")
    blocks_per_stage = _check_blocks(blocks_per_stage, 4)
    num_classes = check_positive_int(num_classes, "num_classes")
    make = Layers(kind=kind, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                  grad_mode=grad_mode, implementation=implementation)
    block_class = _BLOCKS[block]
    self.conv1 = make.conv(3, 64, 7, 2, kind="conv")
    self.bn1 = make.batch_norm(64)
    in_features = 64
    stages = []
    for i, (features, count) in enumerate(zip((64, 128, 256, 512), blocks_per_stage)):
      stages.append(_stage(make, block_class, in_features, features, count, 1 if i == 0 else 2))
      in_features = features * block_class.expansion
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.fc = make.dense(in_features, num_classes, use_bias=True, kind="conv")
    self.bn2 = make.batch_norm(num_classes)
    self.activation = make.activation
    self.kind = kind
    self.num_classes = num_classes
    self.block = block
    self.blocks_per_stage = blocks_per_stage

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Classifies a batch.

    Args:
      inputs: ``(batch, height, width, 3)`` images.

    Returns:
      ``(batch, num_classes)`` logits.
    """
    check_inputs(inputs, channels=3)
    x = max_pool(batch_norm_activation(self.bn1, self.conv1(inputs), self.activation), 3, 2,
                 padding=1)
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x)
    return self.bn2(self.fc(global_average_pool(x)))


def resnet20(**kwargs: Any) -> CifarResNet:
  """ResNet-20 for CIFAR (3 blocks per stage); keyword arguments as :class:`CifarResNet`.

  Example:
    >>> from flax import nnx
    >>> from adderjax.models import resnet20
    >>> model = nnx.eval_shape(lambda: resnet20(num_classes=100, rngs=nnx.Rngs(0)))
    >>> model.fc.kernel.shape
    (64, 100)
  """
  return CifarResNet(blocks_per_stage=(3, 3, 3), **kwargs)


def resnet32(**kwargs: Any) -> CifarResNet:
  """ResNet-32 for CIFAR (5 blocks per stage); keyword arguments as :class:`CifarResNet`."""
  return CifarResNet(blocks_per_stage=(5, 5, 5), **kwargs)


def resnet56(**kwargs: Any) -> CifarResNet:
  """ResNet-56 for CIFAR (9 blocks per stage); keyword arguments as :class:`CifarResNet`."""
  return CifarResNet(blocks_per_stage=(9, 9, 9), **kwargs)


def resnet18(**kwargs: Any) -> ResNet:
  """ResNet-18 for ImageNet (basic blocks, 2-2-2-2); keyword arguments as :class:`ResNet`."""
  return ResNet(block="basic", blocks_per_stage=(2, 2, 2, 2), **kwargs)


def resnet34(**kwargs: Any) -> ResNet:
  """ResNet-34 for ImageNet (basic blocks, 3-4-6-3); keyword arguments as :class:`ResNet`."""
  return ResNet(block="basic", blocks_per_stage=(3, 4, 6, 3), **kwargs)


def resnet50(**kwargs: Any) -> ResNet:
  """ResNet-50 for ImageNet (bottlenecks, 3-4-6-3); keyword arguments as :class:`ResNet`."""
  return ResNet(block="bottleneck", blocks_per_stage=(3, 4, 6, 3), **kwargs)

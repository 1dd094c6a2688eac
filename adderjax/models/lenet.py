"""LeNets for MNIST: LeNet-5 with BatchNorm, and LeNet++ for feature visualisation.

The AdderNet paper (Chen et al., CVPR 2020) trains a LeNet-5-BN on MNIST in
which every layer is an adder layer (Section 4.1, "~870K additions and almost
no multiplication"), and visualises the 2-D features of a LeNet++ (Wen et
al., "A Discriminative Feature Learning Approach for Deep Face Recognition",
ECCV 2016) to show that adder features cluster by L1 distance (Figure 1).
"""

from __future__ import annotations

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
  max_pool,
)
from adderjax.ops import ImplementationLike
from adderjax.ops.spec import GradMode

__all__ = ["LeNet5BN", "LeNetPP", "lenet5_bn", "lenet_pp"]

EMBED_DIMS = (2, 3)
"""The embedding sizes :class:`LeNetPP` offers (dimensions one can plot)."""


class LeNet5BN(nnx.Module):
  """LeNet-5 with a BatchNorm after every layer, for 28x28x1 MNIST images.

  ``conv 5x5 6 (pad 2) -> BN -> act -> maxpool 2 -> conv 5x5 16 (no pad) -> BN
  -> act -> maxpool 2 -> fc 120 -> BN -> act -> fc 84 -> BN -> act -> fc
  num_classes -> BN``.

  - ``kind="adder"``: every convolution and fully connected layer is an adder
    layer, as in the paper's MNIST experiment; the BatchNorm on the logits
    (as the official ResNets' ``bn2`` after the classifier) brings their large
    negative mean and scale to the softmax's range.
  - ``kind="conv"``: the CNN.
  - ``kind="binary"``: the first convolution and the classifier stay full
    precision, the others are binary; the activation is HardTanh.

  Example (shapes only: ``nnx.eval_shape`` builds and runs the model abstractly):
    >>> from flax import nnx
    >>> import jax, jax.numpy as jnp
    >>> from adderjax.models import lenet5_bn
    >>> model = nnx.eval_shape(lambda: lenet5_bn(kind="adder", rngs=nnx.Rngs(0)))
    >>> type(model.conv1).__name__, type(model.fc3).__name__
    ('AdderConv', 'AdderDense')
    >>> images = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    >>> nnx.eval_shape(lambda model, x: model(x), model, images).shape
    (2, 10)

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
    outer = "conv" if kind == "binary" else kind
    self.conv1 = make.conv(1, 6, 5, padding=2, kind=outer)
    self.bn1 = make.batch_norm(6)
    self.conv2 = make.conv(6, 16, 5, padding=0)
    self.bn2 = make.batch_norm(16)
    self.fc1 = make.dense(16 * 5 * 5, 120)
    self.bn3 = make.batch_norm(120)
    self.fc2 = make.dense(120, 84)
    self.bn4 = make.batch_norm(84)
    self.fc3 = make.dense(84, num_classes, kind=outer)
    self.bn5 = make.batch_norm(num_classes)
    self.activation = make.activation
    self.kind = kind
    self.num_classes = num_classes

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Classifies a batch.

    Args:
      inputs: ``(batch, 28, 28, 1)`` images.

    Returns:
      ``(batch, num_classes)`` logits.
    """
    check_inputs(inputs, channels=1, spatial=(28, 28))
    act = self.activation
    x = max_pool(conv_batch_norm_activation(self.conv1, self.bn1, inputs, act), 2, 2)
    x = max_pool(conv_batch_norm_activation(self.conv2, self.bn2, x, act), 2, 2)
    x = jnp.reshape(x, (x.shape[0], -1))
    x = batch_norm_activation(self.bn3, self.fc1(x), act)
    x = batch_norm_activation(self.bn4, self.fc2(x), act)
    return self.bn5(self.fc3(x))


class LeNetPP(nnx.Module):
  """LeNet++ (Wen et al., ECCV 2016), the network of the paper's feature visualisation.

  Three stages of two 5x5 convolutions (32, 64 and 128 channels, padding 2),
  each followed by BatchNorm and PReLU, and a 2x2 max pool after each stage
  (28 -> 14 -> 7 -> 3, rounding down where Caffe rounds up); then a fully
  connected layer to an ``embed_dim``-dimensional embedding, BatchNorm and
  PReLU, and the classifier, followed by a BatchNorm on the logits.

  Choices, where Wen et al. and the AdderNet paper leave them open:

  - BatchNorm after every layer, as everywhere in AdderNets: adder outputs have
    a large negative mean.
  - PReLU with one slope per layer, initialized to 0.25 (PyTorch's default).
  - ``kind="adder"``: every convolution, the embedding and the classifier are
    adder layers, so the logits are negative L1 distances between the
    embedding and a centre per class (then BatchNorm): the adder features
    cluster around these centres, as in the paper's Figure 1.
  - ``kind="conv"``: the CNN, whose features spread by angle.
  - ``kind="binary"``: the first convolution and the classifier stay full
    precision; the activation is HardTanh instead of PReLU.
  - The embedding returned is the classifier's input, after the BatchNorm and
    the activation.

  Example (shapes only: ``nnx.eval_shape`` builds and runs the model abstractly):
    >>> from flax import nnx
    >>> import jax, jax.numpy as jnp
    >>> from adderjax.models import lenet_pp
    >>> model = nnx.eval_shape(lambda: lenet_pp(kind="conv", embed_dim=2, rngs=nnx.Rngs(0)))
    >>> images = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    >>> embedding, logits = nnx.eval_shape(lambda model, x: model(x), model, images)
    >>> embedding.shape, logits.shape
    ((2, 2), (2, 10))

  Args:
    kind: ``"adder"``, ``"conv"`` or ``"binary"``.
    num_classes: the number of classes.
    embed_dim: the size of the embedding, 2 or 3.
    rngs: rng key.
    dtype: the dtype of the computation (default: infer from input and params).
    param_dtype: the dtype of the parameters (default: float32).
    grad_mode: the adder layers' backward pass.
    implementation: the adder op's implementation, None for the fastest.

  Raises:
    ValueError: for an unknown ``kind``, ``grad_mode`` or ``implementation``,
      an ``embed_dim`` other than 2 or 3, or a ``num_classes`` that is not a
      positive int.
  """

  def __init__(self, *, kind: Kind = "adder", num_classes: int = 10, embed_dim: int = 2,
               rngs: nnx.Rngs, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               grad_mode: GradMode = "full_precision", implementation: ImplementationLike = None):
    num_classes = check_positive_int(num_classes, "num_classes")
    if not is_int(embed_dim) or embed_dim not in EMBED_DIMS:
      raise ValueError(f"embed_dim must be one of {EMBED_DIMS}, got embed_dim={embed_dim!r}.")
    make = Layers(kind=kind, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                  grad_mode=grad_mode, implementation=implementation)
    outer = "conv" if kind == "binary" else kind
    widths = (32, 32, 64, 64, 128, 128)
    convs, norms, acts = [], [], []
    in_features = 1
    for i, features in enumerate(widths):
      convs.append(make.conv(in_features, features, 5, padding=2, kind=outer if i == 0 else None))
      norms.append(make.batch_norm(features))
      acts.append(self._activation(kind, dtype, param_dtype))
      in_features = features
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.acts = nnx.List(acts)
    self.embed = make.dense(128 * 3 * 3, embed_dim)
    self.embed_norm = make.batch_norm(embed_dim)
    self.embed_act = self._activation(kind, dtype, param_dtype)
    self.classifier = make.dense(embed_dim, num_classes, kind=outer)
    self.classifier_norm = make.batch_norm(num_classes)
    self.kind = kind
    self.num_classes = num_classes
    self.embed_dim = embed_dim

  @staticmethod
  def _activation(kind: Kind, dtype: Dtype | None, param_dtype: Dtype) -> nnx.Module:
    if kind == "binary":
      return nnx.hard_tanh
    return nnx.PReLU(0.25, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Embeds and classifies a batch.

    Args:
      inputs: ``(batch, 28, 28, 1)`` images.

    Returns:
      ``(embedding, logits)``, of shapes ``(batch, embed_dim)`` and ``(batch,
      num_classes)``.
    """
    check_inputs(inputs, channels=1, spatial=(28, 28))
    x = inputs
    for i, (conv, norm, act) in enumerate(zip(self.convs, self.norms, self.acts)):
      x = act(norm(conv(x)))
      if i % 2:
        x = max_pool(x, 2, 2)
    x = jnp.reshape(x, (x.shape[0], -1))
    embedding = self.embed_act(self.embed_norm(self.embed(x)))
    return embedding, self.classifier_norm(self.classifier(embedding))


def lenet5_bn(**kwargs: Any) -> LeNet5BN:
  """LeNet-5-BN for MNIST; keyword arguments as :class:`LeNet5BN`.

  Example:
    >>> from flax import nnx
    >>> from adderjax.models import lenet5_bn
    >>> model = nnx.eval_shape(lambda: lenet5_bn(kind="conv", rngs=nnx.Rngs(0)))
    >>> model.fc3.kernel.shape
    (84, 10)
  """
  return LeNet5BN(**kwargs)


def lenet_pp(**kwargs: Any) -> LeNetPP:
  """LeNet++ for MNIST feature visualisation; keyword arguments as :class:`LeNetPP`.

  Example:
    >>> from flax import nnx
    >>> from adderjax.models import lenet_pp
    >>> model = nnx.eval_shape(lambda: lenet_pp(embed_dim=3, rngs=nnx.Rngs(0)))
    >>> model.embed.kernel.shape
    (1152, 3)
  """
  return LeNetPP(**kwargs)

"""adderjax.models.vit_tiny: structure, arguments, and training steps on the bundled MNIST."""

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adderjax import models
from adderjax.data import bundled
from adderjax.nn import AdderDense, AdderKernel, BinaryDense, adder_attention
from adderjax.optim import addernet_sgd
from tests.models.test_models import FAST_COMPILE, _numpy_state

SMALL = dict(embed_dim=32, depth=1, num_heads=2, mlp_dim=64)


def _abstract(kind, **options):
  return nnx.eval_shape(lambda: models.get("vit_tiny", kind=kind, rngs=nnx.Rngs(0), **options))


def _params(*, dim=64, depth=4, mlp=128, patch=7, tokens=17, classes=10):
  """ViTTiny's parameters counted by hand."""
  embed = patch * patch * dim + dim + dim + tokens * dim  # conv + bias, class token, positions
  attention = 4 * (dim * dim + dim)  # query, key, value, out: kernels and biases
  mlp_layers = 2 * dim * mlp + 2 * (mlp + dim)  # no biases; two BatchNorms' scales and biases
  block = 2 * 2 * dim + attention + mlp_layers  # two LayerNorms
  return embed + depth * block + 2 * dim + dim * classes + classes


@pytest.mark.parametrize("kind", models.KINDS)
def test_structure(kind):
  model = _abstract(kind)
  assert models.input_shape("vit_tiny") == (28, 28, 1)
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == _params()
  dense = {"adder": AdderDense, "conv": nnx.Linear, "binary": BinaryDense}[kind]
  attention = adder_attention if kind == "adder" else nnx.dot_product_attention
  assert len(model.blocks) == 4
  for block in model.blocks:
    assert type(block.fc1) is dense and type(block.fc2) is dense
    assert block.attention.attention_fn is attention
  assert type(model.patch_embed) is nnx.Conv and type(model.head) is nnx.Linear
  assert len(jax.tree.leaves(nnx.state(model, AdderKernel))) == (8 if kind == "adder" else 0)
  norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
  assert len(norms) == 8 and {m.momentum for m in norms} == {0.9}


def test_other_sizes():
  model = _abstract("adder", image_size=32, channels=3, patch_size=4, **SMALL)
  assert model.pos_embed.shape == (1, 65, 32)
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state,
                       jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert out.shape == (2, 10)
  with pytest.raises(ValueError, match="inputs must be an NHWC batch of shape"):
    model(jnp.zeros((2, 28, 28, 3)))


@pytest.mark.parametrize("options, match", [
    (dict(patch_size=5), "patch_size must divide image_size=28, got patch_size=5"),
    (dict(num_heads=3), "num_heads must divide embed_dim=64, got num_heads=3"),
    (dict(depth=0), "depth must be a positive int, got depth=0"),
    (dict(mlp_dim=1.5), "mlp_dim must be a positive int"),
    (dict(kind="transformer"), "kind must be one of"),
])
def test_bad_arguments_are_named(options, match):
  with pytest.raises(ValueError, match=match):
    models.vit_tiny(rngs=nnx.Rngs(0), **options)


@pytest.mark.parametrize("kind", ["adder", "conv"])
def test_training_steps_on_bundled_mnist_reduce_the_loss(kind):
  """Twenty-four addernet_sgd steps of 64 images (one compiled program) lower the loss."""
  steps, batch = 24, 64
  pixels, labels = bundled.load_bundled_mnist()
  images = (pixels[:steps * batch].astype(np.float32) / 255 - 0.1307) / 0.3081
  images = images.reshape(steps, batch, 28, 28, 1)
  labels = labels[:steps * batch].astype(np.int32).reshape(steps, batch)
  graphdef, state = _numpy_state(_abstract(kind, **SMALL))

  def train(state, images, labels):
    model = nnx.merge(graphdef, state)
    optimizer = nnx.Optimizer(model, addernet_sgd(0.1), wrt=nnx.Param)
    loss = lambda m, x, y: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
    def step(carry, x, y):
      model, optimizer = carry
      value, grads = nnx.value_and_grad(loss)(model, x, y)
      optimizer.update(model, grads)
      return (model, optimizer), value

    _, losses = step((model, optimizer), images, labels)
    return losses, loss(model, images[0], labels[0])

  losses, first_batch_after = jax.jit(train, compiler_options=FAST_COMPILE)(state, images, labels)
  assert np.all(np.isfinite(losses))
  # The first batch's loss before its step (losses[0]) and after all of them, both in train mode.
  assert first_batch_after < losses[0] - 0.3, (first_batch_after, losses)
  assert losses[-8:].mean() < losses[:8].mean() - 0.1, losses

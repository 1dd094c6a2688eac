"""One jitted training step of an `adderjax.models` network, shared by the benchmarks."""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx
import jax
import optax

from adderjax import models
from adderjax.optim import addernet_sgd


def make_train_step(model_name: str, kind: str, *, implementation: str | None = None,
                    num_classes: int = 10, seed: int = 0) -> tuple[Callable, nnx.State]:
  """A jitted ``step(state, images, labels) -> (loss, state)`` and its initial state.

  The step is a forward pass with BatchNorm in train mode, the backward pass and
  an `adderjax.optim.addernet_sgd` update (learning rate 0.05); ``state`` holds
  the model and the optimizer. ``implementation`` goes to the adder layers.
  """
  kwargs = {"implementation": implementation} if kind == "adder" else {}
  model = models.get(model_name, kind=kind, num_classes=num_classes, rngs=nnx.Rngs(seed),
                     **kwargs)
  model.train()
  optimizer = nnx.Optimizer(model, addernet_sgd(0.05), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  @jax.jit
  def step(state, images, labels):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(model):
      logits = model(images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, nnx.state((model, optimizer))

  return step, state

"""A trained model as a compiled pure function: inference without NNX's per-call graph traversal.

``nnx.jit(model)(x)`` walks the module graph on every call (splitting it into
a graph definition and state, then merging it back), which at batch 1 costs
more than the network itself. :func:`inference_function` does that once: it
splits the model in eval mode, flattens its state to a list of arrays, and
returns a `jax.jit` function of the input alone, the arrays bound to it. Later
changes to the model do not reach the function; call it again after training.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from adderjax import models
  >>> model = models.get("lenet5_bn", kind="adder", rngs=nnx.Rngs(0))
  >>> predict = models.inference_function(model)
  >>> predict(jnp.zeros((1, 28, 28, 1))).shape
  (1, 10)
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx
import jax

__all__ = ["inference_function"]


def inference_function(model: nnx.Module) -> Callable[[jax.Array], jax.Array]:
  """``model`` in eval mode as a jitted ``f(x) -> outputs`` of the input alone.

  Args:
    model: A Flax NNX model, such as one of :mod:`adderjax.models`. It is
      put in eval mode (BatchNorm with its running statistics) and left so.

  Returns:
    ``f(x)``: the model's outputs for the batch ``x``, compiled once per input
    shape and dtype. The model's state is copied into it as it is now.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}.")
  model.eval()
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)

  @jax.jit
  def apply(leaves, x):
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(x)

  def predict(x: jax.Array) -> jax.Array:
    return apply(leaves, x)

  predict.__doc__ = f"The eval-mode outputs of a {type(model).__name__} for a batch."
  return predict

"""models.inference_function: the eval-mode model as a jitted function of the input."""

import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax import models


@pytest.mark.parametrize("name, kind", [("lenet5_bn", "adder"), ("resnet20", "conv")])
@jax.default_matmul_precision("highest")  # not TF32 on a GPU: a batch of 1 rounds otherwise
def test_matches_the_model_in_eval_mode(name, kind):
  model = models.get(name, kind=kind, rngs=nnx.Rngs(0))
  model.train()
  x = jax.random.normal(jax.random.key(1), (4, *models.input_shape(name)))
  model(x)  # One training-mode call moves the BatchNorm running statistics off their init.
  predict = models.inference_function(model)
  want = nnx.jit(lambda model, x: model(x))(model, x)  # model is now in eval mode
  np.testing.assert_allclose(predict(x), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(predict(x[:1]), want[:1], rtol=1e-5, atol=1e-5)


def test_the_state_is_copied_at_the_call():
  model = models.get("lenet5_bn", kind="adder", rngs=nnx.Rngs(0))
  x = jnp.ones((2, 28, 28, 1))
  predict = models.inference_function(model)
  before = predict(x)
  model.fc3.kernel[...] = 0  # A later change does not reach it.
  np.testing.assert_array_equal(predict(x), before)


def test_a_call_does_not_traverse_the_model():
  """Per call: one flat list of arrays, not NNX's graph walk (timed loosely, as a sanity check)."""
  model = models.get("lenet5_bn", kind="conv", rngs=nnx.Rngs(0))
  model.eval()
  x = jnp.ones((1, 28, 28, 1))
  predict = models.inference_function(model)
  nnx_forward = nnx.jit(lambda model, x: model(x))
  jax.block_until_ready((predict(x), nnx_forward(model, x)))

  def best(fn, n=30):
    times = []
    for _ in range(n):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - start)
    return min(times)

  assert best(lambda: predict(x)) < best(lambda: nnx_forward(model, x))


def test_bad_model_is_named():
  with pytest.raises(TypeError, match="model must be a flax.nnx.Module"):
    models.inference_function(lambda x: x)

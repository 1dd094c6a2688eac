"""Tests for the Flax Linen adder layers in adderjax.linen."""

import math

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adderjax.linen import AdderConv, AdderDense
from adderjax.ops import adder_conv, adder_dense
from adderjax.optim import adder_kernel_mask, addernet_sgd
from tests._util import normal, np_init
from tests.ops.loop_reference import adder_conv_and_grads

KEY = jax.random.key(0)


def _shapes(module: nn.Module, x: jax.Array) -> dict:
  return jax.tree.map(lambda a: a.shape, jax.eval_shape(module.init, KEY, x))


def test_param_names_and_shapes():
  assert _shapes(AdderConv(4, 3), jnp.zeros((1, 6, 6, 2))) == {
      "params": {"adder_kernel": (3, 3, 2, 4)}}
  grouped = AdderConv(4, (3, 1), feature_group_count=2, use_bias=True)
  assert _shapes(grouped, jnp.zeros((2, 6, 6, 6))) == {
      "params": {"adder_kernel": (3, 1, 3, 4), "bias": (4,)}}
  assert _shapes(AdderDense(5, use_bias=True), jnp.zeros((2, 3))) == {
      "params": {"adder_kernel": (3, 5), "bias": (5,)}}


def test_default_kernel_init_is_standardnormal():
  params = AdderConv(64, 3).init(KEY, jnp.zeros((1, 3, 3, 64)))
  kernel = np.asarray(params["params"]["adder_kernel"])
  assert abs(kernel.mean()) < 0.02
  assert 0.97 < kernel.std() < 1.03


@pytest.mark.parametrize(
    "options, op_options",
    [
        (dict(padding=1, strides=(2, 1)), dict(padding=((1, 1), (1, 1)), strides=(2, 1))),
        (dict(padding="VALID", kernel_dilation=2, feature_group_count=2),
         dict(padding="VALID", rhs_dilation=2, feature_group_count=2)),
    ],
)
def test_conv_matches_op_on_adder_kernel(options, op_options):
  layer = AdderConv(4, 3, kernel_init=np_init, **options)
  x = normal((2, 7, 6, 4))
  params = layer.init(KEY, x)
  np.testing.assert_array_equal(
      layer.apply(params, x), adder_conv(x, params["params"]["adder_kernel"], **op_options))


def test_conv_circular_padding_wraps_the_input():
  layer = AdderConv(3, (3, 4), strides=2, padding="CIRCULAR", kernel_init=np_init)
  x = normal((1, 6, 7, 2))
  params = layer.init(KEY, x)
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 2), (0, 0)), mode="wrap")
  want = adder_conv(padded, params["params"]["adder_kernel"], strides=2, padding="VALID")
  got = layer.apply(params, x)
  assert got.shape == (1, 3, 4, 3)
  np.testing.assert_array_equal(got, want)


def test_conv_batch_dims_bias_and_dtype():
  layer = AdderConv(3, 3, use_bias=True, kernel_init=np_init, bias_init=nn.initializers.ones)
  x = normal((2, 2, 5, 5, 2))
  params = layer.init(KEY, x)
  y = layer.apply(params, x)
  assert y.shape == (2, 2, 5, 5, 3)
  want = adder_conv(x.reshape(4, 5, 5, 2), params["params"]["adder_kernel"]) + 1.0
  np.testing.assert_allclose(y.reshape(4, 5, 5, 3), want, rtol=1e-6)
  np.testing.assert_array_equal(layer.apply(params, x[0, 0]), y[0, 0])
  bf16 = AdderConv(3, 3, use_bias=True, dtype=jnp.bfloat16)
  # The input is rounded to the compute dtype; the kernel and the output stay float32.
  got = bf16.apply(params, x[0])
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(
      got, adder_conv(x[0].reshape(2, 5, 5, 2).astype(jnp.bfloat16),
                      params["params"]["adder_kernel"]).reshape(got.shape) + 1.0)


def test_dense_matches_numpy_and_op():
  layer = AdderDense(2, kernel_init=np_init)
  x = np.array([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]], np.float32)
  params = layer.init(KEY, x)
  w = np.asarray(params["params"]["adder_kernel"])
  got = layer.apply(params, jnp.asarray(x))
  np.testing.assert_allclose(got, -np.abs(x[:, :, None] - w[None]).sum(1), rtol=1e-6)
  np.testing.assert_array_equal(got, adder_dense(jnp.asarray(x), jnp.asarray(w)))
  got = AdderDense(2, dtype=jnp.bfloat16).apply(params, x)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, adder_dense(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w)))


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: AdderConv(0, 3), "features"),
        (lambda: AdderConv(4, (3,)), "kernel_size"),
        (lambda: AdderConv(4, 3, strides=(1, 0)), "strides"),
        (lambda: AdderConv(4, 3, padding="FULL"), "padding"),
        (lambda: AdderConv(4, 3, kernel_dilation=0), "kernel_dilation"),
        (lambda: AdderConv(4, 3, feature_group_count=0), "feature_group_count"),
        (lambda: AdderConv(4, 3, grad_mode="exact"), "grad_mode"),
        (lambda: AdderDense(-2), "features"),
        (lambda: AdderDense(2, implementation="cuda"), "implementation"),
        (lambda: AdderConv(4, 3, p=2.5), "p=2.5"),
        (lambda: AdderDense(2, p=jnp.ones(2)), "p must be a scalar"),
    ],
)
def test_bad_arguments_raise(make, name):
  with pytest.raises(ValueError, match=name):
    make()


def test_groups_must_divide_input_channels():
  with pytest.raises(ValueError, match="in_features=3"):
    AdderConv(4, 3, feature_group_count=2).init(KEY, jnp.zeros((1, 5, 5, 3)))


def test_options_are_keyword_only():
  with pytest.raises(TypeError):
    AdderConv(4, 3, 1, "SAME", 1)  # pylint: disable=too-many-function-args
  with pytest.raises(TypeError):
    AdderDense(4, True)  # pylint: disable=too-many-function-args


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = AdderConv(4, 3, use_bias=True, kernel_init=np_init)(x).mean((1, 2))
    return AdderDense(2, kernel_init=np_init)(h)


def test_addernet_sgd_step_uses_the_adaptive_rate_on_adder_kernels():
  lr, eta = 0.05, 0.2
  model = _Net()
  x = normal((2, 5, 5, 3))
  params = model.init(KEY, x)["params"]
  assert adder_kernel_mask(params) == {
      "AdderConv_0": {"adder_kernel": True, "bias": False},
      "AdderDense_0": {"adder_kernel": True},
  }
  grads = jax.jit(jax.grad(lambda p: (model.apply({"params": p}, x) ** 2).mean()))(params)
  tx = addernet_sgd(lr, momentum=0.0, weight_decay=0.0, eta=eta)
  updates, _ = tx.update(grads, tx.init(params), params)

  for layer in ("AdderConv_0", "AdderDense_0"):
    g = np.asarray(grads[layer]["adder_kernel"], np.float64)
    update = np.asarray(updates[layer]["adder_kernel"], np.float64)
    np.testing.assert_allclose(np.linalg.norm(update), lr * eta * math.sqrt(g.size), rtol=1e-5)
    np.testing.assert_allclose(update, -lr * eta * math.sqrt(g.size) * g / np.linalg.norm(g),
                               rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(updates["AdderConv_0"]["bias"], -lr * grads["AdderConv_0"]["bias"],
                             rtol=1e-6)
  new_params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(
      new_params["AdderDense_0"]["adder_kernel"],
      params["AdderDense_0"]["adder_kernel"] + updates["AdderDense_0"]["adder_kernel"])


def test_implementation_may_be_a_pallas_instance():
  # A frozen dataclass, so the Linen module (and jit's cache) can hash it.
  from adderjax.ops import PallasAdderConv
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 5, 3)), jnp.float32)
  layer = AdderConv(features=4, kernel_size=3,
                    implementation=PallasAdderConv(interpret=True, block_m=16))
  params = layer.init(jax.random.key(0), x)
  want = AdderConv(features=4, kernel_size=3, implementation="xla").apply(params, x)
  np.testing.assert_allclose(jax.jit(layer.apply)(params, x), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="implementation"):
    AdderConv(features=4, kernel_size=3, implementation=object())


def test_p_as_attribute_or_traced_call_argument():
  x = normal((1, 4, 5, 2))
  layer = AdderConv(3, 2, padding="VALID", kernel_init=np_init, p=2.0)
  params = jax.jit(layer.init)(KEY, x)
  w = np.asarray(params["params"]["adder_kernel"])

  def oracle(p):
    return adder_conv_and_grads(x, w, None, strides=(1, 1), padding=((0, 0), (0, 0)),
                                dilation=(1, 1), groups=1, grad_mode="sign", p=p)[0]

  np.testing.assert_allclose(jax.jit(layer.apply)(params, x), oracle(2.0), rtol=1e-5)

  traces = []

  def apply(params, x, p):
    traces.append(p)
    return AdderConv(3, 2, padding="VALID").apply(params, x, p=p)

  apply = jax.jit(apply)
  for p in (1.5, 2.0):
    np.testing.assert_allclose(apply(params, x, jnp.float32(p)), oracle(p), rtol=1e-5)
  assert len(traces) == 1
  dense = AdderDense(2, kernel_init=np_init)
  h = x.reshape(20, 2)
  dense_params = dense.init(KEY, h)
  kernel = np.asarray(dense_params["params"]["adder_kernel"])
  np.testing.assert_allclose(dense.apply(dense_params, h, p=2),
                             -((np.asarray(h)[:, :, None] - kernel) ** 2).sum(1), rtol=1e-5)
  with pytest.raises(ValueError, match='"p" was passed to the constructor and at call time'):
    layer.apply(params, x, p=2.0)
  with pytest.raises(ValueError, match=r"got p=0.5"):
    dense.apply(dense_params, h, p=0.5)

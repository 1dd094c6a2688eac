"""adder_conv in a data-parallel step over 8 CPU devices equals one device.

tests/conftest.py gives the CPU backend 8 devices.
"""

import functools

import chex
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from adderjax.ops import GRAD_MODES, adder_conv, adder_dense
from tests._util import chex_variants

NUM_DEVICES = 8


def _params_and_batch():
  rng = np.random.default_rng(0)
  params = {
      "conv": jnp.asarray(rng.normal(size=(3, 3, 3, 8)), jnp.float32),
      "dense": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
  }
  images = jnp.asarray(rng.normal(size=(16, 6, 6, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, size=16))
  return params, images, labels


def _loss(params, images, labels, grad_mode="full_precision"):
  h = adder_conv(images, params["conv"], strides=2, grad_mode=grad_mode)
  h = (h - jnp.mean(h)) / jnp.std(h)  # global statistics, as BatchNorm across devices
  logits = adder_dense(jnp.mean(jax.nn.relu(h), axis=(1, 2)), params["dense"],
                       grad_mode=grad_mode) / 10
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


@pytest.fixture(scope="module")
def devices():
  if jax.device_count() < NUM_DEVICES:
    pytest.skip(f"needs {NUM_DEVICES} devices; run under tests/conftest.py")
  return jax.devices()[:NUM_DEVICES]


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_named_sharding_step_equals_one_device(devices, axis_type, grad_mode):
  params, images, labels = _params_and_batch()
  loss = functools.partial(_loss, grad_mode=grad_mode)
  single = jax.jit(jax.value_and_grad(loss))(params, images, labels)

  mesh = jax.make_mesh((NUM_DEVICES,), ("data",), devices=devices, axis_types=(axis_type,))
  data = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  step = jax.jit(jax.value_and_grad(loss), out_shardings=replicated)
  sharded = step(jax.device_put(params, replicated), jax.device_put(images, data),
                 jax.device_put(labels, data))
  chex.assert_trees_all_close(sharded, single, rtol=2e-5, atol=1e-6)

  # The activations stay split over the batch: no device computes the whole layer.
  y = jax.jit(lambda x, w: adder_conv(x, w))(jax.device_put(images, data),
                                            jax.device_put(params["conv"], replicated))
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), y.ndim)
  assert {s.data.shape for s in y.addressable_shards} == {(2, 6, 6, 8)}


@chex_variants(with_pmap=True)
def test_pmap_step_equals_one_device(devices, variant):
  params, images, labels = _params_and_batch()
  want = jax.grad(lambda p: _per_example_loss(p, images, labels).mean())(params)

  @variant(axis_name="batch", devices=devices, broadcast_args_to_devices=False, reduce_fn=None)
  def step(params, images, labels):
    grads = jax.grad(lambda p: _per_example_loss(p, images, labels).mean())(params)
    return jax.lax.pmean(grads, "batch")

  shard = lambda a: a.reshape(NUM_DEVICES, -1, *a.shape[1:])
  replicate = lambda a: jnp.broadcast_to(a, (NUM_DEVICES, *a.shape))
  got = step(jax.tree.map(replicate, params), shard(images), shard(labels))
  for device in (0, 3):
    chex.assert_trees_all_close(jax.tree.map(lambda a, d=device: a[d], got), want, rtol=2e-5,
                                atol=1e-6)


def _per_example_loss(params, images, labels):
  h = adder_conv(images, params["conv"], strides=2)
  logits = adder_dense(jnp.mean(jax.nn.relu(h + 20.0), axis=(1, 2)), params["dense"]) / 10
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)[:, 0]

"""adder_conv's implementation objects: a backend added through the registry; xla.integer_forward.

`ToyAdderConv` is what adding a backend takes: one object with
``unsupported_reason``, ``forward``, ``input_grad`` and ``weight_grad`` (a new
module in adderjax.ops), and one line in `adderjax.ops.dispatch.IMPLEMENTATIONS`
(here the same mapping with that line added, patched in for the test).
"""

import dataclasses
import types

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax.ops import adder_conv, dispatch, xla
from adderjax.ops.spec import conv_spec


@dataclasses.dataclass(frozen=True)
class ToyAdderConv:
  """The forward from `lax.conv_general_dilated_patches`, the gradients from the XLA loops."""

  def unsupported_reason(self, x, w, spec):
    return None if spec.groups == 1 else "runs ungrouped layers only. Use implementation='xla'."

  def forward(self, x, w, spec):
    kh, kw, c, out = w.shape
    patches = lax.conv_general_dilated_patches(
        x, (kh, kw), spec.strides, spec.padding, rhs_dilation=spec.dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    filters = w.transpose(2, 0, 1, 3).reshape(c * kh * kw, out)  # the patches' (C, kh, kw) order
    return -jnp.sum(jnp.abs(patches[..., :, None] - filters), axis=-2)

  def input_grad(self, x, w, g, spec, grad_mode):
    return xla.input_grad(x, w, g, spec, grad_mode)

  def weight_grad(self, x, w, g, spec, grad_mode):
    return xla.weight_grad(x, w, g, spec, grad_mode)


@pytest.fixture
def toy(monkeypatch):
  monkeypatch.setattr(dispatch, "IMPLEMENTATIONS", types.MappingProxyType({
      **dispatch.IMPLEMENTATIONS,
      "toy": ToyAdderConv(),
  }))


def _operands(groups=1):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 7, 6, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 2, 4 // groups, 6)), jnp.float32)
  return x, w


def _uses_patches(implementation, **kwargs):
  x, w = _operands(kwargs.get("feature_group_count", 1))
  jaxpr = jax.make_jaxpr(lambda x, w: adder_conv(x, w, implementation=implementation, **kwargs))
  return "conv_general_dilated" in str(jaxpr(x, w))


def test_a_registered_backend_runs_by_name_with_its_gradients(toy):
  x, w = _operands()
  c = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 6, 6)), jnp.float32)
  loss = lambda x, w, impl: jnp.sum(c * adder_conv(x, w, strides=(2, 1), padding="SAME",
                                                   rhs_dilation=(1, 2), implementation=impl))
  got = jax.jit(jax.value_and_grad(lambda x, w: loss(x, w, "toy"), (0, 1)))(x, w)
  want = jax.jit(jax.value_and_grad(lambda x, w: loss(x, w, "xla"), (0, 1)))(x, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert _uses_patches("toy") and not _uses_patches("xla")
  with pytest.raises(ValueError, match=r"one of \('xla', .*'pallas_interpret', 'toy'\)"):
    adder_conv(x, w, implementation="toy2")


def test_a_backend_that_cannot_run_a_layer_says_why(toy):
  x, w = _operands(groups=2)
  with pytest.raises(ValueError, match=r"^implementation='toy' runs ungrouped layers only\. Use"):
    adder_conv(x, w, feature_group_count=2, implementation="toy")


def test_the_default_order_skips_a_backend_that_cannot_run_the_layer(toy, monkeypatch):
  monkeypatch.setattr(dispatch, "DEFAULT_ORDER",
                      types.MappingProxyType({jax.default_backend(): ("toy", "xla")}))
  assert _uses_patches(None)
  assert not _uses_patches(None, feature_group_count=2)


def test_an_unregistered_implementation_object_runs_too():
  x, w = _operands()
  np.testing.assert_allclose(adder_conv(x, w, implementation=ToyAdderConv()),
                             adder_conv(x, w, implementation="xla"), rtol=1e-6)


def test_the_registry_is_read_only():
  with pytest.raises(TypeError):
    dispatch.IMPLEMENTATIONS["toy"] = ToyAdderConv()
  assert tuple(dispatch.IMPLEMENTATIONS) == ("xla", "cpu", "reference", "pallas",
                                             "pallas_interpret")
  assert all(order[-1] == "xla" for order in dispatch.DEFAULT_ORDER.values())


# The integer entry of the XLA loops.


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int16, jnp.int32])
def test_integer_forward_is_the_exact_float_forward(dtype):
  rng = np.random.default_rng(1)
  x = rng.integers(-100, 100, size=(2, 6, 5, 3))
  w = rng.integers(-100, 100, size=(3, 3, 3, 4))
  spec = conv_spec(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), strides=(1, 2),
                   padding="SAME", rhs_dilation=1, feature_group_count=1)
  got = xla.integer_forward(jnp.asarray(x, dtype), jnp.asarray(w, dtype), spec)
  assert got.dtype == jnp.int32
  # At most 27 terms below 200 each: float32 sums them exactly too.
  want = xla.forward(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), spec)
  np.testing.assert_array_equal(got, np.asarray(want).astype(np.int32))


def test_integer_forward_rejects_floats():
  spec = conv_spec(jnp.ones((1, 3, 3, 1)), jnp.ones((1, 1, 1, 1)), strides=1, padding="VALID",
                   rhs_dilation=1, feature_group_count=1)
  with pytest.raises(TypeError, match="w must have an integer dtype"):
    xla.integer_forward(jnp.ones((1, 3, 3, 1), jnp.int32), jnp.ones((1, 1, 1, 1)), spec)

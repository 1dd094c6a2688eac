"""adder_conv and adder_dense with an exponent p: the oracle, the routing, traced p, bad p."""

import warnings

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from adderjax.ops import adder_conv, adder_dense, cpu_native
from tests.ops.loop_reference import adder_conv_and_grads

P_VALUES = (1.0, 1.3, 1.7, 2.0)
NATIVE = jax.default_backend() == "cpu" and cpu_native.available()

# (x shape, w shape, strides, explicit padding, dilation, groups)
CASES = [
    ((2, 7, 6, 4), (3, 3, 2, 6), (2, 1), ((1, 1), (0, 2)), (1, 1), 2),
    ((1, 6, 7, 9), (2, 2, 9, 3), (1, 1), ((1, 1), (1, 0)), (2, 1), 1),  # 2 chunks, stride 1
]


def _inputs(x_shape, w_shape, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=x_shape).astype(np.float32),
          (0.7 * rng.normal(size=w_shape)).astype(np.float32), rng)


def _assert_matches_oracle(got, want, message):
  for name, a, b in zip(("y", "dx", "dw"), got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * (np.abs(b).max() + 1e-6),
                               err_msg=f"{name}, {message}")


@pytest.mark.parametrize("implementation", [None, "reference"])
@pytest.mark.parametrize("case", CASES, ids=["groups-strided", "dilated"])
def test_forward_and_gradients_match_the_oracle_at_each_p(case, implementation):
  """A traced p: one compilation for the four values; at p = 1, grad_mode's rule."""
  x_shape, w_shape, strides, padding, dilation, groups = case
  x, w, rng = _inputs(x_shape, w_shape)
  options = dict(strides=strides, padding=padding, rhs_dilation=dilation,
                 feature_group_count=groups, implementation=implementation)
  oracle_options = dict(strides=strides, padding=padding, dilation=dilation, groups=groups)
  out_shape = (x_shape[0], *_out_hw(x_shape, w_shape, strides, padding, dilation), w_shape[3])
  traced = jax.jit(lambda x, w, p, g: _value_and_vjp(
      lambda x, w: adder_conv(x, w, p=p, **options), x, w, g))
  for p in P_VALUES:
    g = rng.normal(size=out_shape).astype(np.float32)
    want = adder_conv_and_grads(x, w, g, grad_mode="full_precision", p=p, **oracle_options)
    _assert_matches_oracle(traced(x, w, jnp.float32(p), g), want, f"traced p={p}")


@pytest.mark.parametrize("p", [1.3, 2.0])
def test_a_known_p_matches_the_oracle_whatever_the_grad_mode(p):
  """A known p compiles only its formulation; at p > 1 every grad_mode is the exact gradient."""
  x_shape, w_shape, strides, padding, dilation, groups = CASES[0]
  x, w, rng = _inputs(x_shape, w_shape, seed=3)
  g = rng.normal(size=(x_shape[0], *_out_hw(x_shape, w_shape, strides, padding, dilation),
                       w_shape[3])).astype(np.float32)
  want = adder_conv_and_grads(x, w, g, grad_mode="sign", p=p, strides=strides, padding=padding,
                              dilation=dilation, groups=groups)
  for grad_mode in ("sign", "unclipped"):
    got = jax.jit(lambda x, w, g, m=grad_mode: _value_and_vjp(
        lambda x, w: adder_conv(x, w, p=p, grad_mode=m, strides=strides, padding=padding,
                                rhs_dilation=dilation, feature_group_count=groups), x, w, g))
    _assert_matches_oracle(got(x, w, g), want, f"p={p}, {grad_mode}")


def _value_and_vjp(fn, x, w, g):
  y, vjp = jax.vjp(fn, x, w)
  return (y, *vjp(g))


def _out_hw(x_shape, w_shape, strides, padding, dilation):
  return tuple((x_shape[1 + a] + sum(padding[a]) - (w_shape[a] - 1) * dilation[a] - 1)
               // strides[a] + 1 for a in range(2))


def test_adder_dense_matches_the_oracle():
  x, w, rng = _inputs((2, 3, 21), (21, 4), seed=1)
  g = rng.normal(size=(2, 3, 4)).astype(np.float32)
  for p in (1.5, 2.0):
    got = jax.jit(lambda x, w, g, p=p: _value_and_vjp(
        lambda x, w: adder_dense(x, w, p=p), x, w, g))(x, w, g)
    y, dx, dw = adder_conv_and_grads(x.reshape(6, 1, 1, 21), w[None, None],
                                     g.reshape(6, 1, 1, 4), strides=(1, 1),
                                     padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1,
                                     grad_mode="full_precision", p=p)
    _assert_matches_oracle(got, (y.reshape(2, 3, 4), dx.reshape(x.shape), dw[0, 0]), f"p={p}")


def test_the_gradient_is_exact_by_finite_differences():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, 4, 5, 2))
  w = rng.normal(size=(2, 3, 2, 2))
  with jax.enable_x64(True):
    fn = jax.jit(lambda x, w, p: adder_conv(x, w, strides=(1, 2), p=p))
    for p in (1.3, 2.0):
      check_grads(lambda x, w, p=p: fn(x, w, jnp.float64(p)), (jnp.asarray(x), jnp.asarray(w)),
                  order=1, modes=["rev"], eps=1e-4)


def test_changing_a_traced_p_does_not_recompile():
  x, w, _ = _inputs((1, 5, 5, 3), (3, 3, 3, 4))
  traces = []

  def loss(x, w, p):
    traces.append(p)
    return jnp.sum(adder_conv(x, w, p=p) ** 2)

  step = jax.jit(jax.value_and_grad(loss, (0, 1)))
  for p in (2.0, 1.6, 1.0, 1.2):
    value, _ = step(x, w, jnp.float32(p))
    y, _, _ = adder_conv_and_grads(x, w, None, strides=(1, 1), padding=((1, 1), (1, 1)),
                                   dilation=(1, 1), groups=1, grad_mode="sign", p=p)
    np.testing.assert_allclose(value, np.sum(y ** 2), rtol=1e-5)
  assert len(traces) == 1


def test_p_one_runs_the_l1_op_and_other_p_the_xla_formulations():
  x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 3))

  def text(p):
    loss = lambda x: adder_conv(x, w, p=p).sum()
    return jax.jit(jax.value_and_grad(loss)).lower(x).as_text()

  # None and a known 1 are the same program: the L1 op of every implementation.
  assert text(1) == text(None) == text(np.float32(1.0))
  if NATIVE:
    assert "adderjax_adder_forward" in text(None)
    assert "adderjax_adder_forward" not in text(1.5)
  # 2: convolutions and no loop; other p: the loops.
  assert "convolution" in text(2.0) and "while" not in text(2.0)
  assert "while" in text(1.5)
  # Traced: all three, chosen at run time.
  traced = jax.jit(jax.value_and_grad(lambda x, p: adder_conv(x, w, p=p).sum())).lower(
      x, jnp.float32(1.5)).as_text()
  assert "case" in traced and "convolution" in traced and "while" in traced
  if NATIVE:
    assert "adderjax_adder_forward" in traced


def test_a_traced_p_of_one_gives_the_paper_rules_and_of_two_twice_full_precision():
  x = jnp.asarray([[[[0.0]]]])
  w = jnp.asarray([[[[3.0]]]])
  grad = jax.jit(jax.grad(lambda x, w, p: adder_conv(x, w, p=p, padding="VALID").sum(), (0, 1)))
  dx, dw = grad(x, w, jnp.float32(1.0))
  assert (float(dx.squeeze()), float(dw.squeeze())) == (1.0, -3.0)  # HardTanh(3), X - F
  dx, dw = grad(x, w, jnp.float32(2.0))
  assert (float(dx.squeeze()), float(dw.squeeze())) == (6.0, -6.0)  # 2 (F - X), 2 (X - F)
  dx, dw = grad(x, w, jnp.float32(1.5))
  np.testing.assert_allclose([dx.squeeze(), dw.squeeze()], [1.5 * 3 ** 0.5, -1.5 * 3 ** 0.5],
                             rtol=1e-6)


def test_p_gets_no_gradient_and_other_p_fall_back_without_a_warning():
  x, w, _ = _inputs((1, 3, 3, 2), (2, 2, 2, 2))
  implementation = "cpu" if NATIVE else None
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    grad = jax.grad(lambda p: adder_conv(x, w, p=p, implementation=implementation).sum())
    assert float(grad(1.5)) == 0.0
    adder_conv(x, w, p=1.5, implementation=implementation)


def test_vmap_over_p():
  x, w, _ = _inputs((1, 3, 3, 2), (2, 2, 2, 2))
  ys = jax.jit(jax.vmap(lambda p: adder_conv(x, w, p=p)))(jnp.asarray([1.0, 1.5, 2.0]))
  for k, p in enumerate((1.0, 1.5, 2.0)):
    y, _, _ = adder_conv_and_grads(x, w, None, strides=(1, 1), padding=((0, 1), (0, 1)),
                                   dilation=(1, 1), groups=1, grad_mode="sign", p=p)
    np.testing.assert_allclose(ys[k], y, rtol=1e-5)


def test_half_precision_inputs_keep_their_dtypes():
  x, w, _ = _inputs((1, 3, 3, 2), (2, 2, 2, 2))
  x, w = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  y, dx, dw = jax.jit(lambda x, w: _value_and_vjp(
      lambda x, w: adder_conv(x, w, p=1.5), x, w, jnp.ones((1, 3, 3, 2))))(x, w)
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.float32, jnp.bfloat16, jnp.bfloat16)
  empty = adder_conv(jnp.ones((0, 4, 4, 3)), jnp.ones((3, 3, 3, 2)), p=1.5)
  assert empty.shape == (0, 4, 4, 2)


@pytest.mark.parametrize("p, error, match", [
    (0.5, ValueError, r"p must be in \[1, 2\], got p=0.5"),
    (3, ValueError, r"p must be in \[1, 2\], got p=3.0"),
    (np.float32(np.nan), ValueError, "p must be in"),
    (jnp.asarray([1.5, 2.0]), ValueError, r"p must be a scalar \(shape \(\)\), got p with shape"),
    (True, TypeError, "p must be a real number"),
    ("2", TypeError, "p must be a real number"),
    (jnp.asarray(1 + 1j), TypeError, "p must have a floating-point or integer dtype"),
])
def test_bad_p_is_named(p, error, match):
  with pytest.raises(error, match=match):
    adder_conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), p=p)
  with pytest.raises(error, match=match):
    adder_dense(jnp.ones((2, 3)), jnp.ones((3, 4)), p=p)

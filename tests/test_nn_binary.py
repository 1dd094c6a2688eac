"""Tests for the BNN baseline: adderjax.ops.sign_ste and adderjax.nn.BinaryConv / BinaryDense."""

import functools

from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax.nn import BinaryConv, BinaryDense
from adderjax.ops import sign_ste
from adderjax.optim import adder_kernel_mask
from tests._util import normal_np, np_init, np_init_layer

_np_init = functools.partial(np_init, seed=1)


def _sign(x):
  """sign with sign(0) = +1, in NumPy."""
  return np.where(np.asarray(x) >= 0, 1.0, -1.0).astype(np.float32)


# sign_ste


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_sign_ste_forward(dtype):
  x = jnp.asarray([-np.inf, -2.0, -1.0, -1e-3, -0.0, 0.0, 1e-3, 0.5, 1.0, 3.0, np.inf], dtype)
  y = sign_ste(x)
  assert y.dtype == dtype
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                [-1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1])


def test_sign_ste_straight_through_gradient():
  x = jnp.asarray([-3.0, -1.0001, -1.0, -0.3, 0.0, 0.7, 1.0, 1.0001, 5.0])
  g = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
  _, vjp = jax.vjp(sign_ste, x)
  np.testing.assert_array_equal(vjp(g)[0], [0, 0, 3, 4, 5, 6, 7, 0, 0])
  grad = jax.jit(jax.grad(lambda x: jnp.sum(sign_ste(x) * g)))(x)
  np.testing.assert_array_equal(grad, [0, 0, 3, 4, 5, 6, 7, 0, 0])


def test_sign_ste_gradient_keeps_dtype_and_vmaps():
  x = jnp.asarray([[-0.5, 2.0], [0.0, -1.5]], jnp.bfloat16)
  grad = jax.grad(lambda x: jnp.sum(sign_ste(x)).astype(jnp.float32))(x)
  assert grad.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(grad, np.float32), [[1, 0], [1, 0]])
  np.testing.assert_array_equal(jax.vmap(sign_ste)(x), sign_ste(x))


@pytest.mark.parametrize("x", [jnp.arange(3), [0.5, -0.5], 1.0])
def test_sign_ste_rejects_non_float_arrays(x):
  with pytest.raises(TypeError, match="x must be a floating-point array"):
    sign_ste(x)


# BinaryConv


_conv = functools.partial(np_init_layer, BinaryConv, seed=1)


def _reference_conv(x, w, strides, padding, dilation, groups):
  """lax.conv on the NumPy-binarised operands: the binary convolution written out."""
  return lax.conv_general_dilated(
      jnp.asarray(_sign(x)), jnp.asarray(_sign(w)), window_strides=strides, padding=padding,
      rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)


CONV_CASES = [
    # options, lax padding
    (dict(), "SAME"),
    (dict(strides=2, padding="VALID"), "VALID"),
    (dict(padding=1, kernel_dilation=2, feature_group_count=2), ((1, 1), (1, 1))),
    (dict(strides=(1, 2), padding=((0, 1), (2, 0))), ((0, 1), (2, 0))),
]


@pytest.mark.parametrize("options, padding", CONV_CASES)
def test_binary_conv_matches_reference(options, padding):
  layer = _conv(4, 6, (3, 2), **options)
  x = normal_np((2, 7, 6, 4), seed=2)
  x[0, 0, 0, :2] = 0.0  # sign(0) = +1
  want = _reference_conv(x, layer.kernel[...], layer.strides, padding, layer.kernel_dilation,
                         layer.feature_group_count)
  got = layer(jnp.asarray(x))
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, want)
  # Sums of +-1 over at most kh * kw * (in_features / groups) terms, zero padding adding 0.
  assert np.all(got == np.round(got))
  assert np.abs(got).max() <= 3 * 2 * 4 // layer.feature_group_count


def test_binary_conv_straight_through_gradients():
  layer = _conv(3, 5, 3, strides=2)
  x = 1.5 * normal_np((2, 6, 6, 3), seed=3)
  w = np.asarray(layer.kernel[...])
  g = normal_np((2, 3, 3, 5), seed=4)

  def conv(xs, ws):
    return lax.conv_general_dilated(xs, ws, (2, 2), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  _, conv_vjp = jax.vjp(conv, jnp.asarray(_sign(x)), jnp.asarray(_sign(w)))
  dx_signed, dw_signed = conv_vjp(jnp.asarray(g))
  want_dx = np.asarray(dx_signed) * (np.abs(x) <= 1)
  want_dw = np.asarray(dw_signed) * (np.abs(w) <= 1)

  def loss(layer, x):
    return jnp.sum(layer(x) * g)

  dlayer, dx = nnx.grad(loss, argnums=(0, 1))(layer, jnp.asarray(x))
  assert 0 < np.mean(np.abs(x) <= 1) < 1  # both sides of the window are exercised
  np.testing.assert_allclose(dx, want_dx, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dlayer.kernel[...], want_dw, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("options", [
    dict(), dict(padding="VALID", strides=2), dict(padding="CIRCULAR", strides=2),
    dict(padding="REFLECT"), dict(padding=((0, 1), (2, 3)))])
def test_binary_conv_output_shape_matches_nnx_conv(options):
  x = jnp.zeros((2, 9, 8, 3))
  layer = _conv(3, 5, 3, **options)
  conv = nnx.Conv(3, 5, (3, 3), kernel_init=_np_init, rngs=nnx.Rngs(0), **options)
  assert jax.eval_shape(layer, x).shape == jax.eval_shape(conv, x).shape


def test_binary_conv_circular_padding_pads_the_input():
  layer = _conv(2, 3, 3, padding="CIRCULAR")
  x = normal_np((1, 5, 4, 2), seed=5)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")
  want = _reference_conv(padded, layer.kernel[...], (1, 1), "VALID", (1, 1), 1)
  np.testing.assert_array_equal(layer(jnp.asarray(x)), want)


def test_binary_conv_batch_dims_bias_and_dtype():
  layer = _conv(3, 4, 3, use_bias=True, bias_init=lambda k, s, d: jnp.full(s, 0.5, d))
  x = jnp.asarray(normal_np((2, 3, 5, 5, 3), seed=6))
  flat = layer(x.reshape(6, 5, 5, 3))
  y = layer(x)
  assert y.shape == (2, 3, 5, 5, 4)
  np.testing.assert_array_equal(y, flat.reshape(y.shape))
  np.testing.assert_array_equal(layer(x[0, 0]), flat[0])
  np.testing.assert_array_equal(flat - 0.5, np.round(flat - 0.5))
  half = _conv(3, 4, 3, dtype=jnp.bfloat16)
  assert half(x).dtype == jnp.bfloat16


def test_binary_conv_parameters():
  layer = BinaryConv(6, 8, (3, 1), feature_group_count=2, rngs=nnx.Rngs(0))
  assert type(layer.kernel) is nnx.Param  # trained by plain SGD, not the adaptive rate
  assert layer.kernel.shape == (3, 1, 3, 8)
  assert layer.bias is None
  assert not any(jax.tree.leaves(adder_kernel_mask(nnx.state(layer, nnx.Param))))
  # LeCun normal: the kernel starts inside the straight-through window.
  assert np.abs(layer.kernel[...]).max() < 1.5


@pytest.mark.parametrize("args, options, match", [
    ((0, 4, 3), {}, "in_features must be a positive int, got in_features=0"),
    ((4, 4, 0), {}, "kernel_size must be positive"),
    ((4, 6, 3), dict(feature_group_count=4), "out_features=6 is not divisible by"),
    ((4, 4, 3), dict(padding="FULL"), "padding must be one of"),
    ((4, 4, 3), dict(strides=(1, 2, 3)), "strides must be an int or a pair"),
])
def test_binary_conv_bad_arguments(args, options, match):
  with pytest.raises(ValueError, match=match):
    _conv(*args, **options)


def test_binary_conv_bad_input():
  with pytest.raises(ValueError, match=r"inputs must have shape \(\*batch, height, width, 3\)"):
    _conv(3, 4, 3)(jnp.zeros((2, 5, 5, 4)))


# BinaryDense


def test_binary_dense_matches_numpy_and_straight_through_gradients():
  layer = BinaryDense(5, 3, kernel_init=_np_init, rngs=nnx.Rngs(0))
  x = 1.5 * normal_np((2, 4, 5), seed=7)
  x[0, 0, 0] = 0.0
  w = np.asarray(layer.kernel[...])
  got = layer(jnp.asarray(x))
  np.testing.assert_array_equal(got, _sign(x) @ _sign(w))

  g = normal_np((2, 4, 3), seed=8)
  dlayer, dx = nnx.grad(lambda layer, x: jnp.sum(layer(x) * g), argnums=(0, 1))(
      layer, jnp.asarray(x))
  np.testing.assert_allclose(dx, (g @ _sign(w).T) * (np.abs(x) <= 1), rtol=1e-6)
  want_dw = np.einsum("bsk,bsn->kn", _sign(x), g) * (np.abs(w) <= 1)
  np.testing.assert_allclose(dlayer.kernel[...], want_dw, rtol=1e-5, atol=1e-6)


def test_binary_dense_parameters_and_errors():
  layer = BinaryDense(4, 2, use_bias=True, rngs=nnx.Rngs(0))
  assert type(layer.kernel) is nnx.Param and layer.kernel.shape == (4, 2)
  assert layer.bias.shape == (2,)
  with pytest.raises(ValueError, match="out_features must be a positive int"):
    BinaryDense(4, -1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"inputs must have shape \(\.\.\., 4\)"):
    layer(jnp.zeros((2, 3)))


# The layers are nnx.Conv / nnx.Linear whose hook binarises: the same outputs
# and gradients as those layers on binarised operands, with the estimator's
# window on the gradients.


@pytest.mark.parametrize("options", [
    dict(), dict(strides=2, padding="VALID"), dict(padding="CIRCULAR", kernel_dilation=2),
    dict(padding="REFLECT", feature_group_count=2, use_bias=True),
    dict(padding=((0, 1), (2, 0)), strides=(1, 2))])
def test_binary_conv_is_nnx_conv_on_binarised_operands(options):
  layer = _conv(4, 6, (3, 2), **options)
  assert isinstance(layer, nnx.Conv)
  conv = nnx.Conv(4, 6, (3, 2), kernel_init=_np_init, rngs=nnx.Rngs(0),
                  **(dict(use_bias=False) | options))
  w = np.asarray(layer.kernel[...])
  conv.kernel[...] = jnp.asarray(_sign(w))
  if layer.bias is not None:
    layer.bias[...] = conv.bias[...] = jnp.full((6,), 0.25)
  x = 1.5 * normal_np((2, 7, 6, 4), seed=9)
  g = normal_np(jax.eval_shape(layer, jnp.asarray(x)).shape, seed=10)
  y, (dlayer, dx) = nnx.value_and_grad(lambda m, x: jnp.sum(m(x) * g), argnums=(0, 1))(
      layer, jnp.asarray(x))
  want_y, (dconv, dx_signed) = nnx.value_and_grad(lambda m, x: jnp.sum(m(x) * g),
                                                  argnums=(0, 1))(conv, jnp.asarray(_sign(x)))
  np.testing.assert_array_equal(y, want_y)
  np.testing.assert_allclose(dx, dx_signed * (np.abs(x) <= 1), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dlayer.kernel[...], dconv.kernel[...] * (np.abs(w) <= 1),
                             rtol=1e-6, atol=1e-6)


def test_binary_dense_is_nnx_linear_on_binarised_operands():
  layer = BinaryDense(5, 3, use_bias=True, kernel_init=_np_init, rngs=nnx.Rngs(0))
  assert isinstance(layer, nnx.Linear)
  linear = nnx.Linear(5, 3, kernel_init=_np_init, rngs=nnx.Rngs(0))
  w = np.asarray(layer.kernel[...])
  linear.kernel[...] = jnp.asarray(_sign(w))
  layer.bias[...] = linear.bias[...] = jnp.full((3,), -0.5)
  x = 1.5 * normal_np((4, 5), seed=11)
  np.testing.assert_array_equal(layer(jnp.asarray(x)), linear(jnp.asarray(_sign(x))))

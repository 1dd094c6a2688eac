"""Tests for the Flax NNX adder layers in adderjax.nn."""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adderjax.nn import (
  AdderConv,
  AdderDense,
  AdderExponent,
  AdderKernel,
  float32_statistics,
  set_exponent,
)
from adderjax.ops import adder_conv, adder_dense
from adderjax.optim import addernet_sgd
from tests._util import chex_variants, normal, np_init, np_init_layer
from tests.ops.loop_reference import adder_conv_and_grads

_conv = functools.partial(np_init_layer, AdderConv)
_dense = functools.partial(np_init_layer, AdderDense)


# AdderConv: values and shapes


@pytest.mark.parametrize(
    "options, op_padding",
    [
        (dict(), "SAME"),
        (dict(padding="same_lower", strides=(2, 1), feature_group_count=2), "SAME_LOWER"),
        (dict(padding=1, kernel_dilation=2), ((1, 1), (1, 1))),
        (dict(padding=[(0, 1), 2], strides=(1, 2)), ((0, 1), (2, 2))),
    ],
)
def test_conv_matches_op_on_own_kernel(options, op_padding):
  layer = _conv(4, 6, (3, 2), **options)
  x = normal((2, 7, 6, 4))
  want = adder_conv(
      x,
      layer.kernel[...],
      strides=options.get("strides", 1),
      padding=op_padding,
      rhs_dilation=options.get("kernel_dilation", 1),
      feature_group_count=options.get("feature_group_count", 1),
  )
  got = layer(x)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(padding="VALID", strides=2),
        dict(padding="SAME_LOWER", strides=(1, 2)),
        dict(padding="CIRCULAR", strides=2),
        dict(padding="REFLECT", kernel_dilation=2),
        dict(padding=1, strides=(2, 3)),
        dict(padding=((0, 1), (2, 3))),
    ],
)
def test_conv_output_shape_matches_nnx_conv(options):
  x = jnp.zeros((2, 9, 8, 3))
  layer = _conv(3, 5, 3, **options)
  conv = nnx.Conv(3, 5, (3, 3), kernel_init=np_init, rngs=nnx.Rngs(0), **options)
  assert jax.eval_shape(layer, x).shape == jax.eval_shape(conv, x).shape


@pytest.mark.parametrize(
    "mode, np_mode, strides, out_hw",
    [("CIRCULAR", "wrap", (1, 2), (6, 4)), ("REFLECT", "reflect", 1, (6, 7))],
)
def test_conv_circular_and_reflect_pad_the_input(mode, np_mode, strides, out_hw):
  layer = _conv(2, 3, (3, 4), strides=strides, padding=mode)
  x = normal((1, 6, 7, 2))
  # A (3, 4) kernel takes (1, 1) rows and (1, 2) columns, as nnx.Conv pads.
  padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 2), (0, 0)), mode=np_mode)
  want = adder_conv(jnp.asarray(padded), layer.kernel[...], strides=strides, padding="VALID")
  got = layer(x)
  assert got.shape == (1, *out_hw, 3)  # as with "SAME"
  np.testing.assert_array_equal(got, want)


def test_conv_matches_numpy():
  layer = _conv(2, 3, 2, padding="VALID")
  x = np.random.default_rng(1).normal(size=(1, 3, 4, 2)).astype(np.float32)
  w = np.asarray(layer.kernel[...])
  want = np.zeros((1, 2, 3, 3))
  for h in range(2):
    for v in range(3):
      patch = x[0, h:h + 2, v:v + 2, :, None]
      want[0, h, v] = -np.abs(patch - w).sum((0, 1, 2))
  np.testing.assert_allclose(layer(jnp.asarray(x)), want, rtol=1e-6)


@chex_variants(with_jit=True, without_jit=True)
def test_conv_leading_batch_dims_and_unbatched_input(variant):
  layer = variant(_conv(3, 4, 3, strides=2))
  x = normal((2, 3, 6, 6, 3))
  flat = layer(x.reshape(6, 6, 6, 3))
  y = layer(x)
  assert y.shape == (2, 3, 3, 3, 4)
  np.testing.assert_array_equal(y, flat.reshape(y.shape))
  single = layer(x[0, 0])
  assert single.shape == (3, 3, 4)
  np.testing.assert_array_equal(single, flat[0])


def test_conv_bias_is_an_ordinary_param_added_to_the_output():
  layer = _conv(2, 3, 3, use_bias=True)
  assert type(layer.bias) is nnx.Param
  np.testing.assert_array_equal(layer.bias[...], jnp.zeros(3))
  layer.bias[...] = jnp.array([1.0, -2.0, 3.0])
  x = normal((1, 4, 4, 2))
  want = adder_conv(x, layer.kernel[...]) + jnp.array([1.0, -2.0, 3.0])
  np.testing.assert_allclose(layer(x), want, rtol=1e-6)
  assert _conv(2, 3, 3).bias is None


def test_conv_feature_groups_kernel_shape():
  layer = _conv(6, 4, (3, 1), feature_group_count=2)
  assert layer.kernel.shape == (3, 1, 3, 4)
  assert layer(jnp.zeros((1, 5, 5, 6))).shape == (1, 5, 5, 4)


def test_conv_dtypes():
  x = normal((1, 5, 5, 2))
  bf16 = _conv(2, 3, 3, dtype=jnp.bfloat16, use_bias=True, bias_init=nnx.initializers.ones)
  assert bf16.kernel.dtype == jnp.float32
  # The input is rounded to the compute dtype, the kernel and the output are not.
  y = bf16(x)
  assert y.dtype == jnp.float32
  kernel = bf16.kernel[...] * 1000.0
  bf16.kernel[...] = kernel
  want = adder_conv(x.astype(jnp.bfloat16), kernel) + 1.0
  np.testing.assert_array_equal(bf16(x), want)
  assert not np.array_equal(want, adder_conv(x.astype(jnp.bfloat16),
                                             kernel.astype(jnp.bfloat16)) + 1.0)
  half_params = _conv(2, 3, 3, param_dtype=jnp.bfloat16, use_bias=True)
  assert half_params.kernel.dtype == jnp.bfloat16
  assert half_params.bias.dtype == jnp.bfloat16
  assert half_params(x).dtype == jnp.float32
  assert half_params(x.astype(jnp.bfloat16)).dtype == jnp.float32


def test_conv_input_with_wrong_channels_raises():
  layer = _conv(3, 4, 3)
  with pytest.raises(ValueError, match="in_features=3"):
    layer(jnp.zeros((1, 5, 5, 2)))
  with pytest.raises(ValueError, match="shape"):
    layer(jnp.zeros((5, 3)))


# AdderDense


@chex_variants(with_jit=True, without_jit=True)
def test_dense_matches_numpy_and_op(variant):
  layer = _dense(3, 2)
  assert layer.kernel.shape == (3, 2)
  x = np.array([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]], np.float32)
  w = np.asarray(layer.kernel[...])
  want = -np.abs(x[:, :, None] - w[None]).sum(1)
  got = variant(layer)(jnp.asarray(x))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_array_equal(got, adder_dense(jnp.asarray(x), layer.kernel[...]))


def test_dense_shapes_bias_and_dtypes():
  layer = _dense(4, 3, use_bias=True, bias_init=nnx.initializers.ones)
  assert type(layer.bias) is nnx.Param
  x = normal((2, 5, 4))
  y = layer(x)
  assert y.shape == (2, 5, 3)
  np.testing.assert_allclose(y, adder_dense(x, layer.kernel[...]) + 1.0, rtol=1e-6)
  assert layer(x[0, 0]).shape == (3,)
  bf16 = _dense(4, 3, dtype=jnp.bfloat16)
  assert bf16(x).dtype == jnp.float32
  np.testing.assert_array_equal(bf16(x), adder_dense(x.astype(jnp.bfloat16), bf16.kernel[...]))
  half = _dense(4, 3, param_dtype=jnp.bfloat16)
  assert half.kernel.dtype == jnp.bfloat16
  assert half(x).dtype == jnp.float32
  assert _dense(4, 3).bias is None


# Kernels and initialization


class _Mixed(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.conv = AdderConv(1, 4, 3, use_bias=True, kernel_init=np_init, rngs=rngs)
    self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
    self.fc = AdderDense(4, 3, use_bias=True, kernel_init=np_init, rngs=rngs)
    self.head = nnx.Linear(3, 2, rngs=rngs)


def test_state_filter_finds_exactly_the_adder_kernels():
  model = _Mixed(nnx.Rngs(0))
  assert isinstance(model.conv.kernel, AdderKernel)
  assert isinstance(model.fc.kernel, AdderKernel)
  flat = nnx.to_flat_state(nnx.state(model, AdderKernel))
  assert sorted(path for path, _ in flat) == [("conv", "kernel"), ("fc", "kernel")]
  assert all(type(v) is AdderKernel for _, v in flat)
  assert len(nnx.to_flat_state(nnx.state(model, nnx.Param))) == 8


@pytest.mark.parametrize(
    "layer",
    [
        lambda: AdderConv(64, 64, 3, rngs=nnx.Rngs(0)),
        lambda: AdderDense(256, 128, rngs=nnx.Rngs(0)),
    ],
)
def test_default_kernel_init_is_standardnormal(layer):
  kernel = np.asarray(layer().kernel[...])
  assert abs(kernel.mean()) < 0.02
  assert 0.97 < kernel.std() < 1.03


# Constructor checks


@pytest.mark.parametrize(
    "options, name",
    [
        (dict(in_features=0), "in_features"),
        (dict(out_features=-1), "out_features"),
        (dict(in_features=2.0), "in_features"),
        (dict(kernel_size=0), "kernel_size"),
        (dict(kernel_size=(3,)), "kernel_size"),
        (dict(kernel_size=(3, 3, 3)), "kernel_size"),
        (dict(strides=0), "strides"),
        (dict(kernel_dilation=(1, 0)), "kernel_dilation"),
        (dict(feature_group_count=0), "feature_group_count"),
        (dict(in_features=6, feature_group_count=4), "in_features"),
        (dict(out_features=3, feature_group_count=2), "out_features"),
        (dict(padding="FULL"), "padding"),
        (dict(padding="CAUSAL"), "padding"),
        (dict(padding=-1), "padding"),
        (dict(padding=(1, 2, 3)), "padding"),
        (dict(padding=((1, 2), (3,))), "padding"),
        (dict(grad_mode="exact"), "grad_mode"),
        (dict(implementation="cuda"), "implementation"),
        (dict(p=0.5), "p=0.5"),
        (dict(p=jnp.ones(2)), "p must be a scalar"),
    ],
)
def test_conv_bad_arguments_raise(options, name):
  args = dict(in_features=4, out_features=4, kernel_size=3) | options
  with pytest.raises(ValueError, match=name):
    AdderConv(**args, rngs=nnx.Rngs(0))


def test_options_after_strides_are_keyword_only():
  with pytest.raises(TypeError):
    AdderConv(4, 4, 3, 1, "SAME", rngs=nnx.Rngs(0))  # pylint: disable=too-many-function-args
  with pytest.raises(TypeError):
    AdderDense(4, 4, True, rngs=nnx.Rngs(0))  # pylint: disable=too-many-function-args


@pytest.mark.parametrize(
    "options, name",
    [
        (dict(in_features=0), "in_features"),
        (dict(out_features=True), "out_features"),
        (dict(grad_mode="exact"), "grad_mode"),
        (dict(implementation="cuda"), "implementation"),
        (dict(p=3), "p=3.0"),
    ],
)
def test_dense_bad_arguments_raise(options, name):
  args = dict(in_features=4, out_features=4) | options
  with pytest.raises(ValueError, match=name):
    AdderDense(**args, rngs=nnx.Rngs(0))


# The exponent p


@pytest.mark.parametrize("p", [1.3, 2.0])
def test_layers_with_p_match_the_oracle(p):
  conv = _conv(2, 3, 2, strides=(1, 2), padding="VALID", p=p)
  assert isinstance(conv.p, AdderExponent) and conv.p[...].dtype == jnp.float32
  x = np.random.default_rng(1).normal(size=(1, 4, 5, 2)).astype(np.float32)
  want, _, _ = adder_conv_and_grads(x, conv.kernel[...], None, strides=(1, 2),
                                    padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1,
                                    grad_mode="full_precision", p=p)
  np.testing.assert_allclose(conv(jnp.asarray(x)), want, rtol=1e-5)
  dense = _dense(5, 3, p=p)
  h = x.reshape(8, 5)
  want = -(np.abs(h[:, :, None] - np.asarray(dense.kernel[...])) ** p).sum(1)
  np.testing.assert_allclose(dense(jnp.asarray(h)), want, rtol=1e-5)


def test_without_p_there_is_no_exponent_variable():
  model = _Mixed(nnx.Rngs(0))
  assert model.conv.p is None and model.fc.p is None
  assert not nnx.to_flat_state(nnx.state(model, AdderExponent))


class _Tiny(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.conv = AdderConv(1, 2, 1, kernel_init=np_init, rngs=rngs)
    self.fc = AdderDense(2, 2, kernel_init=np_init, rngs=rngs)


def test_set_exponent_in_a_jitted_step_compiles_once():
  model = _Tiny(nnx.Rngs(0))
  assert set_exponent(model, 2.0) == 2  # Outside jit: adds the variables.
  paths = [path for path, _ in nnx.to_flat_state(nnx.state(model, AdderExponent))]
  assert sorted(paths) == [("conv", "p"), ("fc", "p")]
  optimizer = nnx.Optimizer(model, addernet_sgd(0.01), wrt=nnx.Param)
  traces = []

  @nnx.jit
  def step(model, optimizer, x, p):
    traces.append(1)
    set_exponent(model, p)

    def loss(model):
      return jnp.sum(model.fc(model.conv(x).mean((1, 2))) ** 2)

    optimizer.update(model, nnx.grad(loss)(model))
    return loss(model)

  x = normal((2, 3, 3, 1))
  for p in (2.0, 1.5, 1.0, 1.7):
    step(model, optimizer, x, jnp.float32(p))
    assert float(model.conv.p[...]) == float(model.fc.p[...]) == float(np.float32(p))
    assert model.conv.p[...].dtype == jnp.float32
  assert len(traces) == 1
  # The optimizer trains the kernels and leaves the exponents alone.
  assert not nnx.to_flat_state(nnx.state(optimizer.opt_state, AdderExponent))


def test_set_exponent_checks_p_and_needs_the_variables_under_jit():
  model = _Mixed(nnx.Rngs(0))
  for bad, match in ((0.9, r"p must be in \[1, 2\], got p=0.9"),
                     (jnp.ones(3), "p must be a scalar")):
    with pytest.raises(ValueError, match=match):
      set_exponent(model, bad)
  with pytest.raises(ValueError, match="conv was built without p"):
    nnx.jit(set_exponent)(model, jnp.float32(1.5))
  assert set_exponent(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), 1.5) == 0


# Training


_PATTERNS = np.zeros((4, 8, 8, 1), np.float32)
_PATTERNS[0, 3:5, :] = 1.0  # horizontal bar
_PATTERNS[1, :, 3:5] = 1.0  # vertical bar
_PATTERNS[2][np.eye(8, dtype=bool)] = 1.0  # diagonal
_PATTERNS[3, 2:6, 2:6] = 1.0  # square


def _patterns(n: int, seed: int) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, n)
  images = _PATTERNS[labels] + 0.3 * rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
  return jnp.asarray(images), jnp.asarray(labels)


class _TinyAdderNet(nnx.Module):

  def __init__(self, momentum: float, rngs: nnx.Rngs):
    self.conv = AdderConv(1, 8, 3, rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, momentum=momentum, rngs=rngs)
    self.fc = AdderDense(4 * 4 * 8, 4, rngs=rngs)
    self.bn2 = nnx.BatchNorm(4, momentum=momentum, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = nnx.relu(self.bn1(self.conv(x)))
    h = nnx.avg_pool(h, (2, 2), strides=(2, 2))
    return self.bn2(self.fc(h.reshape(h.shape[0], -1)))


@nnx.jit
def _train_step(model: _TinyAdderNet, optimizer: nnx.Optimizer, x: jax.Array,
                y: jax.Array) -> jax.Array:

  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def _accuracy(model: _TinyAdderNet, x: jax.Array, y: jax.Array) -> jax.Array:
  return (model(x).argmax(-1) == y).mean()


@pytest.mark.parametrize("momentum", [0.9, 0.99])
def test_tiny_adder_net_learns_and_needs_batchnorm_momentum_0_9(momentum):
  steps = 100
  model = _TinyAdderNet(momentum, nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, addernet_sgd(optax.cosine_decay_schedule(0.1, steps)), wrt=nnx.Param)
  losses = [float(_train_step(model, optimizer, *_patterns(64, 1000 + i))) for i in range(steps)]
  assert np.mean(losses[-10:]) < 0.1 * losses[0]

  x, y = _patterns(256, 1)
  train_mode_accuracy = float(_accuracy(model, x, y))
  model.eval()
  eval_accuracy = float(_accuracy(model, x, y))
  assert train_mode_accuracy > 0.9
  if momentum == 0.9:
    assert eval_accuracy > 0.9
  else:
    # The running means still lag far behind the distances' large mean.
    assert eval_accuracy < 0.5


# Mixed precision: BatchNorm after an adder layer


@pytest.mark.parametrize("use_running_average", [False, True])
def test_float32_statistics_keeps_the_signal_on_a_large_offset(use_running_average):
  # A trained adder layer's output: an offset near -sum|w| (here -2,000) and a
  # spread of a few units, which bfloat16 (spacing 16 at 2,000) rounds away.
  rng = np.random.default_rng(0)
  y = jnp.asarray(-2000.0 + 2.0 * rng.normal(size=(64, 4)), jnp.float32)

  def normalise(**options):
    bn = nnx.BatchNorm(4, momentum=0.9, use_running_average=use_running_average,
                       rngs=nnx.Rngs(0), **options)
    bn.mean[...] = jnp.full((4,), -2000.0)
    bn.var[...] = jnp.full((4,), 4.0)
    return bn(y), bn

  want, _ = normalise()
  got, bn = normalise(dtype=jnp.bfloat16, promote_dtype=float32_statistics)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=2e-2)
  assert bn.mean.dtype == jnp.float32
  plain, _ = normalise(dtype=jnp.bfloat16)  # Flax's own promotion: the signal is gone.
  assert np.abs(np.asarray(plain, np.float32) - want).max() > 0.5

"""adderjax.ops.adder_batch_norm: the adder forward's statistics, and the fused op's numbers.

The native forward with statistics (`cpu_native.forward_with_statistics`)
against the same kernel's output summed in float64 NumPy; the fused op's
output against the float64 BatchNorm oracle of tests/ops/test_batch_norm.py,
and its gradients against the unfused composition (`adder_conv`, then
`batch_norm_act`) and the oracle's BatchNorm gradients; the kernels that read
their input through a BatchNorm and ReLU (``input_norm``) against the same
kernels on that input written out, bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax.ops import adder_conv, cpu_native, native_build
from adderjax.ops.adder_batch_norm import (
  InputNorm,
  adder_conv_batch_norm_act,
  adder_conv_with_statistics,
  apply_input_norm,
  fused_unsupported_reason,
)
from adderjax.ops.batch_norm import apply_batch_statistics, batch_norm_act, batch_statistics
from adderjax.ops.spec import conv_spec
from tests.ops.test_batch_norm import assert_close_rel, cotangent, oracle, oracle_grads

NATIVE = jax.default_backend() == "cpu" and cpu_native.available()
native = pytest.mark.skipif(not NATIVE, reason="native kernels unavailable: "
                            + (cpu_native.unavailable_reason() if jax.default_backend() == "cpu"
                               else "not a CPU backend"))

# (batch, height, width, in channels, out channels, kernel, stride, padding, groups): the
# channels in the lanes (1 and 2 vectors, 20 channels: a masked tail), the pixels in the lanes
# with AVX-512 (8 output channels over rows of 32 pixels), a stride, groups, rows of one pixel,
# and a batch of one (split into chunks of rows).
LAYERS = [
    pytest.param((3, 8, 8, 16, 16, 3, 1, 1, 1), id="16-channels"),
    pytest.param((2, 6, 5, 8, 20, 3, 1, 1, 1), id="20-channels"),
    pytest.param((2, 9, 9, 16, 32, 3, 2, 1, 1), id="stride-2"),
    pytest.param((2, 4, 34, 4, 8, 3, 1, 1, 1), id="pixel-lanes"),
    pytest.param((2, 5, 5, 8, 16, 3, 1, 1, 2), id="groups"),
    pytest.param((3, 6, 1, 4, 8, 3, 1, 1, 1), id="one-pixel-rows"),
    pytest.param((1, 12, 12, 16, 16, 3, 1, 1, 1), id="batch-1"),
]


def layer_operands(layer, *, seed, offset=0.0):
  """``(x, w, options)``: N(0, 1) input and filters (plus ``offset`` on the filters)."""
  b, h, width, c, o, k, s, p, groups = layer
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(b, h, width, c)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, c // groups, o)) + offset, jnp.float32)
  return x, w, dict(strides=s, padding=((p, p), (p, p)), feature_group_count=groups)


def native_statistics(x, w, options):
  spec = conv_spec(x, w, strides=options["strides"], padding=options["padding"], rhs_dilation=1,
                   feature_group_count=options["feature_group_count"])
  return jax.jit(lambda x, w: cpu_native.forward_with_statistics(x, w, spec))(x, w)


def check_statistics_against_float64():
  """The statistics of every layer of LAYERS against its output summed in float64 (also run
  by tests/ops/test_cpu_native.py in the other native builds)."""
  for param in LAYERS:
    for offset in (0.0, 40.0):
      x, w, options = layer_operands(param.values[0], seed=1, offset=offset)
      y, mean, var = native_statistics(x, w, options)
      # The forward's output itself, bit for bit.
      np.testing.assert_array_equal(y, adder_conv(x, w, implementation="cpu", **options),
                                    err_msg=param.id)
      rows = np.asarray(y, np.float64).reshape(-1, y.shape[-1])
      want_mean, want_var = rows.mean(0), rows.var(0)
      # An offset of -40 per filter element (thousands in all) over a spread of a few units:
      # the float32 sums around each row's first value keep the variance to ~1e-6.
      assert_close_rel(mean, want_mean, 1e-6, param.id)
      np.testing.assert_allclose(var, want_var, rtol=2e-5, err_msg=param.id)


@native
def test_statistics_against_float64():
  check_statistics_against_float64()


@native
def test_statistics_are_deterministic():
  x, w, options = layer_operands(LAYERS[0].values[0], seed=2, offset=40.0)
  first = native_statistics(x, w, options)
  for _ in range(3):
    for got, want in zip(native_statistics(x, w, options), first, strict=True):
      np.testing.assert_array_equal(got, want)


@native
@pytest.mark.parametrize("with_residual, relu", [(True, True), (False, True), (False, False)],
                         ids=["residual-relu", "relu", "identity"])
@pytest.mark.parametrize("layer", [LAYERS[0], LAYERS[3]])
def test_fused_output_against_the_oracle(layer, with_residual, relu):
  x, w, options = layer_operands(layer, seed=3, offset=40.0)
  y = adder_conv(x, w, implementation="cpu", **options)
  c = y.shape[-1]
  rng = np.random.default_rng(4)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
  bias = jnp.asarray(rng.normal(size=c), jnp.float32)
  residual = jnp.asarray(rng.normal(size=y.shape), jnp.float32) if with_residual else None
  out, mean, var = jax.jit(lambda *a: adder_conv_batch_norm_act(*a, relu=relu, **options))(
      x, w, scale, bias, residual)
  want, want_mean, want_var, _ = oracle(y, scale, bias, residual, relu=relu)
  # The ReLU is continuous: a ReLU input that rounds across 0 moves the output by its rounding
  # (y - mean at an offset of thousands: 5e-4 in float32, 2e-5 after the normalisation).
  np.testing.assert_allclose(out, want, rtol=0, atol=1e-4)
  assert_close_rel(mean, want_mean, 1e-6)
  np.testing.assert_allclose(var, want_var, rtol=2e-5)


@native
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
def test_fused_gradients_match_the_composition_and_the_oracle(with_residual):
  x, w, options = layer_operands(LAYERS[2].values[0], seed=5, offset=40.0)
  y = adder_conv(x, w, implementation="cpu", **options)
  c = y.shape[-1]
  rng = np.random.default_rng(6)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
  bias = jnp.asarray(rng.normal(size=c), jnp.float32)
  residual = jnp.asarray(rng.normal(size=y.shape), jnp.float32) if with_residual else None
  _, _, _, z = oracle(y, scale, bias, residual)
  weights = cotangent(z, seed=7)

  def fused(x, w, scale, bias, residual):
    return jnp.sum(adder_conv_batch_norm_act(x, w, scale, bias, residual, **options)[0] * weights)

  def composition(x, w, scale, bias, residual):
    y = adder_conv(x, w, implementation="cpu", **options)
    return jnp.sum(batch_norm_act(y, scale, bias, residual, implementation="cpu")[0] * weights)

  argnums = (0, 1, 2, 3, 4) if with_residual else (0, 1, 2, 3)
  got = jax.jit(jax.grad(fused, argnums))(x, w, scale, bias, residual)
  want = jax.jit(jax.grad(composition, argnums))(x, w, scale, bias, residual)
  for name, g, v in zip(("x", "w", "scale", "bias", "residual"), got, want):
    assert np.any(np.asarray(v) != 0), name
    assert_close_rel(g, v, 1e-4, name)
  _, dscale, dbias, dresidual = oracle_grads(weights, y, scale, bias, residual)
  assert_close_rel(got[2], dscale, 1e-4, "scale")
  assert_close_rel(got[3], dbias, 1e-5, "bias")
  if with_residual:
    assert_close_rel(got[4], dresidual, 1e-6, "residual")


@native
def test_the_statistics_carry_no_gradient():
  x, w, options = layer_operands(LAYERS[0].values[0], seed=8)
  c = w.shape[-1]
  grads = jax.grad(lambda x, w: jnp.sum(adder_conv_batch_norm_act(
      x, w, jnp.ones(c), jnp.zeros(c), **options)[1]), (0, 1))(x, w)
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)


@native
def test_jit_runs_the_fused_kernels_and_xla_runs_the_composition():
  x, w, options = layer_operands(LAYERS[0].values[0], seed=9)
  c = w.shape[-1]
  scale, bias = jnp.ones(c), jnp.zeros(c)
  for implementation, fused in ((None, True), ("cpu", True), ("xla", False)):
    fn = jax.jit(lambda x, w, i=implementation: adder_conv_batch_norm_act(
        x, w, scale, bias, implementation=i, **options)[0])
    text = fn.lower(x, w).as_text()
    assert (f"@{native_build.FORWARD_STATS_TARGET}(" in text) == fused, implementation
    assert (f"@{native_build.BATCH_NORM_APPLY_TARGET}(" in text) == fused, implementation
  # The composition, bit for bit, where the fused kernels do not run.
  got = adder_conv_batch_norm_act(x, w, scale, bias, implementation="xla", **options)
  y = adder_conv(x, w, implementation="xla", **options)
  for g, v in zip(got, batch_norm_act(y, scale, bias), strict=True):
    np.testing.assert_array_equal(g, v)


def test_why_the_fused_kernels_do_not_run():
  x, w, _ = layer_operands(LAYERS[0].values[0], seed=10)
  c = w.shape[-1]
  scale, bias = jnp.ones(c), jnp.zeros(c)
  assert "the adder layer does not run the native CPU kernels" == fused_unsupported_reason(
      x, w, scale, bias, implementation="xla")
  assert "float32" in fused_unsupported_reason(x.astype(jnp.bfloat16), w, scale, bias)
  assert "empty" in fused_unsupported_reason(x[:0], w, scale, bias)
  if NATIVE:
    assert fused_unsupported_reason(x, w, scale, bias) is None


def test_an_unknown_implementation_is_named():
  x, w, _ = layer_operands(LAYERS[0].values[0], seed=11)
  c = w.shape[-1]
  with pytest.raises(ValueError, match="implementation="):
    adder_conv_batch_norm_act(x, w, jnp.ones(c), jnp.zeros(c), implementation="gpu")


@native
@pytest.mark.parametrize("name", ["mean", "var"])
def test_apply_batch_statistics_names_a_wrong_shape(name):
  y = jnp.zeros((4, 3))
  stats = {"mean": jnp.zeros(3), "var": jnp.ones(3), name: jnp.zeros(2)}
  with pytest.raises(ValueError, match=f"{name} must have shape \\(3,\\)"):
    apply_batch_statistics(y, stats["mean"], stats["var"], jnp.ones(3), jnp.zeros(3))


@native
def test_apply_batch_statistics_says_float32():
  y = jnp.zeros((4, 3), jnp.bfloat16)
  with pytest.raises(ValueError, match="float32, y is bfloat16"):
    apply_batch_statistics(y, jnp.zeros(3), jnp.ones(3), jnp.ones(3), jnp.zeros(3))


# The input read through a BatchNorm and ReLU (input_norm).


def pre_norm_operands(layer, *, seed):
  """``(x, w, norm, options)``: x an adder layer's output before its BatchNorm (an offset of -50
  over a spread of 3), ``norm`` that BatchNorm (x's batch statistics, drawn scale and bias)."""
  x, w, options = layer_operands(layer, seed=seed)
  x = x * 3.0 - 50.0
  c = x.shape[-1]
  rng = np.random.default_rng(seed + 1)
  mean, var = batch_statistics(x)
  norm = InputNorm(mean, var, jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
                   jnp.asarray(rng.normal(size=c), jnp.float32), 1e-5)
  return x, w, norm, options


# The layers whose input copies differ: channels not a whole number of vectors (the scalar
# normalisation), a stride, the pixels in the lanes (the transposed copy), a batch of one (chunks
# of rows in the forward and the input gradient). ResNet-20's own layers are checked bit for bit
# in tests/models/test_fused_batch_norm.py.
NORMED_LAYERS = [LAYERS[1], LAYERS[2], LAYERS[3], LAYERS[6]]


def check_normed_kernels_against_the_written_input():
  """For every layer of NORMED_LAYERS: the statistics forward, and the input and weight gradients
  (and, through the BatchNorm, those of x, scale and bias), reading x through its BatchNorm and
  ReLU, equal the same kernels on relu(BatchNorm(x)) written out, bit for bit (also run by
  tests/ops/test_cpu_native.py in the other native builds)."""
  for param in NORMED_LAYERS:
    x, w, norm, options = pre_norm_operands(param.values[0], seed=12)
    weights = jnp.asarray(np.random.default_rng(13).normal(size=adder_conv(
        x, w, implementation="xla", **options).shape), jnp.float32)

    def normed(x, w, scale, bias, options=options, norm=norm, weights=weights):
      out = adder_conv_with_statistics(x, w, input_norm=norm._replace(scale=scale, bias=bias),
                                       **options)
      return jnp.sum(out[0] * weights), out

    def written(x, w, scale, bias, options=options, norm=norm, weights=weights):
      out = adder_conv_with_statistics(apply_input_norm(x, norm._replace(scale=scale, bias=bias)),
                                       w, **options)
      return jnp.sum(out[0] * weights), out

    args = (x, w, norm.scale, norm.bias)
    got_grads, got = jax.jit(jax.grad(normed, (0, 1, 2, 3), has_aux=True))(*args)
    want_grads, want = jax.jit(jax.grad(written, (0, 1, 2, 3), has_aux=True))(*args)
    for name, g, v in zip(("y", "mean", "var", "dx", "dw", "dscale", "dbias"),
                          (*got, *got_grads), (*want, *want_grads), strict=True):
      assert np.any(np.asarray(v) != 0), (param.id, name)
      np.testing.assert_array_equal(g, v, err_msg=f"{param.id}: {name}")


@native
def test_normed_kernels_equal_the_written_input():
  check_normed_kernels_against_the_written_input()


@native
def test_normed_kernels_run_in_the_fused_op_only_where_they_apply():
  x, w, norm, options = pre_norm_operands(LAYERS[0].values[0], seed=14)
  targets = (native_build.INPUT_GRAD_NORMED_TARGET, native_build.WEIGHT_GRAD_NORMED_TARGET)
  # (implementation="xla" writes the input out too: test_jit_runs_the_fused_kernels_and_xla_...)
  for grad_mode, implementation, normed in (("full_precision", None, True),
                                            ("sign", None, False)):
    def loss(x, w, grad_mode=grad_mode, implementation=implementation):
      y = adder_conv_with_statistics(x, w, input_norm=norm, grad_mode=grad_mode,
                                     implementation=implementation, **options)[0]
      return jnp.sum(jnp.sin(y))

    def written_loss(x, w, grad_mode=grad_mode, implementation=implementation):
      y = adder_conv(apply_input_norm(x, norm), w, grad_mode=grad_mode,
                     implementation=implementation, **options)
      return jnp.sum(jnp.sin(y))

    text = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).as_text()
    assert all((f"@{t}(" in text) == normed for t in targets), (grad_mode, implementation)
    got = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    want = jax.jit(jax.grad(written_loss, (0, 1)))(x, w)
    for g, v in zip(got, want, strict=True):
      assert_close_rel(g, v, 1e-5, f"{grad_mode}, {implementation}")


def test_a_bad_input_norm_is_named():
  x, w, norm, options = pre_norm_operands(LAYERS[0].values[0], seed=15)
  with pytest.raises(ValueError, match=r"input_norm.var must have shape \(16,\)"):
    adder_conv_with_statistics(x, w, input_norm=norm._replace(var=norm.var[:3]), **options)
  with pytest.raises(TypeError, match="input_norm must be an InputNorm"):
    adder_conv_with_statistics(x, w, input_norm=tuple(norm), **options)

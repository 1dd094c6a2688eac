"""adderjax.ops.batch_norm.batch_norm_act against a float64 NumPy oracle, and against Flax.

The oracle is BatchNorm in training mode as the textbook writes it: a two-pass
mean and biased variance, the normalisation, the residual add and the ReLU, and
its gradient by the usual BatchNorm backward formula. The native float32 kernels
("cpu") are checked against it, against the "xla" path (the same formulas
differentiated by JAX) and against Flax's `nnx.BatchNorm` + ReLU; the "xla" path
in float64 against the oracle and against Flax to 1e-10.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax.ops import cpu_native, native_build
from adderjax.ops.batch_norm import batch_norm_act

NATIVE = jax.default_backend() == "cpu" and cpu_native.available()
native = pytest.mark.skipif(not NATIVE, reason="native kernels unavailable: "
                            + (cpu_native.unavailable_reason() if jax.default_backend() == "cpu"
                               else "not a CPU backend"))
EPS = 1e-5


# The oracle, in float64 NumPy.


def oracle(y, scale, bias, residual=None, *, epsilon=EPS, relu=True):
  """``(out, mean, var, z)``: the forward in float64, z the ReLU's input."""
  y = np.asarray(y, np.float64)
  rows = y.reshape(-1, y.shape[-1])
  mean = rows.sum(0) / rows.shape[0]
  var = np.square(rows - mean).sum(0) / rows.shape[0]
  z = (y - mean) / np.sqrt(var + epsilon) * np.asarray(scale, np.float64) + np.asarray(
      bias, np.float64)
  if residual is not None:
    z = z + np.asarray(residual, np.float64)
  return (np.maximum(z, 0.0) if relu else z), mean, var, z


def oracle_grads(w, y, scale, bias, residual=None, *, epsilon=EPS, relu=True):
  """The gradients of ``sum(out * w)`` wrt ``(y, scale, bias, residual)``, textbook backward."""
  _, mean, var, z = oracle(y, scale, bias, residual, epsilon=epsilon, relu=relu)
  c = z.shape[-1]
  y = np.asarray(y, np.float64).reshape(-1, c)
  dz = np.asarray(w, np.float64).reshape(-1, c) * ((z.reshape(-1, c) > 0) if relu else 1.0)
  n = y.shape[0]
  inv_std = 1.0 / np.sqrt(var + epsilon)
  xhat = (y - mean) * inv_std
  dbias = dz.sum(0)
  dscale = (dz * xhat).sum(0)
  dxhat = dz * np.asarray(scale, np.float64)
  dy = inv_std / n * (n * dxhat - dxhat.sum(0) - xhat * (dxhat * xhat).sum(0))
  shape = z.shape
  return dy.reshape(shape), dscale, dbias, (None if residual is None else dz.reshape(shape))


# Operands.


def operands(shape, *, seed, offset=False, residual=True):
  """``(y, scale, bias, residual)`` as float32 NumPy arrays.

  ``offset``: an adder layer's output, a mean of -3000 (and per-channel offsets of up to
  a few hundred more) over a spread of about 10; else N(0, 1).
  """
  rng = np.random.default_rng(seed)
  c = shape[-1]
  y = rng.normal(size=shape)
  if offset:
    y = y * np.linspace(8.0, 12.0, c) - 3000.0 - 37.0 * np.arange(c)
  scale = rng.normal(size=c) * 0.5 + 1.0
  bias = rng.normal(size=c) * 0.5
  r = rng.normal(size=shape) if residual else None
  cast = lambda a: None if a is None else np.asarray(a, np.float32)
  return cast(y), cast(scale), cast(bias), cast(r)


def cotangent(z, *, seed, dtype=np.float32):
  """N(0, 1) draws of ``z``'s shape, 0 where the ReLU's input ``z`` is within 1e-4 of 0.

  float32 rounding can put such an input on the other side of the ReLU's kink, which
  changes its gradient by the whole cotangent; with a zero cotangent there that does
  not matter. Those are a few elements (each ~1e-4 likely), not most.
  """
  w = np.random.default_rng(seed).normal(size=z.shape)
  near = np.abs(z) < 1e-4
  assert near.mean() < 1e-2
  w[near] = 0.0
  return w.astype(dtype)


@functools.partial(jax.jit, static_argnums=0, static_argnames="relu")
def loss_grads(implementation, w, y, scale, bias, residual, *, relu=True):
  """jax.grad of ``sum(out * w)`` wrt ``(y, scale, bias[, residual])``, jitted."""
  def loss(y, scale, bias, residual):
    out, _, _ = batch_norm_act(y, scale, bias, residual, relu=relu,
                               implementation=implementation)
    return jnp.sum(out * w)
  argnums = (0, 1, 2) if residual is None else (0, 1, 2, 3)
  return jax.grad(loss, argnums)(y, scale, bias, residual)


def assert_close_rel(got, want, rtol, err_msg=""):
  """``|got - want| <= rtol * max|want|`` elementwise."""
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                             atol=rtol * np.abs(want).max(), err_msg=err_msg)


SHAPES = [
    (2, 5, 7, 5),     # 70 rows: one chunk of the kernel's 256, 5 channels (not a multiple of 8)
    (3, 10, 11, 20),  # 330 rows: a full chunk and a tail, 20 channels
    (300, 5),         # 2-D (N, C), a tail chunk
    (1031, 20),       # 2-D, five chunks
]


# The residual with and without the ReLU; the ReLU with and without the residual.
COMBINATIONS = [pytest.param(True, True, id="residual-relu"),
                pytest.param(False, True, id="relu"),
                pytest.param(True, False, id="residual-identity")]


# The native float32 kernels against the oracle.


@native
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("offset", [True, False], ids=["offset-3000", "normal"])
@pytest.mark.parametrize("with_residual, relu", COMBINATIONS)
def test_native_forward_against_the_oracle(shape, offset, with_residual, relu):
  y, scale, bias, r = operands(shape, seed=sum(shape), offset=offset, residual=with_residual)
  out, mean, var = batch_norm_act(y, scale, bias, r, relu=relu, implementation="cpu")
  want, want_mean, want_var, _ = oracle(y, scale, bias, r, relu=relu)
  assert out.dtype == mean.dtype == var.dtype == jnp.float32
  assert out.shape == y.shape and mean.shape == var.shape == (shape[-1],)
  # The variance of a spread of 10 under an offset of 3000 survives to float32 rounding.
  np.testing.assert_allclose(var, want_var, rtol=1e-5)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-6)
  # The ReLU is continuous: a ReLU input that rounds across 0 moves the output by its rounding.
  np.testing.assert_allclose(out, want, rtol=0, atol=1e-4)
  if relu:
    assert np.all(np.asarray(out) >= 0) and np.any(np.asarray(out) == 0)
  else:
    assert np.any(np.asarray(out) < 0)


@native
@pytest.mark.parametrize("shape, offset", [
    pytest.param(SHAPES[0], True, id="(2, 5, 7, 5)-offset-3000"),
    pytest.param(SHAPES[3], True, id="(1031, 20)-offset-3000"),
    pytest.param(SHAPES[0], False, id="(2, 5, 7, 5)-normal")])
@pytest.mark.parametrize("with_residual, relu", COMBINATIONS)
def test_native_gradients_against_xla_and_the_oracle(shape, offset, with_residual, relu):
  seed = sum(shape) + 1
  y, scale, bias, r = operands(shape, seed=seed, offset=offset, residual=with_residual)
  _, _, _, z = oracle(y, scale, bias, r, relu=relu)
  w = cotangent(z, seed=seed + 100)
  got = loss_grads("cpu", w, y, scale, bias, r, relu=relu)
  xla = loss_grads("xla", w, y, scale, bias, r, relu=relu)
  want = oracle_grads(w, y, scale, bias, r, relu=relu)
  names = ("y", "scale", "bias", "residual")
  for name, g, x, o in zip(names, got, xla, want, strict=False):
    assert g.dtype == jnp.float32 and g.shape == x.shape == o.shape, name
    assert_close_rel(g, x, 1e-5, err_msg=f"d{name}: cpu vs xla")
    assert_close_rel(g, o, 1e-4, err_msg=f"d{name}: cpu vs the float64 oracle")


@native
def test_the_relu_mask_computed_again_from_y_is_the_outputs():
  # Without a residual the backward computes z again from y instead of reading the output; a
  # zero residual makes it read the output. Both must give the same gradients bit for bit, also
  # where z is 0 up to rounding: y = 3 with the bias -3 * mul, where z is the fma's residue
  # (a product rounded before the add would give 0 there).
  rng = np.random.default_rng(4)
  half = rng.integers(-3, 4, size=(32, 4, 4, 8)).astype(np.float32)
  y = np.concatenate([half, -half])  # mean exactly 0
  scale = rng.uniform(0.5, 2.0, size=8).astype(np.float32)
  _, _, var = batch_norm_act(y, scale, np.zeros(8, np.float32), implementation="cpu")
  mul = scale / np.sqrt(np.asarray(var) + np.float32(EPS))  # float32, as the kernels
  bias = -(np.float32(3) * mul)
  da = rng.normal(size=y.shape).astype(np.float32)

  def output_and_grads(residual):
    fn = lambda y, scale, bias: batch_norm_act(y, scale, bias, residual, implementation="cpu")[0]
    out, vjp = jax.vjp(fn, y, scale, bias)
    return out, *vjp(da)

  got, want = output_and_grads(None), output_and_grads(np.zeros_like(y))
  for name, a, b in zip(("out", "dy", "dscale", "dbias"), got, want):
    np.testing.assert_array_equal(a, b, err_msg=name)
  out = np.asarray(got[0])
  residues = [np.unique(out[..., k][y[..., k] == 3]) for k in range(y.shape[-1])]
  # Both cases occur: a positive residue (about 3e-8, passed through) and none (masked).
  assert any(r.size == 1 and 0 < r[0] < 1e-6 for r in residues), residues
  assert any(r.size == 1 and r[0] == 0 for r in residues), residues


@native
def test_mean_and_var_carry_no_gradient():
  y, scale, bias, _ = operands((40, 5), seed=3, residual=False)

  def stats(y, scale, bias):
    _, mean, var = batch_norm_act(y, scale, bias, implementation="cpu")
    return jnp.sum(mean) + jnp.sum(var)

  for g in jax.grad(stats, (0, 1, 2))(y, scale, bias):
    np.testing.assert_array_equal(g, np.zeros_like(g))


# Why the statistics are shifted: Flax's float32 BatchNorm loses the variance at adder offsets.


@native
def test_flax_float32_loses_the_offset_variance_that_the_fused_op_keeps():
  y, scale, bias, _ = operands((2, 5, 7, 5), seed=11, offset=True, residual=False)
  want, _, want_var, _ = oracle(y, scale, bias)
  fused, _, fused_var = batch_norm_act(y, scale, bias, implementation="cpu")

  bn = nnx.BatchNorm(5, momentum=0.0, epsilon=EPS, rngs=nnx.Rngs(0))
  bn.scale[...] = jnp.asarray(scale)
  bn.bias[...] = jnp.asarray(bias)
  unfused = jax.nn.relu(bn(jnp.asarray(y)))
  unfused_var = np.asarray(bn.var[...])  # momentum 0: the batch variance

  def rel(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())

  # Flax's E[y^2] - E[y]^2 cancels 9e6 (float32 spacing 1 there, more through the sums) to a
  # variance of about 100. On this data: the variance 5e-2 off, the output 2.4e-2; fused,
  # 2.5e-7 and 3.7e-6.
  assert rel(fused_var, want_var) < 1e-5
  assert rel(unfused_var, want_var) > 1e-3
  assert 10 * rel(fused_var, want_var) < rel(unfused_var, want_var)
  assert rel(fused, want) < 1e-4
  assert 10 * rel(fused, want) < rel(unfused, want)


# float64: the "xla" path against the oracle and against Flax's unfused layers.


@pytest.mark.parametrize("offset", [True, False], ids=["offset-3000", "normal"])
@pytest.mark.parametrize("with_residual, relu", COMBINATIONS)
def test_xla_float64_against_the_oracle(offset, with_residual, relu):
  y, scale, bias, r = operands((2, 5, 7, 5), seed=21, offset=offset, residual=with_residual)
  want, want_mean, want_var, z = oracle(y, scale, bias, r, relu=relu)
  w = cotangent(z, seed=22, dtype=np.float64)
  want_grads = oracle_grads(w, y, scale, bias, r, relu=relu)
  with jax.enable_x64(True):
    f64 = lambda a: None if a is None else jnp.asarray(a, jnp.float64)
    args = [f64(a) for a in (y, scale, bias, r)]
    out, mean, var = batch_norm_act(*args, relu=relu, implementation="xla")
    grads = loss_grads("xla", f64(w), *args, relu=relu)
    # None picks the xla path for float64 (the native kernels take float32).
    default = batch_norm_act(*args, relu=relu)
  assert out.dtype == mean.dtype == var.dtype == jnp.float64
  np.testing.assert_allclose(var, want_var, rtol=1e-10)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-10)
  assert_close_rel(out, want, 1e-10)
  for got, want_default in zip((out, mean, var), default, strict=True):
    np.testing.assert_array_equal(got, want_default)
  for name, g, o in zip(("y", "scale", "bias", "residual"), grads, want_grads, strict=False):
    assert g.dtype == jnp.float64, name
    assert_close_rel(g, o, 1e-10, err_msg=f"d{name}")


def _flax_float64(y, scale, bias, r, w):
  """``relu(bn(y) + r)`` by `nnx.BatchNorm` in float64, its gradient and batch statistics.

  Flax keeps its running statistics in float32 whatever the dtypes (so the batch
  statistics read back through them, with momentum 0, are float32 roundings).
  """
  bn = nnx.BatchNorm(y.shape[-1], momentum=0.0, epsilon=EPS, param_dtype=jnp.float64,
                     rngs=nnx.Rngs(0))
  bn.scale[...] = scale
  bn.bias[...] = bias
  def loss(bn, y, r):
    out = jax.nn.relu(bn(y) + r)
    return jnp.sum(out * w), out

  (_, out), (d_params, dy, dr) = nnx.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
      bn, y, r)
  mean, var = bn.mean[...], bn.var[...]
  return (out, mean, var), (dy, d_params["scale"][...], d_params["bias"][...], dr)


# Flax stores the float64 batch statistics into its float32 running ones.
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")
@pytest.mark.parametrize("offset", [True, False], ids=["offset-3000", "normal"])
def test_xla_float64_against_flax_batch_norm_and_relu(offset):
  y, scale, bias, r = operands((2, 5, 7, 5), seed=31, offset=offset)
  w = cotangent(oracle(y, scale, bias, r)[3], seed=32, dtype=np.float64)
  with jax.enable_x64(True):
    args = [jnp.asarray(a, jnp.float64) for a in (y, scale, bias, r, w)]
    (want, want_mean, want_var), want_grads = jax.jit(_flax_float64)(*args)
    out, mean, var = batch_norm_act(*args[:4], implementation="xla")
    grads = loss_grads("xla", args[4], *args[:4])
  assert want.dtype == out.dtype == mean.dtype == jnp.float64
  # Flax's E[y^2] - E[y]^2 in float64 cancels 9e6 to 1e2 at the offset: ~1e-11 of the variance.
  assert_close_rel(out, want, 1e-10)
  for name, g, o in zip(("y", "scale", "bias", "residual"), grads, want_grads, strict=True):
    assert g.dtype == o.dtype == jnp.float64, name
    assert_close_rel(g, o, 1e-10, err_msg=f"d{name}")
  np.testing.assert_allclose(mean, want_mean, rtol=1e-7)
  np.testing.assert_allclose(var, want_var, rtol=1e-7)


# NaN, determinism, jit and vmap.


@pytest.mark.parametrize("implementation", [pytest.param("cpu", marks=native), "xla"])
def test_nan_in_y_propagates_to_its_channel(implementation):
  y, scale, bias, r = operands((2, 5, 7, 5), seed=41)
  y[1, 2, 3, 4] = np.nan
  out, mean, _ = batch_norm_act(y, scale, bias, r, implementation=implementation)
  out = np.asarray(out)
  # The NaN reaches its channel's mean, so every output of that channel, through the ReLU
  # (as jax.nn.relu keeps a NaN); the other channels are as without it.
  assert np.all(np.isnan(out[..., 4])) and np.isnan(mean[4])
  clean = np.delete(np.asarray(y), 4, axis=-1)
  want, _, _, _ = oracle(clean, np.delete(scale, 4), np.delete(bias, 4), np.delete(r, 4, -1))
  np.testing.assert_allclose(np.delete(out, 4, axis=-1), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("implementation", [
    pytest.param("cpu", marks=native), "xla"])
def test_nan_in_y_reaches_its_channel_variance(implementation):
  """A NaN variance, as the xla path and nnx.BatchNorm give, so the running one shows it too."""
  y, scale, bias, _ = operands((2, 5, 7, 5), seed=41, residual=False)
  y[1, 2, 3, 4] = np.nan
  _, _, var = batch_norm_act(y, scale, bias, implementation=implementation)
  assert np.isnan(var[4]) and not np.any(np.isnan(np.delete(np.asarray(var), 4)))


@native
def test_native_results_are_deterministic():
  y, scale, bias, r = operands((4, 16, 17, 20), seed=51, offset=True)  # 1088 rows: 5 chunks
  w = np.random.default_rng(52).normal(size=y.shape).astype(np.float32)
  first = (batch_norm_act(y, scale, bias, r, implementation="cpu"),
           loss_grads("cpu", w, y, scale, bias, r))
  second = (batch_norm_act(y, scale, bias, r, implementation="cpu"),
            loss_grads("cpu", w, y, scale, bias, r))
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
    np.testing.assert_array_equal(a, b)


@native
def test_none_picks_the_native_kernels_for_float32_and_jit_matches_eager():
  y, scale, bias, r = operands((2, 5, 7, 5), seed=61, offset=True)
  w = np.random.default_rng(62).normal(size=y.shape).astype(np.float32)
  forward = jax.jit(batch_norm_act)
  assert native_build.BATCH_NORM_TARGET in forward.lower(y, scale, bias, r).as_text()
  grad_text = loss_grads.lower(None, w, y, scale, bias, r).as_text()
  assert native_build.BATCH_NORM_GRAD_TARGET in grad_text
  xla_text = jax.jit(functools.partial(batch_norm_act, implementation="xla")).lower(
      y, scale, bias, r).as_text()
  assert native_build.BATCH_NORM_TARGET not in xla_text
  eager = batch_norm_act(y, scale, bias, r, implementation="cpu")
  for a, b in zip(forward(y, scale, bias, r), eager, strict=True):
    np.testing.assert_array_equal(a, b)


@native
def test_vmap_over_a_leading_axis_equals_a_loop():
  ys, scale, bias, rs = operands((3, 40, 5), seed=71, offset=True)
  ws = np.random.default_rng(72).normal(size=ys.shape).astype(np.float32)
  scales = np.stack([scale, scale * 2, scale - 1])

  def one(y, scale, r):
    return batch_norm_act(y, scale, bias, r, implementation="cpu")

  got = jax.vmap(one)(ys, scales, rs)
  got_grads = jax.vmap(lambda w, y, s, r: loss_grads("cpu", w, y, s, bias, r))(ws, ys, scales, rs)
  for i in range(3):
    for a, b in zip(got, one(ys[i], scales[i], rs[i]), strict=True):
      np.testing.assert_array_equal(a[i], b)
    for a, b in zip(got_grads, loss_grads("cpu", ws[i], ys[i], scales[i], bias, rs[i]),
                    strict=True):
      np.testing.assert_array_equal(a[i], b)
  # Each item is normalised by its own statistics.
  assert not np.allclose(got[1][0], got[1][1])


# Errors.


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_wrong_shapes_name_the_argument(implementation):
  y = jnp.zeros((4, 3, 5), jnp.float32)
  good = jnp.ones(5)
  call = functools.partial(batch_norm_act, implementation=implementation)
  with pytest.raises(ValueError, match=r"scale must have shape \(5,\).*\(4,\)"):
    call(y, jnp.ones(4), good)
  with pytest.raises(ValueError, match=r"bias must have shape \(5,\).*\(1, 5\)"):
    call(y, good, jnp.ones((1, 5)))
  with pytest.raises(ValueError, match=r"residual must have y's shape \(4, 3, 5\).*\(3, 5\)"):
    call(y, good, good, jnp.ones((3, 5)))
  with pytest.raises(ValueError, match="y must be an array"):
    call(jnp.float32(1.0), jnp.ones(()), jnp.ones(()))


def test_unknown_implementation_is_named():
  y = jnp.zeros((4, 5), jnp.float32)
  with pytest.raises(ValueError, match="implementation='bogus'"):
    batch_norm_act(y, jnp.ones(5), jnp.zeros(5), implementation="bogus")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU backend's message")
def test_cpu_with_float64_says_float32():
  with jax.enable_x64(True):
    y = jnp.zeros((4, 5), jnp.float64)
    with pytest.raises(ValueError, match="implementation='cpu' cannot run here.*float32"):
      batch_norm_act(y, jnp.ones(5, jnp.float64), jnp.zeros(5, jnp.float64),
                     implementation="cpu")


@pytest.mark.parametrize("implementation", [pytest.param("cpu", marks=native), "xla"])
def test_an_empty_batch_is_an_error_naming_y(implementation):
  with pytest.raises(ValueError, match=r"y must have at least one element.*\(0, 5\)"):
    batch_norm_act(jnp.zeros((0, 5)), jnp.ones(5), jnp.zeros(5), implementation=implementation)


@native
@pytest.mark.parametrize("operand", ["scale", "bias", "residual"])
def test_cpu_names_an_operand_that_is_not_float32(operand):
  y, scale, bias, r = operands((2, 5, 7, 5), seed=5, residual=True)
  args = {"scale": scale, "bias": bias, "residual": r}
  args[operand] = jnp.asarray(args[operand], jnp.bfloat16)
  with pytest.raises(ValueError, match=f"float32, {operand} is bfloat16"):
    batch_norm_act(y, implementation="cpu", **args)

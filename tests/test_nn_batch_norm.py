"""adderjax.nn.batch_norm_relu against ``nnx.relu(bn(y) + residual)`` of an identical BatchNorm.

And adderjax.nn.batch_norm (no ReLU, no residual) against ``bn(y)``, and
adderjax.nn.adder_conv_batch_norm against ``relu(bn(conv(x)) + residual)``."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax.nn import (
  AdderConv,
  _fused_unsupported_reason,
  adder_conv_batch_norm,
  batch_norm,
  batch_norm_fusion,
  batch_norm_relu,
)
from adderjax.ops import cpu_native, native_build
from tests.ops.test_batch_norm import oracle

NATIVE = jax.default_backend() == "cpu" and cpu_native.available()
native = pytest.mark.skipif(not NATIVE, reason="native kernels unavailable: "
                            + (cpu_native.unavailable_reason() if jax.default_backend() == "cpu"
                               else "not a CPU backend"))
C = 7


def twin_norms(features=C, **options):
  """Two identical BatchNorms (momentum 0.9), with drawn scale, bias and running statistics."""
  rng = np.random.default_rng(0)
  scale, bias = rng.normal(size=features) * 0.5 + 1.0, rng.normal(size=features) * 0.5
  mean, var = rng.normal(size=features), rng.uniform(0.5, 2.0, size=features)
  norms = []
  for _ in range(2):
    bn = nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0), **options)
    if bn.scale is not None:
      bn.scale[...] = jnp.asarray(scale, bn.scale[...].dtype)
      bn.bias[...] = jnp.asarray(bias, bn.bias[...].dtype)
    bn.mean[...] = jnp.asarray(mean, jnp.float32)
    bn.var[...] = jnp.asarray(var, jnp.float32)
    norms.append(bn)
  return norms


def data(shape=(4, 5, 6, C), seed=1, dtype=np.float32):
  """``(y, residual)``: y ~ N(0, 1) * 3 + 2, residual ~ N(0, 1)."""
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=shape) * 3 + 2, dtype),
          jnp.asarray(rng.normal(size=shape), dtype))


def unfused(bn, y, residual=None, **options):
  out = bn(y, **options)
  return nnx.relu(out if residual is None else out + residual)


@nnx.jit
def both_paths(fused_bn, plain_bn, y, r):
  """``batch_norm_relu`` on one BatchNorm, the unfused layers on its twin (one compilation)."""
  return batch_norm_relu(fused_bn, y, residual=r), unfused(plain_bn, y, r)


def stats(bn):
  return np.asarray(bn.mean[...]), np.asarray(bn.var[...])


# Training mode, float32: the fused native op.


@native
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
def test_fused_matches_the_unfused_layers(with_residual):
  fused_bn, plain_bn = twin_norms()
  y, r = data()
  r = r if with_residual else None
  before = stats(fused_bn)
  got, want = both_paths(fused_bn, plain_bn, y, r)
  assert got.dtype == want.dtype == jnp.float32 and got.shape == y.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.any(np.asarray(got) == 0) and np.any(np.asarray(got) > 0)
  # The running statistics moved as nnx.BatchNorm moves them (momentum 0.9).
  for got_stat, want_stat, old in zip(stats(fused_bn), stats(plain_bn), before, strict=True):
    np.testing.assert_allclose(got_stat, want_stat, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got_stat, old)
  rows = np.asarray(y, np.float64).reshape(-1, C)
  np.testing.assert_allclose(stats(fused_bn)[1], 0.9 * before[1] + 0.1 * rows.var(0), rtol=1e-5)


@native
def test_fused_gradients_match_the_unfused_layers():
  fused_bn, plain_bn = twin_norms()
  y, r = data(seed=2)
  w = jnp.asarray(np.random.default_rng(3).normal(size=y.shape), jnp.float32)

  def fused_loss(bn, y, r):
    return jnp.sum(batch_norm_relu(bn, y, residual=r) * w)

  def plain_loss(bn, y, r):
    return jnp.sum(unfused(bn, y, r) * w)

  grad = lambda loss, bn: nnx.jit(nnx.grad(loss, argnums=(0, 1, 2)))(bn, y, r)
  (got_bn, got_y, got_r), (want_bn, want_y, want_r) = grad(fused_loss, fused_bn), grad(
      plain_loss, plain_bn)
  for name, got, want in (("y", got_y, want_y), ("residual", got_r, want_r),
                          ("scale", got_bn["scale"][...], want_bn["scale"][...]),
                          ("bias", got_bn["bias"][...], want_bn["bias"][...])):
    assert got.shape == want.shape, name
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()),
                               err_msg=name)
  # Only the parameters have gradients; the statistics were updated under nnx.grad as well.
  assert set(got_bn.keys()) == {"scale", "bias"}
  for got_stat, want_stat in zip(stats(fused_bn), stats(plain_bn), strict=True):
    np.testing.assert_allclose(got_stat, want_stat, rtol=1e-5, atol=1e-6)


def _jitted(bn):
  """``(state, y, r) -> (batch_norm_relu(bn, y, residual=r), new state)`` and its loss's grad."""
  graphdef, state = nnx.split(bn)

  def forward(state, y, r):
    module = nnx.merge(graphdef, state, copy=True)  # fresh Variables at this trace level
    return batch_norm_relu(module, y, residual=r), nnx.state(module)

  def loss(state, y, r):
    return jnp.sum(forward(state, y, r)[0])

  return state, jax.jit(forward), jax.jit(jax.grad(loss, argnums=1))


@native
def test_training_mode_runs_the_native_op():
  bn, _ = twin_norms()
  y, r = data()
  assert _fused_unsupported_reason(bn, y) is None
  state, forward, grad = _jitted(bn)
  assert native_build.BATCH_NORM_TARGET in forward.lower(state, y, r).as_text()
  assert native_build.BATCH_NORM_GRAD_TARGET in grad.lower(state, y, r).as_text()
  # Evaluation mode normalises with the running statistics, by nnx.BatchNorm.
  bn.eval()
  state, forward, grad = _jitted(bn)
  assert native_build.BATCH_NORM_TARGET not in forward.lower(state, y, r).as_text()
  assert native_build.BATCH_NORM_TARGET not in grad.lower(state, y, r).as_text()


# Evaluation mode: the unfused layers, the running statistics untouched.


@pytest.mark.parametrize("how", ["eval", "argument"])
def test_eval_mode_is_the_unfused_layers(how):
  fused_bn, plain_bn = twin_norms()
  y, r = data(seed=4)
  before = stats(fused_bn)
  if how == "eval":
    fused_bn.eval()
    plain_bn.eval()
    got = batch_norm_relu(fused_bn, y, residual=r)
  else:
    got = batch_norm_relu(fused_bn, y, residual=r, use_running_average=True)
  want = unfused(plain_bn, y, r, use_running_average=True)
  np.testing.assert_array_equal(got, want)
  for got_stat, old in zip(stats(fused_bn), before, strict=True):
    np.testing.assert_array_equal(got_stat, old)
  # Normalised by the running statistics, not the batch's.
  scale, bias = np.asarray(fused_bn.scale[...]), np.asarray(fused_bn.bias[...])
  z = (np.asarray(y) - before[0]) / np.sqrt(before[1] + 1e-5) * scale + bias + np.asarray(r)
  np.testing.assert_allclose(got, np.maximum(z, 0), rtol=1e-5, atol=1e-5)


@native
def test_use_running_average_false_overrides_eval_mode():
  fused_bn, plain_bn = twin_norms()
  fused_bn.eval()
  y, _ = data(seed=5)
  got = batch_norm_relu(fused_bn, y, use_running_average=False)
  want = unfused(plain_bn, y)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats(fused_bn)[0], stats(plain_bn)[0], rtol=1e-5, atol=1e-6)


# The fallbacks: exactly the unfused layers.


def _assert_falls_back(fused_bn, plain_bn, y, r, reason):
  got_reason = _fused_unsupported_reason(fused_bn, y)
  # Off the CPU, the backend is the reason where the layer itself would fit.
  off_cpu = jax.default_backend() != "cpu" and "CPU backend" in str(got_reason)
  assert isinstance(got_reason, str) and (reason in got_reason or off_cpu)
  got, want = both_paths(fused_bn, plain_bn, y, r)
  assert got.dtype == want.dtype
  np.testing.assert_array_equal(got, want)
  for got_stat, want_stat in zip(stats(fused_bn), stats(plain_bn), strict=True):
    np.testing.assert_array_equal(got_stat, want_stat)
  return got


# Flax stores the float64 batch statistics into its float32 running ones.
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")
def test_float64_falls_back():
  with jax.enable_x64(True):
    fused_bn, plain_bn = twin_norms(param_dtype=jnp.float64)
    y, r = data(dtype=np.float64)
    got = _assert_falls_back(fused_bn, plain_bn, y, r, "float32")
    assert got.dtype == jnp.float64


def test_bfloat16_input_falls_back():
  fused_bn, plain_bn = twin_norms()
  y, r = data(dtype=jnp.bfloat16)
  _assert_falls_back(fused_bn, plain_bn, y, r, "float32")


def test_bfloat16_layer_falls_back():
  fused_bn, plain_bn = twin_norms(dtype=jnp.bfloat16)
  y, r = data()
  got = _assert_falls_back(fused_bn, plain_bn, y, r, "float32")
  assert got.dtype == jnp.float32  # bf16 bn output + float32 residual


def test_without_scale_falls_back():
  fused_bn, plain_bn = twin_norms(use_scale=False)
  y, r = data()
  _assert_falls_back(fused_bn, plain_bn, y, r, "no scale")


def test_features_not_last_falls_back():
  fused_bn, plain_bn = twin_norms(axis=1)
  y, r = data(shape=(4, C, 6))
  _assert_falls_back(fused_bn, plain_bn, y, r, "not the last axis")


def test_axis_name_falls_back():
  """Statistics averaged over a vmapped named axis: the unfused layers, bit for bit."""
  fused_bn, plain_bn = twin_norms(axis_name="batch")
  y, r = data(shape=(2, 3, 5, C))  # two groups of 3x5 rows
  assert "axis_name" in _fused_unsupported_reason(fused_bn, y[0])

  def run(layer, bn):
    graphdef, state = nnx.split(bn)

    def one(y, r):
      module = nnx.merge(graphdef, state, copy=True)  # fresh Variables at this trace level
      return layer(module, y, r), nnx.state(module)

    out, new_state = jax.jit(jax.vmap(one, axis_name="batch"))(y, r)
    return out, new_state

  got, got_state = run(lambda bn, y, r: batch_norm_relu(bn, y, residual=r), fused_bn)
  want, want_state = run(unfused, plain_bn)
  np.testing.assert_array_equal(got, want)
  for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state), strict=True):
    np.testing.assert_array_equal(a, b)
  # The statistics are those of both groups together: the two groups' means agree.
  np.testing.assert_array_equal(got_state["mean"][...][0], got_state["mean"][...][1])
  rows = np.asarray(y, np.float64).reshape(-1, C)
  mean0 = np.asarray(stats(fused_bn)[0])
  np.testing.assert_allclose(got_state["mean"][...][0], 0.9 * mean0 + 0.1 * rows.mean(0),
                             rtol=1e-5, atol=1e-6)


@native
def test_bfloat16_residual_gives_the_unfused_result():
  fused_bn, plain_bn = twin_norms()
  y, r = data()
  r = r.astype(jnp.bfloat16)
  got = batch_norm_relu(fused_bn, y, residual=r)
  np.testing.assert_allclose(got, unfused(plain_bn, y, r), rtol=1e-5, atol=1e-5)


# batch_norm: the same op without the ReLU.


@native
def test_batch_norm_without_relu_matches_the_layer_and_its_gradients():
  fused_bn, plain_bn = twin_norms()
  # An adder layer's offset: -3,000 over a spread of 3 (nnx.BatchNorm's E[y^2] - E[y]^2 loses
  # digits there in float32; the op sums around each channel's first value).
  y = data(seed=6)[0] - 3000.0
  w = jnp.asarray(np.random.default_rng(7).normal(size=y.shape), jnp.float32)
  before = stats(fused_bn)

  def fused_loss(bn, y):
    out = batch_norm(bn, y)
    return jnp.sum(out * w), out

  def plain_loss(bn, y):
    out = bn(y)
    return jnp.sum(out * w), out

  def run(loss, bn):
    return nnx.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True))(bn, y)

  (got_bn, got_y), got = run(fused_loss, fused_bn)
  rows = np.asarray(y, np.float64).reshape(-1, C)
  mean, var = rows.mean(0), rows.var(0)
  scale = np.asarray(fused_bn.scale[...], np.float64)
  bias = np.asarray(fused_bn.bias[...], np.float64)
  xhat = (rows - mean) / np.sqrt(var + 1e-5)
  # Against float64 formulas: the output, the running statistics, the gradients.
  np.testing.assert_allclose(np.asarray(got).reshape(-1, C), xhat * scale + bias, rtol=1e-4,
                             atol=2e-4)
  assert np.any(np.asarray(got) < 0)  # No ReLU.
  np.testing.assert_allclose(stats(fused_bn)[0], 0.9 * before[0] + 0.1 * mean, rtol=1e-6)
  np.testing.assert_allclose(stats(fused_bn)[1], 0.9 * before[1] + 0.1 * var, rtol=1e-4)
  g = np.asarray(w, np.float64).reshape(-1, C)
  dbias, dscale = g.sum(0), (g * xhat).sum(0)
  dy = scale / np.sqrt(var + 1e-5) * (g - dbias / len(g) - xhat * dscale / len(g))
  np.testing.assert_allclose(got_bn["bias"][...], dbias, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got_bn["scale"][...], dscale, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(np.asarray(got_y).reshape(-1, C), dy, rtol=1e-3,
                             atol=1e-3 * np.abs(dy).max())
  # nnx.BatchNorm's own statistics lose the spread at this offset (what the ResNets' shortcuts
  # had before they took this op): errors of order one where the op's are a few 1e-5.
  (_, _), plain = run(plain_loss, plain_bn)
  exact = xhat * scale + bias
  fused_error = np.abs(np.asarray(got).reshape(-1, C) - exact).max()
  plain_error = np.abs(np.asarray(plain).reshape(-1, C) - exact).max()
  assert fused_error < 2e-4 and plain_error > 100 * fused_error, (fused_error, plain_error)


@native
def test_batch_norm_runs_the_native_op_in_training_mode_only():
  bn, _ = twin_norms()
  y, _ = data()

  def lowered(bn):
    graphdef, state = nnx.split(bn)

    def forward(state, y):  # A function per BatchNorm: jit's cache keys on the function.
      module = nnx.merge(graphdef, state, copy=True)
      return batch_norm(module, y), nnx.state(module)

    return jax.jit(forward).lower(state, y).as_text()

  assert native_build.BATCH_NORM_TARGET in lowered(bn)
  bn.eval()
  assert native_build.BATCH_NORM_TARGET not in lowered(bn)


def test_batch_norm_in_eval_mode_and_where_it_falls_back_is_the_layer():
  fused_bn, plain_bn = twin_norms()
  y, _ = data(seed=8)
  fused_bn.eval()
  plain_bn.eval()
  np.testing.assert_array_equal(batch_norm(fused_bn, y), plain_bn(y))
  fused_bn.train()
  plain_bn.train()
  y16 = y.astype(jnp.bfloat16)
  got = batch_norm(fused_bn, y16)
  assert "float32" in str(_fused_unsupported_reason(fused_bn, y16)) or (
      jax.default_backend() != "cpu")
  np.testing.assert_array_equal(got, plain_bn(y16))
  for got_stat, want_stat in zip(stats(fused_bn), stats(plain_bn), strict=True):
    np.testing.assert_array_equal(got_stat, want_stat)


# adder_conv_batch_norm: an AdderConv and its BatchNorm, the statistics summed in the conv.


def twin_blocks(features=8, **conv_options):
  """``((conv, bn), (conv, bn))``: identical AdderConvs (3 -> features, 3x3) and BatchNorms."""
  convs = [AdderConv(3, features, 3, rngs=nnx.Rngs(3), **conv_options) for _ in range(2)]
  return tuple(zip(convs, twin_norms(features), strict=True))


def conv_data(seed=2):
  """``(x, residual)`` for an 8x8 input of 3 channels and 8 output channels."""
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32),
          jnp.asarray(rng.normal(size=(4, 8, 8, 8)), jnp.float32))


def unfused_conv(conv, bn, x, residual=None, relu=True):
  out = bn(conv(x))
  out = out if residual is None else out + residual
  return nnx.relu(out) if relu else out


@native
# The ReLU without a residual and the identity with one are the others' parts; ResNet-20's
# blocks (tests/models/test_fused_batch_norm.py) take the first three combinations.
@pytest.mark.parametrize("with_residual, relu", [(True, True), (False, False)],
                         ids=["residual-relu", "identity"])
def test_adder_conv_batch_norm_matches_the_unfused_layers(with_residual, relu):
  (conv, bn), (plain_conv, plain_bn) = twin_blocks()
  before = stats(bn)
  x, r = conv_data()
  r = r if with_residual else None

  @nnx.jit
  def both(conv, bn, plain_conv, plain_bn, x, r):
    def fused_loss(conv, bn):
      out = adder_conv_batch_norm(conv, bn, x, residual=r, relu=relu)
      return jnp.sum(jnp.sin(out)), out

    def plain_loss(conv, bn):
      out = unfused_conv(conv, bn, x, r, relu)
      return jnp.sum(jnp.sin(out)), out

    grad = nnx.grad(fused_loss, argnums=(0, 1), has_aux=True)
    plain_grad = nnx.grad(plain_loss, argnums=(0, 1), has_aux=True)
    return grad(conv, bn), plain_grad(plain_conv, plain_bn)

  y = plain_conv(x)
  scale, bias = np.asarray(plain_bn.scale[...]), np.asarray(plain_bn.bias[...])
  (grads, out), (want_grads, want) = both(conv, bn, plain_conv, plain_bn, x, r)
  # Against BatchNorm on the conv's output in float64; Flax's float32 E[y^2] - E[y]^2 at the
  # adder offset (about -30 over a spread of 5) is itself 5e-5 off.
  exact = oracle(y, scale, bias, r, relu=relu)[0]
  np.testing.assert_allclose(out, exact, rtol=0, atol=1e-5)
  np.testing.assert_allclose(want, exact, rtol=0, atol=2e-4)
  # The running statistics moved as nnx.BatchNorm moves them, towards the float64 statistics.
  rows = np.asarray(y, np.float64).reshape(-1, y.shape[-1])
  for got_stat, want_stat, old, batch in zip(stats(bn), stats(plain_bn), before,
                                             (rows.mean(0), rows.var(0)), strict=True):
    np.testing.assert_allclose(got_stat, 0.9 * old + 0.1 * batch, rtol=1e-6)
    np.testing.assert_allclose(got_stat, want_stat, rtol=1e-4)
  assert not np.allclose(stats(bn)[0], before[0]) and not np.allclose(stats(bn)[1], before[1])
  for got_leaf, want_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads),
                                 strict=True):
    want_leaf = np.asarray(want_leaf)
    assert np.any(want_leaf != 0)
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=0,
                               atol=1e-4 * np.abs(want_leaf).max())


def _fused_targets(conv, bn, x, **options):
  """Which of the fused op's kernels ``adder_conv_batch_norm`` lowers to, jitted."""
  text = nnx.jit(lambda conv, bn, x: adder_conv_batch_norm(conv, bn, x, **options)).lower(
      conv, bn, x).as_text()
  return (f"@{native_build.FORWARD_STATS_TARGET}(" in text,
          f"@{native_build.BATCH_NORM_APPLY_TARGET}(" in text)


@native
def test_adder_conv_batch_norm_runs_the_fused_kernels_in_training_mode_only():
  (conv, bn), _ = twin_blocks()
  x, _ = conv_data()
  assert _fused_targets(conv, bn, x) == (True, True)
  assert _fused_targets(conv, bn, x, use_running_average=True) == (False, False)
  bn.eval()
  assert _fused_targets(conv, bn, x) == (False, False)
  assert _fused_targets(conv, bn, x, use_running_average=False) == (True, True)


@native
@pytest.mark.parametrize("options", [dict(use_bias=True), dict(p=1.5), dict(implementation="xla"),
                                     dict(dtype=jnp.bfloat16)],
                         ids=["bias", "exponent", "xla", "bfloat16"])
def test_adder_conv_batch_norm_runs_other_layers_unfused(options):
  """A bias, an exponent, another implementation or dtype: the layers one after the other."""
  (conv, bn), (plain_conv, plain_bn) = twin_blocks(**options)
  x, _ = conv_data()
  assert _fused_targets(conv, bn, x) == (False, False)
  got = nnx.jit(adder_conv_batch_norm)(conv, bn, x)
  want = nnx.jit(unfused_conv)(plain_conv, plain_bn, x)
  # The native BatchNorm's statistics against Flax's E[y^2] - E[y]^2: 5e-5 apart.
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=0, atol=0.05 if "dtype" in options else 2e-4)


@native
def test_batch_norm_fusion_off_runs_the_conv_module():
  (conv, bn), _ = twin_blocks()
  x, _ = conv_data()
  with batch_norm_fusion(False):
    assert _fused_targets(conv, bn, x) == (False, False)


@native
def test_adder_conv_batch_norm_of_another_layer_calls_it():
  conv = nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0))
  (_, bn), (_, plain_bn) = twin_blocks()
  x, _ = conv_data()
  got = nnx.jit(adder_conv_batch_norm)(conv, bn, x)
  np.testing.assert_allclose(got, nnx.jit(unfused_conv)(conv, plain_bn, x), rtol=0, atol=2e-4)


# Flax stores the float64 batch statistics into its float32 running ones.
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")
def test_adder_conv_batch_norm_in_float64_is_the_unfused_layers_exactly():
  """Float64 runs the layers one after the other: the same numbers, to the last bit."""
  with jax.enable_x64(True):
    (conv, bn), (plain_conv, plain_bn) = twin_blocks(param_dtype=jnp.float64)
    x = jnp.asarray(conv_data()[0], jnp.float64)
    got = nnx.jit(adder_conv_batch_norm)(conv, bn, x)
    want = nnx.jit(unfused_conv)(plain_conv, plain_bn, x)
    assert got.dtype == jnp.float64
    np.testing.assert_array_equal(got, want)
    for got_stat, want_stat in zip(stats(bn), stats(plain_bn), strict=True):
      np.testing.assert_array_equal(got_stat, want_stat)

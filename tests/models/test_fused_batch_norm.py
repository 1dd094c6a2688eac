"""The models' fused BatchNorm + ReLU (adderjax.models.layers.conv_batch_norm_activation).

An adder ResNet-20 in training mode, every adder convolution and the
BatchNorm (+ ReLU, + residual) after it run as the fused op (the statistics
summed in the adder forward, the BatchNorm applied in one pass, or, for the
first of each block, by the second convolution's kernels as they read their
input), and the stem's BatchNorm + ReLU as one native op, against the same
model with the unfused ``activation(bn(conv(x)) + residual)``: logits, every
gradient and the running statistics after the step; and the deferred
BatchNorm against the same fused model without deferral, bit for bit. The
models are built abstractly and filled from NumPy (as
tests/models/test_models.py does): JAX's random initialisation compiles once
per parameter shape, about 10 s for ResNet-20.
"""

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax.models import layers, resnet, resnet20
from adderjax.models.layers import batch_norm_activation
from adderjax.nn import AdderKernel
from adderjax.ops import cpu_native, native_build

NATIVE = jax.default_backend() == "cpu" and cpu_native.available()
pytestmark = pytest.mark.skipif(
    not NATIVE, reason="native kernels unavailable: "
    + (cpu_native.unavailable_reason() if jax.default_backend() == "cpu" else "not a CPU backend"))

# ResNet-20: a BatchNorm + ReLU after the stem and two per block, fused; the two shortcuts'
# BatchNorms have no ReLU and are fused too; the one on the logits (a 2-D input) is not. All
# but the stem's follow an adder convolution, which sums their statistics.
RELU_SITES = 19
SHORTCUTS = 2
FUSED_SITES = RELU_SITES + SHORTCUTS
ADDER_SITES = FUSED_SITES - 1
DEFERRED_SITES = 9  # the first BatchNorm + ReLU of each block, applied by the second conv
BATCH_NORMS = FUSED_SITES + 1
KERNELS = 19 + 2 + 1  # the stem and block convolutions, the shortcuts, the classifier (no bias)


def _is_variable(x):
  return isinstance(x, nnx.Variable)


def numpy_model(kind, seed=0):
  """``(graphdef, params, rest)`` of a ResNet-20 of this kind, in training mode, NumPy-drawn.

  Adder kernels N(0, 1) (so the layers' outputs sit at offsets of -20 to -300 over
  spreads of a few units, as in training), other kernels LeCun normal, BatchNorm
  scales and biases near 1 and 0, running statistics near 0 and 1.
  """
  abstract = nnx.eval_shape(lambda: resnet20(kind=kind, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)

  def fill(path, variable):
    name = path[-1].key
    if name in ("scale", "var"):
      value = 1.0 + 0.2 * rng.uniform(-1, 1, size=variable.shape)
    elif name in ("bias", "mean"):
      value = 0.1 * rng.normal(size=variable.shape)
    elif isinstance(variable, AdderKernel):
      value = rng.normal(size=variable.shape)
    else:
      value = rng.normal(size=variable.shape) / math.sqrt(math.prod(variable.shape[:-1]))
    return variable.replace(np.asarray(value, variable.dtype))

  graphdef, state = nnx.split(abstract)
  state = jax.tree_util.tree_map_with_path(fill, state, is_leaf=_is_variable)
  model = nnx.merge(graphdef, state)
  model.train()
  return nnx.split(model, nnx.Param, ...)


def make_step(graphdef):
  """A jitted training-mode step: logits, d mean(logits^2)/d params, running statistics after.

  A new function per call: jax.jit caches its trace per function, and the two
  paths differ only in what the model's module calls at trace time.
  """
  def step(params, rest, images):
    def loss(params):
      model = nnx.merge(graphdef, params, rest, copy=True)
      logits = model(images)
      return jnp.mean(jnp.square(logits)), (logits, nnx.state(model, nnx.BatchStat))

    (_, (logits, stats)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, grads, stats

  return jax.jit(step)


def unfused_batch_norm_activation(bn, y, activation, *, residual=None):
  out = bn(y)
  out = out if residual is None else out + residual
  return out if activation is None else activation(out)


def unfused_conv_batch_norm_activation(conv, bn, x, activation, *, residual=None, defer=False):
  del defer
  return unfused_batch_norm_activation(bn, conv(x), activation, residual=residual)


def undeferred_conv_batch_norm_activation(conv, bn, x, activation, *, residual=None, defer=False):
  del defer
  return layers.conv_batch_norm_activation(conv, bn, x, activation, residual=residual)


@pytest.fixture(scope="module")
def adder_model():
  graphdef, params, rest = numpy_model("adder")
  images = np.random.default_rng(1).normal(size=(4, 16, 16, 3)).astype(np.float32)
  return graphdef, params, rest, images


def lowered_and_run(graphdef, params, rest, images):
  """``(HLO text, (logits, grads, stats))`` of one training step."""
  lowered = make_step(graphdef).lower(params, rest, images)
  return lowered.as_text(), lowered.compile()(params, rest, images)


@pytest.fixture(scope="module")
def both_paths(adder_model):
  """``(fused, unfused)``: each the HLO text and ``(logits, grads, stats)`` of one step."""
  fused = lowered_and_run(*adder_model)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(resnet, "batch_norm_activation", unfused_batch_norm_activation)
    patch.setattr(resnet, "conv_batch_norm_activation", unfused_conv_batch_norm_activation)
    unfused = lowered_and_run(*adder_model)
  return fused, unfused


def test_the_deferred_batch_norms_give_the_same_bits(both_paths, adder_model):
  """The block's first BatchNorm + ReLU applied by conv2's kernels as they read, or written out
  by the fused op: the same logits, gradients and statistics, bit for bit."""
  (_, deferred), _ = both_paths
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(resnet, "conv_batch_norm_activation", undeferred_conv_batch_norm_activation)
    text, written = lowered_and_run(*adder_model)
  assert native_build.INPUT_GRAD_NORMED_TARGET not in text
  for got, want in zip(jax.tree_util.tree_leaves(deferred), jax.tree_util.tree_leaves(written),
                       strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def rel_error(got, want):
  """``|got - want| / |want|`` in the Frobenius norm, in float64."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def leaves(tree):
  return [(jax.tree_util.keystr(path), np.asarray(v[...])) for path, v in
          jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_variable)]


def test_the_adder_model_fuses_every_batch_norm(both_paths):
  (text, _), (unfused_text, _) = both_paths
  assert text.count(f"@{native_build.FORWARD_STATS_TARGET}(") == ADDER_SITES
  assert text.count(f"@{native_build.FORWARD_TARGET}(") == 0
  # The deferred ones are applied by the next convolution's forward, input and weight gradients.
  assert text.count(f"@{native_build.BATCH_NORM_APPLY_TARGET}(") == ADDER_SITES - DEFERRED_SITES
  assert text.count(f"@{native_build.INPUT_GRAD_NORMED_TARGET}(") == DEFERRED_SITES
  assert text.count(f"@{native_build.WEIGHT_GRAD_NORMED_TARGET}(") == DEFERRED_SITES
  assert text.count(f"@{native_build.INPUT_GRAD_TARGET}(") == ADDER_SITES - DEFERRED_SITES
  assert text.count(f"@{native_build.WEIGHT_GRAD_TARGET}(") == ADDER_SITES - DEFERRED_SITES
  assert text.count(f"@{native_build.BATCH_NORM_TARGET}(") == FUSED_SITES - ADDER_SITES
  assert text.count(f"@{native_build.BATCH_NORM_GRAD_TARGET}(") == FUSED_SITES
  for target in (native_build.BATCH_NORM_TARGET, native_build.FORWARD_STATS_TARGET):
    assert target not in unfused_text
  assert unfused_text.count(f"@{native_build.FORWARD_TARGET}(") == ADDER_SITES


# Float32 is itself imprecise here, fused or not: Flax's E[y^2] - E[y]^2 at the adder offsets
# (batch means up to ~650 over spreads of a few units) and the adder layers' float32 sums.
# Measured on this model and batch, with only the ReLU sites fused: fused vs unfused, logits
# 8e-6, gradients up to 1.0e-3 (a BatchNorm scale of layer3), statistics up to 3.2e-5; against
# the same model in float64 the fused step was off by 1.1e-5, 1.05e-3 and 2e-5, the unfused
# one by 1.0e-5, 1.4e-3 and 3.7e-5. With the shortcuts fused too: logits 1.3e-5, gradients
# up to 2.6e-3 (layer2's first bias), statistics up to 5e-5. The tolerances are 2-3x these;
# a wrong gradient term or statistic would be O(1) off.


def test_logits_match_the_unfused_model(both_paths):
  (_, (logits, _, _)), (_, (want, _, _)) = both_paths
  assert logits.shape == want.shape == (4, 10)
  assert not np.allclose(logits[0], logits[1])
  assert rel_error(logits, want) < 3e-5


def test_every_gradient_matches_the_unfused_model(both_paths):
  (_, (_, grads, _)), (_, (_, want, _)) = both_paths
  got, want = leaves(grads), leaves(want)
  assert [name for name, _ in got] == [name for name, _ in want]
  assert len(got) == KERNELS + 2 * BATCH_NORMS  # kernels, BatchNorm scales and biases
  for (name, g), (_, w) in zip(got, want, strict=True):
    assert np.all(np.isfinite(g)) and np.any(w != 0), name
    assert rel_error(g, w) < 8e-3, name


def test_batch_statistics_match_the_unfused_model(both_paths, adder_model):
  (_, (_, _, stats)), (_, (_, _, want)) = both_paths
  _, _, rest, _ = adder_model
  got, want, before = leaves(stats), leaves(want), leaves(nnx.state(rest, nnx.BatchStat))
  assert len(got) == 2 * BATCH_NORMS
  for (name, g), (_, w), (_, b) in zip(got, want, before, strict=True):
    assert not np.allclose(g, b), name  # the step moved every running statistic
    assert rel_error(g, w) < 1e-4, name


def test_binary_model_fuses_only_its_shortcuts(monkeypatch):
  """HardTanh is not a ReLU, nor a binary convolution an adder one: batch_norm_activation runs
  bn and the activation as they are."""
  graphdef, params, rest = numpy_model("binary")
  activations = []

  def spy(bn, y, activation, *, residual=None):
    activations.append(activation)
    return batch_norm_activation(bn, y, activation, residual=residual)

  monkeypatch.setattr(resnet, "batch_norm_activation", spy)
  monkeypatch.setattr(layers, "batch_norm_activation", spy)
  images = np.zeros((4, 16, 16, 3), np.float32)
  forward = jax.jit(lambda params, rest, x: nnx.merge(graphdef, params, rest, copy=True)(x))
  text = forward.lower(params, rest, images).as_text()
  # Every BatchNorm went through batch_norm_activation; only the shortcuts' (no activation)
  # fused.
  assert sorted(activations, key=str) == sorted([nnx.hard_tanh] * RELU_SITES + [None] * SHORTCUTS,
                                                key=str)
  assert text.count(f"@{native_build.BATCH_NORM_TARGET}(") == SHORTCUTS
  assert "hard_tanh" in text

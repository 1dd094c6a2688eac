"""recompute_batch_norm_stats against the concatenated batches' statistics;
shift_batch_norm_stats."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adderjax.models.batch_norm_stats import recompute_batch_norm_stats, shift_batch_norm_stats
from adderjax.nn import AdderConv


class TwoNorms(nnx.Module):
  def __init__(self, rngs):
    self.first = nnx.BatchNorm(3, momentum=0.9, rngs=rngs)
    self.dense = nnx.Linear(3, 2, rngs=rngs)
    self.second = nnx.BatchNorm(2, momentum=0.9, rngs=rngs)

  def __call__(self, x):
    return self.second(self.dense(self.first(x)))


def test_statistics_are_those_of_all_batches():
  model = TwoNorms(nnx.Rngs(0))
  model.eval()
  rng = np.random.default_rng(0)
  batches = [rng.normal(loc=[5.0, -2.0, 0.0], scale=[1.0, 3.0, 0.5], size=(16, 3))
             .astype(np.float32) for _ in range(4)]
  assert recompute_batch_norm_stats(model, batches) == 4
  everything = np.concatenate(batches).astype(np.float64)
  np.testing.assert_allclose(model.first.mean[...], everything.mean(0), rtol=1e-5)
  np.testing.assert_allclose(model.first.var[...], everything.var(0), rtol=1e-4)
  # While gathering, the first norm normalizes each batch with its own statistics, as in
  # training; the second sees the dense layer's output of that.
  normalized = np.concatenate([(b - b.mean(0)) / np.sqrt(b.var(0) + 1e-5)
                               for b in np.asarray(batches, np.float64)])
  hidden = normalized @ np.asarray(model.dense.kernel[...], np.float64) + np.asarray(
      model.dense.bias[...])
  np.testing.assert_allclose(model.second.mean[...], hidden.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(model.second.var[...], hidden.var(0), rtol=1e-4)
  # Mode and momentum come back as they were.
  assert model.first.use_running_average and model.first.momentum == 0.9


class AdderBlock(nnx.Module):
  def __init__(self, rngs):
    self.adder = AdderConv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.adder(x))


def test_recomputed_adder_statistics_fix_lagging_running_averages():
  model = AdderBlock(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (8, 6, 6, 1))
  forward = nnx.jit(lambda model, x: model(x))
  model.eval()
  before = forward(model, x)
  recompute_batch_norm_stats(model, [x])
  after = forward(model, x)
  model.train()
  train_mode = forward(model, x)
  # With the statistics of x itself, eval mode reproduces training mode on x; the initial
  # running averages (0 and 1) are far from an adder layer's large negative outputs.
  np.testing.assert_allclose(after, train_mode, rtol=1e-3, atol=1e-3)
  assert float(jnp.abs(before - train_mode).max()) > 1.0


def test_errors():
  with pytest.raises(ValueError, match="no nnx.BatchNorm"):
    recompute_batch_norm_stats(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), [jnp.ones((1, 2))])
  with pytest.raises(ValueError, match="batches is empty"):
    recompute_batch_norm_stats(TwoNorms(nnx.Rngs(0)), [])


def test_a_shift_keeps_the_statistics_where_nothing_changed_and_moves_them_by_the_change():
  reference = TwoNorms(nnx.Rngs(0))
  reference.eval()
  trained = {name: (np.asarray(getattr(reference, name).mean[...]),
                    np.asarray(getattr(reference, name).var[...])) for name in ("first", "second")}
  rng = np.random.default_rng(0)
  batches = [rng.normal(loc=[5.0, -2.0, 0.0], size=(16, 3)).astype(np.float32)
             for _ in range(2)]
  same = nnx.clone(reference)
  assert shift_batch_norm_stats(same, reference, batches) == 2
  for name, (mean, var) in trained.items():  # Bit for bit: nothing changed, nothing moves.
    np.testing.assert_array_equal(getattr(same, name).mean[...], mean)
    np.testing.assert_array_equal(getattr(same, name).var[...], var)
  # A derived model whose dense layer computes 2 h + 1: the second norm's input moves.
  derived = nnx.clone(reference)
  derived.dense.kernel[...] = 2 * derived.dense.kernel[...]
  derived.dense.bias[...] = 2 * derived.dense.bias[...] + 1.0
  shift_batch_norm_stats(derived, reference, batches)
  hidden = TwoNorms(nnx.Rngs(0))
  recompute_batch_norm_stats(hidden, batches)  # The reference's own moments on the batches.
  mean, var = np.asarray(hidden.second.mean[...]), np.asarray(hidden.second.var[...])
  np.testing.assert_array_equal(derived.first.mean[...], trained["first"][0])
  np.testing.assert_allclose(derived.second.mean[...], trained["second"][0] + (2 * mean + 1) - mean,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(derived.second.var[...], trained["second"][1] * 4, rtol=1e-4)
  assert reference.first.use_running_average and reference.first.momentum == 0.9


def test_a_shift_needs_the_same_batch_norms():
  with pytest.raises(ValueError, match="different BatchNorms"):
    shift_batch_norm_stats(TwoNorms(nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0)),
                           [jnp.ones((2, 3))])

"""Tests for adderjax.optim against independent NumPy computations."""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adderjax.nn import AdderKernel
from adderjax.optim import (
  OnlyAdderKernelsState,
  ScaleByAdaptiveLrState,
  adder_kernel_mask,
  addernet_sgd,
  only_adder_kernels,
  scale_by_adaptive_lr,
)

RTOL = 1e-5
ATOL = 1e-6


def _adaptive_np(g: np.ndarray, eta: float, eps: float = 1e-12) -> np.ndarray:
  g = np.asarray(g, np.float64)
  return eta * np.sqrt(g.size) * g / max(np.linalg.norm(g), eps)


def _random_tree(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
      "conv": {
          "adder_kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
          "bias": rng.normal(size=(4,)).astype(np.float32),
      },
      "dense": {"kernel": rng.normal(size=(4, 5)).astype(np.float32)},
  }


class _TinyAdderModel(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.w = AdderKernel(jnp.ones((3, 3)))
    self.linear = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear(x @ self.w[...])


# scale_by_adaptive_lr


def test_scale_by_adaptive_lr_matches_numpy():
  grads = jax.tree.map(jnp.asarray, _random_tree(0))
  tx = scale_by_adaptive_lr(eta=0.3)
  state = tx.init(grads)
  assert isinstance(state, ScaleByAdaptiveLrState)
  for s in jax.tree.leaves(state.scale):
    assert s.shape == () and s.dtype == jnp.float32 and s == 0

  updates, state = jax.jit(tx.update)(grads, state)

  for g, u, s in zip(
      jax.tree.leaves(grads),
      jax.tree.leaves(updates),
      jax.tree.leaves(state.scale),
  ):
    g = np.asarray(g)
    np.testing.assert_allclose(u, _adaptive_np(g, 0.3), rtol=RTOL, atol=ATOL)
    expected_scale = 0.3 * np.sqrt(g.size) / np.linalg.norm(g)
    np.testing.assert_allclose(s, expected_scale, rtol=RTOL)
    # Each leaf gets the norm eta * sqrt(k).
    np.testing.assert_allclose(
        np.linalg.norm(u), 0.3 * np.sqrt(g.size), rtol=RTOL
    )


def test_scale_by_adaptive_lr_zero_gradient_uses_eps_floor():
  tx = scale_by_adaptive_lr(eta=0.2, eps=1e-6)
  grads = {"w": jnp.zeros((2, 8))}
  updates, state = tx.update(grads, tx.init(grads))
  assert np.all(np.isfinite(updates["w"]))
  np.testing.assert_array_equal(updates["w"], np.zeros((2, 8)))
  np.testing.assert_allclose(state.scale["w"], 0.2 * 4.0 / 1e-6, rtol=RTOL)


def test_scale_by_adaptive_lr_preserves_bfloat16():
  g = np.arange(1.0, 7.0, dtype=np.float32).reshape(2, 3)
  grads = {"w": jnp.asarray(g, jnp.bfloat16)}
  tx = scale_by_adaptive_lr()
  updates, state = tx.update(grads, tx.init(grads))
  assert updates["w"].dtype == jnp.bfloat16
  assert state.scale["w"].dtype == jnp.float32
  np.testing.assert_allclose(
      updates["w"].astype(np.float32), _adaptive_np(g, 0.2), rtol=1e-2
  )


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(eta=0.0), "eta"),
        (dict(eta=-0.1), "eta"),
        (dict(eps=0.0), "eps"),
        (dict(eps=-1.0), "eps"),
    ],
)
def test_scale_by_adaptive_lr_rejects_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name) as info:
    scale_by_adaptive_lr(**kwargs)
  assert repr(kwargs[name]) in str(info.value)


# adder_kernel_mask


def test_adder_kernel_mask_on_nnx_state():
  params = nnx.state(_TinyAdderModel(nnx.Rngs(0)), nnx.Param)
  mask = adder_kernel_mask(params)
  assert mask["w"] is True
  assert mask["linear"]["kernel"] is False
  assert mask["linear"]["bias"] is False
  assert sorted(jax.tree.leaves(mask)) == [False, False, True]


def test_adder_kernel_mask_on_linen_dict():
  mask = adder_kernel_mask(_random_tree(0))
  assert mask == {
      "conv": {"adder_kernel": True, "bias": False},
      "dense": {"kernel": False},
  }


# only_adder_kernels


@pytest.mark.parametrize("how", ["default", "bools", "callable"])
def test_only_adder_kernels_scales_selected_leaves_only(how):
  grads = jax.tree.map(jnp.asarray, _random_tree(1))
  if how == "default":
    # Default mask: the leaves named "adder_kernel".
    mask, selected = None, ("conv", "adder_kernel")
  elif how == "bools":
    mask = {
        "conv": {"adder_kernel": False, "bias": False},
        "dense": {"kernel": True},
    }
    selected = ("dense", "kernel")
  else:
    mask = lambda p: jax.tree.map(lambda x: x.ndim == 1, p)
    selected = ("conv", "bias")
  tx = only_adder_kernels(scale_by_adaptive_lr(eta=0.5), mask)
  state = tx.init(grads)
  assert isinstance(state, OnlyAdderKernelsState)
  # The selection is in the structure: the only array is the selected scale.
  assert len(jax.tree.leaves(state)) == 1

  updates, state = jax.jit(tx.update)(grads, state, grads)

  for outer, inner in [
      ("conv", "adder_kernel"),
      ("conv", "bias"),
      ("dense", "kernel"),
  ]:
    g = np.asarray(grads[outer][inner])
    u = np.asarray(updates[outer][inner])
    if (outer, inner) == selected:
      np.testing.assert_allclose(u, _adaptive_np(g, 0.5), rtol=RTOL, atol=ATOL)
    else:
      np.testing.assert_array_equal(u, g)


def test_only_adder_kernels_with_nothing_selected():
  grads = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
  tx = only_adder_kernels(scale_by_adaptive_lr())
  updates, _ = tx.update(grads, tx.init(grads))
  chex.assert_trees_all_equal(updates, grads)


def test_only_adder_kernels_remembers_nnx_types_from_init():
  model = _TinyAdderModel(nnx.Rngs(0))
  tx = only_adder_kernels(scale_by_adaptive_lr(eta=0.2))
  state = tx.init(nnx.state(model, nnx.Param))
  # update sees plain arrays, as nnx.Optimizer passes them.
  grads = nnx.as_pure(nnx.state(model, nnx.Param))
  updates, _ = tx.update(grads, state)
  np.testing.assert_allclose(
      updates["w"], _adaptive_np(np.ones((3, 3)), 0.2), rtol=RTOL
  )
  np.testing.assert_array_equal(
      updates["linear"]["kernel"], grads["linear"]["kernel"]
  )


# addernet_sgd


def _addernet_sgd_np(params, grads_seq, lrs, momentum, wd, eta, nesterov):
  """Hand-written re-implementation of the official recipe."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  bufs = {k: np.zeros_like(v) for k, v in params.items()}
  for grads, lr in zip(grads_seq, lrs):
    for k, p in params.items():
      g = np.asarray(grads[k], np.float64)
      if k == "adder_kernel":
        g = _adaptive_np(g, eta)
      d = g + wd * p
      bufs[k] = momentum * bufs[k] + d
      step = d + momentum * bufs[k] if nesterov else bufs[k]
      params[k] = p - lr * step
  return params


@pytest.mark.parametrize(
    "schedule, nesterov",
    [(False, False), (True, False), (False, True)],
)
def test_addernet_sgd_matches_numpy_recipe(schedule, nesterov):
  rng = np.random.default_rng(2)
  params = {
      "adder_kernel": rng.normal(size=(3, 3, 2, 2)).astype(np.float32),
      "kernel": rng.normal(size=(4, 3)).astype(np.float32),
      "bias": rng.normal(size=(3,)).astype(np.float32),
  }
  def random_like(p):
    return rng.normal(size=p.shape).astype(np.float32)

  grads_seq = [jax.tree.map(random_like, params) for _ in range(3)]
  if schedule:
    learning_rate = optax.cosine_decay_schedule(0.1, decay_steps=4)
    lrs = [0.1 * 0.5 * (1 + np.cos(np.pi * i / 4)) for i in range(3)]
  else:
    learning_rate = 0.1
    lrs = [0.1] * 3
  kwargs = dict(momentum=0.8, weight_decay=1e-2, eta=0.3, nesterov=nesterov)

  tx = addernet_sgd(learning_rate, **kwargs)
  jax_params = jax.tree.map(jnp.asarray, params)
  state = tx.init(jax_params)
  update = jax.jit(tx.update)
  for grads in grads_seq:
    updates, state = update(grads, state, jax_params)
    jax_params = optax.apply_updates(jax_params, updates)

  expected = _addernet_sgd_np(
      params,
      grads_seq,
      lrs,
      kwargs["momentum"],
      kwargs["weight_decay"],
      kwargs["eta"],
      nesterov,
  )
  for k in params:
    np.testing.assert_allclose(jax_params[k], expected[k], rtol=RTOL, atol=ATOL)


def test_addernet_sgd_nnx_optimizer_under_jit():
  model = _TinyAdderModel(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, addernet_sgd(0.1), wrt=nnx.Param)
  x = jnp.arange(6.0).reshape(2, 3) / 6.0
  w0 = np.asarray(model.w[...], np.float64)
  k0 = np.asarray(model.linear.kernel[...], np.float64)

  def loss_fn(model):
    return jnp.sum(model(x) ** 2)

  @nnx.jit
  def train_step(model, optimizer):
    grads = nnx.grad(loss_fn)(model)
    optimizer.update(model, grads)
    return grads

  grads = train_step(model, optimizer)
  g_w = np.asarray(grads["w"][...], np.float64)
  g_k = np.asarray(grads["linear"]["kernel"][...], np.float64)
  assert np.linalg.norm(g_w) > 0

  expected_w = w0 - 0.1 * (_adaptive_np(g_w, 0.2) + 5e-4 * w0)
  expected_k = k0 - 0.1 * (g_k + 5e-4 * k0)
  np.testing.assert_allclose(model.w[...], expected_w, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(
      model.linear.kernel[...], expected_k, rtol=RTOL, atol=ATOL
  )
  # A second step runs with the stored state.
  train_step(model, optimizer)
  assert int(optimizer.step[...]) == 2


@pytest.mark.parametrize(
    "args, kwargs, name",
    [
        (("0.1",), {}, "learning_rate"),
        ((None,), {}, "learning_rate"),
        ((np.ones(2),), {}, "learning_rate"),
        ((0.1,), dict(momentum=1.0), "momentum"),
        ((0.1,), dict(momentum=-0.1), "momentum"),
        ((0.1,), dict(weight_decay=-1e-4), "weight_decay"),
        ((0.1,), dict(eta=0.0), "eta"),
    ],
)
def test_addernet_sgd_rejects_bad_arguments(args, kwargs, name):
  with pytest.raises(ValueError, match=name):
    addernet_sgd(*args, **kwargs)


# Composability with optax: array hyperparameters, inject_hyperparams, MultiSteps.


def _train_losses(tx, steps=3):
  """Losses and final params of `_TinyAdderModel` trained by ``tx`` in a jitted nnx step."""
  model = _TinyAdderModel(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.arange(6.0).reshape(2, 3) / 6.0

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.sum((m(x) - 1.0) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(steps)]
  return losses, nnx.state(model, nnx.Param), optimizer


def test_inject_hyperparams_addernet_sgd_trains_like_the_plain_transform():
  want_losses, want_params, _ = _train_losses(addernet_sgd(0.1))
  losses, params, optimizer = _train_losses(
      optax.inject_hyperparams(addernet_sgd)(learning_rate=0.1))
  assert want_losses[0] > want_losses[-1]
  np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
  chex.assert_trees_all_close(params, want_params, rtol=1e-6, atol=1e-7)
  hyperparams = optimizer.opt_state.hyperparams
  assert float(hyperparams["learning_rate"][...]) == pytest.approx(0.1)
  assert float(hyperparams["eta"][...]) == pytest.approx(0.2)


def test_inject_hyperparams_scale_by_adaptive_lr_matches_the_plain_transform():
  def tx(adaptive):
    return optax.chain(only_adder_kernels(adaptive), optax.sgd(0.05))

  want_losses, want_params, _ = _train_losses(tx(scale_by_adaptive_lr(eta=0.3)))
  losses, params, _ = _train_losses(
      tx(optax.inject_hyperparams(scale_by_adaptive_lr)(eta=0.3)))
  np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
  chex.assert_trees_all_close(params, want_params, rtol=1e-6, atol=1e-7)


def test_array_learning_rate_under_jit_and_vmap():
  params = jax.tree.map(jnp.asarray, _random_tree(3))
  grads = jax.tree.map(jnp.asarray, _random_tree(4))

  def step(learning_rate):
    tx = addernet_sgd(learning_rate, eta=jnp.asarray(0.3), momentum=jnp.asarray(0.9))
    return tx.update(grads, tx.init(params), params)[0]

  want = jax.jit(lambda: addernet_sgd(0.1, eta=0.3).update(
      grads, addernet_sgd(0.1).init(params), params)[0])()
  # atol: the updates are about 1e-2, and the smallest (2.7e-6) differ in their last bits
  # where a GPU sums the norms in another order (by 6e-12 on an H200).
  for got in (step(jnp.asarray(0.1)), jax.jit(step)(jnp.asarray(0.1))):
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-9)
  # A learning-rate sweep in one call: the updates scale with the rate.
  swept = jax.jit(jax.vmap(step))(jnp.asarray([0.1, 0.3]))
  chex.assert_trees_all_close(jax.tree.map(lambda a: a[0], swept), want, rtol=1e-6, atol=1e-9)
  chex.assert_trees_all_close(jax.tree.map(lambda a: a[1], swept),
                              jax.tree.map(lambda b: 3 * b, want), rtol=1e-5, atol=1e-7)


def test_multi_steps_accumulates_the_mean_gradient():
  rng = np.random.default_rng(5)
  shapes = {"adder_kernel": (3, 3, 2, 2), "kernel": (4, 3), "bias": (3,)}

  def random_tree():
    return {k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}

  params = random_tree()
  grads_seq = [random_tree() for _ in range(3)]
  tx = optax.MultiSteps(addernet_sgd(0.1, momentum=0.8, weight_decay=1e-2, eta=0.3),
                        every_k_schedule=3)
  jax_params = jax.tree.map(jnp.asarray, params)
  state = tx.init(jax_params)
  update = jax.jit(tx.update)
  for i, grads in enumerate(grads_seq):
    updates, state = update(grads, state, jax_params)
    if i < 2:  # accumulating: no update yet
      assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
  # The third call applies addernet_sgd once, to the mean of the three gradients.
  mean = {k: sum(g[k].astype(np.float64) for g in grads_seq) / 3 for k in shapes}
  expected = _addernet_sgd_np(params, [mean], [0.1], 0.8, 1e-2, 0.3, False)
  got = optax.apply_updates(jax_params, updates)
  for k in shapes:
    np.testing.assert_allclose(got[k], expected[k], rtol=RTOL, atol=ATOL)


def test_scale_by_adaptive_lr_in_float64_is_exact():
  # The official code computes the norm in the gradient's precision; float32
  # arithmetic would cost a relative 1e-7 on a float64 model.
  g = np.random.default_rng(9).normal(size=(3, 3, 4, 5))
  with jax.enable_x64(True):
    grads = {"adder_kernel": jnp.asarray(g, jnp.float64)}
    tx = scale_by_adaptive_lr(eta=0.2)
    state = tx.init(grads)
    assert state.scale["adder_kernel"].dtype == jnp.float64
    updates, state = jax.jit(tx.update)(grads, state)
    assert updates["adder_kernel"].dtype == jnp.float64
    assert state.scale["adder_kernel"].dtype == jnp.float64
    np.testing.assert_allclose(updates["adder_kernel"], _adaptive_np(g, 0.2), rtol=1e-13)

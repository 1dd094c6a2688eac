"""Helpers shared by the test files: NumPy-drawn operands and kernels, chex variants for pytest."""

import functools
import types
import unittest

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest


def normal_np(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
  """A float32 NumPy array of standard normal draws (a writable copy, unlike `normal`'s)."""
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def normal(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
  """`normal_np`'s draws as a float32 jax.Array."""
  return jnp.asarray(normal_np(shape, seed))


def np_init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32, *,
            seed: int = 0) -> jax.Array:
  """A kernel initialiser that ignores ``key`` and returns ``normal(shape, seed)``.

  JAX's RNG compiles anew, slowly, for each shape; NumPy keeps the tests fast.
  """
  del key
  return normal(shape, seed).astype(dtype)


def np_init_layer(layer_class: type, *args, seed: int = 0, **options):
  """``layer_class(*args, **options)`` with its kernel from `np_init` and ``nnx.Rngs(0)``."""
  return layer_class(*args, kernel_init=functools.partial(np_init, seed=seed),
                     rngs=nnx.Rngs(0), **options)


def chex_variants(**which: bool) -> pytest.MarkDecorator:
  """`chex.variants` for a pytest test: one test per variant, each given as ``variant``.

  ``which`` takes `chex.variants`' switches (``with_jit=True, without_jit=True``,
  ``with_pmap=True``, ...). chex unrolls its variants only in an absltest
  ``parameterized.TestCase``, where the test reads ``self.variant``; here the
  same decorator (``variant(fn)``, or ``variant(**options)(fn)``) is the
  test's ``variant`` argument. A variant chex skips here (``with_pmap`` on
  one device) is a skipped test.
  """
  params = []
  for test in chex.variants(lambda test_case: test_case.variant(lambda: None), **which):
    # chex fails a test that never applies its variant: the lambda applies it once.
    name = test.__name__.removeprefix("<lambda>").lstrip("_")
    test_case = types.SimpleNamespace()
    try:
      test(test_case)
    except unittest.SkipTest as skip:
      params.append(pytest.param(None, id=name, marks=pytest.mark.skip(reason=str(skip))))
    else:
      params.append(pytest.param(test_case.variant, id=name))
  return pytest.mark.parametrize("variant", params)

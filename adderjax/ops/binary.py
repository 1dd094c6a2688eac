"""The sign function with a straight-through gradient, for binary networks.

The binary neural networks the AdderNet paper compares against (BNN: Hubara,
Courbariaux et al., "Binarized Neural Networks", NeurIPS 2016) binarise both
weights and activations with ``sign`` in the forward pass and train through it
with the straight-through estimator: the gradient passes unchanged where the
input lies in ``[-1, 1]`` and is cut to zero outside, which is the gradient of
``HardTanh``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["sign_ste"]


@jax.custom_vjp
def _sign_ste(x: jax.Array) -> jax.Array:
  one = jnp.ones((), x.dtype)
  return jnp.where(x >= 0, one, -one)


def _sign_ste_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return _sign_ste(x), x


def _sign_ste_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  return (jnp.where(jnp.abs(x) <= 1, g, jnp.zeros((), g.dtype)),)


_sign_ste.defvjp(_sign_ste_fwd, _sign_ste_bwd)


def sign_ste(x: jax.Array) -> jax.Array:
  """Binarises ``x`` to ``+1``/``-1``, with the straight-through gradient.

  Forward: ``+1`` where ``x >= 0`` (so ``sign(0) = +1``) and ``-1`` elsewhere,
  exactly, in the dtype of ``x``. Backward: ``g * 1{|x| <= 1}``, the
  straight-through estimator of BNN (Hubara et al., 2016).

  Args:
    x: a floating-point array of any shape.

  Returns:
    An array of the shape and dtype of ``x`` holding only ``-1`` and ``+1``.

  Raises:
    TypeError: if ``x`` is not a floating-point array.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from adderjax.ops import sign_ste
    >>> x = jnp.array([-2.0, -0.5, 0.0, 0.5, 2.0])
    >>> print(sign_ste(x))
    [-1. -1.  1.  1.  1.]
    >>> print(jax.grad(lambda x: sign_ste(x).sum())(x))
    [0. 1. 1. 1. 0.]

  References:
    Hubara, Courbariaux, Soudry, El-Yaniv, Bengio, "Binarized Neural
    Networks", NeurIPS 2016. https://arxiv.org/abs/1602.02830
  """
  if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
    got = x.dtype if hasattr(x, "dtype") else type(x).__name__
    raise TypeError(f"x must be a floating-point array, got x of type {got}.")
  return _sign_ste(x)

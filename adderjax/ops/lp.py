"""Kernels for adder layers with an exponent: ``-sum |X - F|^p``, 1 < p <= 2, and its exact
gradient.

The lp adders of the papers that followed AdderNet (Chen et al., "Adder Neural
Networks", TPAMI, arXiv:2105.14202; Liu et al., "Winograd Algorithm for
AdderNet", ICML 2021; NGD, IEEE TIP 2023) anneal ``p`` from 2 to 1 during
training. `adderjax.ops.adder_conv` calls these for ``p != 1``; ``p = 1``
stays on the L1 implementations and their kernels.

- General ``p``: the loops of `adderjax.ops.xla` with ``|d|^p`` in place of
  ``|d|`` and ``p * |d|^(p-1) * sign(d)`` in place of the sign, so the
  broadcast is never materialised either. A power costs a logarithm and an
  exponential per element pair, several times an L1 term.
- ``p = 2``: ``sum (X - F)^2 = sum X^2 - 2 sum X F + sum F^2`` is one
  convolution and two cheap sums, and the exact gradient ``2 sum g (X - F)``
  is twice the full-precision rule, which `adderjax.ops.xla` already computes
  with convolutions. The squares may cancel where ``X`` is close to ``F``:
  float32 keeps about ``1e-7 * (sum X^2 + sum F^2)`` of absolute accuracy.

Operands arrive in one dtype, ``p`` as a scalar of that dtype; the caller casts.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses

import jax
from jax import lax
import jax.numpy as jnp

from adderjax.ops import reference, xla
from adderjax.ops.spec import ConvSpec

__all__ = ["KERNELS", "LpKernels", "exact_factor"]


def exact_factor(p: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """``d -> |d|^(p-1) * sign(d)``: the derivative of ``|d|^p`` divided by ``p``."""
  return lambda d: jnp.abs(d) ** (p - 1) * jnp.sign(d)


def _xla_forward(x: jax.Array, w: jax.Array, p: jax.Array, spec: ConvSpec) -> jax.Array:
  return xla.forward(x, w, spec, distance=lambda d: jnp.abs(d) ** p)


def _xla_weight_grad(x: jax.Array, w: jax.Array, p: jax.Array, g: jax.Array,
                     spec: ConvSpec) -> jax.Array:
  return p * xla.factor_weight_grad(x, w, g, spec, exact_factor(p))


def _xla_input_grad(x: jax.Array, w: jax.Array, p: jax.Array, g: jax.Array,
                    spec: ConvSpec) -> jax.Array:
  return p * xla.factor_input_grad(x, w, g, spec, exact_factor(p))


def _conv(x: jax.Array, w: jax.Array, spec: ConvSpec) -> jax.Array:
  return lax.conv_general_dilated(
      x, w, spec.strides, spec.padding, rhs_dilation=spec.dilation,
      feature_group_count=spec.groups, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST)


def _square_forward(x: jax.Array, w: jax.Array, spec: ConvSpec) -> jax.Array:
  kh, kw, cg, out = w.shape
  groups = spec.groups
  # sum X^2 over each patch and group: a grouped convolution of X^2 with a kernel of ones.
  x_squares = _conv(x * x, jnp.ones((kh, kw, cg, groups), x.dtype), spec)
  x_squares = jnp.repeat(x_squares, out // groups, axis=-1)
  y = 2 * _conv(x, w, spec) - x_squares - jnp.sum(w * w, axis=(0, 1, 2))
  return jnp.minimum(y, 0)  # Rounding may leave a distance of ~0 slightly negative.


def _square_weight_grad(x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec) -> jax.Array:
  return 2 * xla.weight_grad(x, w, g, spec, "full_precision")


def _square_input_grad(x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec) -> jax.Array:
  return 2 * xla.input_grad(x, w, g, spec, "unclipped")


def _reference_square_forward(x: jax.Array, w: jax.Array, spec: ConvSpec) -> jax.Array:
  return reference.lp_forward(x, w, jnp.asarray(2, x.dtype), spec)


def _reference_square_weight_grad(x: jax.Array, w: jax.Array, g: jax.Array,
                                  spec: ConvSpec) -> jax.Array:
  return reference.lp_weight_grad(x, w, jnp.asarray(2, x.dtype), g, spec)


def _reference_square_input_grad(x: jax.Array, w: jax.Array, g: jax.Array,
                                 spec: ConvSpec) -> jax.Array:
  return reference.lp_input_grad(x, w, jnp.asarray(2, x.dtype), g, spec)


@dataclasses.dataclass(frozen=True)
class LpKernels:
  """One formulation of the lp adder: forward and exact gradients, for any ``p`` and for ``p = 2``.

  Attributes:
    forward: ``(x, w, p, spec) -> -sum |X - F|^p``.
    weight_grad: ``(x, w, p, g, spec) -> sum g * p * |X - F|^(p-1) * sign(X - F)``.
    input_grad: ``(x, w, p, g, spec) -> sum g * p * |F - X|^(p-1) * sign(F - X)``.
    square_forward: ``(x, w, spec)``, the forward at ``p = 2``.
    square_weight_grad: ``(x, w, g, spec)``, the weight gradient at ``p = 2``.
    square_input_grad: ``(x, w, g, spec)``, the input gradient at ``p = 2``.
  """

  forward: Callable[..., jax.Array]
  weight_grad: Callable[..., jax.Array]
  input_grad: Callable[..., jax.Array]
  square_forward: Callable[..., jax.Array]
  square_weight_grad: Callable[..., jax.Array]
  square_input_grad: Callable[..., jax.Array]


KERNELS: dict[str, LpKernels] = {
    "xla": LpKernels(_xla_forward, _xla_weight_grad, _xla_input_grad, _square_forward,
                     _square_weight_grad, _square_input_grad),
    "reference": LpKernels(reference.lp_forward, reference.lp_weight_grad,
                           reference.lp_input_grad, _reference_square_forward,
                           _reference_square_weight_grad, _reference_square_input_grad),
}
"""``"reference"`` (the broadcasting formulation, small shapes only) for
``implementation="reference"``; ``"xla"`` for every other implementation."""

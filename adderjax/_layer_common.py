"""What the NNX (`adderjax.nn`) and Linen (`adderjax.linen`) adder layers share.

Argument checks beyond `adderjax._checks`, the default initializers, and the
adder convolution on any batch dims with every padding mode and a bias.
"""

from __future__ import annotations

import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from adderjax._checks import ZERO_PADDINGS, Padding2D
from adderjax.ops.dispatch import ImplementationLike, adder_conv, check_implementation
from adderjax.ops.spec import GradMode, check_grad_mode

__all__ = ["PADDING_MODES", "apply_adder_conv", "check_op_options", "default_bias_init",
           "default_kernel_init", "full_precision_operands", "keep_full_precision", "pad_input"]

default_kernel_init = nnx.initializers.normal(stddev=1.0)
"""N(0, 1), the official code's initialization of adder kernels."""
default_bias_init = nnx.initializers.zeros_init()

_PAD_MODES = {"CIRCULAR": "wrap", "REFLECT": "reflect"}
PADDING_MODES = ZERO_PADDINGS + tuple(_PAD_MODES)
"""The padding strings of the layers: zeros, or `flax.nnx.Conv`'s periodic and reflecting."""


def check_op_options(grad_mode: Any, implementation: Any) -> None:
  """A ValueError naming ``grad_mode`` or ``implementation`` if `adder_conv` rejects it."""
  check_grad_mode(grad_mode)
  check_implementation(implementation)


def keep_full_precision(param: jax.Array | None,
                        promoted: jax.Array | None) -> jax.Array | None:
  """``param`` in the promoted dtype, but never below float32.

  The layers promote their inputs to the compute dtype as Flax does, but an
  adder kernel (and the bias added to the output) enters the sum at float32 or
  more: a trained kernel's output offset ``-sum |w|`` reaches the thousands,
  and rounding the kernel to bfloat16 moves it by more than the signal
  (README, "Mixed precision").
  """
  if param is None:
    return None
  return param.astype(jnp.promote_types(promoted.dtype, jnp.float32))


def full_precision_operands(promoted: tuple[jax.Array, jax.Array, jax.Array | None],
                            kernel: jax.Array,
                            bias: jax.Array | None
                            ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """The layer's ``(inputs, kernel, bias)``: ``promote_dtype``'s inputs, the parameters kept
  at float32 or more (`keep_full_precision`).

  Args:
    promoted: what the layer's ``promote_dtype`` returned for ``(inputs, kernel, bias)``.
    kernel: the kernel parameter as stored.
    bias: the bias parameter as stored, or None.
  """
  inputs, promoted_kernel, promoted_bias = promoted
  return (inputs, keep_full_precision(kernel, promoted_kernel),
          keep_full_precision(bias, promoted_bias))


def pad_input(x: jax.Array, kernel_hw: tuple[int, int], kernel_dilation: tuple[int, int],
              padding: Padding2D) -> tuple[jax.Array, Padding2D]:
  """``(x, padding)`` for the op: ``"CIRCULAR"`` and ``"REFLECT"`` pad ``x``
  as `flax.nnx.Conv` does and become ``"VALID"``; other paddings pass through."""
  if padding not in _PAD_MODES:
    return x, padding
  dilated = [(k - 1) * d + 1 for k, d in zip(kernel_hw, kernel_dilation)]
  pads = [(0, 0)] * (x.ndim - 3) + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
  return jnp.pad(x, pads, mode=_PAD_MODES[padding]), "VALID"


def apply_adder_conv(
    inputs: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    *,
    strides: tuple[int, int],
    padding: Padding2D,
    kernel_dilation: tuple[int, int],
    feature_group_count: int,
    grad_mode: GradMode,
    p: ArrayLike | None = None,
    implementation: ImplementationLike,
) -> jax.Array:
  """`adder_conv` on ``(*batch, H, W, C)`` or ``(H, W, C)`` inputs, plus a bias.

  The batch dims are flattened into one, or one is added, then restored.
  ``"CIRCULAR"`` and ``"REFLECT"`` pad the input as `flax.nnx.Conv` does, then
  convolve with ``"VALID"``.
  """
  batch_shape = inputs.shape[:-3]
  x = jnp.reshape(inputs, (math.prod(batch_shape),) + inputs.shape[-3:])
  x, padding = pad_input(x, kernel.shape[:2], kernel_dilation, padding)
  y = adder_conv(x, kernel, strides=strides, padding=padding, rhs_dilation=kernel_dilation,
                 feature_group_count=feature_group_count, grad_mode=grad_mode, p=p,
                 implementation=implementation)
  if bias is not None:
    y = y + bias
  return jnp.reshape(y, batch_shape + y.shape[1:])

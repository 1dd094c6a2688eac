"""The quantizers of Nie et al. (NeurIPS 2022) and the lossless weight clamp.

With ``b`` bits and a group scale ``s``, activations in ``[0, s]`` are
unsigned, ``a_q = clip(round(x (2^b - 1) / s), 0, 2^b - 1)``, and weights in
``[-s, s]`` signed with twice the step,
``w_q = clip(round(w (2^b - 1) / (2 s)), -2^(b-1), 2^(b-1) - 1)``, so that
``|a_hat - w_hat| = (s / (2^b - 1)) |a_q - 2 w_q|``.

Activations that can be negative (a layer fed the normalized image, or after
an activation that keeps the sign) take the signed quantizer with the weights'
step, ``a_q = clip(round(x (2^b - 1) / (2 s)), -2^(b-1), 2^(b-1) - 1)``, and
``|a_hat - w_hat| = (2 s / (2^b - 1)) |a_q - w_q|``: half the resolution on
``[0, s]``, the price of the sign bit. The clamp below is lossless for
activations in ``[-s, s]`` as well.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from adderjax._checks import is_int

__all__ = ["MAX_BITS", "MIN_BITS", "activation_code_range", "activation_multiplier",
           "activation_step", "check_bits", "clamp_weights", "input_multiplier",
           "quantize_activations", "quantize_weights"]

MIN_BITS = 2
MAX_BITS = 16


def check_bits(bits: object) -> int:
  """Returns ``bits`` if it is an int in ``[MIN_BITS, MAX_BITS]``, else raises a ValueError."""
  if not is_int(bits) or not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f"bits must be an int from {MIN_BITS} to {MAX_BITS}, got bits={bits!r}.")
  return int(bits)


def _levels(bits: int) -> int:
  return 2 ** bits - 1


def quantize_activations(x: jax.Array, scale: jax.Array | float, bits: int, *,
                         signed: bool = False) -> jax.Array:
  """Activations as int32 codes: unsigned on ``[0, s]``, or signed with twice the step.

  Args:
    x: the activations (float).
    scale: the group scale ``s`` (broadcast against ``x``).
    bits: the number of bits ``b``: an int, or an int32 array (traced, so that
      one compiled function serves every bit width; the codes are the same).
    signed: the signed quantizer, for inputs that can be negative.

  Returns:
    int32 codes in ``[0, 2^b - 1]``, or ``[-2^(b-1), 2^(b-1) - 1]`` if signed.

  Example:
    >>> import jax.numpy as jnp
    >>> from adderjax.quant import quantize_activations
    >>> quantize_activations(jnp.array([-1.0, 0.0, 0.5, 1.0, 3.0]), 1.0, 8).tolist()
    [0, 0, 128, 255, 255]
  """
  low, high = activation_code_range(bits, signed=signed)
  codes = jnp.clip(jnp.round(x * activation_multiplier(scale, bits, signed=signed)), low, high)
  return codes.astype(jnp.int32)


def activation_multiplier(scale: jax.Array | float, bits: int, *,
                          signed: bool = False) -> jax.Array:
  """What `quantize_activations` multiplies ``x`` by before rounding: ``(2^b - 1) / s``, or
  half that if signed (the native kernels take it, to round exactly as XLA does)."""
  levels = _levels(bits)
  return levels / (2 * scale) if signed else levels / scale


def activation_code_range(bits: int, *, signed: bool = False) -> tuple:
  """The codes' ``(lowest, highest)``: ``(0, 2^b - 1)``, or ``(-2^(b-1), 2^(b-1) - 1)`` if
  signed."""
  if signed:
    return -2 ** (bits - 1), 2 ** (bits - 1) - 1
  return 0, _levels(bits)


def quantize_weights(w: jax.Array, scale: jax.Array | float, bits: int) -> jax.Array:
  """Weights as signed int32 codes with the step ``2 s / (2^b - 1)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from adderjax.quant import quantize_weights
    >>> quantize_weights(jnp.array([-1.0, -0.5, 0.0, 0.5, 1.0]), 1.0, 8).tolist()
    [-128, -64, 0, 64, 127]
  """
  levels = _levels(bits)
  codes = jnp.clip(jnp.round(w * (levels / (2 * scale))), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
  return codes.astype(jnp.int32)


def input_multiplier(signed: bool) -> int:
  """``m`` in the integer layer's ``|a_q - m w_q|``: 2 for unsigned inputs, 1 for signed."""
  return 1 if signed else 2


def activation_step(scale: jax.Array | float, bits: int, *, signed: bool = False) -> jax.Array:
  """The value of one unit of ``|a_q - m w_q|``: ``s / (2^b - 1)``, or twice that if signed."""
  return jnp.asarray(scale, jnp.float32) * (2 / (input_multiplier(signed) * _levels(bits)))


def clamp_weights(w: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Clips the weights to ``[-s, s]`` and returns the exact correction per output channel.

  For ``|a| <= s``, ``|a - w| = |a - clip(w, -s, s)| + max(|w| - s, 0)``, so
  ``-sum |a - w| = -sum |a - clip(w)| + b_c`` with
  ``b_c = -sum max(|w| - s, 0)`` over the output channel's fan-in.

  Args:
    w: a kernel whose last axis is the output channel (HWIO or IO).
    scale: the scale of each output channel, shape ``(out,)``.

  Returns:
    ``(clipped kernel, b_c)``, ``b_c`` of shape ``(out,)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from adderjax.quant import clamp_weights
    >>> clipped, correction = clamp_weights(jnp.array([[3.0, 0.5], [-2.0, 1.0]]),
    ...                                     jnp.array([1.0, 1.0]))
    >>> clipped.tolist(), correction.tolist()
    ([[1.0, 0.5], [-1.0, 1.0]], [-3.0, 0.0])
  """
  excess = jnp.maximum(jnp.abs(w) - scale, 0.0)
  return jnp.clip(w, -scale, scale), 0.0 - jnp.sum(excess.reshape(-1, w.shape[-1]), axis=0)

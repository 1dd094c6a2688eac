"""Argument checking and normalisation for the adder ops.

Every implementation receives a :class:`ConvSpec`, an already validated,
hashable description of the layer's geometry, so the kernels never re-check
their inputs and `jax.custom_vjp` can take it as a static argument.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import numbers
from typing import Any, Literal, get_args

import jax
from jax import lax
import jax.numpy as jnp

from adderjax._checks import ZERO_PADDINGS, canonical_padding, positive_int, positive_pair

__all__ = ["GRAD_MODES", "P_RANGE", "PADDING_STRINGS", "ConvSpec", "GradMode", "check_grad_mode",
           "check_p", "conv_spec"]

GradMode = Literal["full_precision", "unclipped", "sign"]
"""The type of ``grad_mode`` arguments; `GRAD_MODES` lists its values."""

GRAD_MODES = get_args(GradMode)
"""The backward passes `adder_conv` offers.

- ``"full_precision"`` (default, the paper's and the official code's): weight
  gradient ``g * (X - F)``, input gradient ``g * HardTanh(F - X)``.
- ``"unclipped"``: the same without the HardTanh on the input gradient.
- ``"sign"``: the exact gradient of ``-sum|X - F|`` for both, for ablations.

With an exponent ``p > 1`` (``-sum |X - F|^p``) every mode gives the exact
gradient (`adderjax.ops.adder_conv`).
"""

P_RANGE = (1.0, 2.0)
"""The exponents ``p`` the adder ops take, both ends included."""

PADDING_STRINGS = ZERO_PADDINGS


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """The validated geometry of one adder convolution (2 spatial dims).

  Attributes:
    strides: ``(sh, sw)``.
    padding: ``((top, bottom), (left, right))`` zero padding of the input.
    dilation: ``(dh, dw)`` kernel (rhs) dilation.
    groups: feature group count.
  """

  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  dilation: tuple[int, int]
  groups: int

  def output_spatial(self, in_hw: Sequence[int], kernel_hw: Sequence[int]) -> tuple[int, int]:
    out = []
    for size, k, (lo, hi), d, s in zip(in_hw, kernel_hw, self.padding, self.dilation, self.strides):
      out.append((size + lo + hi - ((k - 1) * d + 1)) // s + 1)
    return tuple(out)


def _check_array(value: Any, name: str, ndim: int | None, what: str) -> None:
  if not hasattr(value, "shape") or not hasattr(value, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(value).__name__}.")
  if ndim is not None and value.ndim != ndim:
    raise ValueError(f"{name} must be a {ndim}-D {what} array, got shape {tuple(value.shape)}.")
  if not jnp.issubdtype(value.dtype, jnp.floating):
    raise TypeError(
        f"{name} must have a floating-point dtype (float32, bfloat16, float16, ...), "
        f"got {value.dtype}.")


def check_grad_mode(grad_mode: Any) -> GradMode:
  if grad_mode not in GRAD_MODES:
    raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got grad_mode={grad_mode!r}.")
  return grad_mode


def check_p(p: Any) -> float | None:
  """Validates an exponent ``p`` of the adder ops; returns its value, or None if it is traced.

  ``p`` may be a real number or a scalar array (NumPy or JAX, floating or
  integer dtype). A concrete value must lie in ``[1, 2]``; a traced one
  (inside `jax.jit`) cannot be checked and is returned as None.

  Example::

    >>> from adderjax.ops.spec import check_p
    >>> check_p(1.5)
    1.5

  Raises:
    TypeError: for a bool, a non-number or a non-real dtype.
    ValueError: for a shape other than ``()``, or a value outside ``[1, 2]``.
  """
  if isinstance(p, bool) or not (isinstance(p, numbers.Real) or hasattr(p, "shape")):
    raise TypeError(f"p must be a real number or a scalar array, got p={p!r} of type "
                    f"{type(p).__name__}.")
  if hasattr(p, "shape"):
    if tuple(p.shape) != ():
      raise ValueError(f"p must be a scalar (shape ()), got p with shape {tuple(p.shape)}.")
    dtype = getattr(p, "dtype", None)
    if dtype is None or jnp.dtype(dtype) == jnp.bool_ or not (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
      raise TypeError(f"p must have a floating-point or integer dtype, got p of dtype {dtype}.")
    if isinstance(p, jax.core.Tracer):
      return None
  value = float(p)
  if not P_RANGE[0] <= value <= P_RANGE[1]:  # NaN fails too.
    raise ValueError(f"p must be in [{P_RANGE[0]:g}, {P_RANGE[1]:g}], got p={value!r}.")
  return value


def conv_spec(x: Any, w: Any, *, strides: Any, padding: Any, rhs_dilation: Any,
              feature_group_count: Any) -> ConvSpec:
  """Validates `adder_conv`'s arguments and returns their :class:`ConvSpec`.

  Raises:
    TypeError: for non-arrays and non-floating dtypes.
    ValueError: for wrong ranks, channel or group mismatches, bad strides,
      dilation or padding, an empty kernel (a zero ``kh`` or ``kw``), and
      kernels larger than the padded input.
  """
  _check_array(x, "x", 4, "NHWC")
  _check_array(w, "w", 4, "HWIO")
  strides = positive_pair(strides, "strides")
  dilation = positive_pair(rhs_dilation, "rhs_dilation")
  groups = positive_int(feature_group_count, "feature_group_count")
  in_channels, out_channels = x.shape[3], w.shape[3]
  if not in_channels:
    raise ValueError(f"x must have at least one input channel, got shape {tuple(x.shape)}.")
  if not out_channels:
    raise ValueError(f"w must have at least one output channel, got shape {tuple(w.shape)}.")
  if in_channels % groups:
    raise ValueError(
        f"feature_group_count={groups} does not divide the input channels of x "
        f"(shape {tuple(x.shape)}).")
  if out_channels % groups:
    raise ValueError(
        f"feature_group_count={groups} does not divide the output channels of w "
        f"(shape {tuple(w.shape)}).")
  if w.shape[2] * groups != in_channels:
    raise ValueError(
        f"Channel mismatch: w has {w.shape[2]} input channels per group (shape "
        f"{tuple(w.shape)}), so x needs {w.shape[2] * groups} channels with "
        f"feature_group_count={groups}, but x has shape {tuple(x.shape)}.")

  kernel_hw = w.shape[:2]
  in_hw = x.shape[1:3]
  if not all(kernel_hw):
    raise ValueError(f"w must have a kernel of at least 1x1 (w is (kh, kw, in, out)), got shape "
                     f"{tuple(w.shape)}.")
  pads = canonical_padding(padding)
  if isinstance(pads, str):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_hw, dilation)]
    pads = tuple(tuple(p) for p in lax.padtype_to_pads(in_hw, dilated, strides, pads))

  spec = ConvSpec(strides=strides, padding=pads, dilation=dilation, groups=groups)  # type: ignore[arg-type]
  for axis, (size, k, (lo, hi), d) in enumerate(zip(in_hw, kernel_hw, pads, dilation)):
    if (k - 1) * d + 1 > size + lo + hi:
      raise ValueError(
          f"The kernel (w shape {tuple(w.shape)}, rhs_dilation={dilation}) spans "
          f"{(k - 1) * d + 1} positions along spatial axis {axis}, more than the padded "
          f"input's {size + lo + hi} (x shape {tuple(x.shape)}, padding={pads}).")
  return spec

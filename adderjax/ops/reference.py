"""The adder convolution written the obvious way, as the tests' oracle.

It unfolds the input into patches and broadcasts them against the filters,
exactly as the official PyTorch code does, so it materialises a tensor of
``outputs x patch size x filters`` elements: use it on small shapes only.
The gradients are the formulas of the paper applied to that broadcast; the
``lp_*`` functions are the same for ``-sum |X - F|^p`` and its exact gradient
(`adderjax.ops.lp`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from adderjax.ops.spec import ConvSpec

__all__ = ["ReferenceAdderConv", "forward", "input_grad", "lp_forward", "lp_input_grad",
           "lp_weight_grad", "unfold", "weight_grad"]


def unfold(x: jax.Array, kernel_hw: tuple[int, int], spec: ConvSpec) -> jax.Array:
  """Patches of a zero-padded NHWC input: ``(B, Ho, Wo, kh, kw, C)``."""
  (sh, sw), (dh, dw) = spec.strides, spec.dilation
  kh, kw = kernel_hw
  ho, wo = spec.output_spatial(x.shape[1:3], kernel_hw)
  xp = jnp.pad(x, ((0, 0), *spec.padding, (0, 0)))
  rows = []
  for i in range(kh):
    cols = []
    for j in range(kw):
      cols.append(xp[:, i * dh: i * dh + (ho - 1) * sh + 1: sh,
                     j * dw: j * dw + (wo - 1) * sw + 1: sw, :])
    rows.append(jnp.stack(cols, axis=3))
  return jnp.stack(rows, axis=3)


def _differences(x: jax.Array, w: jax.Array, spec: ConvSpec) -> jax.Array:
  """``X - F`` broadcast to ``(B, Ho, Wo, kh, kw, G, Cg, Og)``."""
  kh, kw, cg, out = w.shape
  g = spec.groups
  patches = unfold(x, (kh, kw), spec)
  patches = patches.reshape(*patches.shape[:5], g, cg)[..., None]
  filters = w.reshape(kh, kw, cg, g, out // g).transpose(0, 1, 3, 2, 4)
  return patches - filters


def forward(x: jax.Array, w: jax.Array, spec: ConvSpec) -> jax.Array:
  """``Y[b,h,w,o] = -sum_{i,j,c} |Xpad[b, h*s + i*d, w*s + j*d, c] - F[i,j,c,o]|``."""
  y = -jnp.sum(jnp.abs(_differences(x, w, spec)), axis=(3, 4, 6))
  return y.reshape(*y.shape[:3], -1)


def weight_grad(x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
                grad_mode: str) -> jax.Array:
  """``dF = sum_{b,h,w} g * (X - F)``, or ``g * sign(X - F)`` in "sign" mode."""
  diff = _differences(x, w, spec)
  return _weight_grad_of(jnp.sign(diff) if grad_mode == "sign" else diff, g, w.shape, spec)


def _weight_grad_of(factor: jax.Array, g: jax.Array, w_shape: tuple[int, ...],
                    spec: ConvSpec) -> jax.Array:
  """``sum_{b,h,w} g * factor`` for a factor broadcast like `_differences`."""
  kh, kw, cg, out = w_shape
  gg = g.reshape(*g.shape[:3], 1, 1, spec.groups, 1, out // spec.groups)
  dw = jnp.sum(gg * factor, axis=(0, 1, 2))  # (kh, kw, G, Cg, Og)
  return dw.transpose(0, 1, 3, 2, 4).reshape(kh, kw, cg, out)


def input_grad(x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
               grad_mode: str) -> jax.Array:
  """``dX = sum over the outputs it feeds of g * h(F - X)``.

  ``h`` is HardTanh ("full_precision"), the identity ("unclipped") or sign.
  """
  neg = -_differences(x, w, spec)
  factor = {"full_precision": lambda d: jnp.clip(d, -1.0, 1.0),
            "unclipped": lambda d: d,
            "sign": jnp.sign}[grad_mode](neg)
  return _input_grad_of(factor, x, g, w.shape, spec)


def _input_grad_of(factor: jax.Array, x: jax.Array, g: jax.Array, w_shape: tuple[int, ...],
                   spec: ConvSpec) -> jax.Array:
  """The sum over the filters of ``g * factor``, folded back onto ``x``'s positions."""
  kh, kw, cg, out = w_shape
  gg = g.reshape(*g.shape[:3], 1, 1, spec.groups, 1, out // spec.groups)
  dpatches = jnp.sum(gg * factor, axis=-1)  # (B, Ho, Wo, kh, kw, G, Cg)
  dpatches = dpatches.reshape(*dpatches.shape[:5], -1)
  _, unfold_vjp = jax.vjp(lambda v: unfold(v, (kh, kw), spec), x)
  return unfold_vjp(dpatches)[0]


@dataclasses.dataclass(frozen=True)
class ReferenceAdderConv:
  """``implementation="reference"`` of `adderjax.ops.adder_conv`: the broadcasts above."""

  def unsupported_reason(self, x: jax.Array, w: jax.Array, spec: ConvSpec) -> None:
    """None: it runs any layer (that fits in memory)."""

  forward = staticmethod(forward)
  input_grad = staticmethod(input_grad)
  weight_grad = staticmethod(weight_grad)


def lp_forward(x: jax.Array, w: jax.Array, p: jax.Array, spec: ConvSpec) -> jax.Array:
  """``Y[b,h,w,o] = -sum_{i,j,c} |Xpad[...] - F[i,j,c,o]|^p``."""
  y = -jnp.sum(jnp.abs(_differences(x, w, spec)) ** p, axis=(3, 4, 6))
  return y.reshape(*y.shape[:3], -1)


def _lp_factor(d: jax.Array, p: jax.Array) -> jax.Array:
  """``d/dd |d|^p = p * |d|^(p-1) * sign(d)``."""
  return p * jnp.abs(d) ** (p - 1) * jnp.sign(d)


def lp_weight_grad(x: jax.Array, w: jax.Array, p: jax.Array, g: jax.Array,
                   spec: ConvSpec) -> jax.Array:
  """The exact ``dF = sum_{b,h,w} g * p * |X - F|^(p-1) * sign(X - F)``."""
  return _weight_grad_of(_lp_factor(_differences(x, w, spec), p), g, w.shape, spec)


def lp_input_grad(x: jax.Array, w: jax.Array, p: jax.Array, g: jax.Array,
                  spec: ConvSpec) -> jax.Array:
  """The exact ``dX = sum g * p * |F - X|^(p-1) * sign(F - X)`` over the outputs it feeds."""
  return _input_grad_of(_lp_factor(-_differences(x, w, spec), p), x, g, w.shape, spec)

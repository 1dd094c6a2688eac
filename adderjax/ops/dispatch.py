"""The adder convolution and dense ops: public API, custom VJP, dispatch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import functools
import types
from typing import Literal, Protocol, TypeAlias, TypeVar, runtime_checkable

import jax
from jax import lax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from adderjax.ops import cpu_native, lp, pallas_gpu, reference, xla
from adderjax.ops.spec import ConvSpec, GradMode, check_grad_mode, check_p, conv_spec

__all__ = ["DEFAULT_ORDER", "IMPLEMENTATIONS", "Implementation", "ImplementationLike",
           "ImplementationName", "adder_conv", "adder_dense", "check_implementation"]


@runtime_checkable
class Implementation(Protocol):
  """What an `adder_conv` implementation provides.

  An entry of `IMPLEMENTATIONS`, or an object passed as ``implementation=``
  (a `PallasAdderConv` with its own options, say). It must be hashable
  (`jax.custom_vjp` takes it as a static argument). The methods are called
  with operands of one floating dtype (float32, or float64), which they keep.
  `adderjax.ops.sharding.KernelImplementation` is the base of those made of
  custom kernels, the XLA loops where they have none.
  """

  def unsupported_reason(self, x: jax.Array, w: jax.Array, spec: ConvSpec) -> str | None:
    """None where it can run this layer here, else why not.

    One line that completes ``implementation=<the value> ...`` in the error of
    an explicit request, and says what to use instead.
    """

  def forward(self, x: jax.Array, w: jax.Array, spec: ConvSpec) -> jax.Array: ...

  def input_grad(self, x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
                 grad_mode: GradMode) -> jax.Array: ...

  def weight_grad(self, x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
                  grad_mode: GradMode) -> jax.Array: ...


ImplementationName = Literal["xla", "cpu", "reference", "pallas", "pallas_interpret"]
"""The names of the implementations `adder_conv` ships (keys of `IMPLEMENTATIONS`)."""

ImplementationLike: TypeAlias = ImplementationName | Implementation | None
"""What ``implementation=`` takes: ``None`` (the fastest that runs here), a name,
or an `Implementation` object, such as a `PallasAdderConv` carrying its own
kernel options."""


IMPLEMENTATIONS: Mapping[str, Implementation] = types.MappingProxyType({
    "xla": xla.XlaAdderConv(),
    "cpu": cpu_native.NativeCpuAdderConv(),
    "reference": reference.ReferenceAdderConv(),
    "pallas": pallas_gpu.PallasAdderConv(),
    "pallas_interpret": pallas_gpu.PallasAdderConv(interpret=True),
})
"""The implementations ``implementation=`` names (read-only; a new backend is
one module and one line here).

``"xla"`` runs the XLA loops of `adderjax.ops.xla` on any backend;
``"cpu"`` runs the native CPU kernels of `adderjax.ops.cpu_native` (built on
first use) where they apply and the XLA loops elsewhere;
``"reference"`` the broadcasting oracle of `adderjax.ops.reference`;
``"pallas"`` compiles the kernels of `adderjax.ops.pallas_gpu` for a GPU;
``"pallas_interpret"`` runs the same kernels in Pallas' interpreter on any
backend (slow: for tests and debugging). Where this JAX lacks Pallas' Triton
lowering (`adderjax.ops.pallas_gpu.UNAVAILABLE_REASON`), both raise when
asked for by name, and ``None`` runs ``"xla"``."""

DEFAULT_ORDER: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    "cpu": ("cpu", "xla"),
    "gpu": ("pallas", "xla"),
})
"""What ``implementation=None`` tries, per JAX default backend: the first whose
``unsupported_reason`` is None. Other backends run ``"xla"``."""

_OTHER_BACKENDS = ("xla",)

PaddingLike = str | Sequence[tuple[int, int]]


def check_implementation(implementation: object) -> ImplementationLike:
  """Returns ``implementation`` if `adder_conv` accepts it, else raises a ValueError naming it."""
  if isinstance(implementation, str):
    if implementation in IMPLEMENTATIONS:
      return implementation  # type: ignore[return-value]
  elif implementation is None or isinstance(implementation, Implementation):
    return implementation
  raise ValueError(f"implementation must be None or one of {tuple(IMPLEMENTATIONS)}, or an "
                   f"Implementation object such as a PallasAdderConv instance, got "
                   f"implementation={implementation!r}.")


def _resolve_implementation(implementation: ImplementationLike, x: jax.Array, w: jax.Array,
                            spec: ConvSpec) -> Implementation:
  """The implementation to run, ``implementation`` being checked already.

  ``None`` becomes the first of `DEFAULT_ORDER` that can run the layer here
  (``"xla"`` always can); a named or given implementation that cannot raises
  its reason.
  """
  if implementation is None:
    for name in DEFAULT_ORDER.get(jax.default_backend(), _OTHER_BACKENDS):
      if IMPLEMENTATIONS[name].unsupported_reason(x, w, spec) is None:
        return IMPLEMENTATIONS[name]
    return IMPLEMENTATIONS["xla"]
  impl = IMPLEMENTATIONS[implementation] if isinstance(implementation, str) else implementation
  reason = impl.unsupported_reason(x, w, spec)
  if reason is not None:
    raise ValueError(f"implementation={implementation!r} {reason}")
  return impl


def _compute_dtype(*arrays: jax.Array) -> jnp.dtype:
  """Half precision inputs accumulate in float32; float64 stays float64."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _output_dtype(x: jax.Array, w: jax.Array, preferred_element_type: object) -> jnp.dtype:
  """The result's dtype: the accumulation dtype unless ``preferred_element_type`` says otherwise.

  An adder output is a per-channel offset near ``-sum |w|`` (thousands in a
  trained network) plus a signal whose spread is a few units: half precision
  would round the signal away, so it is never the default.
  """
  if preferred_element_type is None:
    return _compute_dtype(x, w)
  try:
    dtype = jnp.dtype(preferred_element_type)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"preferred_element_type must be a floating dtype or None, got "
                    f"preferred_element_type={preferred_element_type!r}.")
  return dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _adder_conv(x, w, spec: ConvSpec, grad_mode: GradMode, implementation: Implementation,
                out_dtype: jnp.dtype):
  dtype = _compute_dtype(x, w)
  y = implementation.forward(x.astype(dtype), w.astype(dtype), spec)
  return y.astype(out_dtype)


def _adder_conv_fwd(x, w, spec, grad_mode, implementation, out_dtype):
  return _adder_conv(x, w, spec, grad_mode, implementation, out_dtype), (x, w)


def _adder_conv_bwd(spec, grad_mode, implementation, out_dtype, residuals, g):
  x, w = residuals
  dtype = _compute_dtype(x, w, g)
  x_, w_, g_ = x.astype(dtype), w.astype(dtype), g.astype(dtype)
  dx = implementation.input_grad(x_, w_, g_, spec, grad_mode)
  dw = implementation.weight_grad(x_, w_, g_, spec, grad_mode)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_adder_conv.defvjp(_adder_conv_fwd, _adder_conv_bwd)


_T = TypeVar("_T")

_Branch = Literal["switch", "square", "general"]
"""How `_lp_adder_conv` picks its formulation: on the traced ``p`` ("switch": the
L1 implementation at 1, the matrix products at 2, else the general loops), or
fixed for a known ``p`` ("square": 2, "general": any other)."""


def _by_exponent(p: jax.Array, branch: _Branch, at_one: Callable[[], _T], at_two: Callable[[], _T],
                 general: Callable[[], _T]) -> _T:
  if branch == "square":
    return at_two()
  if branch == "general":
    return general()
  return lax.switch(jnp.where(p == 1, 0, jnp.where(p == 2, 1, 2)), (at_one, at_two, general))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _lp_adder_conv(x, w, p, spec: ConvSpec, grad_mode: GradMode,
                   implementation: Implementation | None, kernels: lp.LpKernels, branch: _Branch,
                   out_dtype: jnp.dtype):
  dtype = _compute_dtype(x, w)
  x, w, p = x.astype(dtype), w.astype(dtype), p.astype(dtype)
  y = _by_exponent(p, branch, lambda: implementation.forward(x, w, spec),
                   lambda: kernels.square_forward(x, w, spec),
                   lambda: kernels.forward(x, w, p, spec))
  return y.astype(out_dtype)


def _lp_adder_conv_fwd(x, w, p, spec, grad_mode, implementation, kernels, branch, out_dtype):
  y = _lp_adder_conv(x, w, p, spec, grad_mode, implementation, kernels, branch, out_dtype)
  return y, (x, w, p)


def _lp_adder_conv_bwd(spec, grad_mode, implementation, kernels, branch, out_dtype, residuals, g):
  x, w, p = residuals
  dtype = _compute_dtype(x, w, g)
  x_, w_, g_, p_ = x.astype(dtype), w.astype(dtype), g.astype(dtype), p.astype(dtype)
  dx, dw = _by_exponent(
      p_, branch,
      lambda: (implementation.input_grad(x_, w_, g_, spec, grad_mode),
               implementation.weight_grad(x_, w_, g_, spec, grad_mode)),
      lambda: (kernels.square_input_grad(x_, w_, g_, spec),
               kernels.square_weight_grad(x_, w_, g_, spec)),
      lambda: (kernels.input_grad(x_, w_, p_, g_, spec),
               kernels.weight_grad(x_, w_, p_, g_, spec)))
  # p is a schedule's value, not a parameter: it gets no gradient.
  return dx.astype(x.dtype), dw.astype(w.dtype), jnp.zeros_like(p)


_lp_adder_conv.defvjp(_lp_adder_conv_fwd, _lp_adder_conv_bwd)


def adder_conv(
    x: jax.Array,
    w: jax.Array,
    *,
    strides: int | Sequence[int] = 1,
    padding: PaddingLike = "SAME",
    rhs_dilation: int | Sequence[int] = 1,
    feature_group_count: int = 1,
    grad_mode: GradMode = "full_precision",
    p: ArrayLike | None = None,
    implementation: ImplementationLike = None,
    preferred_element_type: DTypeLike | None = None,
) -> jax.Array:
  """The AdderNet convolution: the negative L1 distance of each patch to each filter.

  ``Y[b,h,w,o] = -sum_{i,j,c} |Xpad[b, h*s + i*d, w*s + j*d, c] - F[i,j,c,o]|``

  Zero padding takes part in the distance, as in the official code. The
  gradients are not those of this forward pass but the paper's (Section 3.2):

  - ``grad_mode="full_precision"`` (default): ``dF = sum g * (X - F)`` and
    ``dX = sum g * HardTanh(F - X)``.
  - ``"unclipped"``: the same, without the HardTanh.
  - ``"sign"``: the exact gradient, ``sign(X - F)`` and ``sign(F - X)``.

  **Exponent.** With ``p`` the output is ``-sum |Xpad - F|^p`` (the lp adders
  of Chen et al., TPAMI, arXiv:2105.14202, annealed from ``p = 2`` to 1 in
  training). For ``p > 1`` every ``grad_mode`` gives the exact gradient,
  ``dF = sum g * p * |X - F|^(p-1) * sign(X - F)`` and ``dX`` its negative
  summed over the outputs ``X`` feeds: the paper's rules stand in for the
  sign, the gradient of ``|d|``, which carries no magnitude; for ``p > 1``
  the exact gradient carries it (at ``p = 2`` it is twice the full-precision
  rule, ``2 (X - F)``), and it is bounded by ``p * |X - F|^(p-1)``, not by
  1. At ``p == 1`` exactly, a traced ``p`` included, ``grad_mode`` applies
  as above, so a schedule that ends at 1 ends with the paper's training.
  ``p`` gets no gradient (zero). ``p=None`` and a known ``p == 1`` run the
  L1 op, bit for bit as without ``p``. A known ``p == 2`` runs one
  convolution (``sum X^2 - 2 sum X F + sum F^2``) and the gradients as
  convolutions; any other known ``p`` runs the XLA loops with a power per
  term, whatever ``implementation`` says. A traced ``p`` (`jax.jit`
  compiles once for every value) picks among the three at run time: the
  ``implementation``'s L1 kernels at 1, the convolutions at 2, the loops
  otherwise (``implementation="reference"``: the broadcasting formulation
  throughout).

  Every implementation gives what the XLA loops give for infinite and NaN
  inputs, term by term: an output is -inf where a term is infinite, NaN where
  a NaN (or inf - inf) enters it, and finite wherever the true sum is. An empty
  batch gives an empty result.

  The broadcast of outputs against patch elements against filters is never
  materialised; temporary memory is of the order of the input plus the
  output. Inputs may be float32, bfloat16 or float16 (arithmetic in float32)
  or float64; the gradients have the dtypes of ``x`` and ``w``.

  The result is float32 for half-precision inputs (float64 for float64), as
  `jax.lax.conv_general_dilated` with ``preferred_element_type=jnp.float32``:
  an adder output is a per-channel offset near ``-sum |w|`` plus a signal a
  few units wide, and in a trained network the offset reaches the thousands
  (the official ResNet-20: -3,221), where bfloat16's spacing (16 at 2,000)
  exceeds the signal. Keep the kernel in float32 too: rounding it to
  bfloat16 alone changes a quarter of that network's predictions (the layers
  of `adderjax.nn` and `adderjax.linen` do; README, "Mixed precision").

  Args:
    x: input, ``(batch, height, width, in_channels)``.
    w: filters, ``(kh, kw, in_channels // feature_group_count, out_channels)``.
    strides: an int or a pair ``(sh, sw)``.
    padding: ``"SAME"``, ``"SAME_LOWER"``, ``"VALID"`` or
      ``((top, bottom), (left, right))``, as in `jax.lax.conv_general_dilated`;
      an int ``p`` is ``((p, p), (p, p))``.
    rhs_dilation: kernel dilation, an int or a pair.
    feature_group_count: number of channel groups.
    grad_mode: ``"full_precision"``, ``"unclipped"`` or ``"sign"``; at
      ``p > 1`` all three give the exact gradient.
    p: the exponent, ``1 <= p <= 2``: None (default) or 1 for the L1
      distance; a number, or a scalar array, possibly traced (its range is
      checked only where it is known).
    implementation: ``None`` (the fastest that runs here: ``"pallas"`` on a
      GPU backend, ``"cpu"`` on a CPU backend where the native kernels build,
      else ``"xla"``), ``"xla"`` (XLA loops; any backend), ``"cpu"`` (the
      native CPU kernels of `adderjax.ops.cpu_native` where they apply, XLA
      elsewhere; a CPU backend only),
      ``"pallas"`` (the GPU kernels of `adderjax.ops.pallas_gpu`; a GPU
      backend only), ``"pallas_interpret"`` (the same kernels in Pallas'
      interpreter, any backend; slow, for tests and debugging),
      ``"reference"`` (the broadcasting oracle; small shapes only), or an
      `Implementation` object, such as a `PallasAdderConv` instance: the
      kernels with its options (tiles, warps, ``method``, ``interpret``).
    preferred_element_type: the result's dtype; None (default) for the
      accumulation dtype, float32 or float64. A half-precision type here
      rounds the output (see above).

  Returns:
    ``(batch, out_height, out_width, out_channels)``, of dtype
    ``preferred_element_type`` or the accumulation dtype.

  Raises:
    TypeError: a non-array or a non-floating-point input.
    ValueError: wrong ranks, channel or group mismatches, non-positive strides
      or dilation, bad padding, an empty kernel (a zero ``kh`` or ``kw``) or one
      larger than the padded input, an unknown ``grad_mode`` or
      ``implementation``, ``"pallas"`` where it cannot run (no GPU backend,
      or an unsupported layer; the message says), or a ``p`` that is not a
      scalar or (where known) lies outside ``[1, 2]``; a ``p`` that is not a
      real number or array is a TypeError.

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from adderjax.ops import adder_conv
    >>> x = jnp.ones((2, 8, 8, 3))
    >>> w = jnp.zeros((3, 3, 3, 4))
    >>> adder_conv(x, w, padding="VALID").shape
    (2, 6, 6, 4)
    >>> float(adder_conv(x, w, padding="VALID")[0, 0, 0, 0])  # -(3*3*3 * |1 - 0|)
    -27.0
    >>> x2 = jnp.full((2, 8, 8, 3), 2.0)
    >>> round(float(adder_conv(x2, w, padding="VALID", p=1.5)[0, 0, 0, 0]), 2)  # -27 * 2**1.5
    -76.37
    >>> step = jax.jit(lambda x, w, p: adder_conv(x, w, p=p))  # one compilation for every p
    >>> step(x2, w, 2.0).shape == step(x2, w, 1.0).shape
    True

  References:
    Chen et al., "AdderNet: Do We Really Need Multiplications in Deep
    Learning?", CVPR 2020. https://arxiv.org/abs/1912.13200
  """
  spec = conv_spec(x, w, strides=strides, padding=padding, rhs_dilation=rhs_dilation,
                   feature_group_count=feature_group_count)
  p_value = None if p is None else check_p(p)
  grad_mode = check_grad_mode(grad_mode)
  implementation = check_implementation(implementation)
  out_dtype = _output_dtype(x, w, preferred_element_type)
  if not x.shape[0]:  # An empty batch: the empty result, whatever the implementation.
    out_hw = spec.output_spatial(x.shape[1:3], w.shape[:2])
    return jnp.zeros((0, *out_hw, w.shape[3]), out_dtype)
  if p is None or p_value == 1:
    return _adder_conv(x, w, spec, grad_mode, _resolve_implementation(implementation, x, w, spec),
                       out_dtype)
  kernels = lp.KERNELS["reference" if implementation == "reference" else "xla"]
  if p_value is None:  # Traced: the L1 implementation is one of the branches.
    l1, branch = _resolve_implementation(implementation, x, w, spec), "switch"
  else:
    l1, branch = None, "square" if p_value == 2 else "general"
  return _lp_adder_conv(x, w, jnp.asarray(p, _compute_dtype(x, w)), spec, grad_mode, l1, kernels,
                        branch, out_dtype)


def adder_dense(
    x: jax.Array,
    w: jax.Array,
    *,
    grad_mode: GradMode = "full_precision",
    p: ArrayLike | None = None,
    implementation: ImplementationLike = None,
    preferred_element_type: DTypeLike | None = None,
) -> jax.Array:
  """A fully connected adder layer: ``Y[..., n] = -sum_k |x[..., k] - w[k, n]|``.

  A 1x1 `adder_conv`, with the same gradients and dtypes; with an exponent
  ``p``, ``-sum_k |x[..., k] - w[k, n]|^p`` (see `adder_conv`).

  Args:
    x: ``(..., in_features)``.
    w: ``(in_features, out_features)``.
    grad_mode: as in `adder_conv`.
    p: the exponent, ``1 <= p <= 2``, as in `adder_conv`; None (default) or
      1 for the L1 distance.
    implementation: as in `adder_conv`.
    preferred_element_type: as in `adder_conv`: None for float32 (float64
      for float64 inputs).

  Returns:
    ``(..., out_features)``.

  Example::

    >>> import jax.numpy as jnp
    >>> from adderjax.ops import adder_dense
    >>> adder_dense(jnp.array([[1.0, 2.0]]), jnp.array([[0.0], [4.0]]))
    Array([[-3.]], dtype=float32)
    >>> adder_dense(jnp.array([[1.0, 2.0]]), jnp.array([[0.0], [4.0]]), p=2)  # -(1 + 4)
    Array([[-5.]], dtype=float32)
  """
  if not hasattr(x, "ndim") or not hasattr(w, "ndim"):
    bad = "x" if not hasattr(x, "ndim") else "w"
    raise TypeError(f"{bad} must be an array, got {type(x if bad == 'x' else w).__name__}.")
  if x.ndim < 1:
    raise ValueError(f"x must have at least one dimension (features), got shape {tuple(x.shape)}.")
  if w.ndim != 2:
    raise ValueError(f"w must be a 2-D (in_features, out_features) array, got shape "
                     f"{tuple(w.shape)}.")
  if x.shape[-1] != w.shape[0]:
    raise ValueError(f"Feature mismatch: x has {x.shape[-1]} features (shape {tuple(x.shape)}) "
                     f"but w expects {w.shape[0]} (shape {tuple(w.shape)}).")
  lead = x.shape[:-1]
  y = adder_conv(x.reshape(-1, 1, 1, x.shape[-1]), w[None, None], padding="VALID",
                 grad_mode=grad_mode, p=p, implementation=implementation,
                 preferred_element_type=preferred_element_type)
  return y.reshape(*lead, w.shape[1])

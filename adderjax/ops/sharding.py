"""Custom kernels over a batch-sharded mesh: each device runs its own shard.

XLA's SPMD partitioner cannot split a custom call (a Pallas kernel, an FFI
handler): left alone, it gathers the whole batch onto every device and runs it
there. :func:`per_batch_shard` keeps the batch split instead:

- where the type of ``x`` carries its sharding (mesh axes of type
  ``AxisType.Explicit``), the kernel runs in `jax.shard_map` over the batch's
  mesh axes, the batched operands split, the others replicated;
- otherwise (``AxisType.Auto`` meshes, the sharding decided by the compiler)
  it is wrapped in `custom_partitioning`, which tells the partitioner to keep
  the batch split and the rest replicated, with a
  `jax.custom_batching.custom_vmap` rule (custom_partitioning cannot be
  batched itself). On one device both lower to the plain kernel.

The implementations made of such kernels (`adderjax.ops.cpu_native`,
`adderjax.ops.pallas_gpu`) derive from :class:`KernelImplementation`: each says
which kernels it has (``has_kernel``) and gives them (``kernel``); the base
class runs those per batch shard, as a :class:`BoundKernel`, and everything
else with the XLA loops of `adderjax.ops.xla`. A kernel of kind ``"forward"``
takes ``(x, w)``, ``"input_grad"`` and ``"weight_grad"`` take ``(x, w, g)``. A
weight gradient sums over the batch: each device sums its shard and a ``psum``
over the batch's mesh axes adds the shards up, the result replicated.
"""
from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Literal

import jax
from jax import custom_batching
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding
from jax.typing import DTypeLike

from adderjax.ops import xla
from adderjax.ops.spec import ConvSpec, GradMode

__all__ = ["BoundKernel", "KernelImplementation", "KernelName", "explicit_batch_axes",
           "per_batch_shard"]

KernelName = Literal["forward", "input_grad", "weight_grad"]

# Which operands carry the batch.
_BATCHED = {"forward": (True, False), "input_grad": (True, False, True),
            "weight_grad": (True, False, True)}
# Shardy rules: only the batch factor "b" may stay sharded.
_SHARDING_RULES = {
    "forward": ("b h w c, i j k o -> b y z n", ("h", "w", "c", "i", "j", "k", "o", "y", "z", "n")),
    "input_grad": ("b h w c, i j k o, b y z n -> b h w c",
                   ("h", "w", "c", "i", "j", "k", "o", "y", "z", "n")),
    "weight_grad": ("b h w c, i j k o, b y z n -> i j k o",
                    ("h", "w", "c", "i", "j", "k", "o", "y", "z", "n")),
}
# Kernels whose result sums over the batch: each shard's partial sum, then a psum.
_SUMMED_OVER_BATCH = ("weight_grad",)


class KernelImplementation:
  """An `adder_conv` implementation made of custom kernels, the XLA loops where it has none.

  A subclass (hashable: a frozen dataclass) defines `has_kernel` and `kernel`,
  and `unsupported_reason` where it cannot run everywhere; ``forward``,
  ``input_grad`` and ``weight_grad`` are this class's: each runs the kernel
  per batch shard (`per_batch_shard`) where `has_kernel` says so, else the
  XLA loops (`adderjax.ops.xla`), so a backend decides what it covers in one
  place and never calls the loops itself.
  """

  def unsupported_reason(self, x: jax.Array, w: jax.Array, spec: ConvSpec) -> str | None:
    """Why this implementation cannot run the layer here, or None (the default: it can).

    The reason completes ``implementation=<the value> ...`` in `adder_conv`'s error: one line
    saying what is missing and what to use instead.
    """
    del x, w, spec
    return None

  def has_kernel(self, kind: KernelName, dtype: DTypeLike, grad_mode: GradMode | None) -> bool:
    """Whether a kernel computes ``kind`` for ``dtype`` operands (forward: ``grad_mode=None``)."""
    raise NotImplementedError

  def kernel(self, kind: KernelName) -> Callable[..., jax.Array]:
    """The kernel of ``kind``: a function of the operands and ``spec=`` (a `ConvSpec`)."""
    raise NotImplementedError

  def forward(self, x: jax.Array, w: jax.Array, spec: ConvSpec) -> jax.Array:
    """``-sum |Xpad - F|`` over each patch: ``(B, Ho, Wo, O)``."""
    if self.has_kernel("forward", x.dtype, None):
      return per_batch_shard(BoundKernel(self, "forward", spec), x, w)
    return xla.forward(x, w, spec)

  def input_grad(self, x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
                 grad_mode: GradMode) -> jax.Array:
    """The input gradient of ``grad_mode`` (`adderjax.ops.xla.input_grad`): ``x``'s shape."""
    if self.has_kernel("input_grad", x.dtype, grad_mode):
      return per_batch_shard(BoundKernel(self, "input_grad", spec), x, w, g)
    return xla.input_grad(x, w, g, spec, grad_mode)

  def weight_grad(self, x: jax.Array, w: jax.Array, g: jax.Array, spec: ConvSpec,
                  grad_mode: GradMode) -> jax.Array:
    """The filter gradient of ``grad_mode`` (`adderjax.ops.xla.weight_grad`): ``w``'s shape."""
    if self.has_kernel("weight_grad", x.dtype, grad_mode):
      return per_batch_shard(BoundKernel(self, "weight_grad", spec), x, w, g)
    return xla.weight_grad(x, w, g, spec, grad_mode)


@dataclasses.dataclass(frozen=True)
class BoundKernel:
  """One kernel of an implementation bound to a layer's geometry.

  Hashable, so that its partitioned wrapper is built once per layer.
  """

  implementation: KernelImplementation
  kind: KernelName
  spec: ConvSpec

  def __call__(self, *operands: jax.Array) -> jax.Array:
    return self.implementation.kernel(self.kind)(*operands, spec=self.spec)


def explicit_batch_axes(x: jax.Array):
  """``(mesh, batch axes)`` if ``x``'s type carries an explicit sharding, else ``None``.

  The batch axes are ``None`` where the batch is not split.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or AxisType.Explicit not in getattr(mesh, "axis_types", ()):
    return None
  return mesh, sharding.spec[0] if sharding.spec else None


def per_batch_shard(kernel: BoundKernel, *operands: jax.Array) -> jax.Array:
  """Runs ``kernel(*operands)`` per batch shard; see the module docstring.

  Args:
    kernel: The kernel; its ``kind`` says which operands carry the batch.
    *operands: ``x, w`` (``kind="forward"``) or ``x, w, g``, the batch leading ``x`` and ``g``.

  Returns:
    The kernel's result: batch-sharded as ``x``, or (a weight gradient)
    summed over the whole batch and replicated.
  """
  kind = kernel.kind
  explicit = explicit_batch_axes(operands[0])
  if explicit is not None:
    mesh, axes = explicit
    if axes is None:
      return kernel(*operands)
    batched = jax.P(axes)
    in_specs = tuple(batched if b else jax.P() for b in _BATCHED[kind])
    summed = kind in _SUMMED_OVER_BATCH
    # check_vma=False: custom calls' outputs carry no varying-axes annotation.
    return jax.shard_map(_summed(kernel, axes) if summed else kernel, mesh=mesh,
                         in_specs=in_specs, out_specs=jax.P() if summed else batched,
                         check_vma=False)(*operands)
  return _auto_partitioned(kernel)(*operands)


def _summed(kernel: Callable[..., jax.Array], axes) -> Callable[..., jax.Array]:
  """``kernel`` on a shard, then summed over the mesh ``axes`` the batch is split along."""
  if axes is None:
    return kernel
  return lambda *operands: jax.lax.psum(kernel(*operands), axes)


@functools.cache
def _auto_partitioned(kernel: BoundKernel) -> Callable:
  kind = kernel.kind

  def fn(*operands):  # positional only: custom_partitioning binds the signature
    return kernel(*operands)

  batched_args = _BATCHED[kind]
  summed = kind in _SUMMED_OVER_BATCH

  def batch_axes(arg_shapes):
    x_spec = getattr(arg_shapes[0].sharding, "spec", None)
    return x_spec[0] if x_spec else None

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    axes = batch_axes(arg_shapes)
    batched, replicated = NamedSharding(mesh, jax.P(axes)), NamedSharding(mesh, jax.P())
    operands = tuple(batched if b else replicated for b in batched_args)
    if summed:
      return mesh, _summed(fn, axes), replicated, operands
    return mesh, fn, batched, operands

  def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
    del result_shape
    return NamedSharding(mesh, jax.P() if summed else jax.P(batch_axes(arg_shapes)))

  partitioned = custom_partitioning(fn)
  rule, replicated_factors = _SHARDING_RULES[kind]
  partitioned.def_partition(partition=partition,
                            infer_sharding_from_operands=infer_sharding_from_operands,
                            sharding_rule=rule, need_replication_factors=replicated_factors,
                            reduction_factors=("b",) if summed else ())

  @custom_batching.custom_vmap
  def call(*operands):
    return partitioned(*operands)

  @call.def_vmap
  def _vmap_rule(axis_size, in_batched, *operands):
    del axis_size
    return jax.vmap(fn, in_axes=tuple(0 if b else None for b in in_batched))(*operands), True

  return call

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

A kernel is a hashable callable (so its partitioned wrapper is built once)
of ``(x, w)`` (``kind="forward"``) or ``(x, w, g)`` (``kind="input_grad"``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import jax
from jax import custom_batching
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding

__all__ = ["KernelName", "explicit_batch_axes", "per_batch_shard"]

KernelName = Literal["forward", "input_grad"]

# Which operands carry the batch.
_BATCHED = {"forward": (True, False), "input_grad": (True, False, True)}
# Shardy rules: only the batch factor "b" may stay sharded.
_SHARDING_RULES = {
    "forward": ("b h w c, i j k o -> b y z n", ("h", "w", "c", "i", "j", "k", "o", "y", "z", "n")),
    "input_grad": ("b h w c, i j k o, b y z n -> b h w c",
                   ("h", "w", "c", "i", "j", "k", "o", "y", "z", "n")),
}


def explicit_batch_axes(x: jax.Array):
  """``(mesh, batch axes)`` if ``x``'s type carries an explicit sharding, else ``None``.

  The batch axes are ``None`` where the batch is not split.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or AxisType.Explicit not in getattr(mesh, "axis_types", ()):
    return None
  return mesh, sharding.spec[0] if sharding.spec else None


def per_batch_shard(kernel: Callable[..., jax.Array], kind: KernelName,
                    *operands: jax.Array) -> jax.Array:
  """Runs ``kernel(*operands)`` per batch shard; see the module docstring.

  Args:
    kernel: A hashable callable of the operands.
    kind: ``"forward"`` (operands ``x, w``) or ``"input_grad"`` (``x, w, g``).
    *operands: The kernel's operands, the batch leading ``x`` (and ``g``).

  Returns:
    The kernel's result, batch-sharded as ``x``.
  """
  explicit = explicit_batch_axes(operands[0])
  if explicit is not None:
    mesh, axes = explicit
    if axes is None:
      return kernel(*operands)
    batched = jax.P(axes)
    in_specs = tuple(batched if b else jax.P() for b in _BATCHED[kind])
    # check_vma=False: custom calls' outputs carry no varying-axes annotation.
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=batched,
                         check_vma=False)(*operands)
  return _auto_partitioned(kernel, kind)(*operands)


@functools.cache
def _auto_partitioned(kernel: Callable[..., jax.Array], kind: KernelName) -> Callable:
  def fn(*operands):  # positional only: custom_partitioning binds the signature
    return kernel(*operands)

  batched_args = _BATCHED[kind]

  def batch_sharding(mesh, arg_shapes):
    x_spec = getattr(arg_shapes[0].sharding, "spec", None)
    axes = x_spec[0] if x_spec else None
    return NamedSharding(mesh, jax.P(axes)), NamedSharding(mesh, jax.P())

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    batched, replicated = batch_sharding(mesh, arg_shapes)
    return mesh, fn, batched, tuple(batched if b else replicated for b in batched_args)

  def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
    del result_shape
    return batch_sharding(mesh, arg_shapes)[0]

  partitioned = custom_partitioning(fn)
  rule, replicated_factors = _SHARDING_RULES[kind]
  partitioned.def_partition(partition=partition,
                            infer_sharding_from_operands=infer_sharding_from_operands,
                            sharding_rule=rule, need_replication_factors=replicated_factors)

  @custom_batching.custom_vmap
  def call(*operands):
    return partitioned(*operands)

  @call.def_vmap
  def _vmap_rule(axis_size, in_batched, *operands):
    del axis_size
    return jax.vmap(fn, in_axes=tuple(0 if b else None for b in in_batched))(*operands), True

  return call

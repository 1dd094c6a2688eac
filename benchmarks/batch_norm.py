"""BatchNorm + residual + ReLU in training mode: XLA's graph against the fused native op.

For ResNet-20's activations (batch 64): ``relu(bn(y) + residual)`` as
`nnx.BatchNorm` computes it (XLA: a reduction for the statistics, then
elementwise passes) and as `adderjax.ops.batch_norm.batch_norm_act` (the
native kernels: two passes forward, two backward), each jitted alone, forward
and forward+backward; the variants take turns round by round, each timed over
``--calls`` calls, and the table gives the median over rounds of each round's
median. The input has an adder layer's offset (-3,000, spread 10).

    python benchmarks/batch_norm.py
"""

from __future__ import annotations

import argparse

from flax import nnx
import jax
import jax.numpy as jnp
from layer_parts import median_ms  # benchmarks/layer_parts.py
import numpy as np

from adderjax.models.layers import batch_norm
from adderjax.ops import batch_norm as batch_norm_ops

SHAPES = ((64, 32, 32, 16), (64, 16, 16, 32), (64, 8, 8, 64))


def _unfused(bn, y, residual):
  return nnx.relu(bn(y) + residual)


def _fused(bn, y, residual):
  return batch_norm_ops.batch_norm_act(y, bn.scale[...], bn.bias[...], residual,
                                       epsilon=bn.epsilon, implementation="cpu")[0]


def _variants(graphdef) -> dict:
  """``{(name, part): jitted fn(y, residual, state)}`` for both paths, forward and fwd+bwd."""
  variants = {}
  for name, fn in (("xla", _unfused), ("fused", _fused)):
    def forward(y, r, state, fn=fn):
      return fn(nnx.merge(graphdef, state), y, r)

    loss = nnx.grad(lambda bn, y, r, fn=fn: jnp.sum(fn(bn, y, r) * r), argnums=(1, 2))

    def forward_backward(y, r, state, loss=loss):
      return loss(nnx.merge(graphdef, state), y, r)

    variants[name, "fwd"] = jax.jit(forward)
    variants[name, "fwd+bwd"] = jax.jit(forward_backward)
  return variants


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--calls", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  if batch_norm_ops.native_supported(jnp.zeros(1)) is not None:
    raise SystemExit("the native kernels cannot run here: "
                     f"{batch_norm_ops.native_supported(jnp.zeros(1))}")
  rng = np.random.default_rng(0)
  print("| activation | XLA fwd | fused fwd | XLA fwd+bwd | fused fwd+bwd |")
  print("|---|---|---|---|---|")
  for shape in SHAPES:
    y = jnp.asarray(rng.normal(size=shape) * 10 - 3000, jnp.float32)
    residual = jnp.asarray(rng.normal(size=shape), jnp.float32)
    bn = batch_norm(shape[-1], rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(bn)
    variants = _variants(graphdef)
    times = {key: [] for key in variants}
    for _ in range(args.rounds):
      for key, fn in variants.items():
        times[key].append(median_ms(fn, y, residual, state, calls=args.calls))
    row = [f"{np.median(times[name, part]):.2f} ms" for part in ("fwd", "fwd+bwd")
           for name in ("xla", "fused")]
    print(f"| {'x'.join(map(str, shape))} | " + " | ".join(row) + " |")


if __name__ == "__main__":
  main()

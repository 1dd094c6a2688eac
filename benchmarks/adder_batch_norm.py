"""The adder layer and its BatchNorm fused: what each part of the fusion costs and saves.

For ResNet-20's 3x3 layers (batch 64), the variants take turns round by round,
each timed over ``--calls`` calls; the tables give the median over rounds of
each round's median:

1. the native forward alone, and with the batch statistics of its output
   summed in its epilogue (`cpu_native.forward_with_statistics`);
2. the fused BatchNorm + ReLU with both its passes (`batch_norm_act`), and
   with the statistics given (`apply_batch_statistics`, one pass);
3. one residual block (conv, BatchNorm, ReLU, conv, BatchNorm, residual, ReLU,
   the statistics in the epilogues), its first BatchNorm and ReLU applied by
   the second convolution's kernels as they read (``input_norm``) or written
   out, forward and forward+backward.

    python benchmarks/adder_batch_norm.py
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from layer_parts import median_ms  # benchmarks/layer_parts.py
import numpy as np

from adderjax.ops import batch_norm as batch_norm_ops
from adderjax.ops import cpu_native
from adderjax.ops.adder_batch_norm import (
  InputNorm,
  adder_conv_batch_norm_act,
  adder_conv_with_statistics,
  apply_input_norm,
)
from adderjax.ops.spec import conv_spec

LAYERS = ((32, 16), (16, 32), (8, 64))  # (height and width, channels)
BATCH = 64


def _block(params, x, deferred):
  w1, w2, scale1, bias1, scale2, bias2 = params
  y1, mean1, var1 = adder_conv_with_statistics(x, w1, padding=1)
  norm = InputNorm(mean1, var1, scale1, bias1, 1e-5)
  if deferred:
    return adder_conv_batch_norm_act(y1, w2, scale2, bias2, x, input_norm=norm, padding=1)[0]
  return adder_conv_batch_norm_act(apply_input_norm(y1, norm), w2, scale2, bias2, x,
                                   padding=1)[0]


def _variants(x, w, c):
  """``{(table, column): (jitted fn, operands)}`` for one layer."""
  spec = conv_spec(x, w, strides=1, padding=1, rhs_dilation=1, feature_group_count=1)
  y = cpu_native.forward(x, w, spec)
  mean, var = batch_norm_ops.batch_statistics(y)
  ones, zeros = jnp.ones(c), jnp.zeros(c)
  params = (w, w, ones, zeros, ones, zeros)
  variants = {
      ("forward", "alone"): (jax.jit(lambda x, w: cpu_native.forward(x, w, spec)), (x, w)),
      ("forward", "with statistics"): (
          jax.jit(lambda x, w: cpu_native.forward_with_statistics(x, w, spec)), (x, w)),
      ("batch norm", "two passes"): (
          jax.jit(lambda y: batch_norm_ops.batch_norm_act(y, ones, zeros)[0]), (y,)),
      ("batch norm", "statistics given"): (
          jax.jit(lambda y, m, v: batch_norm_ops.apply_batch_statistics(y, m, v, ones, zeros)),
          (y, mean, var)),
  }
  for deferred, name in ((True, "applied on read"), (False, "written out")):
    variants["block fwd", name] = (
        jax.jit(lambda p, x, d=deferred: _block(p, x, d)), (params, x))
    variants["block fwd+bwd", name] = (
        jax.jit(jax.grad(lambda p, x, d=deferred: jnp.sum(jnp.square(_block(p, x, d))))),
        (params, x))
  return variants


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--calls", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  if not cpu_native.available():
    raise SystemExit(f"the native kernels cannot run here: {cpu_native.unavailable_reason()}")
  rng = np.random.default_rng(0)
  results = {}
  for h, c in LAYERS:
    x = jnp.asarray(rng.normal(size=(BATCH, h, h, c)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, c, c)), jnp.float32)
    variants = _variants(x, w, c)
    times = {key: [] for key in variants}
    for _ in range(args.rounds):
      for key, (fn, operands) in variants.items():
        times[key].append(median_ms(fn, *operands, calls=args.calls))
    for (table, column), t in times.items():
      results.setdefault(table, {}).setdefault(column, {})[f"{h}x{h}x{c}"] = np.median(t)
  for table, columns in results.items():
    names = list(columns)
    print(f"\n| {table} | " + " | ".join(names) + f" | {names[0]} / {names[1]} |")
    print("|---" * (len(names) + 2) + "|")
    for layer in columns[names[0]]:
      row = [columns[name][layer] for name in names]
      print(f"| {layer} | " + " | ".join(f"{v:.3f} ms" for v in row)
            + f" | {row[0] / row[1]:.3f} |")


if __name__ == "__main__":
  main()

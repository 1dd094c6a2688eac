"""The three parts of an adder layer's training pass against a convolution's, timed one by one.

For ResNet-20's stride-1 3x3 shapes (batch 64): forward, input gradient and
weight gradient of `lax.conv_general_dilated` and of the native CPU adder
kernels (`adderjax.ops.cpu_native`), and the adder weight gradient as XLA's
convolution gradient (what the native path used before it had its own), each
jitted alone; the parts take turns round by round (``--rounds``), each timed
over ``--calls`` calls, and the table gives the median over rounds of each
round's median.

    python benchmarks/layer_parts.py
"""

from __future__ import annotations

import argparse
import time

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from adderjax.ops import cpu_native, xla
from adderjax.ops.spec import conv_spec

SHAPES = ((32, 16), (16, 32), (8, 64))  # (height = width, channels) at batch 64


def median_ms(fn, *args, calls: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--calls", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()
  if not cpu_native.available():
    raise SystemExit(f"the native kernels are not available: {cpu_native.unavailable_reason()}")
  rng = np.random.default_rng(0)

  def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  print("| H=W, C | conv fwd | conv dx | conv dw | adder fwd | adder dx | adder dw "
        "| adder dw (XLA conv) |")
  print("|---|---|---|---|---|---|---|---|")
  for size, channels in SHAPES:
    x = jnp.asarray(rng.normal(size=(64, size, size, channels)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, channels, channels)), jnp.float32)
    g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    spec = conv_spec(x, w, strides=1, padding="SAME", rhs_dilation=1, feature_group_count=1)
    parts = {
        "conv fwd": (jax.jit(conv), (x, w)),
        "conv dx": (jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]), (x, w, g)),
        "conv dw": (jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0]), (x, w, g)),
        "adder fwd": (jax.jit(lambda x, w, spec=spec: cpu_native.forward(x, w, spec)), (x, w)),
        "adder dx": (jax.jit(lambda x, w, g, spec=spec:
                             cpu_native.input_grad_full_precision(x, w, g, spec)),
                     (x, w, g)),
        "adder dw": (jax.jit(lambda x, w, g, spec=spec:
                             cpu_native.weight_grad_full_precision(x, w, g, spec)), (x, w, g)),
        "adder dw xla": (jax.jit(lambda x, w, g, spec=spec:
                                 xla.weight_grad(x, w, g, spec, "full_precision")), (x, w, g)),
    }
    for fn, a in parts.values():  # compile and warm up
      jax.block_until_ready(fn(*a))
    rounds = [[median_ms(fn, *a, calls=args.calls) for fn, a in parts.values()]
              for _ in range(args.rounds)]
    cells = [f"{ms:.2f} ms" for ms in np.median(rounds, axis=0)]
    print(f"| {size}, {channels} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()

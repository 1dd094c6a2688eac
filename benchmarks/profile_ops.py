"""Where a training step's time goes, op by op: the JAX profiler over a few ResNet-20 steps.

Traces ``--steps`` jitted training steps (`train_step.make_train_step`) with
`jax.profiler.trace`, reads the trace back with `jax.profiler.ProfileData`
and sums, per step, the time of each kind of compiled op (XLA's fusions by
their kind, ``transpose_copy_fusion``, ``ynn_fusion``, ...; the adder layers'
custom calls by their target and output shape). Times are those of the thread
that runs each op: the helpers of a multi-threaded op (the native kernels
share their rows out over XLA's threads) are not counted, so compare kinds
with each other, not with the wall time of the step.

    python benchmarks/profile_ops.py --kind adder
    python benchmarks/profile_ops.py --kind conv --implementation none
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import tempfile
import time

import jax
from train_step import make_train_step  # benchmarks/train_step.py


def op_times(kind: str, implementation: str | None, *, model: str, batch: int,
             steps: int) -> tuple[float, dict[str, float]]:
  """``(wall ms per step, {op kind: ms per step})``, largest first."""
  step, state = make_train_step(model, kind, implementation=implementation)
  keys = jax.random.split(jax.random.key(0), 2)
  images = jax.random.normal(keys[0], (batch, 32, 32, 3))
  labels = jax.random.randint(keys[1], (batch,), 0, 10)
  for _ in range(3):
    _, state = jax.block_until_ready(step(state, images, labels))
  hlo = step.lower(state, images, labels).compile().as_text()
  # The custom calls named by their target and output shape.
  targets = {name: f"{target} {shape}" for name, shape, target in re.findall(
      r"%(\S+) = (\S+\[[\d,]*\])\S* custom-call\(.*?custom_call_target=\"(\w+)\"", hlo)}
  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        _, state = step(state, images, labels)
      jax.block_until_ready(state)
    wall = (time.perf_counter() - start) / steps * 1e3
    trace = next(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
    data = jax.profiler.ProfileData.from_file(str(trace))
  totals: dict[str, float] = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):  # XLA's threads, not Python's
        continue
      for event in line.events:
        if event.name.startswith(("ThunkExecutor", "end:")):
          continue
        name = targets.get(event.name) or re.sub(r"\.\d+$", "", event.name)
        totals[name] += event.duration_ns / 1e6 / steps
  return wall, dict(sorted(totals.items(), key=lambda item: -item[1]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kind", choices=("adder", "conv"), default="adder")
  parser.add_argument("--implementation", default="none",
                      help="the adder layers' implementation ('none' for the default)")
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args()
  implementation = None if args.implementation == "none" else args.implementation
  wall, totals = op_times(args.kind, implementation, model=args.model, batch=args.batch,
                          steps=args.steps)
  print(f"{args.model} {args.kind} (implementation={implementation}), batch {args.batch}: "
        f"{wall:.1f} ms per step while traced; op time on the thread that ran it, per step:")
  print("| op | ms |\n|---|---|")
  for name, ms in list(totals.items())[:args.top]:
    print(f"| {name} | {ms:.2f} |")
  print(f"| (all ops) | {sum(totals.values()):.2f} |")


if __name__ == "__main__":
  main()

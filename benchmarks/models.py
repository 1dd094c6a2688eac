"""Training throughput of the paper's CIFAR models as AdderNet, CNN and BNN.

For each model (VGG-small, ResNet-20/32/56 by default) it builds the three
kinds of `adderjax.models`, jits one training step each (forward, backward,
`adderjax.optim.addernet_sgd` update, BatchNorm in train mode) on a synthetic
CIFAR-shaped batch, and times the steps side by side in one process: the
kinds are interleaved round by round and each ratio to the CNN is the median
of the per-round ratios, next to the median images/s.

    python benchmarks/models.py                                   # all CIFAR models
    python benchmarks/models.py --models resnet20 --rounds 10 \
        --json benchmarks/results/cpu_2core_models.json
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from report import machine_meta, write_json  # benchmarks/report.py
from train_step import make_train_step  # benchmarks/train_step.py

CIFAR_MODELS = ("resnet20", "resnet32", "resnet56", "vgg_small")
KINDS = ("conv", "adder", "binary")


def bench_model(name: str, *, batch: int, rounds: int, steps_per_round: int) -> dict:
  keys = jax.random.split(jax.random.key(0), 2)
  images = jax.random.normal(keys[0], (batch, 32, 32, 3))
  labels = jax.random.randint(keys[1], (batch,), 0, 10)
  steps, states, compile_s = {}, {}, {}
  for kind in KINDS:
    step, state = make_train_step(name, kind)
    start = time.perf_counter()
    loss, state = step(state, images, labels)
    jax.block_until_ready(loss)
    compile_s[kind] = time.perf_counter() - start
    loss, state = step(state, images, labels)        # a second warm-up call
    jax.block_until_ready(loss)
    steps[kind], states[kind] = step, state

  times = np.zeros((rounds, len(KINDS)))
  for r in range(rounds):
    for k, kind in enumerate(KINDS):
      start = time.perf_counter()
      for _ in range(steps_per_round):
        loss, states[kind] = steps[kind](states[kind], images, labels)
      jax.block_until_ready(loss)
      times[r, k] = (time.perf_counter() - start) / steps_per_round
      if not jnp.isfinite(loss):
        raise FloatingPointError(f"{name} ({kind}): the loss is not finite")
  conv = times[:, KINDS.index("conv")]
  return {
      "model": name, "batch": batch, "rounds": rounds, "steps_per_round": steps_per_round,
      "step_ms": {kind: float(np.median(times[:, k])) * 1e3 for k, kind in enumerate(KINDS)},
      "images_per_s": {kind: float(batch / np.median(times[:, k])) for k, kind in enumerate(KINDS)},
      "time_vs_conv": {kind: float(np.median(times[:, k] / conv)) for k, kind in enumerate(KINDS)},
      "first_call_s": compile_s,
  }


def print_table(rows: list[dict]) -> None:
  header = ["model"] + [f"{k} img/s" for k in KINDS] + ["adder time / conv", "binary time / conv"]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    cells = [r["model"]] + [f"{r['images_per_s'][k]:.1f}" for k in KINDS]
    cells += [f"{r['time_vs_conv']['adder']:.2f}x", f"{r['time_vs_conv']['binary']:.2f}x"]
    print("| " + " | ".join(cells) + " |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", choices=CIFAR_MODELS, default=list(CIFAR_MODELS))
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--steps-per-round", type=int, default=2)
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args()
  rows = []
  for name in args.models:
    rows.append(bench_model(name, batch=args.batch, rounds=args.rounds,
                            steps_per_round=args.steps_per_round))
    print(f"# done {name}: {rows[-1]['images_per_s']}", flush=True)
  meta = machine_meta()
  print(f"\n{meta}\n")
  print_table(rows)
  write_json(args.json, meta, rows)


if __name__ == "__main__":
  main()

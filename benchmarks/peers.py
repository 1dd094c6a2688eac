"""adderjax against PyTorch on this CPU: ResNet-20 training and inference, processes interleaved.

Contenders (ResNet-20 for CIFAR, 32x32x3 inputs, 10 classes):

- ``adderjax_adder``: the AdderNet (native CPU kernels where they build);
- ``adderjax_cnn``: the same network as a CNN (``kind="conv"``);
- ``torch_cnn_cl``: PyTorch's CNN in ``channels_last`` (its fastest CPU layout);
- ``torch_cnn``: PyTorch's CNN in the default NCHW layout;
- ``torch_adder_official``: a PyTorch AdderNet in the official code's
  formulation (unfold, broadcast, sum; the paper's backward), see
  benchmarks/torch_peers.py.

Modes: ``train`` (one step: forward, backward, SGD with momentum; batch 64),
``eval`` (inference in eval mode, batch 64) and ``latency`` (batch 1). Each
(contender, mode) runs in its own process, warmed up, timing several steps;
the processes are alternated round by round so that drifts in the machine's
speed hit every contender alike. Reported: the median over rounds of each
process's median step time, and images/s.

    pip install torch==2.13.0   # benchmark-only; never an adderjax dependency
    python benchmarks/peers.py --rounds 3 --json benchmarks/results/cpu_2core_peers.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

CONTENDERS = ("adderjax_adder", "adderjax_cnn", "torch_cnn_cl", "torch_cnn", "torch_adder_official")
MODES = {"train": 64, "eval": 64, "latency": 1}
# The official formulation materialises B x O x K x L distances (a minute a step
# here at batch 64): one step, no warm-up, in the first round only.
_SLOW = ("torch_adder_official",)


def _jax_runner(contender: str, mode: str, batch: int):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from adderjax import models
  from train_step import make_train_step  # benchmarks/train_step.py

  kind = "adder" if contender == "adderjax_adder" else "conv"
  images = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
  labels = jnp.arange(batch) % 10
  if mode == "train":
    step, state = make_train_step("resnet20", kind)
    holder = {"state": state}

    def run():
      loss, holder["state"] = step(holder["state"], images, labels)
      jax.block_until_ready(loss)
    return run
  predict = models.inference_function(models.get("resnet20", kind=kind, rngs=nnx.Rngs(0)))
  return lambda: jax.block_until_ready(predict(images))


def _torch_runner(contender: str, mode: str, batch: int):
  import torch

  from torch_peers import ResNet20  # benchmarks/torch_peers.py

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  model = ResNet20("adder" if contender == "torch_adder_official" else "conv")
  images = torch.randn(batch, 3, 32, 32)
  labels = torch.arange(batch) % 10
  if contender == "torch_cnn_cl":
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
  if mode == "train":
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def run():
      optimizer.zero_grad(set_to_none=True)
      torch.nn.functional.cross_entropy(model(images), labels).backward()
      optimizer.step()
    return run
  model.eval()

  def infer():
    with torch.inference_mode():
      model(images)
  return infer


def worker(contender: str, mode: str, steps: int, warmup: int) -> dict:
  """Times ``steps`` calls of one (contender, mode) after ``warmup`` calls; prints JSON."""
  batch = MODES[mode]
  make = _jax_runner if contender.startswith("adderjax") else _torch_runner
  run = make(contender, mode, batch)
  for _ in range(warmup):
    run()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return {"contender": contender, "mode": mode, "batch": batch, "times": times}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
  parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES))
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per process")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--json", help="also write the results to this file")
  parser.add_argument("--worker", nargs=2, metavar=("CONTENDER", "MODE"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(*args.worker, args.steps, args.warmup)))
    return

  here = os.path.dirname(os.path.abspath(__file__))
  medians: dict[tuple[str, str], list[float]] = {}
  for r in range(args.rounds):
    for mode in args.modes:
      for contender in args.contenders:
        slow = contender in _SLOW and mode != "latency"
        if slow and r > 0:
          continue
        steps, warmup = (1, 0) if slow else (args.steps, args.warmup)
        out = subprocess.run(
            [sys.executable, os.path.join(here, "peers.py"), "--worker", contender, mode,
             "--steps", str(steps), "--warmup", str(warmup)],
            capture_output=True, text=True, check=True, cwd=here)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        medians.setdefault((contender, mode), []).append(float(np.median(result["times"])))
        print(f"# round {r}: {contender} {mode}: {1e3 * medians[(contender, mode)][-1]:.2f} ms",
              flush=True)

  from report import machine_meta, write_json  # benchmarks/report.py
  rows = []
  for (contender, mode), times in medians.items():
    seconds = float(np.median(times))
    rows.append({"contender": contender, "mode": mode, "batch": MODES[mode],
                 "ms": 1e3 * seconds, "images_per_s": MODES[mode] / seconds,
                 "per_round_ms": [1e3 * t for t in times]})
  meta = machine_meta()
  try:
    import torch
    meta["torch"] = torch.__version__
  except ImportError:
    pass
  print(f"\n{meta}\n")
  print("| contender | " + " | ".join(f"{m} (batch {b})" for m, b in MODES.items()
                                     if m in args.modes) + " |")
  print("|---|" + "---|" * len(args.modes))
  for contender in args.contenders:
    cells = []
    for mode in args.modes:
      row = next(r for r in rows if r["contender"] == contender and r["mode"] == mode)
      cells.append(f"{row['ms']:.2f} ms" if mode == "latency"
                   else f"{row['images_per_s']:.1f} img/s")
    print(f"| {contender} | " + " | ".join(cells) + " |")
  write_json(args.json, meta, rows)


if __name__ == "__main__":
  main()

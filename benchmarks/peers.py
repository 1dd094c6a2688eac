"""adderjax against PyTorch on this CPU: training and inference, processes interleaved.

Contenders (``--model resnet20``, the default: ResNet-20 for CIFAR, 32x32x3
inputs; ``--model lenet5_bn``: LeNet-5-BN, 28x28x1; 10 classes):

- ``adderjax_adder``: the AdderNet (native CPU kernels where they build);
- ``adderjax_adder_int8``: the AdderNet quantized to 8 bits by
  `adderjax.quant.quantize` (4 scale groups; native integer kernels where they
  build); inference only;
- ``adderjax_cnn``: the same network as a CNN (``kind="conv"``);
- ``torch_cnn_cl``: PyTorch's CNN in ``channels_last`` (its fastest CPU layout);
- ``torch_cnn``: PyTorch's CNN in the default NCHW layout;
- ``torch_cnn_int8``: PyTorch's CNN quantized to int8 by its own FX static
  post-training quantization (x86 backend, per-channel weights), inference only;
- ``torch_adder_official``: a PyTorch AdderNet in the official code's
  formulation (unfold, broadcast, sum; the paper's backward), see
  benchmarks/torch_peers.py; ResNet-20 only.

Modes: ``train`` (one step: forward, backward, SGD with momentum; batch 64),
``eval`` (inference in eval mode, batch 64) and ``latency`` (batch 1). Each
(contender, mode) runs in its own process, warmed up, timing several steps;
the processes are alternated round by round so that drifts in the machine's
speed hit every contender alike. Every process, PyTorch's too, starts with
`adderjax.allocator.environment` (glibc's allocator set up to reuse large
buffers, as the trainer runs; ``--default-allocator``: the environment as it
is). Reported: the median over rounds of each process's median step time, and
images/s.

    pip install torch==2.13.0   # benchmark-only; never an adderjax dependency
    python benchmarks/peers.py --rounds 3 --json benchmarks/results/cpu_2core_peers.json
    python benchmarks/peers.py --modes eval latency --contenders adderjax_adder \\
        adderjax_adder_int8 torch_cnn_cl torch_cnn_int8 --model lenet5_bn
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from adderjax import allocator

CONTENDERS = ("adderjax_adder", "adderjax_adder_int8", "adderjax_cnn", "torch_cnn_cl", "torch_cnn",
              "torch_cnn_int8", "torch_adder_official")
MODELS = ("resnet20", "lenet5_bn")
_INFERENCE_ONLY = ("adderjax_adder_int8", "torch_cnn_int8")
MODES = {"train": 64, "eval": 64, "latency": 1}
# The official formulation materialises B x O x K x L distances (a minute a step
# here at batch 64): one step, no warm-up, in the first round only.
_SLOW = ("torch_adder_official",)


def _jax_runner(contender: str, mode: str, batch: int, model_name: str):
  from flax import nnx
  import jax
  import jax.numpy as jnp
  from train_step import make_train_step  # benchmarks/train_step.py

  from adderjax import models, quant

  kind = "conv" if contender == "adderjax_cnn" else "adder"
  shape = models.input_shape(model_name)
  images = jax.random.normal(jax.random.key(0), (batch, *shape))
  labels = jnp.arange(batch) % 10
  if mode == "train":
    step, state = make_train_step(model_name, kind)
    holder = {"state": state}

    def run():
      loss, holder["state"] = step(holder["state"], images, labels)
      jax.block_until_ready(loss)
    return run
  model = models.get(model_name, kind=kind, rngs=nnx.Rngs(0))
  if contender == "adderjax_adder_int8":
    calibration = jax.random.normal(jax.random.key(1), (64, *shape))
    model, _ = quant.quantize(model, [calibration], bits=8, scale_groups=4)
  predict = models.inference_function(model)
  return lambda: jax.block_until_ready(predict(images))


def _torch_runner(contender: str, mode: str, batch: int, model_name: str):
  import torch
  from torch_peers import LeNet5BN, ResNet20, quantize_int8  # benchmarks/torch_peers.py

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  if model_name == "lenet5_bn":
    model, shape = LeNet5BN(), (1, 28, 28)
  else:
    model, shape = ResNet20("adder" if contender == "torch_adder_official" else "conv"), (3, 32, 32)
  images = torch.randn(batch, *shape)
  labels = torch.arange(batch) % 10
  if contender == "torch_cnn_int8":
    model = quantize_int8(model, torch.randn(64, *shape))
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


def worker(contender: str, mode: str, steps: int, warmup: int, model_name: str) -> dict:
  """Times ``steps`` calls of one (contender, mode) after ``warmup`` calls; prints JSON."""
  batch = MODES[mode]
  make = _jax_runner if contender.startswith("adderjax") else _torch_runner
  run = make(contender, mode, batch, model_name)
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
  parser.add_argument("--model", choices=MODELS, default="resnet20")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per process")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--json", help="also write the results to this file")
  parser.add_argument("--default-allocator", action="store_true",
                      help="start the processes in this environment as it is")
  parser.add_argument("--worker", nargs=2, metavar=("CONTENDER", "MODE"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(*args.worker, args.steps, args.warmup, args.model)))
    return
  if args.model != "resnet20" and "torch_adder_official" in args.contenders:
    parser.error("torch_adder_official is ResNet-20 only: leave it out of --contenders.")

  here = os.path.dirname(os.path.abspath(__file__))
  env = None if args.default_allocator else allocator.environment()
  medians: dict[tuple[str, str], list[float]] = {}
  for r in range(args.rounds):
    for mode in args.modes:
      for contender in args.contenders:
        slow = contender in _SLOW and mode != "latency"
        if (slow and r > 0) or (contender in _INFERENCE_ONLY and mode == "train"):
          continue
        steps, warmup = (1, 0) if slow else (args.steps, args.warmup)
        out = subprocess.run(
            [sys.executable, os.path.join(here, "peers.py"), "--worker", contender, mode,
             "--steps", str(steps), "--warmup", str(warmup), "--model", args.model],
            capture_output=True, text=True, check=True, cwd=here, env=env)
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
  meta["model"] = args.model
  meta["glibc_tunables"] = (env or os.environ).get("GLIBC_TUNABLES", "")
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
      row = next((r for r in rows if r["contender"] == contender and r["mode"] == mode), None)
      if row is None:
        cells.append("-")
        continue
      cells.append(f"{row['ms']:.2f} ms" if mode == "latency"
                   else f"{row['images_per_s']:.1f} img/s")
    print(f"| {contender} | " + " | ".join(cells) + " |")
  write_json(args.json, meta, rows)


if __name__ == "__main__":
  main()

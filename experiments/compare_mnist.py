"""The main job: LeNet-5-BN as an AdderNet and as a CNN on MNIST, side by side.

    python -m experiments.compare_mnist                       # TFDS MNIST, else sklearn digits
    python -m experiments.compare_mnist --data_dir ../shared/data/mnist --epochs 10

Both networks train with the paper's MNIST recipe (``experiments/configs/
mnist_lenet5_bn.py``: SGD with momentum, cosine rate from 0.1, the adaptive rate
on the adder kernels) for ``--epochs`` epochs, then the script prints their test
accuracy (with BatchNorm statistics recomputed over 10 training batches: in a
short run the running averages lag the adder layers' fast-moving outputs), operations per image (``adderjax.profiling.count_ops``) and training
time. The data, in order of preference:

1. TFDS MNIST (60,000/10,000), when TensorFlow is installed to prepare it and
   the network can download it;
2. otherwise, saying why, MNIST in its original IDX files in ``--data_dir``:
   the train and test files when present, else only the 10,000 test images,
   the first 8,000 to train on and the other 2,000 to test on;
3. otherwise scikit-learn's bundled 8x8 digits (1,797 images, no network),
   upscaled to 28x28.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from adderjax import data
from adderjax.profiling import count_ops
from experiments.configs import common
from experiments.train import make_model, train_and_evaluate


def choose_data(data_dir: str | None) -> tuple[dict[str, str], str]:
  """The config fields of the best MNIST available here and a sentence naming it."""
  if importlib.util.find_spec("tensorflow") is None:
    reason = "TFDS needs TensorFlow to prepare MNIST and it is not installed"
  else:
    try:
      data.load_source("mnist", "test", source="tfds", download=True)
      return {"data_source": "tfds"}, "TFDS MNIST: 60,000 training and 10,000 test images"
    except data.DataError as e:
      reason = f"TFDS MNIST could not be loaded ({str(e).splitlines()[0]})"
  if data_dir:
    directory = pathlib.Path(data_dir)
    fields = {"data_source": "idx", "data_dir": str(directory)}
    if any(directory.glob("train-images-idx3-ubyte*")):
      return fields, f"{reason}; using the IDX files in {directory}"
    fields.update(train_split="test[:8000]", eval_split="test[8000:]")
    return fields, (f"{reason}; using the MNIST test set in {directory}: "
                    "the first 8,000 images to train on, the other 2,000 to test on")
  return {"data_source": "digits"}, (
      f"{reason}, and no --data_dir was given; using scikit-learn's 8x8 digits upscaled "
      "to 28x28 (1,437 to train on, 360 to test on)")


def comparison_config(kind: str, fields: dict[str, str], epochs: float, batch_size: int,
                      bn_recompute_batches: int):
  config = common.mnist_lenet5_bn(kind)
  config.update(fields)
  config.num_epochs = epochs
  config.batch_size = batch_size
  config.bn_recompute_batches = bn_recompute_batches
  config.eval_batch_size = 400
  config.log_every_steps = 10
  config.checkpoint_every_steps = 10**9  # Only at the end.
  return config


def op_counts(config) -> tuple[int, int, int]:
  model = nnx.eval_shape(lambda: make_model(config, rngs=nnx.Rngs(0)))
  counts = count_ops(model, jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
  return counts.multiplications, counts.additions, counts.params


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", help="MNIST in its original IDX files.")
  parser.add_argument("--epochs", type=float, default=5.0)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--bn_recompute_batches", type=int, default=10,
                      help="Training batches to recompute BatchNorm statistics on before each "
                      "evaluation (0: use the running averages).")
  parser.add_argument("--workdir", help="Where the two runs go (default: a new temporary "
                      "directory); an existing run there is resumed.")
  args = parser.parse_args(argv)
  logging.basicConfig(format="%(message)s")
  logging.getLogger("experiments").setLevel(logging.INFO)
  if args.data_dir and not pathlib.Path(args.data_dir).is_dir():
    parser.error(f"--data_dir {args.data_dir} is not a directory.")

  fields, description = choose_data(args.data_dir)
  print(f"Data: {description}.", flush=True)
  workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="compare_mnist_"))
  rows = []
  for kind, label in (("adder", "AdderNet"), ("conv", "CNN")):
    config = comparison_config(kind, fields, args.epochs, args.batch_size,
                               args.bn_recompute_batches)
    print(f"\nTraining LeNet-5-BN as {label} for {args.epochs:g} epochs "
          f"(workdir {workdir / kind})", flush=True)
    start = time.perf_counter()
    result = train_and_evaluate(config, workdir / kind)
    wall = time.perf_counter() - start
    rows.append((label, result, wall, *op_counts(config)))

  print(f"\nLeNet-5-BN on {description.split('; using ')[-1]}, {args.epochs:g} epochs, "
        f"{jax.device_count()} {jax.default_backend()} device(s):")
  header = (f"{'network':<9} {'test acc':>8} {'test images':>11} {'train s':>8} {'total s':>8} "
            f"{'mults/img':>10} {'adds/img':>10} {'params':>7}")
  print(header + "\n" + "-" * len(header))
  for label, result, wall, mults, adds, params in rows:
    print(f"{label:<9} {result['eval_accuracy']:8.4f} {int(result['eval_examples']):11d} "
          f"{result['train_seconds']:8.1f} {wall:8.1f} {mults:10,d} {adds:10,d} {params:7,d}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The main job: LeNet-5-BN as an AdderNet and as a CNN on MNIST, side by side.

    python -m experiments.compare_mnist                    # full MNIST if available, else bundled
    python -m experiments.compare_mnist --data=bundled     # the MNIST test set shipped in adderjax
    python -m experiments.compare_mnist --data_dir ../shared/data/mnist --epochs 10

Both networks train with the paper's MNIST recipe (``experiments/configs/
mnist_lenet5_bn.py``: SGD with momentum, cosine rate from 0.1, the adaptive rate
on the adder kernels), then the script prints their test accuracy (BatchNorm
statistics recomputed over 10 training batches: in a short run the running
averages lag the adder layers' fast-moving outputs), the difference and what it
shows, operations per image (``adderjax.profiling.count_ops``), parameters and
time, and writes their learning curves to ``learning_curves.png`` in the
workdir (with matplotlib, the ``plot`` extra). The data (``--data``):

- ``auto`` (default): full MNIST, 60,000 images to train on and 10,000 to test
  on, from the download cache or downloaded (11 MB, checksummed: see
  ``adderjax.data.download``); without a network, says why in one line and
  uses ``bundled``;
- ``full``: full MNIST, or an error if it cannot be had;
- ``bundled``: the 10,000 real MNIST test images shipped in the package, the
  first 8,000 to train on and the other 2,000 to test on;
- ``digits``: scikit-learn's 1,797 8x8 digits upscaled to 28x28 (only when
  asked for: they are not MNIST).

``--data_dir`` reads MNIST's IDX files from a directory instead: the train and
test files when present, else only the test files, split 8,000 / 2,000.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import pathlib
import sys
import tempfile
import textwrap
import time

from flax import nnx
import jax
import jax.numpy as jnp

from adderjax import data
from adderjax.data import bundled
from adderjax.profiling import count_ops
from experiments.configs import common
from experiments.train import DTYPES, make_model, train_and_evaluate

DATA_CHOICES = ("auto", "full", "bundled", "digits")
DTYPE_CHOICES = tuple(DTYPES)
_NETWORKS = (("adder", "AdderNet"), ("conv", "CNN"))
PAPER_MNIST = "the paper's Table 1: 99.4% for both on full MNIST"


@dataclasses.dataclass(frozen=True)
class DataChoice:
  """The MNIST a run uses.

  Attributes:
    fields: The config fields that select it.
    description: What it is, for the table's title.
    note: A line on why it was chosen (empty when asked for).
    default_epochs: Epochs that show the point in 1-2 minutes on 2 CPU cores.
  """

  fields: dict[str, str]
  description: str
  note: str = ""
  default_epochs: float = 10.0


def _bundled(note: str = "") -> DataChoice:
  return DataChoice(
      {"data_source": "bundled", "train_split": bundled.TRAIN_SPLIT,
       "eval_split": bundled.EVAL_SPLIT},
      "the MNIST test set bundled with adderjax (the first 8,000 images to train on, "
      "the other 2,000 to test on)", note)


def choose_data(choice: str = "auto", data_dir: str | None = None) -> DataChoice:
  """The MNIST to train on: see the module's docstring.

  Args:
    choice: One of :data:`DATA_CHOICES`.
    data_dir: A directory of MNIST IDX files; overrides ``choice``.

  Returns:
    The chosen data.

  Raises:
    adderjax.data.DataError: If ``choice="full"`` and full MNIST cannot be had.
  """
  if data_dir:
    directory = pathlib.Path(data_dir)
    fields = {"data_source": "idx", "data_dir": str(directory), "download": False}
    if any(directory.glob("train-images-idx3-ubyte*")):
      return DataChoice(fields, f"MNIST in {directory} (60,000 / 10,000)", default_epochs=2.0)
    fields.update(train_split=bundled.TRAIN_SPLIT, eval_split=bundled.EVAL_SPLIT)
    return DataChoice(fields, f"the MNIST test set in {directory} (the first 8,000 images "
                      "to train on, the other 2,000 to test on)")
  if choice == "digits":
    return DataChoice({"data_source": "digits"}, "scikit-learn's 8x8 digits upscaled to 28x28 "
                      "(1,437 to train on, 360 to test on; not MNIST)")
  if choice == "bundled":
    return _bundled()
  try:
    directory = data.download("mnist")
  except data.DataError as e:
    if choice == "full":
      raise
    first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
    return _bundled(f"Full MNIST could not be downloaded ({first}); training on the MNIST "
                    "test set bundled with adderjax instead.")
  return DataChoice({"data_source": "idx", "data_dir": str(directory), "download": False},
                    "full MNIST (60,000 images to train on, 10,000 to test on)",
                    default_epochs=2.0)


def comparison_config(kind: str, fields: dict, epochs: float, batch_size: int,
                      bn_recompute_batches: int, num_devices: int = 0, dtype: str = "float32"):
  config = common.mnist_lenet5_bn(kind)
  config.update(fields)
  config.dtype = dtype
  config.num_devices = num_devices
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


def verdict(adder_accuracy: float, cnn_accuracy: float, num_test: int) -> str:
  """One line on what the two accuracies show, with the test set's noise."""
  diff = 100 * (adder_accuracy - cnn_accuracy)
  mean = (adder_accuracy + cnn_accuracy) / 2
  # Two standard errors of the difference of two accuracies on num_test images.
  noise = 200 * math.sqrt(2 * max(mean * (1 - mean), 1 / num_test) / num_test)
  head = f"AdderNet - CNN: {diff:+.2f} points (noise of {num_test:,} test images: +-{noise:.2f})."
  if abs(diff) <= noise:
    return (f"{head} The AdderNet matches the CNN with no multiplications, as in {PAPER_MNIST}.")
  if diff > 0:
    return f"{head} The AdderNet beats the CNN here, with no multiplications ({PAPER_MNIST})."
  return (f"{head} The AdderNet trails the CNN by more than the noise ({PAPER_MNIST}); "
          "train longer (--epochs) to close the gap.")


def plot_learning_curves(workdir: pathlib.Path, title: str) -> pathlib.Path:
  """Writes both networks' test accuracy and training loss against epochs to a PNG in ``workdir``.

  Raises:
    ImportError: If matplotlib (the ``plot`` extra) is not installed.
  """
  from adderjax import plotting  # Needs matplotlib: the `plot` extra.
  runs = {label: workdir / kind for kind, label in _NETWORKS}
  figure = plotting.learning_curves(runs, keys=("eval_accuracy", "train_loss"),
                                    title=textwrap.fill(title, 100), x_axis="epoch")
  path = workdir / "learning_curves.png"
  figure.savefig(path, dpi=100)
  return path


def plot_line(workdir: pathlib.Path, title: str) -> str:
  """Plots the learning curves and says where they are, or why there is no plot."""
  try:
    return f"Learning curves: {plot_learning_curves(workdir, title)}"
  except ImportError:
    return ("Learning curves: not plotted, matplotlib is not installed "
            "(pip install 'adderjax[plot]').")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", choices=DATA_CHOICES, default="auto",
                      help="Which MNIST: see the module docstring (default: %(default)s).")
  parser.add_argument("--data_dir", help="MNIST in its original IDX files (overrides --data).")
  parser.add_argument("--epochs", type=float,
                      help="Default: 2 on full MNIST, 10 on the 8,000-image split (1-2 "
                      "minutes on 2 CPU cores either way).")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--bn_recompute_batches", type=int, default=10,
                      help="Training batches to recompute BatchNorm statistics on before each "
                      "evaluation (0: use the running averages).")
  parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                      help="The compute dtype; parameters, adder outputs and BatchNorm "
                      "statistics stay float32 (default: %(default)s).")
  parser.add_argument("--num_devices", type=int, default=0,
                      help="Local devices to train on (default: all).")
  parser.add_argument("--workdir", help="Where the two runs and the plot go (default: a new "
                      "temporary directory); an existing run there is resumed.")
  args = parser.parse_args(argv)
  logging.basicConfig(format="%(message)s", force=True)
  for name in ("experiments", "adderjax"):  # adderjax: the first-use build of the native kernels.
    logging.getLogger(name).setLevel(logging.INFO)
  if args.data_dir and not pathlib.Path(args.data_dir).is_dir():
    parser.error(f"--data_dir {args.data_dir} is not a directory.")
  if args.epochs is not None and not args.epochs > 0:
    parser.error(f"--epochs must be positive, got {args.epochs}.")

  try:
    choice = choose_data(args.data, args.data_dir)
  except data.DataError as e:
    print(f"error: --data={args.data}: {e}", file=sys.stderr)
    return 1
  if choice.note:
    print(choice.note, flush=True)
  print(f"Data: {choice.description}.", flush=True)
  epochs = args.epochs or choice.default_epochs
  workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="compare_mnist_"))
  rows = []
  for kind, label in _NETWORKS:
    config = comparison_config(kind, choice.fields, epochs, args.batch_size,
                               args.bn_recompute_batches, args.num_devices, args.dtype)
    print(f"\nTraining LeNet-5-BN as {label} for {epochs:g} epochs "
          f"(workdir {workdir / kind})", flush=True)
    start = time.perf_counter()
    result = train_and_evaluate(config, workdir / kind)
    wall = time.perf_counter() - start
    rows.append((label, result, wall, *op_counts(config)))

  precision = "" if args.dtype == "float32" else f", {args.dtype}"
  title = (f"LeNet-5-BN on {choice.description}, {epochs:g} epochs{precision}, "
           f"{jax.device_count()} {jax.default_backend()} device(s)")
  print(f"\n{title}:")
  header = (f"{'network':<9} {'test acc':>8} {'test images':>11} {'train s':>8} {'total s':>8} "
            f"{'mults/img':>10} {'adds/img':>10} {'params':>7}")
  print(header + "\n" + "-" * len(header))
  for label, result, wall, mults, adds, params in rows:
    print(f"{label:<9} {result['eval_accuracy']:8.4f} {int(result['eval_examples']):11d} "
          f"{result['train_seconds']:8.1f} {wall:8.1f} {mults:10,d} {adds:10,d} {params:7,d}")
  adder, cnn = rows[0][1], rows[1][1]
  print(verdict(adder["eval_accuracy"], cnn["eval_accuracy"], int(cnn["eval_examples"])))
  print(plot_line(workdir, title))
  return 0


if __name__ == "__main__":
  sys.exit(main())

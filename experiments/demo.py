"""Demo: the same small network as an AdderNet and as a CNN, trained side by side.

Trains on the first 8,000 images of the MNIST test set in its original IDX
files (../shared/data/mnist by default) and evaluates on the other 2,000, for
both variants, then prints accuracy, training time and the layers' op counts.
Without the IDX files it says so and uses a synthetic digit-like task.

    python -m experiments.demo
    python -m experiments.demo --data-dir /path/to/mnist --epochs 3

This is the interim main job; the training system (experiments/main.py) will
replace it.
"""

from __future__ import annotations

import argparse
import gzip
import pathlib
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from adderjax.nn import AdderConv
from adderjax.optim import addernet_sgd

DEFAULT_DATA_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
IMAGES, LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


def read_idx(path: pathlib.Path) -> np.ndarray:
  """Reads an (optionally gzipped) IDX file of unsigned bytes."""
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    data = f.read()
  zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype_code != 0x08:
    raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {data[:4]!r}).")
  shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != np.prod(shape):
    raise ValueError(f"{path} holds {array.size} values, its header says {shape}.")
  return array.reshape(shape)


def load_mnist(data_dir: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  images = read_idx(data_dir / IMAGES).astype(np.float32) / 255.0
  labels = read_idx(data_dir / LABELS).astype(np.int32)
  return (images[..., None] - 0.1307) / 0.3081, labels


def synthetic_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Ten fixed random 28x28 stroke patterns, shifted and noised."""
  rng = np.random.default_rng(seed)
  prototypes = (rng.random((10, 28, 28)) < 0.15).astype(np.float32)
  labels = rng.integers(0, 10, n).astype(np.int32)
  shifts = rng.integers(-2, 3, (n, 2))
  images = np.stack([np.roll(prototypes[c], tuple(s), (0, 1)) for c, s in zip(labels, shifts)])
  images += 0.3 * rng.normal(size=images.shape).astype(np.float32)
  return images[..., None], labels


class SmallNet(nnx.Module):
  """Stem conv, two 3x3 layers of the chosen kind each with BatchNorm, a linear head.

  As in the official code, the stem and the classifier stay multiplicative.
  BatchNorm after an adder layer uses momentum 0.9: adder outputs have a
  large negative mean, and slower running averages wreck eval accuracy.
  """

  def __init__(self, kind: str, *, rngs: nnx.Rngs):
    layer = AdderConv if kind == "adder" else nnx.Conv
    self.stem = nnx.Conv(1, 16, (3, 3), use_bias=False, rngs=rngs)
    self.bn0 = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
    self.conv1 = layer(16, 32, (3, 3), strides=2, use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
    self.conv2 = layer(32, 64, (3, 3), strides=2, use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(64, momentum=0.9, rngs=rngs)
    self.head = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn0(self.stem(x)))
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.head(x.mean(axis=(1, 2)))


@nnx.jit
def train_step(model, optimizer, images, labels):
  def loss_fn(model):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def predict(model, images):
  return model(images).argmax(-1)


def train_and_evaluate(kind: str, data, *, epochs: int, batch_size: int, lr: float, seed: int):
  (train_x, train_y), (test_x, test_y) = data
  model = SmallNet(kind, rngs=nnx.Rngs(seed))
  steps_per_epoch = len(train_x) // batch_size
  schedule = optax.cosine_decay_schedule(lr, epochs * steps_per_epoch)
  optimizer = nnx.Optimizer(model, addernet_sgd(schedule), wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  for _ in range(epochs):
    order = rng.permutation(len(train_x))
    for step in range(steps_per_epoch):
      idx = order[step * batch_size:(step + 1) * batch_size]
      loss = train_step(model, optimizer, jnp.asarray(train_x[idx]), jnp.asarray(train_y[idx]))
  loss = float(loss)
  train_time = time.perf_counter() - start
  model.eval()
  preds = np.concatenate([np.asarray(predict(model, jnp.asarray(test_x[k:k + 500])))
                          for k in range(0, len(test_x), 500)])
  return {"accuracy": float((preds == test_y).mean()), "final_loss": loss,
          "train_seconds": train_time}


def layer_ops(kind: str) -> tuple[int, int]:
  """(multiplications, additions) per image of conv1 and conv2, the swapped layers."""
  macs = 14 * 14 * 9 * 16 * 32 + 7 * 7 * 9 * 32 * 64
  return (macs, macs) if kind == "conv" else (0, 2 * macs)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data-dir", type=pathlib.Path, default=DEFAULT_DATA_DIR)
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  if (args.data_dir / IMAGES).exists() and (args.data_dir / LABELS).exists():
    images, labels = load_mnist(args.data_dir)
    source = f"MNIST test set IDX files in {args.data_dir} (train 8,000 / test 2,000)"
  else:
    print(f"No MNIST IDX files in {args.data_dir}: using a synthetic 10-class task instead.")
    images, labels = synthetic_digits(10_000)
    source = "synthetic digits (train 8,000 / test 2,000)"
  data = ((images[:8000], labels[:8000]), (images[8000:], labels[8000:]))
  print(f"Data: {source}; {args.epochs} epochs, batch {args.batch_size}, "
        f"addernet_sgd lr {args.lr} cosine; JAX {jax.__version__} on {jax.devices()[0].platform}")

  print(f"{'model':8s} {'test acc':>9s} {'loss':>7s} {'train s':>8s} {'muls':>10s} {'adds':>10s}")
  for kind in ("adder", "conv"):
    result = train_and_evaluate(kind, data, epochs=args.epochs, batch_size=args.batch_size,
                                lr=args.lr, seed=args.seed)
    muls, adds = layer_ops(kind)
    print(f"{kind:8s} {result['accuracy']:9.4f} {result['final_loss']:7.4f} "
          f"{result['train_seconds']:8.1f} {muls:10,d} {adds:10,d}", flush=True)
  print("(muls/adds: per image, for the two layers that differ; stem and head are shared)")


if __name__ == "__main__":
  main()

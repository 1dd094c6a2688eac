"""How the BatchNorm statistics of a quantized model should follow the quantization (issue 20).

For a trainer workdir (e.g. LeNet-5-BN on the bundled MNIST), over ``--draws``
sets of ``--batches`` calibration batches (training batches of the run's batch
size, each set from another seed), the test accuracy and loss of:

- the float model with the checkpoint's statistics, and with them recomputed on
  the calibration batches (`recompute_batch_norm_stats`: every BatchNorm in
  training mode in one pass) or layer by layer (each BatchNorm measured with
  the ones before it already fixed: the order of layers);
- the model quantized by `adderjax.quant.quantize` to each ``--bits``, its
  statistics kept (``recompute_batch_norm=False``), recomputed (``True``) or
  shifted by what quantization changes (``"shift"``, the default).

    python -m experiments.main --config=experiments/configs/mnist_lenet5_bn.py:adder \
        --workdir=/tmp/lenet --config.data_source=bundled --config.train_split='test[:8000]' \
        --config.eval_split='test[8000:]' --config.num_epochs=10 --config.batch_size=128
    python benchmarks/quant_batch_norm.py --workdir=/tmp/lenet --batches 8 --draws 5 --bits 16 8 4
"""

from __future__ import annotations

import argparse
import itertools

from flax import nnx
import jax.numpy as jnp
import numpy as np
import optax

from adderjax import data, quant
from adderjax.models.batch_norm_stats import recompute_batch_norm_stats
from experiments.trained import load_run


@nnx.jit
def _forward(model, images):
  return model(images)


@nnx.jit
def _train_step(model, images):
  model(images)


def _recomputed(model, batches):
  model = nnx.clone(model)
  recompute_batch_norm_stats(model, batches)
  model.eval()
  return model


def _layer_by_layer(model, batches):
  """Each BatchNorm's statistics over ``batches``, measured with the ones before it fixed."""
  model = nnx.clone(model)
  model.eval()
  for _, bn in nnx.iter_modules(model):
    if not isinstance(bn, nnx.BatchNorm):
      continue
    momentum, bn.momentum, bn.use_running_average = bn.momentum, 0.0, False
    first = second = 0.0
    for batch in batches:
      _train_step(model, batch)
      first, second = first + bn.mean[...], second + bn.var[...] + bn.mean[...] ** 2
    mean = first / len(batches)
    bn.mean[...], bn.var[...] = mean, jnp.maximum(second / len(batches) - mean ** 2, 0.0)
    bn.momentum, bn.use_running_average = momentum, True
  return model


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--batches", type=int, default=8)
  parser.add_argument("--draws", type=int, default=5)
  parser.add_argument("--bits", type=int, nargs="+", default=[16, 8, 4])
  args = parser.parse_args()
  run = load_run(args.workdir)
  config = run.config
  test = next(data.eval_batches(config.dataset, run.eval_source,
                               global_batch_size=len(run.eval_source)))
  images, labels = jnp.asarray(test["image"]), np.asarray(test["label"])

  def evaluate(model):
    logits = np.asarray(_forward(model, images), np.float64)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return float(np.mean(np.argmax(logits, -1) == labels)), float(np.mean(loss))

  results = {"float, checkpoint statistics": [evaluate(run.model)]}
  for draw in range(args.draws):
    batches = [jnp.asarray(b["image"]) for b in itertools.islice(data.train_batches(
        config.dataset, run.train_source, global_batch_size=config.batch_size,
        seed=config.seed + 1 + draw, augment=config.augment), args.batches)]
    rows = {"float, recomputed": _recomputed(run.model, batches),
            "float, recomputed layer by layer": _layer_by_layer(run.model, batches)}
    for bits in args.bits:
      for how in (False, True, "shift"):
        rows[f"{bits:2d} bits, recompute_batch_norm={how!r}"] = quant.quantize(
            run.model, batches, bits=bits, recompute_batch_norm=how).model
    for name, model in rows.items():
      results.setdefault(name, []).append(evaluate(model))
  print(f"{args.draws} draws of {args.batches} batches of {config.batch_size}; test accuracy "
        f"and loss on {len(labels)} images, mean +- sd over the draws")
  for name, values in results.items():
    a = np.asarray(values)
    print(f"{name:40s} {a[:, 0].mean():.2%} +- {a[:, 0].std():.2%}   "
          f"loss {a[:, 1].mean():.4f} +- {a[:, 1].std():.4f}")


if __name__ == "__main__":
  main()

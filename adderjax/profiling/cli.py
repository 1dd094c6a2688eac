"""``python -m adderjax.profiling``: operation counts, energy and latency of a model.

    python -m adderjax.profiling resnet20                    # the AdderNet, layer by layer
    python -m adderjax.profiling resnet20 --kind conv        # the CNN
    python -m adderjax.profiling resnet50 --compare          # CNN, AdderNet, BNN side by side
    python -m adderjax.profiling vgg_small --energy int8_45nm --input-shape 64,64,3

The model is built abstractly (:func:`flax.nnx.eval_shape`) and traced with
:func:`jax.eval_shape`, so even a ResNet-50 at 224x224 is counted in a few
seconds without computing anything.
"""

import argparse
from collections.abc import Sequence
import sys
from typing import TextIO

from flax import nnx
import jax
import jax.numpy as jnp

from adderjax import models
from adderjax.profiling.costs import CYCLE_TABLES, ENERGY_TABLES, estimate_energy, estimate_latency
from adderjax.profiling.counting import OpCounts, count_ops
from adderjax.profiling.report import format_comparison, format_layers, format_totals

__all__ = ["main", "parser", "profile"]

_TITLES = {"conv": "CNN", "adder": "AdderNet", "binary": "BNN"}


def _input_shape(text: str) -> tuple[int, int, int]:
  try:
    shape = tuple(int(v) for v in text.split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) < 1:
    raise argparse.ArgumentTypeError(
        f"must be three positive ints H,W,C such as 32,32,3, got {text!r}")
  return shape  # type: ignore[return-value]


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
  return value


def parser() -> argparse.ArgumentParser:
  """Returns the command line's argument parser.

  Example:
    >>> from adderjax.profiling.cli import parser
    >>> parser().parse_args(["resnet20", "--input-shape", "64,64,3"]).input_shape
    (64, 64, 3)

  Returns:
    An :class:`argparse.ArgumentParser` for ``MODEL [--kind ...] [--input-shape
    H,W,C] [--num-classes N] [--energy TABLE] [--cycles TABLE] [--compare]``.
  """
  p = argparse.ArgumentParser(
      prog="python -m adderjax.profiling",
      description="Per-example multiplications, additions, XNORs, parameters, energy and "
                  "latency of an adderjax model, counted as in the AdderNet paper (Chen et al., "
                  "CVPR 2020): only convolution and fully connected layers.")
  p.add_argument("model", choices=models.names(), help="the model to count")
  p.add_argument("--kind", choices=models.KINDS, default="adder",
                 help="adder (AdderNet), conv (CNN) or binary (BNN); default: adder")
  p.add_argument("--input-shape", type=_input_shape, metavar="H,W,C",
                 help="the shape of one input image (default: the model's, such as 32,32,3)")
  p.add_argument("--num-classes", type=_positive_int, metavar="N",
                 help="the number of classes (default: the model's)")
  p.add_argument("--energy", choices=tuple(ENERGY_TABLES), default="fp32_45nm",
                 help="energy per operation, Horowitz ISSCC 2014 at 45 nm; default: fp32_45nm")
  p.add_argument("--cycles", choices=tuple(CYCLE_TABLES), default="via_nano_2000",
                 help="cycles per operation; default: via_nano_2000 (the paper's)")
  p.add_argument("--compare", action="store_true",
                 help="print the CNN, the AdderNet and the BNN side by side")
  return p


def profile(name: str, *, kind: str, input_shape: Sequence[int],
            num_classes: int | None = None) -> OpCounts:
  """Counts the operations of the model ``name`` per example, without computing anything.

  Example:
    >>> from adderjax.profiling import human, profile
    >>> counts = profile("resnet32", kind="conv", input_shape=(32, 32, 3))
    >>> human(counts.multiplications)  # the paper's 69.12M
    '69.12M'

  Args:
    name: one of :func:`adderjax.models.names`.
    kind: ``"adder"``, ``"conv"`` or ``"binary"``.
    input_shape: the ``(height, width, channels)`` of one image.
    num_classes: the number of classes (default: the model's).

  Returns:
    The :class:`OpCounts` of :func:`count_ops` on an abstract model and input.

  Raises:
    ValueError: for an unknown ``name`` or ``kind``, or an input the model
      does not take.
  """
  options = {} if num_classes is None else {"num_classes": num_classes}
  model = nnx.eval_shape(lambda: models.get(name, kind=kind, rngs=nnx.Rngs(0), **options))
  return count_ops(model, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
  """Runs the command line on ``argv`` (default: ``sys.argv[1:]``), printing to ``out``.

  Example:
    >>> from adderjax.profiling import main
    >>> main(["lenet5_bn", "--kind", "conv"])  # doctest: +ELLIPSIS
    lenet5_bn (CNN), input 28x28x1, per example
    ...
    0

  Args:
    argv: the arguments, without the program name.
    out: where to print (default: ``sys.stdout``).

  Returns:
    0. Bad arguments exit with status 2 and a message, as argparse does.
  """
  p = parser()
  args = p.parse_args(argv)
  out = sys.stdout if out is None else out
  shape = args.input_shape or models.input_shape(args.model)
  kinds = tuple(_TITLES) if args.compare else (args.kind,)
  results = {}
  for kind in kinds:
    try:
      counts = profile(args.model, kind=kind, input_shape=shape, num_classes=args.num_classes)
    except ValueError as e:
      p.error(f"cannot count {args.model} on a {shape} input: {e}")
    results[_TITLES[kind]] = (counts, estimate_energy(counts, table=args.energy),
                              estimate_latency(counts, cycles=args.cycles))
  size = "x".join(map(str, shape))
  if args.compare:
    print(f"{args.model}, input {size}, per example\n", file=out)
    print(format_comparison(results), file=out)
  else:
    (title, (counts, energy, latency)), = results.items()
    print(f"{args.model} ({title}), input {size}, per example\n", file=out)
    print(format_layers(counts) + "\n", file=out)
    print(format_totals(counts, energy=energy, latency=latency), file=out)
  return 0

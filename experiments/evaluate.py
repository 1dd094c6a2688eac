"""Evaluates a pretrained AdderNet or a trainer run on its test set: top-1, top-5, as JSON.

    python -m experiments.evaluate --pretrained=resnet20_cifar10
    python -m experiments.evaluate --workdir=W [--output=FILE --batch_size=500 --dtype=bfloat16]

``--pretrained=NAME`` (``adderjax.models.pretrained_names()``) takes its
dataset's test split: for CIFAR-10 the authors' archive, downloaded once into
the cache with ``adderjax.data.download`` and checked against its published
MD5 (or read from ``--data_dir``, which holds the python batches already), the
images normalised with the model's ``mean`` and ``std``. ``--workdir=W`` takes
the newest good checkpoint of a trainer workdir (damaged ones are skipped, not
moved) on the split the run evaluated on, read as its config says (its
``data_dir`` replaced by ``--data_dir`` if given), at the run's dtype and adder
implementation unless ``--dtype`` / ``--implementation`` say otherwise.
``--limit N`` takes the first N images.

Prints one line with top-1, top-5 and the number of images, and writes them as
JSON to ``--output`` (default ``W/evaluation.json``, or
``./evaluation_NAME.json``), atomically. A different result already there is
never lost: it is kept beside it as ``evaluation.1.json`` (the first free
number), and the new one takes the name; the same result (timings aside) is
simply rewritten. Exit status: 0; 1 with a one-line message when the data
cannot be had (offline: no traceback), the workdir has no usable checkpoint or
an option is out of range; 2 for a usage error.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys

import jax

import adderjax
from adderjax import data, models, ops
from experiments import evaluation
from experiments.checkpoints import CheckpointError
from experiments.result_files import write_result
from experiments.trained import load_newest_good_run

VOLATILE = ("seconds", "images_per_second")
"""Fields that differ between two evaluations of the same model on the same data."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m experiments.evaluate",
                                   description=__doc__.split("\n\n")[0])
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument("--pretrained", choices=models.pretrained_names(),
                     help="A pretrained model of adderjax.models.")
  which.add_argument("--workdir", help="A trainer workdir (python -m experiments.main).")
  parser.add_argument("--output", help="The JSON file (default: W/evaluation.json or "
                      "./evaluation_NAME.json).")
  parser.add_argument("--data_dir", help="A directory that already holds the test files "
                      "(for CIFAR the python batches); nothing is downloaded.")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="Images per batch (default: 256, or the run's eval_batch_size).")
  parser.add_argument("--dtype", choices=tuple(evaluation.DTYPES), default=None,
                      help="Compute dtype (default: float32, or the run's dtype).")
  parser.add_argument("--implementation", choices=("", *ops.IMPLEMENTATIONS), default=None,
                      help="The adder layers' implementation ('' picks the fastest; default: "
                      "that, or the run's).")
  parser.add_argument("--limit", type=int, default=None, help="Evaluate the first N images only.")
  args = parser.parse_args(argv)
  for name in ("batch_size", "limit"):
    value = getattr(args, name)
    if value is not None and value < 1:
      parser.error(f"--{name} must be a positive number, got {value}.")
  return args


def _download_message(error: data.DownloadError, dataset: str) -> str:
  """A :class:`~adderjax.data.DownloadError` (one line per URL tried) said in one line."""
  lines = str(error).strip().splitlines()
  failures = [line.strip() for line in lines[1:] if line.startswith("  ")]
  if not failures:  # A bad file already there: its message says what to do.
    return lines[0]
  offline = all("unreachable" in line or "timed out" in line for line in failures)
  return (f"{'No network: ' if offline else ''}the {dataset} test set could not be downloaded "
          f"({len(failures)} URL(s) tried; {failures[0]}). Pass --data_dir=DIR with its files, "
          f"or set ${data.remote.ENV_MIRROR} to a server that has them.")


def _evaluate(args: argparse.Namespace) -> tuple[dict, pathlib.Path]:
  """The result record and the file it goes to."""
  if args.pretrained:
    name = args.pretrained
    record = models.PRETRAINED[name]
    dtype = args.dtype or "float32"
    try:  # The data first: offline, say so before anything else.
      dataset, source = evaluation.pretrained_test_set(name, data_dir=args.data_dir)
    except data.DownloadError as e:
      raise data.DataError(_download_message(e, record.dataset)) from e
    model = models.pretrained(name, dtype=evaluation.DTYPES[dtype],
                              implementation=args.implementation or None)
    split, image_size, batch_size = "test", None, args.batch_size or 256
    transform = evaluation.renormalizer(dataset, record.mean, record.std)
    about = {"pretrained": name, "model": record.model, "kind": "adder"}
    output = pathlib.Path(args.output or f"evaluation_{name}.json")
  else:
    run = load_newest_good_run(args.workdir)
    config = run.config
    dtype = args.dtype or config.dtype
    model = evaluation.workdir_model(run, dtype=dtype, implementation=args.implementation)
    dataset = config.dataset
    try:
      split, source = evaluation.workdir_test_set(run, data_dir=args.data_dir)
    except data.DownloadError as e:
      raise data.DataError(_download_message(e, dataset)) from e
    image_size, batch_size = config.image_size or None, args.batch_size or config.eval_batch_size
    transform = None  # Normalised as the trainer did.
    about = {"workdir": str(run.workdir), "step": run.step, "model": config.model,
             "kind": config.kind}
    output = pathlib.Path(args.output or run.workdir / "evaluation.json")
  source = evaluation.first(source, args.limit)
  batch_size = min(batch_size, len(source))
  batches = data.eval_batches(dataset, source, global_batch_size=batch_size,
                              image_size=image_size, process_index=0, process_count=1)
  result = evaluation.top_k_accuracy(model, batches, dtype=evaluation.DTYPES[dtype],
                                     transform=transform)
  implementation = args.implementation if args.implementation is not None else (
      "" if args.pretrained else run.config.implementation)
  record = {**about, "dataset": dataset, "split": split, "limit": args.limit,
            "num_images": result.num_images, "top1": result.top1, "top5": result.top5,
            "correct_top1": result.correct_top1, "correct_top5": result.correct_top5,
            "dtype": dtype, "implementation": implementation, "batch_size": batch_size,
            "backend": jax.default_backend(), "adderjax_version": adderjax.__version__,
            "jax_version": jax.__version__, "seconds": round(result.seconds, 3),
            "images_per_second": round(result.num_images / max(result.seconds, 1e-9), 1)}
  return record, output


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
  try:
    record, output = _evaluate(args)
  except (data.DataError, CheckpointError, FileNotFoundError, ValueError) as e:
    own = isinstance(e, (data.DataError, CheckpointError))  # Their messages say what.
    first_line = (str(e).strip().splitlines() or [""])[0]
    message = first_line if own else f"{type(e).__name__}: {first_line}"
    print(f"python -m experiments.evaluate: error: {message}", file=sys.stderr)
    return 1
  name = record.get("pretrained") or f"{record['workdir']} step {record['step']}"
  print(f"{name}: top-1 {record['top1']:.2%}, top-5 {record['top5']:.2%} on "
        f"{record['num_images']:,} images of {record['dataset']} {record['split']} "
        f"({record['dtype']}, {record['seconds']:.1f} s)", flush=True)
  kept = write_result(output, record, volatile=VOLATILE)
  print(f"Wrote {output}" + (f" (the previous, different result is kept as {kept})"
                             if kept else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Quantizes the model of a trainer workdir to integer adder layers and tests it.

    python -m experiments.quantize --workdir=W --bits=8
    python -m experiments.quantize --workdir=W --bits 8 6 5 4 --method nie2022 shared_scale

For each bits and method: `adderjax.quant.quantize` on ``--calibration_batches``
training batches (which also re-estimate the BatchNorm statistics), then the
accuracy on the run's evaluation split, next to the float model's (its
BatchNorm statistics recomputed on the same batches, as the trainer evaluates
it). Prints a table (``--report`` adds each layer's scales and clipping) and
writes the rows to ``W/quantization.json`` (``W/quantization_float_conv1...json``
with ``--keep_float conv1 ...``, which leaves those adder layers in float).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from adderjax import quant
from experiments.trained import accuracy, calibration_batches, float_reference, load_run


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="A trainer workdir (experiments.main).")
  parser.add_argument("--bits", type=int, nargs="+", default=[8], help="Bits, 2 to 16 (several "
                      "for a table).")
  parser.add_argument("--method", nargs="+", default=["nie2022"], choices=quant.METHODS)
  parser.add_argument("--groups", type=int, default=4, help="Scale groups per layer (nie2022).")
  parser.add_argument("--keep_float", nargs="*", default=[],
                      help="Adder layers to leave in float, by path (e.g. conv1 fc3).")
  parser.add_argument("--calibration_batches", type=int, default=10,
                      help="Training batches for calibration and BatchNorm statistics.")
  parser.add_argument("--step", type=int, default=None, help="Checkpoint (default: newest).")
  parser.add_argument("--report", action="store_true", help="Print each layer's quantization.")
  args = parser.parse_args(argv)
  if args.calibration_batches < 1:
    parser.error(f"--calibration_batches must be positive, got {args.calibration_batches}.")

  run = load_run(args.workdir, step=args.step)
  batches = calibration_batches(run, args.calibration_batches)
  start = time.perf_counter()
  float_accuracy = accuracy(run, float_reference(run, batches))
  rows = [{"method": "float", "bits": 32, "accuracy": float_accuracy,
           "seconds": time.perf_counter() - start}]
  print(f"{run.config.model} ({run.config.kind}) step {run.step}: float accuracy "
        f"{float_accuracy:.2%} on {run.config.eval_split or 'the eval split'}", flush=True)
  for method in args.method:
    for bits in args.bits:
      start = time.perf_counter()
      qmodel, report = quant.quantize(run.model, batches, bits=bits, groups=args.groups,
                                      method=method, keep_float=args.keep_float)
      acc = accuracy(run, qmodel)
      seconds = time.perf_counter() - start
      rows.append({"method": method, "bits": bits, "groups": args.groups if method == "nie2022"
                   else 1, "accuracy": acc, "seconds": seconds,
                   "layers": [vars(layer) for layer in report.layers]})
      print(f"{method:>12} {bits:>2} bits: accuracy {acc:.2%} ({acc - float_accuracy:+.2%} vs "
            f"float), {seconds:.1f} s", flush=True)
      if args.report:
        print(report.format(), flush=True)
  suffix = "".join(f"_float_{name.replace('/', '-')}" for name in args.keep_float)
  path = run.workdir / f"quantization{suffix}.json"
  path.write_text(json.dumps({"workdir": str(run.workdir), "step": run.step,
                              "calibration_batches": args.calibration_batches,
                              "keep_float": args.keep_float, "rows": rows},
                             indent=2))
  print(f"Wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

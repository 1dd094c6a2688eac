"""Quantizes the model of a trainer workdir to integer adder layers and tests it.

    python -m experiments.quantize --workdir=W --bits=8
    python -m experiments.quantize --workdir=W --bits 8 6 5 4 --method nie2022 shared_scale

For each bits and method: `adderjax.quant.quantize` on ``--calibration_batches``
training batches (which also show how quantization moves the BatchNorm
statistics), then the accuracy on the run's evaluation split, next to the
float model's (with the checkpoint's BatchNorm statistics, which the quantized
model starts from, and with them recomputed on the same batches, as the
trainer evaluates). Prints a table (``--report`` adds each layer's scales and clipping) and
writes the rows to ``W/quantization.json`` (``W/quantization_float_conv1...json``
with ``--keep_float conv1 ...``, which leaves those adder layers in float).

A second run on the same checkpoint and settings merges its rows into that
file by method, bits and groups (``--bits 8`` then ``--bits 4`` leaves both
rows); a row it recomputes with another result, or a file of another
checkpoint or settings, is first kept as ``quantization.1.json``
(`experiments.result_files.write_result`): nothing earlier is lost.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

from adderjax import quant
from experiments.result_files import write_result
from experiments.trained import (
  accuracy,
  add_run_arguments,
  calibration_batches,
  float_reference,
  load_run,
)

# What identifies one result of the table; the rest of the file must match to merge.
_ROW_KEY = ("method", "bits", "groups")
_SETTINGS = ("workdir", "step", "calibration_batches", "keep_float")


def _row_key(row: dict[str, Any]) -> tuple:
  return tuple(row.get(k) for k in _ROW_KEY)


def _without_seconds(row: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in row.items() if k != "seconds"}


def _sort_key(row: dict[str, Any]) -> tuple:
  # The float row first, then by method and from most to fewest bits, as the command prints.
  return (row["method"] != "float", str(row["method"]), -row["bits"], row.get("groups") or 0)


def write_table(path: pathlib.Path, record: dict[str, Any]) -> pathlib.Path | None:
  """Writes ``record`` to ``path``, merging the rows of an earlier run of the same settings.

  Rows are merged by method, bits and groups, the new ones replacing those with
  the same key. The earlier file is kept (``NAME.1.json``...) when it belongs to
  other settings, or when a row replaced holds another result than the new one
  (timings aside).

  Returns:
    Where the earlier file was kept, or None.
  """
  try:
    old = json.loads(path.read_text())
  except (OSError, ValueError):
    old = None
  if not (isinstance(old, dict) and isinstance(old.get("rows"), list)
          and all(old.get(k) == record[k] for k in _SETTINGS)):
    return write_result(path, record)  # None, or another run's table: kept if different.
  rows = {_row_key(r): r for r in old["rows"] if isinstance(r, dict)}
  same = all(_without_seconds(rows[_row_key(r)]) == _without_seconds(r)
             for r in record["rows"] if _row_key(r) in rows)
  rows.update((_row_key(r), r) for r in record["rows"])
  merged = {**record, "rows": sorted(rows.values(), key=_sort_key)}
  # Only timings of rows recomputed changed: nothing to keep. Otherwise the old file is kept.
  return write_result(path, merged, volatile=("rows",) if same else ())


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_run_arguments(parser, several_methods=True)
  parser.add_argument("--bits", type=int, nargs="+", default=[8], help="Bits, 2 to 16 (several "
                      "for a table).")
  parser.add_argument("--report", action="store_true", help="Print each layer's quantization.")
  args = parser.parse_args(argv)
  if args.calibration_batches < 1:
    parser.error(f"--calibration_batches must be positive, got {args.calibration_batches}.")

  run = load_run(args.workdir, step=args.step)
  batches = calibration_batches(run, args.calibration_batches)
  start = time.perf_counter()
  # The checkpoint's BatchNorm statistics: where quantization changes nothing (16 bits), the
  # quantized model keeps them. Recomputed on the calibration batches, as the trainer evaluates,
  # they differ by the noise of those few batches.
  float_accuracy = accuracy(run, run.model)
  recomputed_accuracy = accuracy(run, float_reference(run, batches))
  rows = [{"method": "float", "bits": 32, "accuracy": float_accuracy,
           "accuracy_bn_recomputed": recomputed_accuracy,
           "seconds": time.perf_counter() - start}]
  print(f"{run.config.model} ({run.config.kind}) step {run.step}: float accuracy "
        f"{float_accuracy:.2%} on {run.config.eval_split or 'the eval split'} "
        f"({recomputed_accuracy:.2%} with the BatchNorm statistics recomputed on the "
        f"{len(batches)} calibration batches)", flush=True)
  for method in args.method:
    for bits in args.bits:
      start = time.perf_counter()
      qmodel, report = quant.quantize(run.model, batches, bits=bits, scale_groups=args.groups,
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
  kept = write_table(path, {"workdir": str(run.workdir), "step": run.step,
                            "calibration_batches": args.calibration_batches,
                            "keep_float": args.keep_float, "rows": rows})
  print(f"Wrote {path}" + (f" (the earlier table, with other results, kept as {kept})"
                           if kept else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())

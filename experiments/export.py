"""Exports the model of a trainer workdir, float or quantized, as one `jax.export` file or C.

    python -m experiments.export --workdir=W --output=model.jaxexport
    python -m experiments.export --workdir=W --output=int8.jaxexport --bits=8 [--method --groups]
    python -m experiments.export --workdir=W --bits=8 --c=DIR

The file holds the inference function (StableHLO for CPU and CUDA, any batch
size, adder layers on the XLA implementation) with the input spec and the
dataset's normalisation; ``adderjax.export`` says how to load it with JAX alone.
With ``--bits``, the model is first quantized (`adderjax.quant.quantize`, on
``--calibration_batches`` training batches). ``--check`` reloads the file and
reports its accuracy on the run's evaluation split.

``--c=DIR`` (with ``--bits``) writes the quantized model as integer-only C99
(``model.h``, ``model.c``, ``main.c``: `adderjax.export.save_c`) and prints
the memory it needs; ``--output`` is then optional. Build and run it with
``cc -std=c99 -O2 DIR/model.c DIR/main.c -o classify && ./classify < images.raw``.
"""

from __future__ import annotations

import argparse
import sys

from adderjax import data, export, quant
from experiments.trained import (
  accuracy,
  add_run_arguments,
  calibration_batches,
  float_reference,
  load_run,
)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_run_arguments(parser)
  parser.add_argument("--output", default=None,
                      help="The jax.export file to write (required unless --c is given).")
  parser.add_argument("--c", default=None, metavar="DIR",
                      help="Also (or only) write the quantized model as integer-only C99 source "
                           "to this directory (needs --bits).")
  parser.add_argument("--bits", type=int, default=None, help="Quantize to this many bits first.")
  parser.add_argument("--platforms", nargs="+", default=list(export.PLATFORMS))
  parser.add_argument("--check", action="store_true",
                      help="Reload the file and report its test accuracy.")
  args = parser.parse_args(argv)
  if args.output is None and args.c is None:
    parser.error("give --output, --c, or both.")
  if args.c is not None and args.bits is None:
    parser.error("--c needs --bits: the C program is the quantized model's (e.g. --bits=8).")
  if args.check and args.output is None:
    parser.error("--check reloads the jax.export file: give --output.")

  run = load_run(args.workdir, step=args.step)
  batches = calibration_batches(run, args.calibration_batches)
  metadata = {"model": run.config.model, "kind": run.config.kind,
              "dataset": run.config.dataset, "step": run.step}
  if args.bits is None:
    model = float_reference(run, batches)
  else:
    model, _ = quant.quantize(run.model, batches, bits=args.bits, scale_groups=args.groups,
                              method=args.method, keep_float=args.keep_float)
    metadata["quantization"] = {"bits": args.bits, "method": args.method, "groups": args.groups}
  spec = data.DATASETS[run.config.dataset]
  if args.c is not None:
    export.save_c(model, args.c, input_shape=run.input_shape, mean=spec.mean, std=spec.std)
  if args.output is None:
    return 0
  written = export.save(model, args.output, input_shape=run.input_shape, mean=spec.mean,
                        std=spec.std, platforms=args.platforms, metadata=metadata)
  print(f"Wrote {args.output}: input {written['input_shape']}, platforms "
        f"{written['platforms']}, JAX {written['jax_version']}")
  if args.check:
    function, _ = export.load(args.output)
    print(f"Reloaded: accuracy {accuracy(run, function):.2%} on the eval split")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""CPU inference of the integer AdderNet against the float AdderNet and the float CNN.

For each model (ResNet-20 on 32x32x3, LeNet-5-BN on 28x28x1) and batch size
(1 and 64) it builds, in one process:

- ``conv``: the CNN (`flax.nnx.Conv` layers), float32;
- ``adder``: the AdderNet, float32, with the default implementation (the
  native CPU kernels where they build);
- ``adder_xla``: the same AdderNet on the XLA loops (``implementation="xla"``),
  the code path the integer layers share;
- ``adder_int8_xla``: the AdderNet quantized by `adderjax.quant.quantize` (8
  bits, 4 groups): int32 sums of ``|a_q - 2 w_q|`` on the XLA loops
  (``implementation="xla"``; this column was ``adder_int8`` before the native
  integer kernels);
- ``adder_int8_native``: the same integer model on the native kernels of
  `adderjax.ops.cpu_native_int` (the input quantized in the kernel, ``vpsadbw``
  on uint8 lanes, the float epilogue fused; the default implementation where
  they build);

jits each forward pass (eval mode), and times them interleaved round by round;
each ratio to the CNN is the median of the per-round ratios. The weights are
untrained (timing does not depend on them); calibration uses random batches.

    python benchmarks/quant_inference.py --json benchmarks/results/cpu_quant_inference.json
    python benchmarks/quant_inference.py --smoke  # one tiny round: checks it runs, measures nothing
"""

from __future__ import annotations

import argparse
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from report import machine_meta, write_json  # benchmarks/report.py

from adderjax import models, quant
from adderjax.models.batch_norm_stats import recompute_batch_norm_stats

MODELS = ("resnet20", "lenet5_bn")
VARIANTS = ("conv", "adder", "adder_xla", "adder_int8_xla", "adder_int8_native")


@nnx.jit
def _forward(model: nnx.Module, images: jax.Array) -> jax.Array:
  return model(images)


def _images(name: str, batch: int, seed: int) -> jax.Array:
  shape = models.input_shape(name)
  return jax.random.normal(jax.random.key(seed), (batch, *shape), jnp.float32)


def build_variants(name: str, batch: int, *, calibration_batch: int) -> dict[str, nnx.Module]:
  """The four models of ``name``, in eval mode, BatchNorm statistics from a random batch."""
  calibration = [_images(name, calibration_batch, 1)]
  built = {}
  for variant in VARIANTS[:3]:
    kind = "conv" if variant == "conv" else "adder"
    model = models.get(name, kind=kind, rngs=nnx.Rngs(0),
                       implementation="xla" if variant == "adder_xla" else None)
    recompute_batch_norm_stats(model, calibration)
    model.eval()
    built[variant] = model
  native, _ = quant.quantize(built["adder"], calibration, bits=8, scale_groups=4)
  built["adder_int8_xla"] = _with_implementation(native, "xla")
  built["adder_int8_native"] = _with_implementation(native, "cpu")
  return built


def _with_implementation(model: nnx.Module, implementation: str) -> nnx.Module:
  """A copy of an integer model whose integer layers use ``implementation``."""
  model = nnx.clone(model)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, (quant.QuantizedAdderConv, quant.QuantizedAdderDense)):
      module.implementation = implementation
  return model


def bench(name: str, batch: int, *, rounds: int, calls_per_round: int,
          calibration_batch: int) -> dict:
  images = _images(name, batch, 0)
  variants = build_variants(name, batch, calibration_batch=calibration_batch)
  first_call_s = {}
  for variant, model in variants.items():
    start = time.perf_counter()
    jax.block_until_ready(_forward(model, images))
    first_call_s[variant] = time.perf_counter() - start
  times = np.zeros((rounds, len(VARIANTS)))
  for r in range(rounds):
    for k, variant in enumerate(VARIANTS):
      start = time.perf_counter()
      for _ in range(calls_per_round):
        out = _forward(variants[variant], images)
      jax.block_until_ready(out)
      times[r, k] = (time.perf_counter() - start) / calls_per_round
      if not bool(jnp.all(jnp.isfinite(out))):
        raise FloatingPointError(f"{name} ({variant}): the output is not finite")
  conv = times[:, 0]
  return {
      "model": name, "batch": batch, "rounds": rounds, "calls_per_round": calls_per_round,
      "ms": {v: float(np.median(times[:, k])) * 1e3 for k, v in enumerate(VARIANTS)},
      "images_per_s": {v: float(batch / np.median(times[:, k])) for k, v in enumerate(VARIANTS)},
      "time_vs_conv": {v: float(np.median(times[:, k] / conv)) for k, v in enumerate(VARIANTS)},
      "first_call_s": first_call_s,
  }


def print_table(rows: list[dict]) -> None:
  header = ["model", "batch"] + [f"{v} ms" for v in VARIANTS] + [
      f"{v} / conv" for v in VARIANTS[1:]]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    cells = [r["model"], str(r["batch"])] + [f"{r['ms'][v]:.2f}" for v in VARIANTS]
    cells += [f"{r['time_vs_conv'][v]:.2f}x" for v in VARIANTS[1:]]
    print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--calls-per-round", type=int, default=5)
  parser.add_argument("--smoke", action="store_true",
                      help="LeNet-5-BN, batch 2, one round of one call: checks that the script "
                      "runs; the numbers are not a measurement.")
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args(argv)
  if args.smoke:
    args.models, args.batches, args.rounds, args.calls_per_round = ["lenet5_bn"], [2], 1, 1
  rows = []
  for name in args.models:
    for batch in args.batches:
      rows.append(bench(name, batch, rounds=args.rounds, calls_per_round=args.calls_per_round,
                        calibration_batch=8 if args.smoke else 64))
      print(f"# done {name} batch {batch}: {rows[-1]['ms']}", flush=True)
  meta = machine_meta() | {"smoke": args.smoke}
  print(f"\n{meta}\n")
  print_table(rows)
  write_json(args.json, meta, rows)


if __name__ == "__main__":
  main()

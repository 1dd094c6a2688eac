"""adder_conv against lax.conv_general_dilated and the official formulation.

For the 3x3 layer shapes of ResNet-20, VGG-small and ResNet-18 it times, in one
process, the forward pass and the forward+backward pass (the VJP with respect
to both input and kernel) of

- ``conv``: `jax.lax.conv_general_dilated`, the multiplicative layer;
- ``adder``: `adderjax.ops.adder_conv` (default implementation: on a CPU the
  native kernels of `adderjax.ops.cpu_native` where they build);
- ``xla``: the same with ``implementation="xla"`` (the XLA loops);
- ``official``: the official PyTorch code's formulation, unfold then
  broadcast and sum, written in JAX (`implementation="reference"`), run only
  where its broadcast fits in ``--official-max-gb``;

and reports the compiled temporary memory of each
(``jit(f).lower(...).compile().memory_analysis()``).

The machines here are shared and noisy, so the calls are interleaved (conv,
adder, official, conv, ...) and each ratio is the median of the per-round
ratios, next to the median times.

    python benchmarks/adder_conv.py                      # all shapes
    python benchmarks/adder_conv.py --nets resnet20 --json benchmarks/results/cpu.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import time

import jax
from jax import lax
import numpy as np
from report import machine_meta, write_json  # benchmarks/report.py

from adderjax.ops import adder_conv

# (name, batch, height, width, in_channels, out_channels, stride)
LAYERS = {
    "resnet20": [
        ("res20.stage1", 64, 32, 32, 16, 16, 1),
        ("res20.stage2", 64, 16, 16, 32, 32, 1),
        ("res20.stage3", 64, 8, 8, 64, 64, 1),
        ("res20.down2", 64, 32, 32, 16, 32, 2),
    ],
    "vgg_small": [
        ("vgg.conv1", 16, 32, 32, 128, 128, 1),
        ("vgg.conv3", 16, 16, 16, 256, 256, 1),
        ("vgg.conv5", 16, 8, 8, 512, 512, 1),
    ],
    "resnet18": [
        ("res18.layer1", 8, 56, 56, 64, 64, 1),
        ("res18.layer2", 8, 28, 28, 128, 128, 1),
        ("res18.layer3", 8, 14, 14, 256, 256, 1),
        ("res18.layer4", 8, 7, 7, 512, 512, 1),
    ],
}


def conv(x, w, stride):
  return lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def forward_and_backward(layer: Callable) -> Callable:
  def f(x, w, g):
    y, vjp = jax.vjp(layer, x, w)
    return y, vjp(g)
  return f


def temp_mb(fn: Callable, *args) -> float:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes / 1e6


def interleaved_times(fns: list[Callable], args: tuple, rounds: int) -> np.ndarray:
  """Seconds per call, shape (rounds, len(fns)); calls alternate within a round."""
  for fn in fns:
    for _ in range(2):
      jax.block_until_ready(fn(*args))
  times = np.zeros((rounds, len(fns)))
  for r in range(rounds):
    for k, fn in enumerate(fns):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[r, k] = time.perf_counter() - start
  return times


def bench_layer(layer, *, rounds: int, official_max_gb: float) -> dict:
  name, b, h, w_, cin, cout, stride = layer
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (b, h, w_, cin))
  w = jax.random.normal(keys[1], (3, 3, cin, cout))
  ho, wo = -(-h // stride), -(-w_ // stride)
  g = jax.random.normal(keys[2], (b, ho, wo, cout))
  layers = {
      "conv": lambda x, w: conv(x, w, stride),
      "adder": lambda x, w: adder_conv(x, w, strides=stride),
      "xla": lambda x, w: adder_conv(x, w, strides=stride, implementation="xla"),
      "official": lambda x, w: adder_conv(x, w, strides=stride, implementation="reference"),
  }
  broadcast_gb = b * ho * wo * 9 * cin * cout * 4 / 1e9
  names = [n for n in layers if n != "official" or broadcast_gb <= official_max_gb]
  row = {"layer": name, "shape": [b, h, w_, cin, cout], "stride": stride,
         "macs": b * ho * wo * 9 * cin * cout, "official_broadcast_gb": broadcast_gb}
  for pass_name, make in (("fwd", lambda f: (lambda x, w, g: f(x, w))),
                          ("fwd_bwd", forward_and_backward)):
    fns = {n: make(layers[n]) for n in layers}
    row[f"{pass_name}_temp_mb"] = {n: temp_mb(fns[n], x, w, g) for n in layers}
    times = interleaved_times([jax.jit(fns[n]) for n in names], (x, w, g), rounds)
    row[f"{pass_name}_ms"] = {n: float(np.median(times[:, k])) * 1e3 for k, n in enumerate(names)}
    row[f"{pass_name}_ratio"] = {n: float(np.median(times[:, k] / times[:, 0]))
                                 for k, n in enumerate(names) if n != "conv"}
  return row


def _fmt(value, spec=".2f"):
  return "n/a" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
  header = ("layer", "B,H,W,Cin,Cout,s", "conv fwd ms", "adder fwd", "x conv", "xla x conv",
            "official fwd", "x conv", "conv f+b ms", "adder f+b", "x conv", "xla x conv",
            "official f+b", "x conv", "temp MB conv/adder/official (f+b)")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    fm, fr, bm, br, t = (r["fwd_ms"], r["fwd_ratio"], r["fwd_bwd_ms"], r["fwd_bwd_ratio"],
                         r["fwd_bwd_temp_mb"])
    cells = (r["layer"], ",".join(map(str, r["shape"])) + f",{r['stride']}",
             _fmt(fm["conv"]), _fmt(fm["adder"]), _fmt(fr["adder"]), _fmt(fr["xla"]),
             _fmt(fm.get("official")), _fmt(fr.get("official"), ".0f"), _fmt(bm["conv"]),
             _fmt(bm["adder"]), _fmt(br["adder"]), _fmt(br["xla"]), _fmt(bm.get("official")),
             _fmt(br.get("official"), ".0f"),
             f"{t['conv']:.2f} / {t['adder']:.1f} / {t['official']:.0f}")
    print("| " + " | ".join(cells) + " |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--nets", nargs="+", choices=sorted(LAYERS), default=sorted(LAYERS))
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--official-max-gb", type=float, default=2.0,
                      help="run the official formulation only if its broadcast is this small")
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args()
  rows = []
  for net in args.nets:
    for layer in LAYERS[net]:
      rows.append(bench_layer(layer, rounds=args.rounds, official_max_gb=args.official_max_gb))
      print(f"# done {layer[0]}", flush=True)
  meta = machine_meta()
  print(f"\n{meta}\n")
  print_table(rows)
  write_json(args.json, meta, rows)


if __name__ == "__main__":
  main()

"""adder_conv's GPU kernels against fp32 and TF32 convolution, and ResNet-20 training throughput.

Part 1, layers: for the 3x3 layer shapes of `benchmarks/adder_conv.py`
(ResNet-20, VGG-small, ResNet-18; ``--batch`` overrides their batch) it times
four passes, the forward (``fwd``), the input gradient alone (``dx``), the
weight gradient alone (``dw``) and the forward+backward (``fwd_bwd``, the VJP
for both), of

- ``conv_highest``: `jax.lax.conv_general_dilated` at ``Precision.HIGHEST``
  (fp32 on CUDA cores, no TF32), the bar of the issue;
- ``conv_default``: the same at default precision (TF32 tensor cores);
- ``adder``: `adderjax.ops.adder_conv` with ``--impl`` (default ``"pallas"``);
- ``adder_xla``: `adder_conv` with ``implementation="xla"``, the fallback
  (``--no-xla`` skips it).

Each pass is jitted; calls are issued back to back (``inner`` of them, enough
for ~20 ms) and timed to the last result, so launch overhead is amortised as
in a training step. The variants are interleaved round by round and each ratio
is the median of the per-round ratios. With a known fp32 peak (``--peak-tflops``,
or looked up from the device name) it also prints the fraction of the CUDA-core
peak reached, counting 1 instruction per multiply-accumulate for conv and
2 per element pair for the adder forward (`adderjax.ops.pallas_gpu` explains
the count).

Part 2, training: images/s of one training step of ResNet-20 (forward,
backward, `adderjax.optim.addernet_sgd`, BatchNorm in train mode) on synthetic
CIFAR-shaped data, batch 256, as AdderNet (``--impl``) and as CNN at default
and at HIGHEST precision. ``--devices N`` splits the batch over N devices
(data parallel, ``jax.jit`` with sharded inputs).

``--sweep`` instead searches the kernels' options (tiles, warps, stages, the
forward's ``method``, the input gradient's ``fused_saturate``) per layer, one
option at a time from the defaults, and reports the best.

Results go to ``--json`` (default ``benchmarks/results/adder_conv_gpu_<device>.json``)
with the device name, JAX version and date.

    python benchmarks/adder_conv_gpu.py                       # layers + training, on a GPU
    python benchmarks/adder_conv_gpu.py --sweep --nets resnet20 resnet18
    # Smoke test anywhere (the kernels in Pallas' interpreter; slow, numbers meaningless):
    python benchmarks/adder_conv_gpu.py --impl pallas_interpret --shapes tiny --rounds 1 \\
        --train-batch 4 --train-steps 1 --json /tmp/adder_conv_gpu_smoke.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import re
import sys
import time

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import jaxlib
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adder_conv import LAYERS
from train_step import make_train_step

from adderjax.ops import IMPLEMENTATIONS, adder_conv
from adderjax.ops.pallas_gpu import PallasAdderConv
from adderjax.ops.spec import conv_spec

SHAPES = dict(LAYERS, tiny=[
    ("tiny.s1", 2, 8, 8, 4, 4, 1),
    ("tiny.s2", 2, 8, 8, 4, 8, 2),
])
VARIANTS = ("conv_highest", "conv_default", "adder", "adder_xla")
PASSES = ("fwd", "dx", "dw", "fwd_bwd")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# fp32 FMA/s of the CUDA cores: SMs x 128 lanes x boost clock (vendor figures).
_PEAK_TERA_FMA = {
    "H100 PCIe": 114 * 128 * 1.755e-3,
    "H100": 132 * 128 * 1.98e-3,     # SXM5 / HBM3
    "H200": 132 * 128 * 1.98e-3,
    "A100": 108 * 64 * 1.41e-3,
}


def peak_tera_fma(device_kind: str, override_tflops: float | None) -> float | None:
  """The device's fp32 CUDA-core peak in tera FMA/s (= TFLOPS / 2), if known."""
  if override_tflops:
    return override_tflops / 2
  for name, peak in _PEAK_TERA_FMA.items():  # the most specific names first
    if name in device_kind:
      return peak
  return None


def conv(x, w, stride, precision):
  return lax.conv_general_dilated(x, w, (stride, stride), "SAME", precision=precision,
                                  dimension_numbers=_DIMENSION_NUMBERS)


def make_pass(layer: Callable, pass_name: str) -> Callable:
  """``f(x, w, g)`` for one pass of ``layer(x, w)``."""
  if pass_name == "fwd":
    return lambda x, w, g: layer(x, w)
  if pass_name == "dx":
    return lambda x, w, g: jax.vjp(lambda x: layer(x, w), x)[1](g)[0]
  if pass_name == "dw":
    return lambda x, w, g: jax.vjp(lambda w: layer(x, w), w)[1](g)[0]
  return lambda x, w, g: jax.vjp(layer, x, w)[1](g)


def calibrate(fn: Callable, args: tuple, target_s: float, max_inner: int) -> int:
  """How many back-to-back calls take about ``target_s``."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = time.perf_counter() - start
  return int(min(max_inner, max(1, math.ceil(target_s / max(once, 1e-6)))))


def interleaved_times(fns: list[Callable], args: tuple, *, rounds: int, target_s: float = 0.02,
                      max_inner: int = 200) -> np.ndarray:
  """Seconds per call, shape (rounds, len(fns)); the functions alternate within a round."""
  for fn in fns:
    for _ in range(2):
      jax.block_until_ready(fn(*args))
  inner = [calibrate(fn, args, target_s, max_inner) for fn in fns]
  times = np.zeros((rounds, len(fns)))
  for r in range(rounds):
    for k, fn in enumerate(fns):
      start = time.perf_counter()
      out = None
      for _ in range(inner[k]):
        out = fn(*args)
      jax.block_until_ready(out)
      times[r, k] = (time.perf_counter() - start) / inner[k]
  return times


def layer_operands(layer):
  _, b, h, w_, cin, cout, stride = layer
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (b, h, w_, cin))
  w = jax.random.normal(keys[1], (3, 3, cin, cout))
  g = jax.random.normal(keys[2], (b, -(-h // stride), -(-w_ // stride), cout))
  return x, w, g


def layer_functions(stride: int, impl: str, with_xla: bool) -> dict[str, Callable]:
  fns = {
      "conv_highest": lambda x, w: conv(x, w, stride, lax.Precision.HIGHEST),
      "conv_default": lambda x, w: conv(x, w, stride, None),
      "adder": lambda x, w: adder_conv(x, w, strides=stride, implementation=impl),
  }
  if with_xla:
    fns["adder_xla"] = lambda x, w: adder_conv(x, w, strides=stride, implementation="xla")
  return fns


def bench_layer(layer, *, impl: str, rounds: int, with_xla: bool, peak: float | None) -> dict:
  name, b, h, w_, cin, cout, stride = layer
  x, w, g = layer_operands(layer)
  ho, wo = g.shape[1:3]
  pairs = b * ho * wo * 9 * cin * cout
  row = {"layer": name, "shape": [b, h, w_, cin, cout], "stride": stride, "pairs": pairs}
  layers = layer_functions(stride, impl, with_xla)
  names = list(layers)
  for pass_name in PASSES:
    fns = [jax.jit(make_pass(layers[n], pass_name)) for n in names]
    times = interleaved_times(fns, (x, w, g), rounds=rounds)
    row[f"{pass_name}_ms"] = {n: float(np.median(times[:, k])) * 1e3 for k, n in enumerate(names)}
    adder = times[:, names.index("adder")]
    row[f"{pass_name}_ratio"] = {
        "adder/conv_highest": float(np.median(adder / times[:, 0])),
        "adder/conv_default": float(np.median(adder / times[:, 1])),
    }
    if with_xla:
      row[f"{pass_name}_ratio"]["xla/adder"] = float(
          np.median(times[:, names.index("adder_xla")] / adder))
  if peak:
    fwd = row["fwd_ms"]
    row["fwd_fraction_of_peak"] = {
        "conv_highest": pairs / (fwd["conv_highest"] * 1e-3) / (peak * 1e12),
        "adder": 2 * pairs / (fwd["adder"] * 1e-3) / (peak * 1e12),
    }
  return row


def _fmt(value, spec=".3f"):
  return "n/a" if value is None else format(value, spec)


def print_layer_table(rows: list[dict]) -> None:
  header = ("layer", "B,H,W,Cin,Cout,s", "conv HIGHEST fwd ms", "conv default fwd ms",
            "adder fwd ms", "x HIGHEST", "adder XLA fwd ms", "XLA / adder",
            "conv HIGHEST f+b ms", "conv default f+b ms", "adder f+b ms", "x HIGHEST",
            "x default", "adder XLA f+b ms", "XLA / adder", "adder dx ms (x conv)",
            "adder dw ms (x conv)", "fwd % of fp32 peak conv / adder")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    fm, fr, bm, br = r["fwd_ms"], r["fwd_ratio"], r["fwd_bwd_ms"], r["fwd_bwd_ratio"]
    peak = r.get("fwd_fraction_of_peak")
    cells = (
        r["layer"], ",".join(map(str, r["shape"])) + f",{r['stride']}",
        _fmt(fm["conv_highest"]), _fmt(fm["conv_default"]), _fmt(fm["adder"]),
        _fmt(fr["adder/conv_highest"], ".2f"), _fmt(fm.get("adder_xla")),
        _fmt(fr.get("xla/adder"), ".1f"),
        _fmt(bm["conv_highest"]), _fmt(bm["conv_default"]), _fmt(bm["adder"]),
        _fmt(br["adder/conv_highest"], ".2f"), _fmt(br["adder/conv_default"], ".2f"),
        _fmt(bm.get("adder_xla")), _fmt(br.get("xla/adder"), ".1f"),
        f"{r['dx_ms']['adder']:.3f} ({r['dx_ratio']['adder/conv_highest']:.2f})",
        f"{r['dw_ms']['adder']:.3f} ({r['dw_ratio']['adder/conv_highest']:.2f})",
        "n/a" if not peak else
        f"{100 * peak['conv_highest']:.0f}% / {100 * peak['adder']:.0f}%")
    print("| " + " | ".join(cells) + " |")


# ----------------------------------------------------------------------------
# Option sweep
# ----------------------------------------------------------------------------

SWEEP_AXES = {
    "block_m": (32, 64, 128, 256),
    "block_n": (16, 32, 64, 128),
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3, 4),
    "method": ("abs", "max"),
    "fused_saturate": (False, True),
}


def sweep_layer(layer, *, interpret: bool, rounds: int) -> dict:
  """Coordinate search: each option in turn, the others at their best so far."""
  name, _, _, _, cin, cout, stride = layer
  x, w, g = layer_operands(layer)
  spec = conv_spec(x, w, strides=stride, padding="SAME", rhs_dilation=1, feature_group_count=1)
  result = {"layer": name}
  for kernel, axes in (("forward", ("block_n", "block_m", "num_warps", "num_stages", "method")),
                       ("input_grad", ("block_n", "block_m", "num_warps", "num_stages",
                                       "fused_saturate"))):
    best, trials = {}, []
    for axis in axes:
      values = [v for v in SWEEP_AXES[axis]
                if axis != "block_n" or v <= max(16, 2 * (cout if kernel == "forward" else cin))]
      fns, configs = [], []
      for value in values:
        options = PallasAdderConv(interpret=interpret, **{**best, axis: value})
        if kernel == "forward":
          fns.append(jax.jit(functools.partial(options.forward, spec=spec)))
        else:
          fns.append(jax.jit(lambda x, w, g, o=options: o.input_grad(x, w, g, spec,
                                                                     "full_precision")))
        configs.append({**best, axis: value})
      args = (x, w) if kernel == "forward" else (x, w, g)
      ok_fns, ok_configs = [], []
      for fn, config in zip(fns, configs):
        try:
          jax.block_until_ready(fn(*args))
          ok_fns.append(fn)
          ok_configs.append(config)
        except Exception as e:  # a configuration Triton rejects (e.g. out of shared memory)
          trials.append({"options": config, "error": f"{type(e).__name__}: {str(e)[:200]}"})
      times = np.median(interleaved_times(ok_fns, args, rounds=rounds), axis=0)
      trials += [{"options": c, "ms": float(t) * 1e3} for c, t in zip(ok_configs, times)]
      best = ok_configs[int(np.argmin(times))]
    best_ms = min(t["ms"] for t in trials if "ms" in t and t["options"] == best)
    result[kernel] = {"best": best, "best_ms": best_ms, "trials": trials}
    print(f"# {name} {kernel}: best {best} at {best_ms:.3f} ms", flush=True)
  return result


# ----------------------------------------------------------------------------
# Training throughput
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Trainer:
  name: str
  step: Callable
  state: object
  precision: str | None

  def __call__(self, images, labels):
    # The precision is read when the step is traced, and is part of jit's cache key.
    context = (jax.default_matmul_precision(self.precision) if self.precision
               else contextlib.nullcontext())
    with context:
      loss, self.state = self.step(self.state, images, labels)
    return loss


def bench_training(*, impl: str, batch: int, rounds: int, steps: int, devices: int) -> dict:
  keys = jax.random.split(jax.random.key(0), 2)
  images = jax.random.normal(keys[0], (batch, 32, 32, 3))
  labels = jax.random.randint(keys[1], (batch,), 0, 10)
  trainers = []
  for name, kind, precision in (("adder", "adder", None), ("conv_default", "conv", None),
                                ("conv_highest", "conv", "highest")):
    step, state = make_train_step("resnet20", kind,
                                  implementation=impl if kind == "adder" else None)
    trainers.append(_Trainer(name, step, state, precision))
  if devices > 1:
    mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
    images = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
    labels = jax.device_put(labels, NamedSharding(mesh, PartitionSpec("data")))
    for t in trainers:
      t.state = jax.device_put(t.state, NamedSharding(mesh, PartitionSpec()))
  first_call_s = {}
  for t in trainers:
    start = time.perf_counter()
    jax.block_until_ready(t(images, labels))
    first_call_s[t.name] = time.perf_counter() - start
    jax.block_until_ready(t(images, labels))
  times = np.zeros((rounds, len(trainers)))
  for r in range(rounds):
    for k, t in enumerate(trainers):
      start = time.perf_counter()
      loss = None
      for _ in range(steps):
        loss = t(images, labels)
      jax.block_until_ready(loss)
      times[r, k] = (time.perf_counter() - start) / steps
      if not jnp.isfinite(loss):
        raise FloatingPointError(f"ResNet-20 ({t.name}): the loss is not finite")
  names = [t.name for t in trainers]
  return {
      "model": "resnet20", "batch": batch, "devices": devices, "rounds": rounds,
      "steps_per_round": steps,
      "step_ms": {n: float(np.median(times[:, k])) * 1e3 for k, n in enumerate(names)},
      "images_per_s": {n: float(batch / np.median(times[:, k])) for k, n in enumerate(names)},
      "adder_time_over": {n: float(np.median(times[:, 0] / times[:, k]))
                          for k, n in enumerate(names) if n != "adder"},
      "first_call_s": first_call_s,
  }


def print_training(row: dict) -> None:
  ips, ratio = row["images_per_s"], row["adder_time_over"]
  print("| model | batch | devices | adder img/s | CNN default img/s | CNN HIGHEST img/s | "
        "adder time / CNN default | adder time / CNN HIGHEST |")
  print("|---|---|---|---|---|---|---|---|")
  print(f"| {row['model']} | {row['batch']} | {row['devices']} | {ips['adder']:.0f} | "
        f"{ips['conv_default']:.0f} | {ips['conv_highest']:.0f} | "
        f"{ratio['conv_default']:.2f}x | {ratio['conv_highest']:.2f}x |")


# ----------------------------------------------------------------------------


def metadata(args) -> dict:
  device = jax.devices()[0]
  return {
      "device": device.device_kind, "platform": device.platform,
      "platform_version": getattr(device.client, "platform_version", None),
      "device_count": jax.device_count(), "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "date": datetime.date.today().isoformat(),
      "time": datetime.datetime.now().isoformat(timespec="seconds"),
      "impl": args.impl, "options": repr(IMPLEMENTATIONS.get(args.impl)),
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "argv": sys.argv[1:],
  }


def default_json_path(device_kind: str) -> str:
  slug = re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_")
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                      f"adder_conv_gpu_{slug}.json")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--impl", default="pallas", choices=sorted(IMPLEMENTATIONS),
                      help="adder_conv implementation to measure (default: pallas)")
  parser.add_argument("--nets", "--shapes", dest="nets", nargs="+", choices=sorted(SHAPES),
                      default=["resnet20", "resnet18", "vgg_small"])
  parser.add_argument("--layers", nargs="+", metavar="NAME",
                      help="only these layers of --nets (e.g. res18.layer4)")
  parser.add_argument("--batch", type=int, help="override the layers' batch size")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--no-xla", action="store_true", help="skip the XLA fallback")
  parser.add_argument("--peak-tflops", type=float, help="fp32 CUDA-core peak of the device")
  parser.add_argument("--sweep", action="store_true", help="search the kernels' options instead")
  parser.add_argument("--no-train", action="store_true", help="skip ResNet-20 training")
  parser.add_argument("--train-batch", type=int, default=256)
  parser.add_argument("--train-steps", type=int, default=10, help="steps per timed round")
  parser.add_argument("--train-rounds", type=int, default=5)
  parser.add_argument("--devices", type=int, default=1, help="data-parallel devices for training")
  parser.add_argument("--json", help="where to write the results (default: "
                      "benchmarks/results/adder_conv_gpu_<device>.json)")
  args = parser.parse_args()

  meta = metadata(args)
  print(f"# {meta}", flush=True)
  if jax.default_backend() != "gpu":
    print("# WARNING: no GPU backend; these numbers say nothing about the GPU kernels.",
          flush=True)
  layers = [layer for net in args.nets for layer in SHAPES[net]]
  if args.layers:
    unknown = sorted(set(args.layers) - {layer[0] for layer in layers})
    if unknown:
      parser.error(f"--layers {unknown} are not layers of --nets {args.nets}; they have "
                   f"{[layer[0] for layer in layers]}")
    layers = [layer for layer in layers if layer[0] in args.layers]
  if args.batch:
    layers = [(n, args.batch, *rest) for n, _, *rest in layers]
  out = {"meta": meta}

  if args.sweep:
    out["sweep"] = [sweep_layer(layer, interpret=args.impl == "pallas_interpret",
                                rounds=args.rounds) for layer in layers]
  else:
    peak = peak_tera_fma(meta["device"], args.peak_tflops)
    out["meta"]["peak_tera_fma"] = peak
    rows = []
    for layer in layers:
      rows.append(bench_layer(layer, impl=args.impl, rounds=args.rounds,
                              with_xla=not args.no_xla, peak=peak))
      print(f"# done {layer[0]}", flush=True)
    out["layers"] = rows
    print()
    print_layer_table(rows)
    if not args.no_train:
      out["training"] = bench_training(impl=args.impl, batch=args.train_batch,
                                       rounds=args.train_rounds, steps=args.train_steps,
                                       devices=args.devices)
      print()
      print_training(out["training"])

  path = args.json or default_json_path(meta["device"])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print(f"\n# wrote {path}")


if __name__ == "__main__":
  main()

"""Where a training step's time goes: ResNet-20 (or another model) broken into parts by ablation.

For each variant (the CNN; the AdderNet with the native CPU kernels; the
AdderNet with the XLA loops) it times, side by side and interleaved round by
round:

- ``step``: the whole jitted training step (forward, backward, addernet_sgd);
- ``grad``: forward and backward only (no optimizer update);
- ``forward``: the loss in train mode only;
- ``layers``: the convolution / adder layers alone, each jitted on its own
  input shape, forward and backward, summed over the network's layers;
- ``dispatch``: a jitted step that returns the state untouched (the cost of
  passing the state pytree in and out).

and derives ``update = step - grad``, ``backward = grad - forward`` and
``rest = grad - layers`` (BatchNorm, ReLU, pooling, the loss: everything but
the layers, forward and backward).

    python benchmarks/profile_step.py --rounds 5 \\
        --json benchmarks/results/cpu_2core_profile_step.json
"""

from __future__ import annotations

import argparse
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from report import machine_meta, write_json  # benchmarks/report.py
from train_step import make_train_step  # benchmarks/train_step.py

from adderjax import models
from adderjax.nn import AdderConv

VARIANTS = {"conv": ("conv", None), "adder_cpu": ("adder", "cpu"), "adder_xla": ("adder", "xla")}


def _layer_calls(model: nnx.Module, images: jax.Array) -> list[tuple[nnx.Module, tuple]]:
  """Each conv / adder layer of ``model`` with the input shape it sees."""
  calls = []
  originals = {cls: cls.__call__ for cls in (AdderConv, nnx.Conv)}

  def recording(cls):
    def call(self, x, *args, **kwargs):
      calls.append((self, x.shape))
      return originals[cls](self, x, *args, **kwargs)
    return call

  try:
    for cls in originals:
      cls.__call__ = recording(cls)
    model.eval()  # The same shapes, and no BatchNorm statistics to update in the trace.
    jax.eval_shape(lambda x: model(x), images)
  finally:
    model.train()
    for cls, call in originals.items():
      cls.__call__ = call
  return calls


def _layer_steps(model: nnx.Module, images: jax.Array) -> list:
  """One jitted forward+backward per layer call: ``(fn, args)``."""
  steps = []
  for layer, shape in _layer_calls(model, images):
    graphdef, params = nnx.split(layer)
    x = jnp.ones(shape, jnp.float32)

    @jax.jit
    def fwd_bwd(params, x, graphdef=graphdef):
      def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x) ** 2) * 1e-6
      return jax.value_and_grad(loss, (0, 1))(params, x)
    steps.append((fwd_bwd, (params, x)))
  return steps


def _timer(fn, args, steps_per_round):
  def run():
    start = time.perf_counter()
    for _ in range(steps_per_round):
      out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps_per_round
  run()  # compile and warm up
  run()
  return run


def variant_parts(name: str, kind: str, implementation: str | None, *, batch: int,
                  steps_per_round: int) -> dict[str, object]:
  keys = jax.random.split(jax.random.key(0), 2)
  images = jax.random.normal(keys[0], (batch, 32, 32, 3))
  labels = jax.random.randint(keys[1], (batch,), 0, 10)
  step, state = make_train_step(name, kind, implementation=implementation)
  kwargs = {"implementation": implementation} if kind == "adder" else {}
  model = models.get(name, kind=kind, num_classes=10, rngs=nnx.Rngs(0), **kwargs)
  model.train()
  graphdef, params = nnx.split(model)

  def loss(params, images, labels):
    logits = nnx.merge(graphdef, params)(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grad = jax.jit(jax.value_and_grad(loss))
  forward = jax.jit(loss)
  dispatch = jax.jit(lambda state, images, labels: (jnp.zeros(()), state))
  layer_steps = _layer_steps(model, images)
  timers = {
      "step": _timer(lambda s: step(s, images, labels), (state,), steps_per_round),
      "grad": _timer(grad, (params, images, labels), steps_per_round),
      "forward": _timer(forward, (params, images, labels), steps_per_round),
      "dispatch": _timer(dispatch, (state, images, labels), steps_per_round),
  }
  layer_timers = [_timer(fn, args, steps_per_round) for fn, args in layer_steps]
  timers["layers"] = lambda: sum(t() for t in layer_timers)
  return timers


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps-per-round", type=int, default=2)
  parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args()
  timers = {v: variant_parts(args.model, *VARIANTS[v], batch=args.batch,
                             steps_per_round=args.steps_per_round) for v in args.variants}
  parts = ("step", "grad", "forward", "layers", "dispatch")
  times = {v: {p: [] for p in parts} for v in args.variants}
  for _ in range(args.rounds):
    for v in args.variants:
      for p in parts:
        times[v][p].append(timers[v][p]())
  rows = []
  for v in args.variants:
    ms = {p: float(np.median(times[v][p])) * 1e3 for p in parts}
    ms["update"] = ms["step"] - ms["grad"]
    ms["backward"] = ms["grad"] - ms["forward"]
    ms["rest"] = ms["grad"] - ms["layers"]
    rows.append({"variant": v, "model": args.model, "batch": args.batch, "ms": ms,
                 "images_per_s": args.batch / ms["step"] * 1e3})
  meta = machine_meta()
  print(f"\n{meta}\n")
  columns = ("step", "forward", "backward", "update", "layers", "rest", "dispatch")
  print("| variant | img/s | " + " | ".join(f"{c} ms" for c in columns) + " |")
  print("|---|---|" + "---|" * len(columns))
  for row in rows:
    print(f"| {row['variant']} | {row['images_per_s']:.0f} | "
          + " | ".join(f"{row['ms'][c]:.1f}" for c in columns) + " |")
  write_json(args.json, meta, rows)


if __name__ == "__main__":
  main()

"""The follow-up papers' experiments on the bundled MNIST: lp adders, adder attention, attacks.

    python -m experiments.followups_mnist --workdir /tmp/runs/followups    # everything, 3 seeds
    python -m experiments.followups_mnist --parts lp --seeds 0 1 2 3 4     # one part, 5 seeds

Three parts (``--parts``), each on the MNIST test set shipped in adderjax (the
first 8,000 images to train on, the other 2,000 to test on), each run a
trainer workdir under ``--workdir`` (rerunning resumes, and finished runs are
only read back):

- ``lp``: LeNet-5-BN with the paper's recipe (``configs/mnist_lenet5_bn.py``)
  as an AdderNet with ``p = 1`` (the CVPR paper), ``p = 2`` throughout, and
  ``p`` annealed from 2 to 1 along half a cosine over the first half of the
  steps (``adder_p_schedule="cosine:2:1:0.5"``, the l2-to-l1 training of the
  TPAMI AdderNet and Winograd AdderNet), against the CNN, one run per seed.
- ``vit``: ``vit_tiny`` (``configs/mnist_vit_tiny.py``) with adder attention
  and adder MLPs against dot-product attention and ordinary MLPs.
- ``attacks``: FGSM and PGD-7 (step ``epsilon / 4``, random start) on the
  2,000 test images at several ``epsilon`` (pixel units, 1 = white), against
  the ``lp`` part's CNN and its AdderNets (p = 1 and annealed), through the
  exact gradient and, for the AdderNets, through their training surrogate.

Every number lands in ``--results`` (JSON; default ``WORKDIR/results.json``)
and the tables are printed as Markdown, with each row's mean and standard
deviation over the seeds.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import functools
import json
import logging
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import ml_collections
import numpy as np

from adderjax import analysis, data
from adderjax.data import bundled
from adderjax.models.batch_norm_stats import recompute_batch_norm_stats
from experiments import trained
from experiments.configs import common, mnist_vit_tiny
from experiments.train import train_and_evaluate

PARTS = ("lp", "vit", "attacks")

# Row name -> (network kind, adder_p_schedule, label).
LP_ROWS = {
    "cnn": ("conv", "", "CNN"),
    "adder_p1": ("adder", "", "AdderNet, p = 1"),
    "adder_p2": ("adder", "constant:2", "AdderNet, p = 2"),
    "adder_p2to1": ("adder", "cosine:2:1:0.5", "AdderNet, p 2 -> 1 (cosine, first half)"),
}
VIT_ROWS = {
    "vit_dot": ("conv", "vit_tiny, dot-product attention"),
    "vit_adder": ("adder", "vit_tiny, adder attention (+ identity)"),
}
ATTACKED = ("cnn", "adder_p1", "adder_p2to1")
EPSILONS = (0.05, 0.1, 0.15, 0.2, 0.3)
PGD_STEPS = 7


def lenet_config(kind: str, p_schedule: str, *, seed: int, epochs: float
                 ) -> ml_collections.ConfigDict:
  config = common.mnist_lenet5_bn(kind)
  config.update(data_source="bundled", download=False, train_split=bundled.TRAIN_SPLIT,
                eval_split=bundled.EVAL_SPLIT, batch_size=128, eval_batch_size=400,
                num_epochs=epochs, bn_recompute_batches=10, adder_p_schedule=p_schedule,
                seed=seed, log_every_steps=31, checkpoint_every_steps=10**9, progress_bar=False)
  return config


def vit_config(kind: str, *, seed: int, epochs: float | None) -> ml_collections.ConfigDict:
  config = mnist_vit_tiny.get_config(kind)
  config.update(seed=seed, log_every_steps=31, checkpoint_every_steps=10**9, progress_bar=False,
                eval_batch_size=400)
  if epochs:
    config.num_epochs = epochs
  return config


def lenet_config_of_seed(kind: str, p_schedule: str, epochs: float, seed: int
                         ) -> ml_collections.ConfigDict:
  return lenet_config(kind, p_schedule, seed=seed, epochs=epochs)


def vit_config_of_seed(kind: str, epochs: float, seed: int) -> ml_collections.ConfigDict:
  return vit_config(kind, seed=seed, epochs=epochs)


def eval_curve(workdir: pathlib.Path) -> list[tuple[float, float]]:
  """``(epoch, eval_accuracy)`` of every evaluation logged in ``workdir/metrics.jsonl``."""
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
             if line.strip()]
  epoch_of = {r["step"]: r["epoch"] for r in records if "epoch" in r}
  return [(round(epoch_of.get(r["step"], 0.0), 4), r["eval_accuracy"]) for r in records
          if "eval_accuracy" in r]


def train_row(config: ml_collections.ConfigDict, workdir: pathlib.Path,
              earlier: dict | None = None) -> dict:
  """Trains (or resumes) one run; a run already finished keeps its ``earlier`` record's times."""
  start = time.perf_counter()
  result = train_and_evaluate(config, workdir)
  row = {"accuracy": result["eval_accuracy"], "train_seconds": result["train_seconds"],
         "wall_seconds": time.perf_counter() - start, "curve": eval_curve(workdir)}
  if earlier and not result["train_seconds"]:
    row.update(train_seconds=earlier["train_seconds"], wall_seconds=earlier["wall_seconds"])
  return row


def test_arrays(run: trained.TrainedRun) -> tuple[np.ndarray, np.ndarray]:
  """The run's whole evaluation split, normalised as the model takes it, and its labels."""
  images, labels = [], []
  for batch in data.eval_batches(run.config.dataset, run.eval_source,
                                 global_batch_size=run.config.eval_batch_size):
    keep = np.asarray(batch["mask"], bool)
    images.append(np.asarray(batch["image"])[keep])
    labels.append(np.asarray(batch["label"])[keep])
  return np.concatenate(images), np.concatenate(labels)


def attack_rows(workdir: pathlib.Path, *, epsilons: Sequence[float], limit: int | None) -> list:
  """FGSM and PGD against one trained run, through each gradient that differs."""
  run = trained.load_run(workdir)
  if run.config.bn_recompute_batches:  # Attack the network the trainer evaluated.
    recompute_batch_norm_stats(
        run.model, trained.calibration_batches(run, run.config.bn_recompute_batches))
  images, labels = test_arrays(run)
  images, labels = images[:limit], labels[:limit]
  spec = data.DATASETS[run.config.dataset]
  gradients = ("exact", "surrogate") if run.config.kind == "adder" else ("exact",)
  rows = []
  for gradient in gradients:
    for epsilon in epsilons:
      common_args = dict(epsilon=epsilon, mean=spec.mean, std=spec.std, gradient=gradient)
      for attack, result in (
          ("fgsm", analysis.fgsm(run.model, images, labels, **common_args)),
          (f"pgd{PGD_STEPS}", analysis.pgd(run.model, images, labels, steps=PGD_STEPS,
                                           step_size=epsilon / 4, seed=0, **common_args))):
        rows.append({"attack": attack, "gradient": gradient, "epsilon": epsilon,
                     "accuracy": float(result.accuracy), "loss": float(result.loss),
                     "clean_accuracy": float(result.clean_accuracy)})
  return rows


def cpu_model() -> str:
  """The CPU's model name and family as Linux gives them, else what `platform` knows."""
  try:
    info = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.processor() or platform.machine()
  fields = dict(line.split(":", 1) for line in info.splitlines()[:30] if ":" in line)
  fields = {k.strip(): v.strip() for k, v in fields.items()}
  return (f"{fields.get('model name', platform.machine())} (family {fields.get('cpu family', '?')}"
          f" model {fields.get('model', '?')})")


def spread(values: Sequence[float]) -> str:
  mean = 100 * statistics.fmean(values)
  if len(values) < 2:
    return f"{mean:.2f}%"
  return f"{mean:.2f} +- {100 * statistics.stdev(values):.2f}%"


def accuracy_table(rows: dict, labels: dict[str, str]) -> str:
  lines = ["| network | test accuracy (mean +- s.d.) | per seed | training loop, s (mean) |",
           "|---|---|---|---|"]
  for name, runs in rows.items():
    accuracies = [run["accuracy"] for run in runs.values()]
    per_seed = ", ".join(f"{100 * a:.2f}" for a in accuracies)
    seconds = statistics.fmean(run["train_seconds"] for run in runs.values())
    lines.append(f"| {labels[name]} | {spread(accuracies)} | {per_seed} | {seconds:.0f} |")
  return "\n".join(lines)


def attack_table(attacks: dict, epsilons: Sequence[float]) -> str:
  head = " | ".join(f"eps {e:g}" for e in epsilons)
  lines = [f"| network | gradient | attack | clean | {head} |",
           "|---|---|---|---|" + "---|" * len(epsilons)]
  for name, seeds in attacks.items():
    keys = sorted({(r["gradient"], r["attack"]) for rows in seeds.values() for r in rows},
                  key=lambda k: (k[0] != "exact", k[1]))
    for gradient, attack in keys:
      cells, clean = [], []
      for epsilon in epsilons:
        found = [r for rows in seeds.values() for r in rows
                 if (r["gradient"], r["attack"], r["epsilon"]) == (gradient, attack, epsilon)]
        cells.append(spread([r["accuracy"] for r in found]))
        clean += [r["clean_accuracy"] for r in found]
      lines.append(f"| {LP_ROWS[name][2]} | {gradient} | {attack.upper()} | "
                   f"{spread(clean[:len(seeds)])} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/adderjax_followups",
                      help="One trainer workdir per run under it (default: %(default)s).")
  parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--epochs", type=float, default=10.0, help="LeNet-5-BN's epochs.")
  parser.add_argument("--vit_epochs", type=float, default=0.0,
                      help="vit_tiny's epochs (0: its config's, 20).")
  parser.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS))
  parser.add_argument("--attack_images", type=int, default=0,
                      help="Test images to attack (0: all 2,000).")
  parser.add_argument("--results", help="The JSON file (default: WORKDIR/results.json).")
  args = parser.parse_args(argv)
  if not args.epochs > 0:
    parser.error(f"--epochs must be positive, got {args.epochs}.")
  if args.vit_epochs < 0:
    parser.error(f"--vit_epochs must be >= 0, got {args.vit_epochs}.")
  if any(not 0 < e <= 1 for e in args.epsilons):
    parser.error(f"--epsilons must lie in (0, 1], got {args.epsilons}.")
  if args.attack_images < 0:
    parser.error(f"--attack_images must be >= 0, got {args.attack_images}.")
  logging.basicConfig(format="%(message)s", force=True)
  logging.getLogger("experiments").setLevel(logging.WARNING)
  workdir = pathlib.Path(args.workdir)
  results_path = pathlib.Path(args.results or workdir / "results.json")
  results = json.loads(results_path.read_text()) if results_path.exists() else {}
  results["machine"] = (f"{cpu_model()}, {os.cpu_count()} cores, {jax.device_count()} "
                        f"{jax.default_backend()} device(s), JAX {jax.__version__}")

  def save():
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1) + "\n")

  def train_rows(part: str, rows: dict[str, tuple[str, Callable[[int], ml_collections.ConfigDict]]]
                 ) -> dict:
    """Trains (or reads back) each row's run for every seed into ``results[part]``."""
    stored = results.setdefault(part, {})
    for name, (label, make_config) in rows.items():
      runs = stored.setdefault(name, {})
      for seed in args.seeds:
        print(f"{label}, seed {seed}", flush=True)
        runs[str(seed)] = train_row(make_config(seed), workdir / f"{name}_s{seed}",
                                    runs.get(str(seed)))
        save()
    return stored

  if "lp" in args.parts or "attacks" in args.parts:
    lp = train_rows("lp", {
        name: (label, functools.partial(lenet_config_of_seed, kind, schedule, args.epochs))
        for name, (kind, schedule, label) in LP_ROWS.items()
        if "lp" in args.parts or name in ATTACKED})
    print("\nLeNet-5-BN, lp adders:\n" + accuracy_table(
        lp, {name: row[2] for name, row in LP_ROWS.items()}), flush=True)

  if "vit" in args.parts:
    vit = train_rows("vit", {
        name: (label, functools.partial(vit_config_of_seed, kind, args.vit_epochs))
        for name, (kind, label) in VIT_ROWS.items()})
    print("\nvit_tiny:\n" + accuracy_table(
        vit, {name: row[1] for name, row in VIT_ROWS.items()}), flush=True)

  if "attacks" in args.parts:
    attacks = results["attacks"] = {}
    for name in ATTACKED:
      for seed in args.seeds:
        print(f"Attacking {LP_ROWS[name][2]}, seed {seed}", flush=True)
        attacks.setdefault(name, {})[str(seed)] = attack_rows(
            workdir / f"{name}_s{seed}", epsilons=args.epsilons,
            limit=args.attack_images or None)
        save()
    print(f"\nAttacks (test accuracy under attack; PGD: {PGD_STEPS} steps of eps/4, "
          "random start):\n" + attack_table(attacks, args.epsilons), flush=True)
  print(f"\nResults: {results_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

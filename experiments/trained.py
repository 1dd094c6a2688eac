"""A trained model back from a trainer workdir, its data, and its test accuracy.

Shared by the commands that take a finished run further: `experiments.quantize`
and `experiments.export`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import functools
import itertools
import json
import logging
import pathlib
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adderjax import data, quant
from adderjax.models.batch_norm_stats import recompute_batch_norm_stats
from experiments.checkpoints import CheckpointError, Checkpoints
from experiments.train import abstract_state, load_sources, logits_of

__all__ = ["TrainedRun", "accuracy", "add_run_arguments", "calibration_batches",
           "float_reference", "load_newest_good_run", "load_run"]

logger = logging.getLogger(__name__)


class TrainedRun:
  """A run's config, model (restored, in eval mode), step and data sources.

  Attributes:
    workdir: the trainer workdir.
    config: its ``config.json``.
    model: the model at ``step``.
    step: the checkpoint restored.
    train_source, eval_source: the splits the run trained and evaluated on (read when
      first used).
  """

  def __init__(self, workdir: pathlib.Path, config: ml_collections.ConfigDict,
               model: nnx.Module, step: int):
    self.workdir = workdir
    self.config = config
    self.model = model
    self.step = step

  @functools.cached_property
  def _sources(self) -> tuple[Any, Any]:
    return load_sources(self.config)

  @property
  def train_source(self) -> Any:
    return self._sources[0]

  @property
  def eval_source(self) -> Any:
    return self._sources[1]

  @property
  def input_shape(self) -> tuple[int, int, int]:
    if self.config.dataset == "imagenet2012" and self.config.image_size:
      return (self.config.image_size, self.config.image_size, 3)
    return data.DATASETS[self.config.dataset].image_shape


def load_run(workdir: str | pathlib.Path, *, step: int | None = None) -> TrainedRun:
  """Restores the model of a `experiments.train.train_and_evaluate` workdir.

  Args:
    workdir: the run's directory, with ``config.json`` and ``checkpoints/``.
    step: the checkpoint to restore; None for the newest.

  Raises:
    FileNotFoundError: if the workdir has no ``config.json`` or no checkpoint.
    experiments.checkpoints.CheckpointError: if the checkpoint's files do not
      match their digest.
  """
  workdir = pathlib.Path(workdir)
  config_path = workdir / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} is missing: --workdir must be a trainer workdir "
                            "(python -m experiments.main --workdir=...).")
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  # The checkpoint holds the trainer's (model, optimizer): restore into the same structure.
  model, optimizer = abstract_state(config)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  like = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                      nnx.state((model, optimizer)))
  checkpoints = Checkpoints(workdir / "checkpoints")
  try:
    step = checkpoints.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{workdir / 'checkpoints'} has no checkpoint.")
    # Read only: a damaged checkpoint is reported, not moved aside as the trainer does.
    problem = checkpoints.verify_files(step)
    if problem:
      raise CheckpointError(f"Checkpoint {step} in {workdir / 'checkpoints'} is damaged: "
                            f"{problem}. Pass --step for another one.")
    state = checkpoints.restore(step, like)
  finally:
    checkpoints.close()
  nnx.update((model, optimizer), state)
  model.eval()
  return TrainedRun(workdir, config, model, step)


def load_newest_good_run(workdir: str | pathlib.Path) -> TrainedRun:
  """`load_run` of the newest checkpoint that matches its digest and restores.

  Damaged checkpoints are skipped with a warning and left where they are.

  Raises:
    FileNotFoundError: if the workdir has no ``config.json`` or no checkpoint.
    experiments.checkpoints.CheckpointError: if no checkpoint is usable; the
      message gives each one's problem.
  """
  workdir = pathlib.Path(workdir)
  if not (workdir / "config.json").exists():
    return load_run(workdir)  # Raises the error that says what a workdir is.
  checkpoints = Checkpoints(workdir / "checkpoints")
  try:
    steps = sorted(checkpoints.all_steps(), reverse=True)
  finally:
    checkpoints.close()
  if not steps:
    raise FileNotFoundError(f"{workdir / 'checkpoints'} has no checkpoint.")
  problems = []
  for step in steps:
    try:
      return load_run(workdir, step=step)
    except (CheckpointError, ValueError) as e:
      problem = (str(e).splitlines() or [type(e).__name__])[0]
    except Exception as e:
      problem = f"it cannot be restored ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
    logger.warning("Skipping checkpoint %d of %s: %s", step, workdir, problem)
    problems.append(f"step {step}: {problem}")
  raise CheckpointError(f"No checkpoint in {workdir / 'checkpoints'} can be restored: "
                        + "; ".join(problems) + ".")


def add_run_arguments(parser: argparse.ArgumentParser, *, several_methods: bool = False) -> None:
  """Adds the options that pick a run's checkpoint and how `adderjax.quant.quantize` treats it.

  ``--workdir``, ``--step``, ``--method``, ``--groups``, ``--keep_float`` and
  ``--calibration_batches``, as `experiments.quantize` and `experiments.export` take them.

  Args:
    parser: the command's parser.
    several_methods: whether ``--method`` takes several methods (a list, default
      ``["nie2022"]``) rather than one (default ``"nie2022"``).
  """
  parser.add_argument("--workdir", required=True, help="A trainer workdir (experiments.main).")
  if several_methods:
    parser.add_argument("--method", nargs="+", default=["nie2022"], choices=quant.METHODS)
  else:
    parser.add_argument("--method", default="nie2022", choices=quant.METHODS)
  parser.add_argument("--groups", type=int, default=4, help="Scale groups per layer (nie2022).")
  parser.add_argument("--keep_float", nargs="*", default=[],
                      help="Adder layers to leave in float, by path (e.g. conv1 fc3).")
  parser.add_argument("--calibration_batches", type=int, default=10,
                      help="Training batches for calibration and BatchNorm statistics.")
  parser.add_argument("--step", type=int, default=None, help="Checkpoint (default: newest).")


def calibration_batches(run: TrainedRun, num_batches: int) -> list[jax.Array]:
  """``num_batches`` training batches (shuffled, with the training augmentation) of images.

  From another seed than training's, as the trainer's BatchNorm recomputation.
  """
  config = run.config
  batches = data.train_batches(config.dataset, run.train_source,
                               global_batch_size=config.batch_size, seed=config.seed + 1,
                               augment=config.augment, image_size=config.image_size or None)
  return [jnp.asarray(b["image"]) for b in itertools.islice(batches, num_batches)]


@nnx.jit
def _forward(model: nnx.Module, images: jax.Array) -> Any:
  return model(images)


def accuracy(run: TrainedRun, model: nnx.Module | Callable[[jax.Array], Any]) -> float:
  """The accuracy on the run's evaluation split (every example once).

  Args:
    run: the run, whose split and batch size are used.
    model: an NNX model (run jitted), or any function from images to logits
      (e.g. a loaded `adderjax.export` file).
  """
  config = run.config
  predict = (lambda x: _forward(model, x)) if isinstance(model, nnx.Module) else model
  correct = count = 0
  for batch in data.eval_batches(config.dataset, run.eval_source,
                                 global_batch_size=config.eval_batch_size,
                                 image_size=config.image_size or None):
    logits = np.asarray(logits_of(predict(jnp.asarray(batch["image"]))))
    hits = (np.argmax(logits, -1) == batch["label"]) & batch["mask"]
    correct, count = correct + int(hits.sum()), count + int(batch["mask"].sum())
  return correct / max(count, 1)


def float_reference(run: TrainedRun, batches: list[jax.Array]) -> nnx.Module:
  """A copy of the float model with its BatchNorm statistics recomputed on ``batches``,
  as the trainer evaluates it and as `adderjax.quant.quantize` treats the quantized one."""
  model = nnx.clone(run.model)
  recompute_batch_norm_stats(model, batches)
  model.eval()
  return model

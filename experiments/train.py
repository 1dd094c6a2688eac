"""Training and evaluation of the paper's networks: ``train_and_evaluate(config, workdir)``.

Data-parallel over a one-axis ``("data",)`` mesh of all devices: the state is
replicated, each batch is sharded over its batch axis, and ``jax.jit`` turns
BatchNorm's batch means into global ones, so every device count gives the
same updates. The workdir holds ``checkpoints/`` (orbax), ``metrics.jsonl``,
``tensorboard/`` and ``config.json``; a run started on a workdir with a
checkpoint resumes from the newest one and, because the data order and the
augmentation are functions of the seed and the step, ends with the same
parameters as a run that was never stopped.

What keeps a run safe lives in small modules: the workdir lock
(:mod:`experiments.workdir_lock`), verified checkpoints with a fallback
(:mod:`experiments.checkpoints`), the divergence guard
(:mod:`experiments.guards`) and the synchronised stop on ``SIGTERM``/``SIGINT``
(:mod:`experiments.preemption`).
"""

from __future__ import annotations

from collections.abc import Iterator
import logging
import pathlib
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax

from adderjax import data, models, ops
from adderjax.models.batch_norm_stats import recompute_batch_norm_stats
from adderjax.nn import batch_norm_fusion, set_exponent
from adderjax.optim import addernet_sgd
from experiments import adder_p, finished, init_from
from experiments.checkpoints import Checkpoints, SaveError
from experiments.guards import NONFINITE_ACTIONS, Diverged, DivergenceGuard, all_finite
from experiments.metrics import MetricWriter, ProgressBar, adaptive_lr_scales
from experiments.preemption import Preempted, PreemptionWatch
from experiments.workdir_lock import WorkdirLock, check_workdir

logger = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SCHEDULES = ("cosine", "constant")
ADDER_LRS = ("adaptive", "fixed", "none")


def _choice(config: ml_collections.ConfigDict, field: str, choices: Any) -> Any:
  value = config[field]
  if value not in choices:
    raise ValueError(f"config.{field} must be one of {tuple(choices)}, got {value!r}.")
  return value


def _positive(config: ml_collections.ConfigDict, field: str, *, allow_zero: bool = False) -> Any:
  value = config[field]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
      value == 0 and not allow_zero):
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"config.{field} must be a number {bound}, got {value!r}.")
  return value


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the first field of ``config`` that is out of range."""
  _choice(config, "model", models.names())
  _choice(config, "kind", models.KINDS)
  _choice(config, "grad_mode", ops.GRAD_MODES)
  _choice(config, "implementation", ("", *ops.IMPLEMENTATIONS))
  _choice(config, "dataset", data.DATASETS)
  _choice(config, "data_source", data.SOURCES)
  _choice(config, "dtype", DTYPES)
  _choice(config, "schedule", SCHEDULES)
  _choice(config, "adder_lr", ADDER_LRS)
  _choice(config, "on_nonfinite", NONFINITE_ACTIONS)
  for field in ("batch_size", "eval_batch_size", "learning_rate", "eta", "log_every_steps",
                "checkpoint_every_steps", "keep_checkpoints", "adder_lr_multiplier",
                "max_consecutive_skips"):
    _positive(config, field)
  for field in ("num_epochs", "num_train_steps", "warmup_epochs", "weight_decay",
                "label_smoothing", "eval_every_steps", "bn_recompute_batches", "num_devices",
                "data_threads", "num_synthetic_examples", "image_size"):
    _positive(config, field, allow_zero=True)
  if not config.num_epochs and not config.num_train_steps:
    raise ValueError("Set config.num_epochs or config.num_train_steps to a number > 0.")
  if not 0 <= config.momentum < 1:
    raise ValueError(f"config.momentum must be in [0, 1), got {config.momentum!r}.")
  if p_schedule(config) is not None and config.kind != "adder":
    raise ValueError(f"config.adder_p_schedule={config.adder_p_schedule!r} sets the exponent of "
                     f"adder layers, but config.kind={config.kind!r}; use \"\" or kind 'adder'.")
  taken = set(config.model_kwargs.keys()) & set(_MODEL_ARGUMENTS)
  if taken:
    raise ValueError(f"config.model_kwargs sets {sorted(taken)}, which the trainer sets from "
                     f"other fields; set config.kind, config.grad_mode, ... instead.")
  init_from.check(config)


def make_mesh(num_devices: int) -> jax.sharding.Mesh:
  """A one-axis ``("data",)`` mesh over all devices, or the first ``num_devices`` local ones."""
  devices = jax.devices()
  if len(jax.local_devices()) * jax.process_count() != len(devices):
    raise ValueError(f"The {jax.process_count()} processes must have the same number of devices; "
                     f"this one has {len(jax.local_devices())} of {len(devices)}.")
  if num_devices:
    if jax.process_count() > 1:
      raise ValueError(f"config.num_devices must be 0 (all devices) in a multi-process run, got "
                       f"{num_devices}.")
    if num_devices > len(devices):
      raise ValueError(f"config.num_devices={num_devices} but only {len(devices)} devices exist.")
    devices = devices[:num_devices]
  # Auto, not Explicit: only the batch is sharded, so the inputs' sharding and jit's propagation
  # say everything (BatchNorm's means become all-reduces) without sharded types on every array.
  return jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def make_schedule(config: ml_collections.ConfigDict, total_steps: int,
                  steps_per_epoch: int) -> optax.Schedule:
  """The learning rate per step: linear warmup, then cosine decay to 0 or constant."""
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  if config.schedule == "cosine":
    main = optax.cosine_decay_schedule(config.learning_rate, max(total_steps - warmup, 1))
  else:
    main = optax.constant_schedule(config.learning_rate)
  if not warmup:
    return main
  ramp = optax.linear_schedule(0.0, config.learning_rate, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """``addernet_sgd``, or for the ablations the same SGD with a fixed or no adder-kernel factor."""
  adder_transform = None  # the adaptive rate
  if config.adder_lr != "adaptive":
    adder_transform = optax.scale(
        config.adder_lr_multiplier if config.adder_lr == "fixed" else 1.0)
  return addernet_sgd(schedule, momentum=config.momentum, weight_decay=config.weight_decay,
                      eta=config.eta, nesterov=config.nesterov, adder_transform=adder_transform)


def p_schedule(config: ml_collections.ConfigDict) -> adder_p.PSchedule | None:
  """``config.adder_p_schedule`` parsed; None where unset or absent (a run's older config.json)."""
  return adder_p.parse(config.get("adder_p_schedule", ""))


_MODEL_ARGUMENTS = ("kind", "num_classes", "rngs", "dtype", "grad_mode", "implementation")
"""The model arguments `make_model` derives from other config fields."""


def make_model(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               dtype: Any = None) -> nnx.Module:
  """``config.model`` built with the config's kind, dtype, ... and ``config.model_kwargs``.

  ``dtype`` overrides ``config.dtype`` (e.g. ``jnp.float16`` to evaluate a trained model).
  With ``config.adder_p_schedule`` set, every adder layer holds an exponent
  (`adderjax.nn.AdderExponent`), the schedule's first value, so that the
  trainer's state and its checkpoints have it.
  """
  model = models.get(
      config.model,
      kind=config.kind,
      num_classes=data.DATASETS[config.dataset].num_classes,
      rngs=rngs,
      dtype=DTYPES[config.dtype] if dtype is None else dtype,
      grad_mode=config.grad_mode,
      implementation=config.implementation or None,
      **config.model_kwargs.to_dict(),
  )
  schedule = p_schedule(config)
  if schedule is not None:
    set_exponent(model, schedule.start)
  return model


def make_state(config: ml_collections.ConfigDict,
               schedule: optax.Schedule) -> tuple[nnx.Module, nnx.Optimizer]:
  """The ``(model, optimizer)`` pair the trainer trains and checkpoints, freshly initialised.

  The model is in training mode; its optimizer is `make_optimizer`'s with ``schedule``.
  """
  model = make_model(config, rngs=nnx.Rngs(config.seed))
  model.train()
  return model, nnx.Optimizer(model, make_optimizer(config, schedule), wrt=nnx.Param)


def abstract_state(config: ml_collections.ConfigDict) -> tuple[nnx.Module, nnx.Optimizer]:
  """`make_state`'s pair with shapes and dtypes in place of values: a checkpoint's structure.

  Restore into ``nnx.state(abstract_state(config))`` and ``nnx.update`` the pair with the
  result. Nothing is initialised or compiled (which takes seconds for a ResNet); the
  schedule, which holds no state, is a placeholder.
  """
  return nnx.eval_shape(lambda: make_state(config, make_schedule(config, 1, 1)))


def logits_of(outputs: Any) -> jax.Array:
  # LeNet++ returns (embedding, logits).
  return (outputs[-1] if isinstance(outputs, tuple) else outputs).astype(jnp.float32)


def _loss_and_correct(logits: jax.Array, labels: jax.Array, num_classes: int,
                      label_smoothing: float) -> tuple[jax.Array, jax.Array]:
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  losses = optax.softmax_cross_entropy(logits, targets)
  return losses, (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def load_sources(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """The ``(train, eval)`` data sources of ``config``'s dataset, splits and ``data_source``.

  ``config.num_synthetic_examples`` sizes only the synthetic training split.
  """
  spec = data.DATASETS[config.dataset]
  options = dict(source=config.data_source, data_dir=config.data_dir or None,
                 download=config.download, seed=config.seed)
  if config.data_source == "synthetic" and config.num_synthetic_examples:
    options["num_examples"] = config.num_synthetic_examples
  train = data.load_source(config.dataset, config.train_split or spec.train_split, **options)
  options.pop("num_examples", None)
  evaluation = data.load_source(config.dataset, config.eval_split or spec.eval_split, **options)
  return train, evaluation


def _write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  path = workdir / "config.json"
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if not path.exists():
    path.write_text(text)
  elif path.read_text() != text:
    logger.warning("%s differs from this run's config; it is kept as it is. "
                   "Resuming under a changed config mixes two recipes.", path)


class Trainer:
  """The jitted steps and the state of one run; built by :func:`train_and_evaluate`."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               total_steps: int, steps_per_epoch: int):
    self.config = config
    self.mesh = mesh
    self.replicated = NamedSharding(mesh, P())
    self.batch_sharding = NamedSharding(mesh, P("data"))
    self.num_classes = data.DATASETS[config.dataset].num_classes
    self.schedule = make_schedule(config, total_steps, steps_per_epoch)
    self.total_steps = total_steps
    self.p_schedule = p_schedule(config)
    self.graphdef, state = nnx.split(make_state(config, self.schedule))
    self.state = jax.device_put(state, self.replicated)
    self.train_step = jax.jit(self._fused_where_one_device(self._train_step), donate_argnums=0,
                              out_shardings=(self.replicated, self.replicated))
    self.eval_step = jax.jit(self._eval_step, out_shardings=self.replicated)

  def _fused_where_one_device(self, step):
    """``step``, traced with the models' fused native ops only where the mesh has one device.

    XLA's partitioner cannot split a custom call: over a mesh of several devices the fused
    BatchNorm and adder+BatchNorm ops would gather the whole batch onto every device and each
    run all of it. There the models' layers run one after the other instead (the adder layers'
    kernels per batch shard, BatchNorm's statistics an all-reduce).
    """
    if self.mesh.size == 1:
      return step

    def unfused(*args):
      with batch_norm_fusion(False):
        return step(*args)

    return unfused

  def _train_step(self, state: nnx.State, batch: dict[str, jax.Array]):
    previous = jax.tree.map(lambda x: x, state)  # The arrays, before merge() shares them.
    model, optimizer = nnx.merge(self.graphdef, state)
    if self.p_schedule is not None:  # A value in the state: no recompilation as it changes.
      set_exponent(model, self.adder_p(optimizer.step[...]))

    def loss_fn(model):
      logits = logits_of(model(batch["image"]))
      losses, correct = _loss_and_correct(logits, batch["label"], self.num_classes,
                                          self.config.label_smoothing)
      return losses.mean(), correct.mean()

    (loss, accuracy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    new_state = nnx.state((model, optimizer))
    finite = jnp.isfinite(loss) & all_finite(new_state)
    if self.config.on_nonfinite == "skip":
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, previous)
    return new_state, {"loss": loss, "accuracy": accuracy, "finite": finite}

  def adder_p(self, count: jax.Array | int) -> jax.Array:
    """The adder layers' exponent for the update after ``count`` updates
    (config.adder_p_schedule)."""
    return self.p_schedule.at(count, total_steps=self.total_steps)

  def _eval_step(self, state: nnx.State, batch: dict[str, jax.Array]):
    model, _ = nnx.merge(self.graphdef, state)
    model.eval()
    logits = logits_of(model(batch["image"]))
    losses, correct = _loss_and_correct(logits, batch["label"], self.num_classes, 0.0)
    mask = batch["mask"].astype(jnp.float32)
    return {"loss": (losses * mask).sum(), "correct": (correct * mask).sum(), "count": mask.sum()}

  def initialize_from(self, source: nnx.Module) -> None:
    """Sets the model's parameters and BatchNorm statistics to ``source``'s (config.init_from)."""
    model, optimizer = nnx.merge(self.graphdef, self.state)
    init_from.copy_weights(source, model, self.config)
    self.state = jax.device_put(nnx.state((model, optimizer)), self.replicated)

  def to_global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's slice of a batch -> one array sharded over the mesh's batch axis."""
    dtype = DTYPES[self.config.dtype]

    def put(name, value):
      if name == "image":
        value = value.astype(dtype)
      return jax.make_array_from_process_local_data(self.batch_sharding, value)

    return {name: put(name, value) for name, value in batch.items()}

  def evaluate(self, batches: Iterator[dict[str, np.ndarray]],
               state: nnx.State | None = None) -> dict[str, float]:
    """Loss and accuracy over every (unpadded) example of ``batches``."""
    state = self.state if state is None else state
    totals = None
    for batch in batches:
      sums = self.eval_step(state, self.to_global(batch))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {"eval_loss": float(totals["loss"]) / count,
            "eval_accuracy": float(totals["correct"]) / count,
            "eval_examples": float(totals["count"])}

  def recomputed_bn_state(self, batches: Iterator[dict[str, np.ndarray]],
                          num_batches: int) -> nnx.State:
    """A copy of the state whose BatchNorm statistics are recomputed on ``num_batches`` batches."""
    model, optimizer = nnx.merge(self.graphdef, self.state)
    images = (self.to_global(next(batches))["image"] for _ in range(num_batches))
    recompute_batch_norm_stats(model, images)
    return jax.device_put(nnx.state((model, optimizer)), self.replicated)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
                       ) -> dict[str, float]:
  """Trains ``config``'s model on its dataset, evaluating and checkpointing in ``workdir``.

  Args:
    config: The fields of :func:`experiments.configs.common.base_config`.
    workdir: The run's directory; created if missing. A checkpoint in it is
      resumed from.

  Returns:
    The final evaluation (``eval_loss``, ``eval_accuracy``, ``eval_examples``)
    with ``step``, ``train_seconds`` (the training loop's wall time in this
    call, compilation included; 0 when the checkpoint was already at the last
    step, whose evaluation is then read from ``metrics.jsonl`` where it is
    there) and ``train_loss`` (mean of the last logging interval, when this
    call trained).

  Raises:
    ValueError: for a bad config field (named), and ``adderjax.data.DataError``
      for a missing or malformed dataset; both before anything is written.
    experiments.workdir_lock.WorkdirError: if ``workdir`` is a file, under one
      or not writable (before anything is read or written); ``WorkdirLocked``
      if another live run holds it.
    experiments.metrics.MetricsError: if ``metrics.jsonl`` cannot be written.
    experiments.checkpoints.CheckpointError: if the workdir has checkpoints and
      none can be restored (nothing is moved); ``SaveError`` if a save failed
      (the earlier checkpoints are kept).
    experiments.guards.Diverged: if the loss or state became non-finite
      (``config.on_nonfinite``); nothing non-finite is saved.
    experiments.preemption.Preempted: after ``SIGTERM``/``SIGINT``, once the
      step every process stopped at is saved.
  """
  check_config(config)
  check_workdir(workdir)
  train_source, eval_source = load_sources(config)
  mesh = make_mesh(config.num_devices)
  batch_size, eval_batch_size = config.batch_size, config.eval_batch_size
  for field, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
    if size % mesh.size:
      raise ValueError(f"config.{field}={size} must be divisible by the {mesh.size} devices.")
  steps_per_epoch = data.steps_per_epoch(len(train_source), batch_size)
  total_steps = config.num_train_steps or int(round(config.num_epochs * steps_per_epoch))
  loader = dict(image_size=config.image_size or None, num_threads=config.data_threads)
  # The loaders check their arguments when made: fail here, before the workdir is touched.
  data.train_batches(config.dataset, train_source, global_batch_size=batch_size,
                     seed=config.seed, augment=config.augment, **loader)
  data.eval_batches(config.dataset, eval_source, global_batch_size=eval_batch_size, **loader)

  workdir = pathlib.Path(workdir)
  initial = _initial_model(config, workdir)
  with WorkdirLock(workdir, process_index=jax.process_index()):
    return _train(config, workdir, mesh, train_source, eval_source, total_steps, steps_per_epoch,
                  loader, initial)


def _initial_model(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> nnx.Module | None:
  """The model ``config.init_from`` names, for a fresh run; None if it is unset or the run resumes.

  Read before the workdir is touched, so that a bad ``init_from`` leaves it as it was. A workdir
  with checkpoints resumes from them and does not read ``init_from``.
  """
  directory = workdir / "checkpoints"
  if not config.init_from or (directory.is_dir() and any(
      p.name.isdigit() for p in directory.iterdir())):
    return None
  return init_from.load(config)


def _save_after_error(checkpoints: Checkpoints, guard: DivergenceGuard, step: int, state: Any,
                      error: BaseException, saved_step: int) -> None:
  """Tries to keep the steps done before ``error``; logs what happened either way."""
  reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
  try:
    guard.check()
    checkpoints.save(step, state)
  except Diverged as e:
    logger.error("Stopped by %s; step %d not saved: %s", reason, step, e)
  except Exception as e:
    logger.error("Stopped by %s; could not save step %d (%s: %s); the last checkpoint is step "
                 "%d.", reason, step, type(e).__name__, str(e).splitlines()[0], saved_step)
  else:
    logger.warning("Stopped by %s; saved the checkpoint of step %d.", reason, step)


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh: jax.sharding.Mesh,
           train_source: Any, eval_source: Any, total_steps: int, steps_per_epoch: int,
           loader: dict[str, Any], initial: nnx.Module | None = None) -> dict[str, float]:
  """The body of :func:`train_and_evaluate`, run while this process holds the workdir."""
  batch_size, eval_batch_size = config.batch_size, config.eval_batch_size
  eval_every = config.eval_every_steps or steps_per_epoch
  if jax.process_index() == 0:
    _write_config(config, workdir)
  trainer = Trainer(config, mesh, total_steps, steps_per_epoch)
  checkpoints = Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
  try:
    restored_step, trainer.state = checkpoints.restore_latest(trainer.state)
  except BaseException:
    checkpoints.close()
    raise
  start_step = restored_step or 0
  if start_step:
    logger.info("Resumed from the checkpoint of step %d in %s%s.", start_step, workdir,
                "; config.init_from is not used" if config.init_from else "")
  elif config.init_from:
    trainer.initialize_from(initial if initial is not None else init_from.load(config))
    logger.info("Initialised the parameters and BatchNorm statistics from config.init_from=%r.",
                config.init_from)
  if start_step >= total_steps:
    # Every process reads the same answer only where they share the workdir: one process.
    stored = finished.stored_result(workdir, start_step) if jax.process_count() == 1 else None
    logger.info("The checkpoint of step %d is already the last of %d steps: nothing to train%s.",
                start_step, total_steps,
                "; its evaluation is read from metrics.jsonl" if stored else ", evaluating it")
    if stored is not None:
      checkpoints.close()
      return {**stored, "step": float(start_step), "train_seconds": 0.0}

  train_batches = data.train_batches(config.dataset, train_source, global_batch_size=batch_size,
                                     seed=config.seed, start_step=start_step,
                                     augment=config.augment, **loader)

  def evaluate() -> dict[str, float]:
    state = None
    if config.bn_recompute_batches:
      # Fresh batches from another seed, so the training order is untouched.
      batches = data.train_batches(config.dataset, train_source, global_batch_size=batch_size,
                                   seed=config.seed + 1, augment=config.augment, **loader)
      state = trainer.recomputed_bn_state(batches, config.bn_recompute_batches)
    batches = data.eval_batches(config.dataset, eval_source, global_batch_size=eval_batch_size,
                                **loader)
    return trainer.evaluate(batches, state)

  writer = MetricWriter(workdir)
  progress = ProgressBar(total_steps, enabled=config.progress_bar)
  guard = DivergenceGuard(config.on_nonfinite, max_consecutive_skips=config.max_consecutive_skips)
  preemption = PreemptionWatch(checkpoints.reached_preemption)
  result: dict[str, float] = {}
  step = start_step
  saved_step = start_step
  interval_metrics: list[dict[str, jax.Array]] = []
  interval_start = time.perf_counter()
  loop_start = interval_start
  eval_seconds = 0.0
  try:
    with preemption:
      while step < total_steps:
        batch = trainer.to_global(next(train_batches))
        trainer.state, metrics = trainer.train_step(trainer.state, batch)
        step += 1
        if step == start_step + 1:
          jax.block_until_ready(metrics)
          progress.compiled(step)  # The ETA's rate counts from the second step on.
        guard.record(step, metrics.pop("finite"))
        interval_metrics.append(metrics)
        if step % config.log_every_steps == 0 or step == total_steps:
          guard.check()
          means = jax.tree.map(lambda *m: float(np.mean(m)), *jax.device_get(interval_metrics))
          now = time.perf_counter()
          images_per_sec = len(interval_metrics) * batch_size / (now - interval_start)
          _, optimizer = nnx.merge(trainer.graphdef, trainer.state)
          scalars = {"train_loss": means["loss"], "train_accuracy": means["accuracy"],
                     "learning_rate": float(trainer.schedule(step - 1)),
                     "images_per_sec": images_per_sec,
                     "epoch": step / steps_per_epoch}
          if trainer.p_schedule is not None:
            scalars["adder_p"] = float(trainer.adder_p(step - 1))
          if guard.skipped_steps:
            scalars["skipped_steps"] = len(guard.skipped_steps)
          scalars.update(adaptive_lr_scales(optimizer.opt_state))
          writer.write(step, scalars)
          progress.update(step, images_per_sec=images_per_sec, loss=means["loss"],
                          acc=means["accuracy"])
          result["train_loss"] = means["loss"]
          interval_metrics = []
          interval_start = time.perf_counter()
        if step % eval_every == 0 or step == total_steps:
          guard.check()
          eval_start = time.perf_counter()
          result.update(evaluate())
          writer.write(step, {k: v for k, v in result.items() if k.startswith("eval_")})
          logger.info("step %d: eval accuracy %.4f, loss %.4f over %d examples", step,
                      result["eval_accuracy"], result["eval_loss"], result["eval_examples"])
          eval_seconds += time.perf_counter() - eval_start
          if step <= start_step + eval_every:
            progress.compiled(step)  # Nor the first evaluation's.
          interval_start = time.perf_counter()
        preempted = preemption.reached(step)
        if preempted or step % config.checkpoint_every_steps == 0 or step == total_steps:
          guard.check()  # Never save a non-finite state.
          checkpoints.save(step, trainer.state)
          saved_step = step
          interval_start = time.perf_counter()
        if preempted:
          raise Preempted(step, str(workdir))
  except (Preempted, Diverged, SaveError):
    raise
  except BaseException as e:
    # Keep what was done: the state after the last completed step is consistent. Other
    # processes of a multi-process run would not join the save, so only one process saves.
    if step > saved_step and jax.process_count() == 1:
      _save_after_error(checkpoints, guard, step, trainer.state, e, saved_step)
    raise
  finally:
    checkpoints.wait()
    checkpoints.close()
    progress.close()
    writer.close()
  train_seconds = time.perf_counter() - loop_start - eval_seconds
  if not any(k.startswith("eval_") for k in result):
    result.update(evaluate())
  result["step"] = float(step)
  result["train_seconds"] = train_seconds
  return result

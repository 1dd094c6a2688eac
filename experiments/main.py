"""Trains and evaluates one config:

    python -m experiments.main --config=experiments/configs/cifar10_resnet20.py:adder \
        --workdir=/tmp/cifar10_resnet20_adder [--config.batch_size=128 ...]

Restarting the same command resumes from the newest good checkpoint in the
workdir; rerunning a finished run says so in one line and exits at once. Exit
status: 0 when the run completed (or had already); 75 (``EX_TEMPFAIL``) when it
was preempted (``SIGTERM`` or ``SIGINT``) and saved the step it stopped at, or
was stopped outside the training loop (starting up: nothing to save), so
rerunning resumes; 1 with a one-line message for a bad config, data directory
or workdir, a failed save or metrics write, a diverged run or unusable
checkpoints (the libraries' tracebacks of a failed save go to
``workdir/errors.log``); 2 for an unknown config field.
"""

if __name__ == "__main__":
  # First of all: start again with glibc's allocator set up to reuse XLA's per-step buffers (a
  # tenth of a CPU training step went to page faults without it; adderjax.allocator).
  from adderjax import allocator

  allocator.restart_with_tuned_allocator()
  # Then, before the slow imports and the start-up: SIGTERM and SIGINT exit with 75.
  from experiments import startup_signals

  startup_signals.install()

import difflib
import importlib.util
import logging
import os
import pathlib
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import ConfigDict, config_flags

from experiments import console, finished

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.")
config_flags.DEFINE_config_file("config", None, "A config file of experiments/configs.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

logger = logging.getLogger("experiments")


def _run_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
  """The errors shown as one line without a traceback, and those whose message says what.

  Imported here, not at the top: JAX and orbax take seconds to import, and
  the command line is checked first.
  """
  from adderjax.data import DataError
  from experiments.checkpoints import CheckpointError
  from experiments.guards import Diverged
  from experiments.metrics import MetricsError
  from experiments.workdir_lock import WorkdirError

  own = (WorkdirError, CheckpointError, Diverged, MetricsError)
  return (ValueError, DataError, *own), own


def _load_config(argv: list[str]) -> ConfigDict | None:
  """The config ``--config=FILE[:ARG]`` names, loaded like config_flags does, or None."""
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path, _, variant = arg.removeprefix("--config=").partition(":")
      try:
        spec = importlib.util.spec_from_file_location("_config_file", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(variant) if variant else module.get_config()
      except Exception:
        return None
  return None


def unknown_field_message(argv: list[str]) -> str | None:
  """One line naming the first ``--config.FIELD`` override that is no field, with the closest
  names."""
  config = _load_config(argv)
  if config is None:
    return None
  for arg in argv[1:]:
    match = re.match(r"--config\.([^=]+)", arg)
    if not match:
      continue
    node, path = config, []
    for part in match.group(1).split("."):
      if not isinstance(node, ConfigDict):
        break
      if part not in node:
        close = difflib.get_close_matches(part, list(node.keys()), n=3, cutoff=0.5)
        hint = f"the closest valid names are {', '.join(close)}" if close else (
            "see experiments/configs/common.py for the fields")
        return f"Unknown config field config.{'.'.join([*path, part])} in {arg!r}; {hint}."
      node = node[part]
      path.append(part)
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error for an unknown config field."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    message = unknown_field_message(argv)
    if message is None:
      raise
    print(f"{argv[0]}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _process_index(config: ConfigDict) -> int | None:
  """This process's index as the environment gives it before JAX starts; None if unknown."""
  if not config.get("distributed", False):
    return 0
  try:
    return int(os.environ.get("JAX_PROCESS_ID", ""))
  except ValueError:
    return None  # distributed.initialize() says what is wrong.


def _report_finished(config: ConfigDict, workdir: str) -> bool:
  """Says so in one line and returns True if ``workdir``'s run already reached its last step.

  Only for a single-process run with ``config.num_train_steps`` (otherwise the
  number of steps depends on the dataset, which is slow to read): the trainer
  itself then reports the finished run without training or compiling.
  """
  if config.get("distributed", False) or not config.get("num_train_steps", 0):
    return False
  step = finished.final_checkpoint_step(workdir, config.num_train_steps)
  result = None if step is None else finished.stored_result(workdir, step)
  if result is None:
    return False
  logger.info("Nothing to do: the checkpoint of step %d in %s is already the last of %d steps. "
              "Its evaluation (metrics.jsonl): %s.", step, workdir, config.num_train_steps,
              ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.items())))
  return True


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO.
  console.configure()  # Clean lines, without absl's prefix; the native kernels' build shows.
  from experiments.workdir_lock import WorkdirError, check_unlocked, check_workdir

  try:
    # Before the slow imports: a bad or busy --workdir is said at once.
    check_workdir(FLAGS.workdir)
    index = _process_index(FLAGS.config)
    if index is not None:
      check_unlocked(FLAGS.workdir, process_index=index)
  except WorkdirError as e:
    logger.error("%s", e)
    sys.exit(1)
  if _report_finished(FLAGS.config, FLAGS.workdir):
    return
  import jax

  from experiments import distributed
  from experiments.library_errors import LibraryErrors
  from experiments.preemption import PREEMPTED_EXIT_CODE, Preempted

  run_errors, own_errors = _run_errors()
  # The libraries' tracebacks (a failed save's) go to the workdir, not to the console; so until
  # the process ends, for the reports that come after the error.
  library_errors = LibraryErrors(pathlib.Path(FLAGS.workdir) / "errors.log").install()
  try:
    distributed.initialize(FLAGS.config)
    from experiments.train import (
      train_and_evaluate,  # After initialize(): it touches devices.
    )

    result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except Preempted as e:
    logger.warning("%s", e)
    sys.exit(PREEMPTED_EXIT_CODE)
  except run_errors as e:
    logger.debug("Traceback of the error:", exc_info=True)
    message = str(e) if isinstance(e, own_errors) else f"{type(e).__name__}: {e}"
    if library_errors.written:
      message += f" The libraries' reports: {library_errors.path}."
    logger.error("%s", message)
    sys.exit(1)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    # A collective failed: another process died. JAX's exit would wait for it at the shutdown
    # barrier and then abort; exit now instead.
    logger.error("A collective of this %d-process run failed, so another process has most likely "
                 "died (%s); rerun every process to resume from the last checkpoint.",
                 jax.process_count(), str(e).splitlines()[0])
    logging.shutdown()
    os._exit(1)
  logger.info("Done: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.items())))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

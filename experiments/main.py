"""Trains and evaluates one config:

    python -m experiments.main --config=experiments/configs/cifar10_resnet20.py:adder \
        --workdir=/tmp/cifar10_resnet20_adder [--config.batch_size=128 ...]

Restarting the same command resumes from the newest checkpoint in the workdir.
"""

import logging
import signal

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.")
config_flags.DEFINE_config_file("config", None, "A config file of experiments/configs.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def _raise_interrupt(signum, frame):
  # Preemption sends SIGTERM: stop like Ctrl-C, which saves a checkpoint first.
  raise KeyboardInterrupt(f"signal {signum}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO.
  logging.getLogger("experiments").setLevel(logging.INFO)
  if FLAGS.config.distributed:
    jax.distributed.initialize()
  signal.signal(signal.SIGTERM, _raise_interrupt)
  from experiments.train import (
    train_and_evaluate,  # After initialize(): it touches devices.
  )

  result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  logging.getLogger("experiments").info("Done: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.items())))


if __name__ == "__main__":
  app.run(main)

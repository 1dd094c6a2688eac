"""Runs ``experiments.main`` with one fault injected, for the trainer's multi-process tests.

    FAULT_SIGNAL=SIGTERM FAULT_STEP=7 FAULT_PROCESS=1 python -m tests.experiments.fault_driver \
        --config=... --workdir=...

Process ``FAULT_PROCESS`` sends itself ``FAULT_SIGNAL`` (a real signal) when it
fetches the batch of training step ``FAULT_STEP``, so the test knows where the
run was when the signal came, however fast the machine is; from then on each
batch takes ``FAULT_SLOWDOWN`` seconds more.
"""

import os
import signal
import time

from absl import app

from adderjax import data


def _faulty(train_batches):
  signum = getattr(signal, os.environ["FAULT_SIGNAL"])
  fault_step = int(os.environ["FAULT_STEP"])
  fault_process = int(os.environ.get("FAULT_PROCESS", "0"))
  slowdown = float(os.environ.get("FAULT_SLOWDOWN", "0"))

  def batches(*args, start_step=0, **kwargs):
    import jax
    for step, batch in enumerate(train_batches(*args, start_step=start_step, **kwargs),
                                 start_step + 1):
      if step == fault_step and jax.process_index() == fault_process:
        os.kill(os.getpid(), signum)
      if step >= fault_step:
        time.sleep(slowdown)  # Time for the processes to agree on a preemption step.
      yield batch

  return batches


if __name__ == "__main__":
  if os.environ.get("FAULT_SIGNAL"):
    data.train_batches = _faulty(data.train_batches)
  from experiments import main
  app.run(main.main, flags_parser=main.parse_flags)

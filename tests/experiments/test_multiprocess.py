"""Two processes x two CPU devices on localhost (gloo): a killed process, a preemption, a restart.

One workdir goes through three launches of ``experiments.main`` as a
2-process run, each started exactly as the README says (``JAX_*`` variables
and ``--config.distributed=True``):

1. process 1 is killed (``SIGKILL``) at step 7: process 0 exits with a clear
   error within a bounded time; checkpoint 4 is intact;
2. the restart resumes from step 4; process 1 gets ``SIGTERM`` at step 7: both
   processes save the same step and exit with the preemption status;
3. the restart resumes from that step and completes,

and its parameters equal those of one process with four devices.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import train
from experiments.preemption import PREEMPTED_EXIT_CODE

from .test_train import REPO, final_params, smoke_config

STEPS = 16
FIELDS = {"num_train_steps": STEPS, "checkpoint_every_steps": 4, "log_every_steps": 4,
          "eval_every_steps": STEPS}


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(workdir, fault=None):
  """Starts both processes; ``fault``: ``(signal name, step)`` for process 1.

  The launches share a compilation cache beside ``workdir``, so only the first compiles.
  """
  port = free_port()
  overrides = [f"--config.{k}={v}" for k, v in FIELDS.items()]
  command = [sys.executable, "-m", "tests.experiments.fault_driver",
             f"--config={REPO / 'experiments/configs/smoke.py'}", f"--workdir={workdir}",
             "--config.progress_bar=False", "--config.bn_recompute_batches=0",
             "--config.distributed=True", "--config.heartbeat_timeout_seconds=10",
             "--config.shutdown_timeout_seconds=10",
             "--config.initialization_timeout_seconds=60", *overrides]
  processes = []
  for index in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(index), JAX_COMPILATION_CACHE_DIR=str(workdir) + "_jax_cache",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    if fault:
      env.update(FAULT_SIGNAL=fault[0], FAULT_STEP=str(fault[1]), FAULT_PROCESS="1",
                 FAULT_SLOWDOWN="0.3")
    processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
  return processes


def finish(process, timeout):
  """(exit status, stderr); kills the process if it outlives ``timeout`` seconds."""
  try:
    _, stderr = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    _, stderr = process.communicate()
    pytest.fail(f"still running after {timeout} s:\n{stderr[-3000:]}")
  return process.returncode, stderr


def test_two_processes_survive_kill_and_preemption_and_match_one_process(tmp_path):
  workdir = tmp_path / "two_processes"
  # 1. SIGKILL of process 1: process 0 sees its collective fail and exits.
  first, second = launch(workdir, fault=("SIGKILL", 7))
  status, stderr = finish(second, timeout=180)
  assert status == -signal.SIGKILL, stderr[-3000:]
  killed_at = time.monotonic()
  status, stderr = finish(first, timeout=60)
  assert status != 0 and time.monotonic() - killed_at < 30, stderr[-3000:]
  # The trainer's message when a collective fails; JAX's when the heartbeat stops first.
  assert ("another process has most likely died" in stderr
          or "This most likely indicates that another task died" in stderr), stderr[-3000:]
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [4]

  # 2. Restart; SIGTERM to process 1 only: both agree on one step, save it and exit.
  processes = launch(workdir, fault=("SIGTERM", 7))
  results = [finish(p, timeout=180) for p in processes]
  saved = []
  for status, stderr in results:
    assert status == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert "Resumed from the checkpoint of step 4" in stderr
    saved.append(int(re.search(r"Preempted: saved the checkpoint of step (\d+)", stderr)[1]))
  assert saved[0] == saved[1] and 7 <= saved[0] < STEPS, saved
  step_dir = workdir / "checkpoints" / str(saved[0])
  # Both processes wrote their part of the same checkpoint.
  assert {p.name for p in (step_dir / "default").glob("ocdbt.process_*")} == {
      "ocdbt.process_0", "ocdbt.process_1"}

  # 3. Restart: completes from the saved step.
  results = [finish(p, timeout=180) for p in launch(workdir)]
  for status, stderr in results:
    assert status == 0, stderr[-3000:]
    assert f"Resumed from the checkpoint of step {saved[0]}" in stderr
  step, two_processes = final_params(workdir)
  assert step == STEPS

  # The same config on one process with four devices.
  train.train_and_evaluate(smoke_config(**FIELDS, num_devices=4), tmp_path / "one_process")
  _, one_process = final_params(tmp_path / "one_process")
  model = [k for k in one_process if k[0].key == 0]  # The model (the optimizer is item 1).
  assert len(model) == 25
  a, b = (np.concatenate([params[k].ravel() for k in model]) for params in (two_processes,
                                                                              one_process))
  # Sums over devices run in another order. Adder gradients are clipped to [-1, 1] (HardTanh),
  # so a value near the edge can take the other side: all but a few values agree to float
  # precision, and those few stay close (BatchNorm statistics of adder outputs are in the
  # hundreds).
  assert np.mean(np.isclose(a, b, rtol=1e-3, atol=1e-4)) > 0.999
  np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)
  assert np.isfinite(a).all()

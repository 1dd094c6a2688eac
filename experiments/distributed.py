"""Starting a multi-process (multi-host) run: ``jax.distributed.initialize`` from the config."""

from __future__ import annotations

import os

import jax
import ml_collections

__all__ = ["ENV_VARS", "initialize"]

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
"""Read by :func:`initialize`; JAX 0.10 itself reads only the first."""


def _int_var(name: str, value: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name} must be an integer, got {name}={value!r}.") from None


def initialize(config: ml_collections.ConfigDict) -> None:
  """Calls ``jax.distributed.initialize`` if ``config.distributed``; before any device is used.

  With ``JAX_NUM_PROCESSES`` or ``JAX_PROCESS_ID`` set, all three
  :data:`ENV_VARS` are required and passed on. Otherwise JAX detects the
  cluster (SLURM, Cloud TPU, MPI via mpi4py), using ``JAX_COORDINATOR_ADDRESS``
  if set. The coordinator waits ``config.initialization_timeout_seconds`` for
  every process to connect; a process silent for
  ``config.heartbeat_timeout_seconds`` ends the others with an error, and the
  exit waits at most ``config.shutdown_timeout_seconds`` for the rest.
  CPU collectives go through gloo, so a CPU-only cluster trains too.

  Raises:
    ValueError: naming a missing or malformed variable.

  Example::

    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \\
        python -m experiments.main --config=... --workdir=... --config.distributed=True
  """
  if not config.distributed:
    return
  timeouts = {}
  for field in ("initialization_timeout_seconds", "heartbeat_timeout_seconds",
                "shutdown_timeout_seconds"):
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{field} must be an int >= 1, got {value!r}.")
    timeouts[field] = value
  env = {name: os.environ.get(name, "") for name in ENV_VARS}
  kwargs: dict = {"initialization_timeout": timeouts["initialization_timeout_seconds"],
                  "heartbeat_timeout_seconds": timeouts["heartbeat_timeout_seconds"],
                  "shutdown_timeout_seconds": timeouts["shutdown_timeout_seconds"]}
  if env["JAX_NUM_PROCESSES"] or env["JAX_PROCESS_ID"]:
    missing = [name for name, value in env.items() if not value]
    if missing:
      raise ValueError(f"config.distributed=True with {ENV_VARS[1]}/{ENV_VARS[2]} needs all of "
                       f"{ENV_VARS}; {', '.join(missing)} is not set.")
    num_processes = _int_var("JAX_NUM_PROCESSES", env["JAX_NUM_PROCESSES"])
    process_id = _int_var("JAX_PROCESS_ID", env["JAX_PROCESS_ID"])
    if not 0 <= process_id < num_processes:
      raise ValueError(f"JAX_PROCESS_ID must be in [0, JAX_NUM_PROCESSES={num_processes}), "
                       f"got {process_id}.")
    kwargs.update(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                  num_processes=num_processes, process_id=process_id)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)

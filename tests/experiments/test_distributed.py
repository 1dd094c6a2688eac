"""``--config.distributed=True``: what reaches ``jax.distributed.initialize``."""

import jax
import pytest

from experiments import distributed
from experiments.configs import smoke

TIMEOUTS = {"initialization_timeout": 300, "heartbeat_timeout_seconds": 60,
            "shutdown_timeout_seconds": 60}


@pytest.fixture
def calls(monkeypatch):
  recorded = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: recorded.append(kwargs))
  monkeypatch.setattr(jax.config, "update", lambda *args: recorded.append(args))
  for name in distributed.ENV_VARS:
    monkeypatch.delenv(name, raising=False)
  return recorded


def config(**fields):
  config = smoke.get_config()
  config.distributed = True
  config.update(fields)
  return config


def test_the_three_variables_are_passed_with_the_timeouts(calls, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  distributed.initialize(config(heartbeat_timeout_seconds=7))
  assert calls == [("jax_cpu_collectives_implementation", "gloo"),
                   dict(TIMEOUTS, heartbeat_timeout_seconds=7, coordinator_address="host0:1234",
                        num_processes=4, process_id=3)]


def test_without_variables_jax_detects_the_cluster(calls):
  distributed.initialize(config())
  assert calls[-1] == TIMEOUTS
  calls.clear()
  distributed.initialize(config(distributed=False))
  assert calls == []


@pytest.mark.parametrize("env, match", [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS is not set"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES is not set"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES must be an integer, got JAX_NUM_PROCESSES='two'"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     r"JAX_PROCESS_ID must be in \[0, JAX_NUM_PROCESSES=2\), got 2"),
])
def test_bad_variables_are_named(calls, monkeypatch, env, match):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match=match):
    distributed.initialize(config())
  assert calls == []


def test_bad_timeout_is_named(calls):
  with pytest.raises(ValueError, match="config.heartbeat_timeout_seconds must be an int >= 1"):
    distributed.initialize(config(heartbeat_timeout_seconds=0))

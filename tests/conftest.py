"""Test set-up: eight virtual CPU devices, so data-parallel tests can run anywhere.

XLA reads the flag when the backend starts, so it is set before anything
imports jax.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

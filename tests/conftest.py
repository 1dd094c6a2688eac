"""Test set-up: eight virtual CPU devices, one compilation cache, and no network.

XLA reads the device flag when the backend starts, so it is set before
anything imports jax. The tests' processes (pytest-xdist's workers and the
trainer runs they start) share one persistent compilation cache, a fresh
folder per session: most of the suite's time is XLA compiling the same small
programs (a model's random initialisation compiles one per parameter shape,
about 0.4 s each; ResNet-20 took 18 s to build, 1.5 s from the cache). Tests never download:
the download cache is a fresh
folder, no mirror is configured, and host names other than this machine's
and the loopback's do not resolve, as on an offline machine (the download
tests use a server on 127.0.0.1).
"""

import os
import shutil
import socket
import tempfile

# Not --xla_backend_optimization_level=0 (three times faster compilations): it changes float32
# results (ResNet-50's distance to the official float64 logits: 8e-4 -> 4.6e-3).
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

# Each process's own download cache (pytest's, each xdist worker's), removed when it ends.
_DATA_DIR = tempfile.mkdtemp(prefix="adderjax-test-cache-")
os.environ["ADDERJAX_DATA_DIR"] = _DATA_DIR

# Made by the first process (pytest itself, or its xdist controller), inherited by the workers.
_OWNS_JAX_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWNS_JAX_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="adderjax-test-jax-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_sessionfinish(session, exitstatus):
  shutil.rmtree(_DATA_DIR, ignore_errors=True)
  if _OWNS_JAX_CACHE and not hasattr(session.config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.pop("ADDERJAX_DATA_MIRROR", None)

_LOCAL_HOSTS = {None, "", "localhost", "::1", socket.gethostname()}
_getaddrinfo = socket.getaddrinfo


def _local_only(host, *args, **kwargs):
  name = host.decode() if isinstance(host, bytes) else host
  if name not in _LOCAL_HOSTS and not str(name).startswith("127."):
    raise socket.gaierror(socket.EAI_NONAME, f"tests do not use the network (host {name!r})")
  return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _local_only


# The files with the longest tests run first, so that pytest-xdist's workers (`--dist worksteal`
# in pyproject.toml) do not end the session with one of them running alone: the multi-process
# run alone takes about 100 s.
_SLOW_FILES = ("tests/experiments/test_multiprocess.py", "tests/test_colabs.py",
               "tests/experiments/test_train.py", "tests/test_export_c.py",
               "tests/experiments/test_compare_mnist.py", "tests/test_export.py")


def pytest_collection_modifyitems(session, config, items):
  def rank(item):
    path = item.nodeid.split("::")[0]
    return _SLOW_FILES.index(path) if path in _SLOW_FILES else len(_SLOW_FILES)

  items.sort(key=rank)

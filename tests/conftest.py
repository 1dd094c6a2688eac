"""Test set-up: eight virtual CPU devices, and no network.

XLA reads the device flag when the backend starts, so it is set before
anything imports jax. Tests never download: the download cache is a fresh
folder, no mirror is configured, and host names other than this machine's
and the loopback's do not resolve, as on an offline machine (the download
tests use a server on 127.0.0.1).
"""

import os
import socket
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

os.environ["ADDERJAX_DATA_DIR"] = tempfile.mkdtemp(prefix="adderjax-test-cache-")
os.environ.pop("ADDERJAX_DATA_MIRROR", None)

_LOCAL_HOSTS = {None, "", "localhost", "::1", socket.gethostname()}
_getaddrinfo = socket.getaddrinfo


def _local_only(host, *args, **kwargs):
  name = host.decode() if isinstance(host, bytes) else host
  if name not in _LOCAL_HOSTS and not str(name).startswith("127."):
    raise socket.gaierror(socket.EAI_NONAME, f"tests do not use the network (host {name!r})")
  return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _local_only

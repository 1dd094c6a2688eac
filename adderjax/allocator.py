"""glibc's allocator set up for XLA's per-execution buffers on Linux CPUs, for a process to start.

XLA's CPU runtime allocates each execution's temporary buffer (a ResNet-20
training step at batch 64: 99 MiB) with ``posix_memalign`` on a worker thread,
and glibc serves a request that large from a fresh ``mmap`` that it unmaps on
``free``: every step writes 25,000 new 4 KiB pages, each a page fault that the
kernel zeroes (7-10% of the step on a 2-core Xeon, ``benchmarks/README.md``).
With the tunables of :data:`TUNABLES` (``GLIBC_TUNABLES``) every thread
allocates from one arena that never maps (``arena_max=1``, ``mmap_max=0``: a
thread's own arena maps any request over 64 MiB) and never gives memory back
(``trim_threshold``), so the next step reuses the same pages: no faults, no
zeroing; and ``hugetlb=1`` (glibc 2.35 and later; older ones ignore it) asks
for transparent huge pages for the heap. The cost: the process keeps the most
memory it ever had in use, as a framework's caching allocator would, and its
threads share one arena's lock.

glibc reads its tunables when a process starts, so this is for processes about
to start: :func:`environment` gives an environment with them, for
subprocesses, and :func:`restart_with_tuned_allocator` starts the running
program again with it (the trainer, ``python -m experiments.main``, does so
first thing). For a script of your own::

    GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:\\
    glibc.malloc.trim_threshold=18446744073709551615:glibc.malloc.hugetlb=1 python train.py

This module imports nothing slow.

Example:
  >>> from adderjax import allocator
  >>> env = allocator.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  >>> env["GLIBC_TUNABLES"].split(":")  # doctest: +NORMALIZE_WHITESPACE
  ['glibc.malloc.arena_max=2', 'glibc.malloc.mmap_max=0',
   'glibc.malloc.trim_threshold=18446744073709551615', 'glibc.malloc.hugetlb=1']
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import re
import sys

__all__ = ["DISABLE_VARIABLE", "TUNABLES", "environment", "needs_restart",
           "restart_with_tuned_allocator"]

TUNABLES = (
    "glibc.malloc.arena_max=1",
    "glibc.malloc.mmap_max=0",
    "glibc.malloc.trim_threshold=18446744073709551615",  # SIZE_MAX: never trim.
    "glibc.malloc.hugetlb=1",
)
# Set to 1 to keep restart_with_tuned_allocator from restarting the process.
DISABLE_VARIABLE = "ADDERJAX_NO_ALLOCATOR_TUNING"
_FIRST_GLIBC = (2, 26)  # The first with GLIBC_TUNABLES.


def _name(tunable: str) -> str:
  return tunable.split("=")[0]


def environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
  """A copy of ``env`` (default: this process's) whose ``GLIBC_TUNABLES`` has :data:`TUNABLES`.

  Tunables already there are kept, the caller's value of any of these among
  them.

  Args:
    env: the environment to start from.

  Returns:
    The environment for a subprocess.
  """
  env = dict(os.environ if env is None else env)
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  present = {_name(t) for t in tunables}
  tunables += [t for t in TUNABLES if _name(t) not in present]
  env["GLIBC_TUNABLES"] = ":".join(tunables)
  return env


def _glibc_version() -> tuple[int, int] | None:
  try:
    match = re.fullmatch(r"glibc (\d+)\.(\d+).*", os.confstr("CS_GNU_LIBC_VERSION") or "")
  except (ValueError, OSError):  # Not a glibc system.
    return None
  return (int(match[1]), int(match[2])) if match else None


def needs_restart(env: Mapping[str, str] | None = None) -> bool:
  """Whether starting again with :func:`environment` would change how malloc works.

  True on Linux with glibc 2.26 or later, unless every one of :data:`TUNABLES`
  is set in ``GLIBC_TUNABLES`` already (to any value) or
  ``ADDERJAX_NO_ALLOCATOR_TUNING=1`` is in ``env``.

  Args:
    env: the environment the process started with (default: this process's).
  """
  linux = sys.platform.startswith("linux")
  return _needs_restart(os.environ if env is None else env, _glibc_version() if linux else None)


def _needs_restart(env: Mapping[str, str], glibc: tuple[int, int] | None) -> bool:
  """:func:`needs_restart` for a C library's version (None: not glibc)."""
  if env.get(DISABLE_VARIABLE, "") not in ("", "0") or environment(env) == dict(env):
    return False
  return glibc is not None and glibc >= _FIRST_GLIBC


def restart_with_tuned_allocator() -> None:
  """Starts this program again in place, with :func:`environment`, where :func:`needs_restart`.

  Call it first thing in a program's entry point, before threads, open files
  or output that the new process would not inherit as they are. It does not
  return where it restarts (``os.execve``: same process id, same command
  line); elsewhere it returns at once.
  """
  if needs_restart():
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment())

"""Huge pages for XLA's per-execution buffers on Linux CPUs: a process started with a glibc tunable.

XLA's CPU runtime allocates each execution's temporary buffer (a ResNet-20
training step at batch 64: 99 MiB) with ``posix_memalign`` on a worker
thread, and glibc serves a request that large with a fresh ``mmap`` that it
unmaps on ``free``: every step writes 25,000 new 4 KiB pages, each a page fault
that the kernel zeroes (measured: 7-10% of the step on a 2-core Xeon,
``benchmarks/README.md``). With the tunable ``glibc.malloc.hugetlb=1`` (glibc
2.35 and later) malloc advises transparent huge pages for its mappings, and
where the kernel's mode is ``madvise`` (the common default) they come in 2 MiB
pages: 512 times fewer faults. Nothing else changes: memory is still returned
to the system, and a kernel without huge pages to spare gives small ones.

glibc reads its tunables when a process starts, so this is for processes about
to start: :func:`environment` gives an environment with the tunable, for
subprocesses, and :func:`restart_with_huge_pages` starts the running program
again with it (the trainer, ``python -m experiments.main``, does so first
thing). For a script of your own::

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py

This module imports nothing slow.

Example:
  >>> from adderjax import huge_pages
  >>> huge_pages.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"]
  'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import pathlib
import re
import sys

__all__ = ["DISABLE_VARIABLE", "TUNABLE", "environment", "needs_restart",
           "restart_with_huge_pages"]

TUNABLE = "glibc.malloc.hugetlb=1"
# Set to 1 to keep restart_with_huge_pages from restarting the process.
DISABLE_VARIABLE = "ADDERJAX_NO_HUGE_PAGES"
_THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
_FIRST_GLIBC = (2, 35)  # The first with glibc.malloc.hugetlb.


def environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
  """A copy of ``env`` (default: this process's) whose ``GLIBC_TUNABLES`` has :data:`TUNABLE`.

  Tunables already there are kept; a ``glibc.malloc.hugetlb`` setting of the
  caller's is left as it is.

  Args:
    env: the environment to start from.

  Returns:
    The environment for a subprocess.
  """
  env = dict(os.environ if env is None else env)
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  if not any(t.split("=")[0] == TUNABLE.split("=")[0] for t in tunables):
    tunables.append(TUNABLE)
  env["GLIBC_TUNABLES"] = ":".join(tunables)
  return env


def _glibc_version() -> tuple[int, int] | None:
  try:
    match = re.fullmatch(r"glibc (\d+)\.(\d+).*", os.confstr("CS_GNU_LIBC_VERSION") or "")
  except (ValueError, OSError):  # Not a glibc system.
    return None
  return (int(match[1]), int(match[2])) if match else None


def _thp_mode() -> str | None:
  try:
    match = re.search(r"\[(\w+)\]", _THP_MODE.read_text())
  except OSError:
    return None
  return match[1] if match else None


def needs_restart(env: Mapping[str, str] | None = None) -> bool:
  """Whether starting again with :func:`environment` would change how malloc maps memory.

  True on Linux with glibc 2.35 or later, transparent huge pages in
  ``madvise`` mode (with ``always`` every large mapping gets them already; with
  ``never`` none can), and neither ``glibc.malloc.hugetlb`` in
  ``GLIBC_TUNABLES`` nor ``ADDERJAX_NO_HUGE_PAGES=1`` in ``env``.

  Args:
    env: the environment the process started with (default: this process's).
  """
  linux = sys.platform.startswith("linux")
  return _needs_restart(os.environ if env is None else env,
                        _glibc_version() if linux else None, _thp_mode() if linux else None)


def _needs_restart(env: Mapping[str, str], glibc: tuple[int, int] | None,
                   thp_mode: str | None) -> bool:
  """:func:`needs_restart` for a C library's version (None: not glibc) and a huge page mode."""
  if env.get(DISABLE_VARIABLE, "") not in ("", "0") or environment(env) == dict(env):
    return False
  return glibc is not None and glibc >= _FIRST_GLIBC and thp_mode == "madvise"


def restart_with_huge_pages() -> None:
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

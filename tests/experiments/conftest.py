"""Fixtures of the trainer's tests: a small disk that the test can fill up; logging restored."""

import errno
import logging
import subprocess

import pytest


@pytest.fixture(autouse=True)
def restore_logging():
  """Puts the loggers' handlers back after each test.

  The entry points (``experiments.compare_mnist``, ``experiments.main``) set up
  console logging on the ``sys.stderr`` of the moment, which under pytest is a
  capture that closes with the test: a handler left behind would fail on the
  next test's records.
  """
  loggers = [logging.getLogger()] + [logging.getLogger(name) for name in ("absl", "experiments",
                                                                          "adderjax")]
  saved = [(logger, list(logger.handlers), logger.level, logger.propagate) for logger in loggers]
  yield
  for logger, handlers, level, propagate in saved:
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture
def small_disk(tmp_path):
  """A directory on a 1 MiB tmpfs (we are root), or None where it cannot be mounted."""
  mount = tmp_path / "disk"
  mount.mkdir()
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, check=False)
  if result.returncode:
    yield None
    return
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(directory):
  """Writes into ``directory`` until the disk is full."""
  with open(directory / "filler", "wb", buffering=0) as f:
    try:
      while True:
        f.write(bytes(4096))
    except OSError as e:
      assert e.errno == errno.ENOSPC

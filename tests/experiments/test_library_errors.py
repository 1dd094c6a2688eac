"""The libraries' tracebacks of a failed save go to the workdir's errors.log, not the console."""

import asyncio
import gc
import logging
import sys
import threading
import time

from absl import logging as absl_logging
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.checkpoints import Checkpoints, SaveError
from experiments.library_errors import LibraryErrors


def test_reports_go_to_the_file_and_the_hooks_come_back(tmp_path, caplog, capfd):
  hooks = (sys.unraisablehook, threading.excepthook)
  with LibraryErrors(tmp_path / "errors.log") as errors:
    with caplog.at_level(logging.INFO):
      absl_logging.error("a library failed")
      absl_logging.warning("a library warns")  # Warnings stay on the console.
      try:
        raise RuntimeError("in a thread")
      except RuntimeError:
        absl_logging.exception("with its traceback")
    thread = threading.Thread(target=lambda: 1 / 0, name="worker")
    thread.start()
    thread.join()
    _abandon_a_failed_task()
  assert (sys.unraisablehook, threading.excepthook) == hooks
  assert errors.count == errors.written == 4
  assert [r.getMessage() for r in caplog.records] == ["a library warns"]
  text = (tmp_path / "errors.log").read_text()
  assert "a library failed" in text and "RuntimeError: in a thread" in text
  assert "thread worker" in text and "ZeroDivisionError" in text
  assert "Task exception was never retrieved" in text and "OSError: disk full" in text
  assert "Traceback" not in capfd.readouterr().err


def _abandon_a_failed_task():
  """What orbax leaves behind when a write fails: asyncio logs it when the task is collected."""
  async def write():
    raise OSError("disk full")

  loop = asyncio.new_event_loop()
  task = loop.create_task(write())
  loop.run_until_complete(asyncio.sleep(0))
  loop.close()
  del task
  gc.collect()


def test_before_the_workdir_exists_reports_stay_on_the_console(tmp_path, caplog):
  with LibraryErrors(tmp_path / "not yet" / "errors.log") as errors, caplog.at_level(logging.ERROR):
    absl_logging.error("a library failed early")
  assert errors.count == 0 and [r.getMessage() for r in caplog.records] == [
      "a library failed early"]


def test_a_save_on_a_full_disk_prints_no_traceback(tmp_path, small_disk, capfd, caplog):
  """Orbax logs each failed thread, TensorStore's callbacks raise on a closed event loop."""
  if small_disk is None:
    pytest.skip("mounting a small tmpfs needs root")
  rng = np.random.default_rng(0)
  # Many arrays: TensorStore calls back on orbax's closed event loop for each one left. About
  # 400 kB a checkpoint: the disk fills up while the third one's arrays are written.
  state = {f"a{i}": jnp.asarray(rng.random((50, 50), np.float32)) for i in range(40)}
  checkpoints = Checkpoints(small_disk / "checkpoints")
  checkpoints.save(1, state)
  checkpoints.save(2, state)
  with LibraryErrors(tmp_path / "errors.log") as errors, caplog.at_level(logging.WARNING):
    with pytest.raises(SaveError, match=r"step 3: No space left on device \(writing "):
      checkpoints.save(3, state)
    time.sleep(0.5)  # The callbacks of the writes still under way.
    gc.collect()
  checkpoints.close()
  assert errors.count >= 1 and not [r for r in caplog.records if r.name == "absl"]
  text = (tmp_path / "errors.log").read_text()
  assert "RESOURCE_EXHAUSTED" in text and "Traceback" in text
  assert "Traceback" not in capfd.readouterr().err

"""The command line: one-line messages for unknown config fields and for failed runs."""

import errno
import io
import json
import logging
import signal
import subprocess
import sys
import time

import pytest

from experiments import console, finished, main, train
from experiments.checkpoints import DIGEST_FILE, Checkpoints
from experiments.guards import DivergenceGuard
from experiments.workdir_lock import WorkdirLock

from .test_checkpoints import state_of
from .test_train import REPO
from .test_workdir_lock import HOLD

SMOKE = f"--config={REPO / 'experiments/configs/smoke.py'}"


@pytest.mark.parametrize("override, message", [
    ("--config.learning_rat=2", ("Unknown config field config.learning_rat in "
                                 "'--config.learning_rat=2'; the closest valid names are "
                                 "learning_rate.")),
    ("--config.bogus_field=1", ("Unknown config field config.bogus_field in "
                                "'--config.bogus_field=1'; see experiments/configs/common.py "
                                "for the fields.")),
    ("--config.batch_size.x=1", None),  # A field, but not a ConfigDict: the parser says so.
    ("--config.batch_size=1", None),
])
def test_unknown_config_field_is_named_with_the_closest_names(override, message):
  assert main.unknown_field_message(["main.py", SMOKE, override]) == message


def test_unknown_config_field_exits_with_one_line():
  completed = subprocess.run(
      [sys.executable, "-m", "experiments.main", SMOKE, "--workdir=/nonexistent/never/written",
       "--config.batch_sizes=64"], cwd=REPO, capture_output=True, text=True, timeout=120,
      check=False)
  assert completed.returncode == 2
  [line] = completed.stderr.strip().splitlines()
  assert line.endswith(
      "error: Unknown config field config.batch_sizes in '--config.batch_sizes=64'; the closest "
      "valid names are batch_size, eval_batch_size, image_size.")


def test_failed_save_after_an_error_is_reported_as_failed(tmp_path, caplog, monkeypatch):
  """The old trainer logged "saved the checkpoint of step 50" when the disk was full."""
  checkpoints = Checkpoints(tmp_path / "checkpoints")
  checkpoints.save(1, state_of(1.0))

  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(checkpoints._manager, "save", no_space)
  with caplog.at_level(logging.WARNING, logger="experiments"):
    train._save_after_error(checkpoints, DivergenceGuard("stop"), 3, state_of(3.0),
                            RuntimeError("data source failed"), saved_step=1)
  checkpoints.close()
  assert "saved the checkpoint" not in caplog.text
  assert ("Stopped by RuntimeError: data source failed; could not save step 3 (SaveError: Could "
          "not save the checkpoint of step 3") in caplog.text
  assert "the last checkpoint is step 1" in caplog.text


def run_smoke(workdir, *overrides, timeout=300):
  return subprocess.run([sys.executable, "-m", "experiments.main", SMOKE, f"--workdir={workdir}",
                         "--config.progress_bar=False", *overrides], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_an_unusable_workdir_is_one_line_and_status_1(tmp_path, where):
  (tmp_path / "f").touch()
  workdir = {"a file": tmp_path / "f", "under a file": tmp_path / "f" / "w",
             "read-only": tmp_path / "ro" / "w"}[where]
  if where == "read-only":
    (tmp_path / "ro").mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs",
                              str(tmp_path / "ro")], capture_output=True, check=False)
    if mounted.returncode:
      (tmp_path / "ro").chmod(0o500)  # Not root: a folder without write permission.
  try:
    completed = run_smoke(workdir)
  finally:
    if where == "read-only":
      subprocess.run(["umount", "-l", str(tmp_path / "ro")], capture_output=True, check=False)
  assert completed.returncode == 1
  [line] = completed.stderr.strip().splitlines()
  expected = {"a file": f"The workdir {workdir} is a file, not a folder",
              "under a file": f"The workdir {workdir} cannot be created: {tmp_path / 'f'} is a "
                              "file, not a folder",
              "read-only": f"The workdir {workdir} is not writable ({tmp_path / 'ro'}, where it "
                           "would be created)"}[where]
  assert line.endswith(f"{expected}; choose another --workdir.")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_exits_75_with_one_line(tmp_path, signum):
  """Before the training loop (here: importing JAX) there is nothing to save; 75 says rerun."""
  process = subprocess.Popen([sys.executable, "-m", "experiments.main", SMOKE,
                              f"--workdir={tmp_path / 'w'}"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(1.5)
  process.send_signal(signum)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == 75
  assert stderr.strip().splitlines() == [
      f"Stopped by {signal.Signals(signum).name} outside the training loop (while starting up or "
      "finishing): there was nothing to save. Rerun the same command to resume."]
  WorkdirLock(tmp_path / "w").acquire()  # The rerun can take the workdir.


def test_a_save_on_a_full_disk_says_why_in_one_line(tmp_path, small_disk):
  """The reason and the path, without the 141 lines of the libraries' tracebacks."""
  if small_disk is None:
    pytest.skip("mounting a small tmpfs needs root")
  workdir = small_disk / "w"
  # The first checkpoint fits on the 1 MiB disk, the second does not.
  completed = run_smoke(workdir, "--config.num_train_steps=3", "--config.checkpoint_every_steps=1",
                        "--config.eval_every_steps=3", "--config.bn_recompute_batches=0")
  assert completed.returncode == 1
  assert "Traceback" not in completed.stderr
  last = completed.stderr.strip().splitlines()[-1]
  expected = (f"Could not save the checkpoint of step 2: No space left on device (writing "
              f"{workdir / 'checkpoints'}). The earlier checkpoints [1] are kept.")
  # The reports share the full disk: the message names their file only if they got into it.
  errors = workdir / "errors.log"
  if errors.exists() and errors.read_text():
    assert "RESOURCE_EXHAUSTED" in errors.read_text()
    expected += f" The libraries' reports: {errors}."
  assert last.endswith(expected)


@pytest.fixture
def console_loggers():
  """Puts :data:`console.LOGGERS` back as they were after the test."""
  loggers = [logging.getLogger(name) for name in console.LOGGERS]
  saved = [(list(g.handlers), g.level, g.propagate) for g in loggers]
  yield
  for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.mark.usefixtures("console_loggers")
def test_console_lines_are_bare_messages_and_warnings_stay_visible():
  """absl's handler headed the eval and resume lines with
  ``I1203 09:04:55.426517 ... train.py:418]``."""
  stream = io.StringIO()
  console.configure(stream)
  console.configure(stream)  # Again: still one handler, each line once.
  logging.getLogger("experiments.train").info("step %d: eval accuracy %.4f", 10, 0.5)
  logging.getLogger("experiments.train").debug("not shown")
  logging.getLogger("experiments.main").warning("a warning")
  logging.getLogger("adderjax.ops.cpu_native").info("Building the native CPU kernels")
  assert stream.getvalue().splitlines() == [
      "step 10: eval accuracy 0.5000", "a warning", "Building the native CPU kernels"]


def finished_workdir(workdir, step=20):
  """A workdir whose run ended at ``step``: its last checkpoint and evaluation, as a run leaves
  them."""
  (workdir / "checkpoints" / str(step)).mkdir(parents=True)
  (workdir / "checkpoints" / str(step) / finished.DIGEST_FILE).write_text('{"files": {}}')
  records = [{"step": step, "time": 0.0, "train_loss": 0.3},
             {"step": step, "time": 0.0, "eval_accuracy": 0.875, "eval_examples": 320,
              "eval_loss": 0.25}]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return workdir


def test_rerunning_a_finished_run_says_so_at_once(tmp_path):
  """It took 30 s (data, compilation, an evaluation) and reported ``train_seconds=5.351``."""
  workdir = finished_workdir(tmp_path / "w")
  start = time.monotonic()
  completed = run_smoke(workdir, timeout=60)
  seconds = time.monotonic() - start
  assert completed.returncode == 0, completed.stderr
  assert completed.stderr.splitlines() == [
      f"Nothing to do: the checkpoint of step 20 in {workdir} is already the last of 20 steps. "
      "Its evaluation (metrics.jsonl): eval_accuracy=0.875, eval_examples=320, eval_loss=0.25."]
  assert seconds < 5, seconds  # Before JAX is imported.
  assert not (workdir / "process_0.lock").exists()  # Nothing written.
  # More steps: not finished, the trainer resumes (not run here).
  assert finished.final_checkpoint_step(workdir, 21) is None
  assert finished.DIGEST_FILE == DIGEST_FILE


def test_a_locked_workdir_is_said_before_the_slow_imports(tmp_path):
  """The lock message came after 11 s of imports."""
  holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "locked\n"
    start = time.monotonic()
    completed = run_smoke(tmp_path, timeout=60)
    seconds = time.monotonic() - start
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert completed.returncode == 1
  assert completed.stderr.splitlines() == [
      f"The workdir {tmp_path} is in use by another run (process id {holder.pid}, lock "
      "process_0.lock); wait for it to end or choose another --workdir."]
  assert seconds < 2, seconds

"""The command line: one-line messages for unknown config fields and for failed runs."""

import errno
import logging
import subprocess
import sys

import pytest

from experiments import main, train
from experiments.checkpoints import Checkpoints
from experiments.guards import DivergenceGuard

from .test_checkpoints import state_of
from .test_train import REPO

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

"""Checkpoints: digests, damaged checkpoints moved aside with a fallback, failed saves."""

import errno
import json
import logging
import shutil

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.checkpoints import DIGEST_FILE, CheckpointError, Checkpoints, SaveError

from .conftest import fill

NOISE = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)


def state_of(value):
  """A small state; random values, so the files are not compressed away."""
  return {"params": {"w": jnp.asarray(NOISE + value), "b": jnp.arange(8.0) + value},
          "count": jnp.int32(0 if np.isnan(value) else value)}


def assert_state(state, value):
  np.testing.assert_array_equal(state["params"]["w"], NOISE + np.float32(value))
  np.testing.assert_array_equal(state["params"]["b"], np.arange(8.0) + value)
  assert int(state["count"]) == value


def saved(directory, *values, keep=3):
  """Checkpoints of steps 1, 2, ... holding ``state_of(value)``."""
  checkpoints = Checkpoints(directory, keep=keep)
  for step, value in enumerate(values, 1):
    checkpoints.save(step, state_of(value))
  checkpoints.close()


def data_files(step_dir):
  """The array data files of a checkpoint, largest first."""
  files = [p for p in (step_dir / "default").rglob("*") if p.is_file() and p.parent.name == "d"]
  return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def truncate(step_dir):
  path = data_files(step_dir)[0]
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def remove_a_file(step_dir):
  data_files(step_dir)[0].unlink()


def empty_the_folder(step_dir):
  shutil.rmtree(step_dir)
  step_dir.mkdir()


def remove_the_manifest(step_dir):
  (step_dir / "default" / "manifest.ocdbt").unlink()


def flip_a_bit(step_dir):
  path = data_files(step_dir)[0]
  content = bytearray(path.read_bytes())
  content[len(content) // 2] ^= 0x10
  path.write_bytes(bytes(content))


def truncate_without_digest(step_dir):
  (step_dir / DIGEST_FILE).unlink()
  truncate(step_dir)


DAMAGE = {
    "truncated": (truncate, "differ from the digest"),
    "missing file": (remove_a_file, "file(s) are missing"),
    "empty folder": (empty_the_folder, "its folder is empty"),
    "missing manifest": (remove_the_manifest, "file(s) are missing, e.g. default/manifest.ocdbt"),
    "bit flip": (flip_a_bit, "differ from the digest"),
    "truncated, no digest": (truncate_without_digest, "it cannot be restored"),
}


def test_each_save_writes_a_digest_of_its_files(tmp_path):
  saved(tmp_path, 1.0)
  digest = json.loads((tmp_path / "1" / DIGEST_FILE).read_text())
  files = {p.relative_to(tmp_path / "1").as_posix() for p in (tmp_path / "1").rglob("*")
           if p.is_file() and p.name != DIGEST_FILE}
  assert digest["step"] == 1 and set(digest["files"]) == files
  assert all(len(h) == 64 for h in digest["files"].values())


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_restored(
    tmp_path, caplog, damage):
  directory = tmp_path / "checkpoints"
  saved(directory, 1.0, 2.0)
  damage_fn, reason = DAMAGE[damage]
  damage_fn(directory / "2")
  checkpoints = Checkpoints(directory)
  with caplog.at_level(logging.WARNING, logger="experiments"):
    step, state = checkpoints.restore_latest(state_of(0.0))
  assert step == 1
  assert_state(state, 1.0)
  [message] = [r.getMessage() for r in caplog.records if r.name == "experiments.checkpoints"]
  assert message.startswith("Checkpoint 2 in ") and reason in message and "\n" not in message
  # Moved aside, not deleted; the next save may reuse step 2.
  [aside] = list((tmp_path / "checkpoints_damaged").iterdir())
  assert aside.name.startswith("2.") and f"moved to {aside}" in message
  assert checkpoints.all_steps() == [1]
  checkpoints.save(2, state_of(3.0))
  assert_state(checkpoints.restore_latest(state_of(0.0))[1], 3.0)
  checkpoints.close()


def test_checkpoint_with_non_finite_values_is_moved_aside(tmp_path, caplog):
  directory = tmp_path / "checkpoints"
  saved(directory, 1.0, np.nan)  # As an older version could have saved a diverged run.
  checkpoints = Checkpoints(directory)
  with caplog.at_level(logging.WARNING, logger="experiments"):
    step, state = checkpoints.restore_latest(state_of(0.0))
  checkpoints.close()
  assert step == 1
  assert_state(state, 1.0)
  assert "Checkpoint 2 in" in caplog.text and "non-finite values" in caplog.text


def test_no_good_checkpoint_is_an_error_and_nothing_is_moved(tmp_path):
  directory = tmp_path / "checkpoints"
  saved(directory, 1.0, 2.0)
  flip_a_bit(directory / "1")
  remove_the_manifest(directory / "2")
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  checkpoints = Checkpoints(directory)
  with pytest.raises(CheckpointError, match=r"No checkpoint in .* can be restored: step 2: .*"
                     r"manifest.ocdbt; step 1: .*differ from the digest.*Nothing was moved"):
    checkpoints.restore_latest(state_of(0.0))
  checkpoints.close()
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_no_checkpoint_restores_nothing(tmp_path):
  checkpoints = Checkpoints(tmp_path)
  like = state_of(5.0)
  assert checkpoints.restore_latest(like) == (None, like)
  checkpoints.close()


def test_failed_save_says_so_and_keeps_the_earlier_checkpoints(tmp_path, small_disk,
                                                               monkeypatch):
  directory = (small_disk or tmp_path) / "checkpoints"
  checkpoints = Checkpoints(directory)
  checkpoints.save(1, state_of(1.0))
  if small_disk is not None:
    fill(small_disk)
  else:  # Not root: a write error as the disk would give it.
    def no_space(*args, **kwargs):
      raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ocp.CheckpointManager, "save", no_space)
  with pytest.raises(SaveError) as raised:
    checkpoints.save(2, state_of(2.0))
  # The reason first (not cut off behind TensorStore's paths), then where.
  assert str(raised.value) == (f"Could not save the checkpoint of step 2: No space left on "
                               f"device (writing {directory}). The earlier checkpoints [1] are "
                               "kept.")
  if small_disk is not None:
    (small_disk / "filler").unlink()
  monkeypatch.undo()
  checkpoints.close()
  checkpoints = Checkpoints(directory)
  step, state = checkpoints.restore_latest(state_of(0.0))
  checkpoints.close()
  assert step == 1
  assert_state(state, 1.0)


def test_a_step_damaged_twice_is_kept_twice(tmp_path):
  directory = tmp_path / "checkpoints"
  saved(directory, 1.0, 2.0)
  checkpoints = Checkpoints(directory)
  for value in (2.0, 3.0):
    flip_a_bit(directory / "2")
    assert checkpoints.restore_latest(state_of(0.0))[0] == 1
    checkpoints.save(2, state_of(value))
  checkpoints.close()
  aside = sorted(p.name for p in (tmp_path / "checkpoints_damaged").iterdir())
  assert len(aside) == 2 and all(name.startswith("2.") for name in aside)

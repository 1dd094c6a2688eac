"""One run per workdir: the lock, its message, its release when the holder dies."""

import os
import signal
import subprocess
import sys

import pytest

from experiments import train
from experiments.workdir_lock import WorkdirError, WorkdirLock, WorkdirLocked, check_workdir

from .test_train import REPO, smoke_config

HOLD = """
import sys, time
from experiments.workdir_lock import WorkdirLock
lock = WorkdirLock(sys.argv[1], process_index=0)
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_second_run_on_a_workdir_exits_at_once_naming_it_and_the_holder(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "locked\n"
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(WorkdirLocked, match=rf"The workdir {tmp_path} is in use by another run "
                       rf"\(process id {holder.pid}, lock process_0.lock\)"):
      train.train_and_evaluate(smoke_config(), tmp_path)
    assert sorted(tmp_path.rglob("*")) == before  # Nothing written.
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The kernel released the killed holder's lock.
  with WorkdirLock(tmp_path) as lock:
    assert lock.path.read_text() == f"{os.getpid()}\n"


def test_processes_of_one_run_lock_only_their_own_file(tmp_path):
  with (WorkdirLock(tmp_path, process_index=0), WorkdirLock(tmp_path, process_index=1),
        pytest.raises(WorkdirLocked, match="lock process_1.lock")):
    WorkdirLock(tmp_path, process_index=1).acquire()
  WorkdirLock(tmp_path, process_index=1).acquire()


def test_a_workdir_that_is_a_file_is_named_before_anything_is_read(tmp_path):
  (tmp_path / "f").touch()
  with pytest.raises(WorkdirError, match=f"The workdir {tmp_path / 'f'} is a file, not a folder"):
    train.train_and_evaluate(smoke_config(), tmp_path / "f")
  with pytest.raises(WorkdirError, match=f"cannot be created: {tmp_path / 'f'} is a file"):
    check_workdir(tmp_path / "f" / "a" / "b")
  check_workdir(tmp_path / "new" / "run")  # Can be made: fine, and nothing is written.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_a_lock_that_cannot_be_created_is_a_workdir_error(tmp_path):
  (tmp_path / "f").touch()
  with pytest.raises(WorkdirError, match=r"cannot be used: (Not a directory|File exists)"):
    WorkdirLock(tmp_path / "f").acquire()

"""The preemption watch of a single process: SIGTERM and SIGINT ask to stop at the next step."""

import os
import signal

import pytest

from experiments.preemption import Preempted, PreemptionWatch


def never(step):
  raise AssertionError("a single process needs no sync point")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_asks_to_stop_and_handlers_are_restored(signum):
  before = signal.getsignal(signum)
  with PreemptionWatch(never) as preemption:
    assert not preemption.reached(1)
    os.kill(os.getpid(), signum)
    assert preemption.reached(2) and preemption.signal == signum
  assert signal.getsignal(signum) is before


def test_second_ctrl_c_interrupts_at_once():
  with PreemptionWatch(never) as preemption:
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
    assert preemption.reached(3)


def test_preempted_names_the_saved_step():
  error = Preempted(12, "/runs/a")
  assert error.step == 12
  assert str(error) == ("Preempted: saved the checkpoint of step 12 in /runs/a; rerun the same "
                        "command to resume from it.")

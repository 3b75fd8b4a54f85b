"""The SIGTERM guard outside the training loop: a Preempted that Python
drops (raised inside a finalizer) is raised again at the next phase."""

import os
import signal
import time

import pytest

from trainer.persistence import preemption

# The dropped Preempted is what these tests make: Python prints it from the
# finalizer and pytest reports that as a warning.
pytestmark = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')


@pytest.fixture
def guard():
  old = signal.getsignal(signal.SIGTERM)
  preemption.install_guard()
  yield
  signal.signal(signal.SIGTERM, old)
  preemption._pending.clear()  # pylint: disable=protected-access
  preemption.set_phase('start-up')


class SigtermWhenCollected:

  def __del__(self):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)  # The guard runs here, inside __del__: its raise dropped.


def test_a_sigterm_dropped_in_a_finalizer_is_raised_at_the_next_phase(guard):
  del guard
  preemption.set_phase('restore')
  SigtermWhenCollected()  # Collected at once; Python prints and drops it.
  with pytest.raises(preemption.Preempted, match='during restore'):
    preemption.set_phase('the final evaluation')


def test_a_sigterm_dropped_before_training_stops_it_at_the_start(guard):
  del guard
  SigtermWhenCollected()
  with pytest.raises(preemption.Preempted, match='during start-up'):
    with preemption.SigtermWatcher(lambda: None):
      pytest.fail('training started after a SIGTERM')

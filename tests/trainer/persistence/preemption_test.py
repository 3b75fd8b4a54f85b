"""The SIGTERM guard outside the training loop: a Preempted that Python
drops (raised inside a finalizer) is raised again at the next phase, and
not printed where it was dropped."""

import os
import signal
import sys
import time
import warnings

import pytest

from trainer.persistence import preemption


class SigtermWhenCollected:

  def __del__(self):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)  # The guard runs here, inside __del__: its raise dropped.


def test_a_sigterm_dropped_in_a_finalizer_is_raised_at_the_next_phase(
    sigterm_guard, capfd):
  del sigterm_guard
  preemption.set_phase('restore')
  with warnings.catch_warnings():
    # pytest reports an exception Python dropped as this warning.
    warnings.simplefilter('error', pytest.PytestUnraisableExceptionWarning)
    SigtermWhenCollected()  # Collected at once; Python drops the raise.
  assert 'Exception ignored' not in capfd.readouterr().err
  with pytest.raises(preemption.Preempted, match='during restore'):
    preemption.set_phase('the final evaluation')


def test_installing_the_guard_again_wraps_the_unraisable_hook_once(
    sigterm_guard):
  del sigterm_guard
  hook = sys.unraisablehook
  preemption.install_guard()
  assert sys.unraisablehook is hook


def test_a_sigterm_dropped_before_training_stops_it_at_the_start(
    sigterm_guard):
  del sigterm_guard
  SigtermWhenCollected()
  with pytest.raises(preemption.Preempted, match='during start-up'):
    with preemption.SigtermWatcher(lambda: None):
      pytest.fail('training started after a SIGTERM')

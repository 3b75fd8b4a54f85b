"""Test session set-up: 4 logical CPUs, made before TensorFlow starts.

Multi-replica tests run MirroredStrategy over the first 1, 2, 3 or 4 of them
(the way Keras' own distribute tests run without accelerators).
"""

import os
import signal
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

# pylint: disable=wrong-import-position
import pytest  # noqa: E402

from trainer.cluster import strategies  # noqa: E402

NUM_CPU_DEVICES = 4
strategies.configure_cpu_devices(NUM_CPU_DEVICES)


@pytest.fixture(name='sigterm_guard')
def fixture_sigterm_guard():
  """main.py's SIGTERM and SIGINT guard, installed outside any training loop's watcher
  and taken down after the test."""
  # pylint: disable=import-outside-toplevel,protected-access
  from trainer.persistence import preemption
  old = {s: signal.getsignal(s) for s in preemption.SIGNALS}
  old_hook = sys.unraisablehook
  preemption.install_guard()
  yield
  for signum, handler in old.items():
    signal.signal(signum, handler)
  sys.unraisablehook = old_hook
  preemption.uninstall_guard()
  preemption._pending.clear()
  preemption.set_phase('start-up')

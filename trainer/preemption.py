"""SIGTERM -> stop after the step in flight, save, exit with status 42.

Cluster managers (Kubernetes, Slurm, GCE preemption) send SIGTERM and wait a
grace period before SIGKILL. The training loop runs inside one tf.function of
up to `steps_per_loop` steps, during which Python runs no signal handler in
the main thread. So Python's signal wake-up fd is pointed at a socket that a
watcher thread reads: the thread runs while the tf.function does (TensorFlow
releases the GIL) and sets the trainer's `stop_requested` variable, which the
replica step reads every step. The step's all-reduce makes every replica and
worker stop after the same step.
"""

import signal
import socket
import threading

from absl import logging

# The exit status of a preempted run: TensorFlow's PreemptionCheckpointHandler
# uses the same, so job managers configured for it restart the job.
EXIT_CODE = 42


class Preempted(Exception):
  """Raised by the controller once the preemption checkpoint is saved."""

  def __init__(self, step: int, path: str):
    super().__init__(f'preempted by SIGTERM: saved {path} at step {step}; '
                     f'exiting with status {EXIT_CODE} so the job is '
                     'restarted and resumes from it')
    self.step = step
    self.path = path


class SigtermWatcher:
  """Context manager: while active, SIGTERM calls `on_sigterm` from a thread.

  Must be entered in the main thread (Python installs signal handlers only
  there). `requested` is True once a SIGTERM has arrived.
  """

  def __init__(self, on_sigterm):
    self._on_sigterm = on_sigterm
    self.requested = False
    self._old_handler = None
    self._old_fd = None
    self._thread = None
    self._reader = self._writer = None

  def __enter__(self):
    self._reader, self._writer = socket.socketpair()
    self._writer.setblocking(False)
    self._old_fd = signal.set_wakeup_fd(self._writer.fileno(),
                                        warn_on_full_buffer=False)
    self._old_handler = signal.signal(signal.SIGTERM, self._handler)
    self._thread = threading.Thread(target=self._watch, daemon=True,
                                    name='sigterm-watcher')
    self._thread.start()
    return self

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._old_handler)
    signal.set_wakeup_fd(self._old_fd)
    self._writer.close()  # Ends the watcher's recv.
    self._thread.join(timeout=5)
    self._reader.close()
    return False

  def _handler(self, signum, frame):  # Main thread, between Python bytecodes.
    del signum, frame
    self._trigger()

  def _watch(self):
    while True:
      try:
        data = self._reader.recv(64)
      except OSError:
        return
      if not data:
        return
      if signal.SIGTERM in data:
        self._trigger()

  def _trigger(self):
    if not self.requested:
      self.requested = True
      logging.warning('SIGTERM received: stopping after the step in flight '
                      'to save a checkpoint')
      self._on_sigterm()

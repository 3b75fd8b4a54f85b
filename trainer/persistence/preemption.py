"""SIGTERM -> stop after the step in flight, save, exit with a retryable status.

Cluster managers (Kubernetes, Slurm, GCE preemption) send SIGTERM and wait a
grace period before SIGKILL. A SIGTERM at any moment is a preemption:
`install_guard`, called first thing by main.py (before TensorFlow is even
imported), makes SIGTERM outside the training loop - start-up, restore, the
first trace, the final eval, export - raise `Preempted` in the main thread:
there is no progress since the last checkpoint to save then, so the run
exits at once with the retryable status. During training the controller's
`SigtermWatcher` takes over. The training loop runs inside one tf.function of
up to `steps_per_loop` steps, during which Python runs no signal handler in
the main thread. So Python's signal wake-up fd is pointed at a socket that a
watcher thread reads: the thread runs while the tf.function does (TensorFlow
releases the GIL) and sets the trainer's `stop_requested` variable, which the
replica step reads every step. The step's all-reduce makes every replica and
worker stop after the same step.
"""

import signal
import socket
import sys
import threading

from absl import logging

# The exit status of a preempted run: TensorFlow's PreemptionCheckpointHandler
# uses the same, so job managers configured for it restart the job
# (--retryable_exit_code changes it, e.g. for Kubeflow's TFJob).
EXIT_CODE = 42


class Preempted(Exception):
  """A SIGTERM ended the run; raised once anything to save is saved.

  Args:
    step: the step saved, or None: SIGTERM came outside training, where
      there was nothing new to save.
    path: the checkpoint written, or None.
    phase: where the run was, for the message.
  """

  def __init__(self, step=None, path=None, phase: str = 'training'):
    if path:
      what = f'saved {path} at step {step}'
    else:
      what = 'nothing new to save since the last checkpoint'
    super().__init__(f'preempted by SIGTERM during {phase}: {what}; the '
                     'job is to be restarted and resume from the newest '
                     'checkpoint')
    self.step, self.path, self.phase = step, path, phase


_phase = ['start-up']
# The phase of a SIGTERM the guard raised Preempted for. Python runs a
# signal handler between any two bytecodes, also inside a finalizer or a
# weakref callback, where an exception is printed and dropped: the next
# set_phase (or training's start) raises it again.
_pending = []


def set_phase(phase: str) -> None:
  """Names where the run is (start-up, restore, evaluation...) for the
  message of a SIGTERM that arrives there.

  Raises:
    Preempted: a SIGTERM arrived earlier and its Preempted was dropped.
  """
  raise_pending()
  _phase[0] = phase


def raise_pending() -> None:
  """Raises the Preempted of a SIGTERM whose first raise was dropped."""
  if _pending:
    raise Preempted(phase=_pending[0])


def install_guard() -> None:
  """From now on, SIGTERM outside the training loop raises Preempted in
  the main thread (call in the main thread, as early as possible)."""
  def guard(signum, frame):
    del signum, frame
    logging.warning('SIGTERM received during %s', _phase[0])
    _pending[:] = [_phase[0]]
    raise Preempted(phase=_phase[0])
  signal.signal(signal.SIGTERM, guard)
  if getattr(sys.unraisablehook, 'hides_preempted', False):
    return  # Installed by an earlier call: wrap the hook once only.
  print_unraisable = sys.unraisablehook

  def unraisable(dropped):
    # A dropped Preempted is raised again (_pending): print no traceback.
    if not isinstance(dropped.exc_value, Preempted):
      print_unraisable(dropped)
  unraisable.hides_preempted = True
  sys.unraisablehook = unraisable


class SigtermWatcher:
  """Context manager: while active, SIGTERM calls `on_sigterm` from a thread.

  Must be entered in the main thread (Python installs signal handlers only
  there). `requested` is True once a SIGTERM has arrived.
  """

  def __init__(self, on_sigterm):
    self._on_sigterm = on_sigterm
    self._signalled = False  # Set by the handler, in the main thread.
    self._triggered = False  # Set by the watcher thread.
    self._old_handler = None
    self._old_fd = None
    self._thread = None
    self._reader = self._writer = None

  def __enter__(self):
    raise_pending()
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

  @property
  def requested(self) -> bool:
    return self._signalled or self._triggered

  def _handler(self, signum, frame):
    # Runs in the main thread between any two Python bytecodes, possibly
    # while a step is being traced (in a replica context, inside a graph),
    # so it only marks the request for the main thread's next check: the
    # same signal wakes the watcher thread through the wakeup fd, and
    # `_trigger` runs there, outside any graph.
    del signum, frame
    self._signalled = True

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
    if not self._triggered:
      self._triggered = True
      logging.warning('SIGTERM received: stopping after the step in flight '
                      'to save a checkpoint')
      self._on_sigterm()

"""SIGTERM -> stop after the step in flight, save, exit with a retryable status.

Cluster managers (Kubernetes, Slurm, GCE preemption) send SIGTERM and wait a
grace period before SIGKILL. A SIGTERM at any moment is a preemption:
`install_guard`, called first thing by main.py (before TensorFlow is even
imported), makes SIGTERM outside the training loop - start-up, restore, the
first trace, the final eval, export - raise `Preempted` in the main thread:
there is no progress since the last checkpoint to save then, so the run
exits at once with the retryable status. During training the controller's
`SignalWatcher` takes over. The training loop runs inside one tf.function of
up to `steps_per_loop` steps, during which Python runs no signal handler in
the main thread. So Python's signal wake-up fd is pointed at a socket that a
watcher thread reads: the thread runs while the tf.function does (TensorFlow
releases the GIL) and sets the trainer's `stop_requested` variable, which the
replica step reads every step. The step's all-reduce makes every replica and
worker stop after the same step.

SIGINT (Ctrl-C) is handled the same way, with its own message and exit
status 130 (the shell's for Ctrl-C): the run saves and stops instead of
dying with a traceback. A second SIGINT during training exits at once
without waiting for the save (a job stuck on a lost worker, say).
"""

import signal
import socket
import sys
import threading
import time

from absl import logging

from trainer import errors

# The exit status of a preempted run: TensorFlow's PreemptionCheckpointHandler
# uses the same, so job managers configured for it restart the job
# (--retryable_exit_code changes it, e.g. for Kubeflow's TFJob).
EXIT_CODE = 42


# Ctrl-C: the shell's status for a process ended by SIGINT.
INTERRUPTED_EXIT_CODE = 130
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(BaseException):
  """A SIGTERM (or SIGINT) ended the run; raised once anything to save is
  saved.

  A BaseException, like KeyboardInterrupt: the handlers that turn any error
  of a user's code into a one-line `UserError` (exit 2, never retried) must
  let a preemption through.

  Args:
    step: the step saved, or None: the signal came outside training, where
      there was nothing new to save.
    path: the checkpoint written, or None.
    phase: where the run was, for the message.
    signum: the signal; SIGINT is an interruption by hand (Ctrl-C). None:
      SIGTERM; 0: no signal here, another worker's.
  """

  def __init__(self, step=None, path=None, phase: str = 'training',
               signum=None):
    if path:
      what = f'saved {path} at step {step}'
    else:
      what = 'nothing new to save since the last checkpoint'
    if signum == signal.SIGINT:
      message = (f'interrupted by SIGINT (Ctrl-C) during {phase}: ' + (
          f'saved {path} at step {step}; run the same command to resume '
          'from it' if path else 'no training progress was lost'))
    elif signum == 0:  # Stopped by the signal of another worker.
      message = (f'stopped during {phase} with the other workers, one of '
                 f'which got SIGTERM or Ctrl-C: {what}; the job resumes '
                 'from the newest checkpoint when started again')
    else:
      message = (f'preempted by SIGTERM during {phase}: {what}; the job is '
                 'to be restarted and resume from the newest checkpoint')
    super().__init__(message)
    self.step, self.path, self.phase = step, path, phase
    self.signum = signum

  def exit_code(self, retryable_exit_code=None) -> int:
    """130 for Ctrl-C; else 42, or the job's retryable status."""
    if self.signum == signal.SIGINT:
      return INTERRUPTED_EXIT_CODE
    return retryable_exit_code or EXIT_CODE


class EvalStopped(Exception):
  """An evaluation left before the end of its split: a stop request
  (SIGTERM or Ctrl-C while training) arrived during it. Its numbers cover
  part of the split and are not reported."""


_phase = ['start-up']
# (phase, signal) of a signal the guard raised Preempted for. Python runs a
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
    raise Preempted(phase=_pending[0][0], signum=_pending[0][1])


# Seconds the main thread has to act on a signal outside training before
# the guard's thread exits the process: TensorFlow runs no Python signal
# handler while a tf.function runs (a whole evaluation is one call).
GRACE_SECS = 3.0
# installed: whether install_guard ran: this process is main.py's, whose
# Ctrl-C is ours (in any other, a notebook or pytest, SIGINT is left to
# Python); handled: signals the main thread has acted on; thread: the one
# that exits the process when it does not.
_guard = {'installed': False, 'deferred': False, 'handled': 0,
          'retryable_exit_code': None, 'thread': None}


def retryable_code_in(argv) -> int | None:
  """--retryable_exit_code=N or --retryable_exit_code N from raw argv
  (flags may not be parsed yet); the last one given, as absl takes."""
  value = ''
  for i, arg in enumerate(argv):
    if arg.startswith('--retryable_exit_code='):
      value = arg.split('=', 1)[1]
    elif arg == '--retryable_exit_code' and i + 1 < len(argv):
      value = argv[i + 1]
  return int(value) if value.isascii() and value.isdigit() else None


def exit_preempted(error: Preempted, retryable_exit_code=None):
  """Logs a Preempted error in one line and exits with its status."""
  code = error.exit_code(retryable_exit_code)
  logging.warning('%s (exit status %d)', error, code)
  logging.flush()
  errors.exit_now(code)


def set_retryable_exit_code(code) -> None:
  """The status a SIGTERM exits with when the guard's thread exits."""
  _guard['retryable_exit_code'] = code


def install_guard(defer: bool = False) -> None:
  """From now on, SIGTERM or SIGINT outside the training loop raises
  Preempted in the main thread, and SignalWatcher handles SIGINT too (call
  in the main thread, as early as possible). If the main thread does not
  get to it within GRACE_SECS (it is inside a long tf.function call, e.g.
  an evaluation), a thread exits the process with the same status: there
  is nothing to save outside training.

  defer: only note a signal until `stop_deferring()`, which raises it: for
  the module-level code before the caller's handler of Preempted.
  """
  _guard['installed'], _guard['deferred'] = True, defer
  def guard(signum, frame):
    del frame
    logging.warning('%s received during %s', signal.Signals(signum).name,
                    _phase[0])
    _pending[:] = [(_phase[0], signum)]
    if not _guard['deferred']:
      _guard['handled'] += 1
      raise Preempted(phase=_phase[0], signum=signum)
  for signum in SIGNALS:
    signal.signal(signum, guard)
  if _guard['thread'] is None:
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    _guard['thread'] = threading.Thread(
        target=_exit_if_stuck, args=(reader, writer), daemon=True,
        name='signal-guard')
    _guard['sockets'] = (reader, writer)
    _guard['thread'].start()
  if getattr(sys.unraisablehook, 'hides_preempted', False):
    return  # Installed by an earlier call: wrap the hook once only.
  print_unraisable = sys.unraisablehook

  def unraisable(dropped):
    # A dropped Preempted is raised again (_pending): print no traceback.
    if not isinstance(dropped.exc_value, Preempted):
      print_unraisable(dropped)
  unraisable.hides_preempted = True
  sys.unraisablehook = unraisable


def stop_deferring() -> None:
  """Signals raise Preempted from now on; one noted before raises now (if
  it is not raised within GRACE_SECS, the guard's thread exits)."""
  _guard['deferred'] = False
  if _pending:
    _guard['handled'] += 1
  raise_pending()


def uninstall_guard() -> None:
  """Undoes install_guard's thread and flags (for tests; the caller puts
  back its own signal handlers)."""
  _guard['installed'] = False
  if _guard['thread'] is not None:
    signal.set_wakeup_fd(-1)
    reader, writer = _guard.pop('sockets')
    writer.close()
    reader.shutdown(socket.SHUT_RDWR)
    _guard['thread'].join(timeout=5)
    reader.close()
    _guard['thread'] = None


def _exit_if_stuck(reader, writer):
  del writer  # Kept open (referenced) for as long as the guard is.
  received = 0
  while True:
    try:
      data = reader.recv(64)
    except OSError:
      return
    if not data:
      return
    for signum in data:
      if signum not in SIGNALS:
        continue
      received += 1
      deadline = time.monotonic() + GRACE_SECS
      while _guard['handled'] < received and time.monotonic() < deadline:
        time.sleep(0.05)
      if _guard['installed'] and _guard['handled'] < received:
        error = Preempted(phase=_phase[0], signum=signum)
        code = error.exit_code(_guard['retryable_exit_code'])
        logging.warning('%s received during %s, which TensorFlow does not '
                        'interrupt: exiting now', signal.Signals(signum).name,
                        _phase[0])
        logging.warning('%s (exit status %d)', error, code)
        logging.flush()
        errors.exit_now(code)


class SignalWatcher:
  """Context manager: while active, SIGTERM (and in main.py's process,
  SIGINT) calls `on_signal` from a thread (once); a SIGINT after that exits
  the process at once.

  Must be entered in the main thread (Python installs signal handlers only
  there). `requested` is True once either signal has arrived, `signum` is
  the first one.
  """

  def __init__(self, on_signal):
    self._on_signal = on_signal
    self._signalled = None  # Set by the handler, in the main thread.
    self._triggered = None  # Set by the watcher thread.
    self._old_handlers = {}
    self._old_fd = None
    self._thread = None
    self._reader = self._writer = None

  def __enter__(self):
    raise_pending()
    self._reader, self._writer = socket.socketpair()
    self._writer.setblocking(False)
    self._old_fd = signal.set_wakeup_fd(self._writer.fileno(),
                                        warn_on_full_buffer=False)
    signals = SIGNALS if _guard['installed'] else (signal.SIGTERM,)
    self._old_handlers = {s: signal.signal(s, self._handler) for s in signals}
    self._thread = threading.Thread(target=self._watch, daemon=True,
                                    name='signal-watcher')
    self._thread.start()
    return self

  def __exit__(self, *exc):
    for signum, handler in self._old_handlers.items():
      signal.signal(signum, handler)
    signal.set_wakeup_fd(self._old_fd)
    self._writer.close()  # Ends the watcher's recv.
    self._thread.join(timeout=5)
    self._reader.close()
    return False

  @property
  def requested(self) -> bool:
    return bool(self._signalled or self._triggered)

  @property
  def signum(self):
    """The first signal received (SIGTERM or SIGINT), or None."""
    return self._triggered or self._signalled

  def _handler(self, signum, frame):
    # Runs in the main thread between any two Python bytecodes, possibly
    # while a step is being traced (in a replica context, inside a graph),
    # so it only marks the request for the main thread's next check: the
    # same signal wakes the watcher thread through the wakeup fd, and
    # `_trigger` runs there, outside any graph.
    del frame
    self._signalled = self._signalled or signum

  def _watch(self):
    while True:
      try:
        data = self._reader.recv(64)
      except OSError:
        return
      if not data:
        return
      for signum in data:
        if signum in self._old_handlers:
          self._trigger(signal.Signals(signum))

  def _trigger(self, signum):
    if self._triggered:
      if signum == signal.SIGINT:
        # "Now": the stop after the step in flight is taking too long.
        logging.error('SIGINT while stopping after %s: exiting now, without '
                      'waiting for the save (exit status %d)',
                      self._triggered.name, INTERRUPTED_EXIT_CODE)
        logging.flush()
        errors.exit_now(INTERRUPTED_EXIT_CODE)
      return
    self._triggered = signum
    logging.warning('%s received: stopping after the step in flight to save '
                    'a checkpoint%s', signum.name,
                    ' (Ctrl-C again: exit now without saving)'
                    if signum == signal.SIGINT else '')
    self._on_signal()

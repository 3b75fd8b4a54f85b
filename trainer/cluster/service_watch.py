"""A run through a tf.data service: checked before it starts, stopped
rather than hung when its dispatcher is gone.

`check` refuses a dispatcher that does not answer and --deterministic (the
service's order is not reproducible). A trainer reading through a tf.data service (config key data.service) waits
for its next batch as long as the dispatcher does not answer, logging one
'Failed to heartbeat to dispatcher' line a second, forever; a SIGTERM then
cannot finish the step in flight either. `DispatcherWatch` probes the
dispatcher's port from a thread of its own (the main thread is blocked in
TensorFlow) and, once nothing has answered for `timeout` seconds, prints
one `error:` line and ends the process with a retryable status, so that a
job manager restarts it and training resumes from the newest checkpoint.
The exit skips every `finally` of the main thread, so what must not outlive
the process (a non-chief worker's temporary directory) is passed as
`before_exit`.
A dispatcher that comes back within the timeout (restarted with --work_dir,
which keeps its jobs) costs nothing but the wait.
"""

from collections.abc import Callable
import socket
import sys
import threading
import time

from absl import logging

from trainer import errors
from trainer.errors import UserError


def check(address: str, *, deterministic: bool) -> None:
  """Refuses what the service cannot hold; warns of what it changes."""
  if deterministic:
    raise UserError(f'flag --deterministic with config key data.service='
                    f'{address!r}: the service hands out batches in the '
                    'order its workers finish them, so runs differ; drop '
                    'one of the two')
  host, _, port = address.removeprefix('grpc://').rpartition(':')
  try:
    socket.create_connection((host, int(port)), timeout=10).close()
  except OSError as e:
    raise UserError(f'config key data.service={address!r}: no dispatcher '
                    f'answers there ({e.strerror or e}); start one with '
                    'python -m input.data_service or fix the address') from e
  logging.warning('data.service=%s: the training input comes from the '
                  'tf.data service; its order is not reproducible, so a '
                  'resumed run goes on with other batches than the '
                  'interrupted one would have read (docs/cluster.md)', address)


class DispatcherWatch:
  """Probes `address` (grpc://HOST:PORT) every `interval` seconds until
  stopped; exits the process with `exit_code` after `timeout` seconds
  without an answer, once `before_exit()` has run."""

  def __init__(self, address: str, *, timeout: float, exit_code: int,
               before_exit: Callable[[], None] = lambda: None,
               interval: float = 2.0):
    host, _, port = address.removeprefix('grpc://').rpartition(':')
    try:  # Once: a name service outage later is not the dispatcher's.
      host = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[
          0][4][0]
    except OSError:
      pass  # Probed by name then; run.py already saw it answer.
    self._target = (host, int(port))
    self._address = address
    self._timeout = timeout
    self._exit_code = exit_code
    self._before_exit = before_exit
    self._interval = interval
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True,
                                    name='distloop-dispatcher-watch')
    self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    self._thread.join(timeout=2 * self._interval)

  def _answers(self) -> bool:
    try:
      socket.create_connection(self._target, timeout=self._interval).close()
      return True
    except OSError:
      return False

  def _watch(self) -> None:
    last_answer = time.monotonic()
    silent = False
    while not self._stop.wait(self._interval):
      if self._answers():
        if silent:
          logging.warning('tf.data service dispatcher %s answers again',
                          self._address)
        last_answer, silent = time.monotonic(), False
        continue
      if not silent:
        logging.warning('tf.data service dispatcher %s does not answer; '
                        'giving up after %gs (--cluster_timeout)',
                        self._address, self._timeout)
        silent = True
      if (time.monotonic() - last_answer > self._timeout and
          not self._stop.is_set()):
        print(f'error: config key data.service={self._address!r}: the '
              f'dispatcher has not answered for --cluster_timeout='
              f'{self._timeout:g}s; restart it (python -m '
              'input.data_service, with --work_dir to keep its jobs), '
              'training resumes from the newest checkpoint in --model_dir',
              file=sys.stderr, flush=True)
        try:
          self._before_exit()
        except Exception:  # pylint: disable=broad-except
          logging.exception('cleaning up before the exit failed')
        logging.flush()
        errors.exit_now(self._exit_code)

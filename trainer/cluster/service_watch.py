"""Stops a run whose tf.data service dispatcher is gone, instead of hanging.

A trainer reading through a tf.data service (config key data.service) waits
for its next batch as long as the dispatcher does not answer, logging one
'Failed to heartbeat to dispatcher' line a second, forever; a SIGTERM then
cannot finish the step in flight either. `DispatcherWatch` probes the
dispatcher's port from a thread of its own (the main thread is blocked in
TensorFlow) and, once nothing has answered for `timeout` seconds, prints
one `error:` line and ends the process with a retryable status, so that a
job manager restarts it and training resumes from the newest checkpoint.
A dispatcher that comes back within the timeout (restarted with --work_dir,
which keeps its jobs) costs nothing but the wait.
"""

import os
import socket
import sys
import threading
import time

from absl import logging


class DispatcherWatch:
  """Probes `address` (grpc://HOST:PORT) every `interval` seconds until
  stopped; exits the process with `exit_code` after `timeout` seconds
  without an answer."""

  def __init__(self, address: str, *, timeout: float, exit_code: int,
               interval: float = 2.0):
    host, _, port = address.removeprefix('grpc://').rpartition(':')
    self._target = (host, int(port))
    self._address = address
    self._timeout = timeout
    self._exit_code = exit_code
    self._interval = interval
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True,
                                    name='distloop-dispatcher-watch')
    self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()

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
      if time.monotonic() - last_answer > self._timeout:
        print(f'error: config key data.service={self._address!r}: the '
              f'dispatcher has not answered for --cluster_timeout='
              f'{self._timeout:g}s; restart it (python -m '
              'input.data_service, with --work_dir to keep its jobs), '
              'training resumes from the newest checkpoint in --model_dir',
              file=sys.stderr, flush=True)
        logging.flush()
        os._exit(self._exit_code)  # pylint: disable=protected-access

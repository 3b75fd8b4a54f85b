"""How main.py's process ends: flushed, without the interpreter's slow
shutdown, and together with the other workers of a cluster."""

import sys

from absl import logging
import tensorflow as tf

from trainer import errors


def exit_process(code: int, request) -> None:
  """Exits once everything is on disk and printed, without waiting for
  interpreter shutdown.

  By now checkpoints are written and summary writers closed. Left to itself,
  shutdown can take seconds (destroying a multi-device tf.data iterator waits
  for its threads), while a cluster's grace period runs after a SIGTERM.
  Multi-worker processes exit normally: TensorFlow's coordination service
  expects every task to pass its shutdown barrier, after `_leave_together`.
  `request`: main.py's (cli.RunRequest).
  """
  sys.stdout.flush()
  sys.stderr.flush()
  logging.flush()
  if request.strategy != 'multi_worker_mirrored':
    errors.exit_now(code)
  _leave_together(request.cluster_timeout)
  sys.exit(code)


def _leave_together(timeout: float) -> None:
  """Waits until every worker is here, i.e. done with its collectives.

  A collective can finish on one worker while a peer still fetches its last
  buffer from it: a worker that then exits (a preemption exits ~70 ms after
  the last step) breaks the peer's fetch, and the peer fails with 'connection
  lost' instead of saving and reporting its preemption. A worker reaches this
  barrier only once its own collectives are done. If a peer never arrives
  (it died), the barrier fails and this worker exits anyway.
  """
  # pylint: disable=g-import-not-at-top
  from tensorflow.python.eager import context
  try:
    context.context().wait_at_barrier('distloop_exit', int(timeout * 1000))
  except tf.errors.OpError as e:
    logging.warning('not every worker reached the end of the run (%s); '
                    'exiting anyway', str(e).splitlines()[0])

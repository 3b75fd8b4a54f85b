r"""Starts a tf.data service: a dispatcher and input workers on this machine.

An input-bound job moves its training pipeline (reading, decoding,
augmentation, batching) off the training hosts onto CPU machines that run
this command; the trainer names the dispatcher in its config:

  python -m input.data_service --port=5050 --workers=2
  python main.py --config=configs/cifar_resnet20.py \
      --config.data.service=grpc://127.0.0.1:5050

On more machines, start the dispatcher (`--workers=0`) on one and workers
on the others (`--dispatcher=HOST:5050 --workers=4 --host=THIS_HOST`).
It serves until SIGTERM or Ctrl-C and exits 0. It prints one line with the
dispatcher's address once it listens, and a line whenever the number of
pipeline tasks its workers run changes (a trainer's job starts a task on
every worker). docs/cluster.md says what the service does to a run.
"""

import os
import signal
import sys
import threading

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_integer('port', 5050, 'the dispatcher\'s port; 0: any free '
                     'port (the printed address says which)', lower_bound=0)
flags.DEFINE_integer('workers', 2, 'input workers to start in this process',
                     lower_bound=0)
flags.DEFINE_string('dispatcher', '', 'HOST:PORT of a running dispatcher: '
                    'start only workers for it; empty: start a dispatcher')
flags.DEFINE_string('host', '127.0.0.1', 'the name the trainers reach this '
                    'machine by: the workers tell the dispatcher HOST:PORT')
flags.DEFINE_string('work_dir', '', 'the dispatcher keeps its journal here '
                    'and recovers its jobs after a restart; empty: none')


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; this command takes only flags')
  if FLAGS.dispatcher and ':' not in FLAGS.dispatcher:
    _fail(f'flag --dispatcher={FLAGS.dispatcher!r} must be HOST:PORT')
  if FLAGS.dispatcher and not FLAGS.workers:
    _fail('flag --workers=0 with --dispatcher: nothing to start; pass '
          '--workers=N')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  service = tf.data.experimental.service
  stop = threading.Event()
  signal.signal(signal.SIGTERM, lambda *_: stop.set())
  signal.signal(signal.SIGINT, lambda *_: stop.set())
  dispatcher = None
  address = FLAGS.dispatcher
  try:
    if not address:
      dispatcher = service.DispatchServer(service.DispatcherConfig(
          port=FLAGS.port, work_dir=FLAGS.work_dir or None,
          fault_tolerant_mode=bool(FLAGS.work_dir)))
      address = f'{FLAGS.host}:{dispatcher.target.rpartition(":")[2]}'
    workers = [
        service.WorkerServer(service.WorkerConfig(
            dispatcher_address=address,
            worker_address=f'{FLAGS.host}:%port%'))
        for _ in range(FLAGS.workers)]
  except tf.errors.OpError as e:
    _fail(f'could not start the tf.data service (--port={FLAGS.port}, '
          f'--dispatcher={FLAGS.dispatcher!r}): {e.message.splitlines()[0]}; '
          'pick a free --port or a running dispatcher')
  print(f'tf.data service: dispatcher grpc://{address}, {len(workers)} '
        f'worker(s) in this process; train with '
        f'--config.data.service=grpc://{address}', flush=True)
  tasks = 0
  while not stop.wait(0.5):
    now = sum(worker._num_tasks() for worker in workers)  # pylint: disable=protected-access
    if now != tasks:
      print(f'tf.data service: {now} pipeline task(s) running on the '
            'workers', flush=True)
      tasks = now
  print('tf.data service: stopped', flush=True)
  # Not `del dispatcher, workers`: a server's shutdown waits for the requests
  # in flight, which a trainer still running keeps open for as long as it
  # lives. Nothing is lost by not waiting: the dispatcher's journal
  # (--work_dir) is written as it goes.
  os._exit(0)  # pylint: disable=protected-access


if __name__ == '__main__':
  app.run(main)

"""--strategy=parameter_server: the strategy on the chief, a server elsewhere.

Every task runs the same main.py command (as every replica of a Kubernetes
TFJob does) and TF_CONFIG says what it is:

  chief      builds ParameterServerStrategy and its ClusterCoordinator and
             runs the whole experiment; the inner loops go to the workers
             (trainer/coordinated.py)
  worker     starts its TensorFlow server and serves the chief's closures
  ps         starts its TensorFlow server and holds variables
  evaluator  --mode=continuous_eval, alone (trainer/experiment/cli.py)

A worker or ps task serves until it gets SIGTERM or SIGINT, then exits with
the preemption status (42, or --retryable_exit_code): it has nothing to
save, and a job manager should start it again. The chief tolerates a
worker that fails (its closures run on the others, and on the worker again
once it is back); a ps task that fails ends the chief's run with status 75
(trainer/cluster/failures.py), and a restarted chief resumes from the
newest checkpoint.

Variables are placed round-robin over the ps tasks, whole or, with
train.variable_shard_bytes, a large one as pieces of rows
(MaxSizePartitioner; trainer/parts/sharding.py makes Keras 3 train and
checkpoint them).
"""

import signal
import threading
import time

from absl import logging
import tensorflow as tf

from trainer.cluster import failures
from trainer.cluster import tf_config
from trainer.errors import UserError


def build_strategy(cluster_timeout: float, variable_shard_bytes: int = 0
                   ) -> tf.distribute.experimental.ParameterServerStrategy:
  """The chief's strategy, from TF_CONFIG (validated here first), once every
  worker and ps task serves. With `variable_shard_bytes` > 0 a variable
  larger than that is made of pieces of rows, each at most that size (as
  near as whole rows allow) and placed round-robin (parts/sharding.py).

  Raises:
    failures.ClusterError: a task did not serve within `cluster_timeout` s.
  """
  config = tf_config.from_environ(strategy='parameter_server')
  cluster = config['cluster']
  logging.info('TF_CONFIG: the chief of %d worker(s) and %d ps task(s)',
               len(cluster['worker']), len(cluster['ps']))
  failures.watch(config)
  _wait_for_servers(config, cluster_timeout)
  resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
  partitioner = RowPieces(variable_shard_bytes) if variable_shard_bytes else None
  return tf.distribute.experimental.ParameterServerStrategy(
      resolver, variable_partitioner=partitioner)


class RowPieces(tf.distribute.experimental.partitioners.Partitioner):
  """TensorFlow's MaxSizePartitioner, refusing what it would do badly.

  A piece holds whole rows: below one row's size MaxSizePartitioner makes a
  variable of every row, and near it nearly so (a million variables for a
  large embedding table). So a size below one row, or one that would cut a
  variable into more than MAX_PIECES, is refused. Keras swallows an error
  raised while a subclassed model builds itself, so the refusal is kept in
  `refused` too, for the Trainer to raise (parts/sharding.py).
  """

  MAX_PIECES = 1024

  def __init__(self, max_bytes: int):
    self.max_bytes = max_bytes
    self.refused = None
    self._pieces = tf.distribute.experimental.partitioners.MaxSizePartitioner(
        max_shard_bytes=max_bytes)

  def __call__(self, shape, dtype, axis=0):
    dtype = tf.as_dtype(dtype)
    row = shape[1:].num_elements() * dtype.size
    what = (f'config key train.variable_shard_bytes={self.max_bytes} cuts '
            f'a {shape.as_list()} {dtype.name} variable')
    if row > self.max_bytes:
      self.refused = UserError(
          f'{what} below one row ({row} bytes), and a piece holds whole '
          f'rows; set it to at least {row}, or 0 to keep variables whole')
      raise self.refused
    pieces = self._pieces(shape, dtype, axis)
    if pieces[0] > self.MAX_PIECES:
      rows = -(-shape[0] // self.MAX_PIECES)
      self.refused = UserError(
          f'{what} into {pieces[0]} pieces, more than {self.MAX_PIECES}; set '
          f'it to at least {rows * row} ({rows} rows), or 0 to keep '
          'variables whole')
      raise self.refused
    return pieces


def _wait_for_servers(config: dict, cluster_timeout: float) -> None:
  """Waits until every worker and ps address accepts a connection.

  TensorFlow's own connection (in the strategy's constructor) waits for a
  missing task forever, holding the GIL, so that not even SIGTERM is
  handled. Worker and ps tasks listen as soon as they start (`serve`), so
  unlike MultiWorkerMirroredStrategy's peers a TCP probe tells a task that
  has not started from one that has.
  """
  deadline = time.monotonic() + cluster_timeout
  missing = failures.unreachable_peers(config)
  if missing:
    logging.info('waiting for %s to serve (--cluster_timeout=%gs)',
                 failures.describe(missing, config), cluster_timeout)
  while missing:
    if time.monotonic() > deadline:
      raise failures.ClusterError(
          f'{failures.describe(missing, config)} did not serve within '
          f'--cluster_timeout={cluster_timeout:g}s; start every task of '
          'TF_CONFIG\'s cluster (each runs the same command), check that '
          'this host can reach its address, or raise --cluster_timeout')
    time.sleep(1.0)
    missing = failures.unreachable_peers(config)


def serve(exit_code: int) -> int:
  """Runs this worker or ps task's server until SIGTERM/SIGINT.

  Returns:
    `exit_code`, once a signal arrived.
  Raises:
    UserError: the server could not start (e.g. its port is taken).
  """
  config = tf_config.from_environ(strategy='parameter_server')
  task = config['task']
  stopped = threading.Event()
  received = []

  def on_signal(signum, frame):
    del frame
    received.append(signal.Signals(signum).name)
    stopped.set()
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, on_signal)
  resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
  try:
    tf.distribute.Server(resolver.cluster_spec(), job_name=task['type'],
                         task_index=task['index'], protocol='grpc',
                         start=True)
  except tf.errors.OpError as e:
    address = config['cluster'][task['type']][task['index']]
    raise UserError(
        f'TF_CONFIG task {tf_config.task_name(config)}: could not serve at '
        f'{address} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); '
        'is another process using the port?') from e
  logging.info('%s serves the chief of the parameter-server cluster until it '
               'gets SIGTERM', tf_config.task_name(config))
  # Not server.join(): it would hold this thread where no signal handler
  # runs. The server runs in TensorFlow's own threads meanwhile.
  while not stopped.wait(1.0):
    pass
  logging.warning('%s got %s: stopped serving (exit status %d)',
                  tf_config.task_name(config), received[0], exit_code)
  return exit_code

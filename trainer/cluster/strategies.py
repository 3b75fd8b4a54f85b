"""--strategy / --tpu / --num_cpu_devices / TF_CONFIG -> tf.distribute.Strategy."""

import itertools
import os
import socket
import subprocess
import sys
import time

from absl import logging
import tensorflow as tf

from trainer.cluster import STRATEGIES
from trainer.cluster import failures
from trainer.cluster import parameter_server
from trainer.cluster import tf_config
from trainer.errors import UserError

_MIRRORED_KEY_BASES = itertools.count(0, 100_000)




def configure_cpu_devices(num_cpu_devices: int) -> None:
  """Splits the host CPU into `num_cpu_devices` logical devices.

  Must run before TensorFlow initialises its devices (before the first op or
  strategy). With N logical CPUs, `mirrored` runs N replicas on any machine:
  the standard way to test multi-replica code without accelerators.
  """
  if num_cpu_devices < 1:
    raise UserError(f'flag --num_cpu_devices={num_cpu_devices} must be >= 1')
  if num_cpu_devices == 1:
    return
  cpu = tf.config.list_physical_devices('CPU')[0]
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num_cpu_devices)
  except RuntimeError as e:
    current = len(tf.config.list_logical_devices('CPU'))
    if current != num_cpu_devices:
      raise RuntimeError(
          f'--num_cpu_devices={num_cpu_devices}: TensorFlow already initialised '
          f'{current} CPU devices; split them before any TF op runs') from e


def _local_devices():
  """GPUs when there are any, otherwise every logical CPU."""
  gpus = tf.config.list_logical_devices('GPU')
  return [d.name for d in (gpus or tf.config.list_logical_devices('CPU'))]


def mirrored_strategy(devices) -> tf.distribute.MirroredStrategy:
  """MirroredStrategy over `devices` that can coexist with others in a process.

  On CPUs MirroredStrategy all-reduces with collective ops whose group keys
  start at 1 in every instance; a second instance over a different device set
  then joins the first one's group and aborts ("joining a group with size 4,
  but that group has size 2"). Each instance made here gets its own key range
  (TF's own tests do the same through `_collective_key_base`).
  """
  tf.distribute.MirroredStrategy._collective_key_base = next(  # pylint: disable=protected-access
      _MIRRORED_KEY_BASES)
  return tf.distribute.MirroredStrategy(devices)


def _check_port_free(config: dict) -> None:
  """Refuses this task's port when another process listens on it.

  TensorFlow's server would fail to bind it and the task would end as a
  cluster failure (exit 75, "collectives aborted"), which a restart cannot
  mend, while its peers wait out --cluster_timeout.
  """
  task = config['task']
  address = config['cluster'][task['type']][task['index']]
  port = int(address.rpartition(':')[2])
  with socket.socket() as probe:
    # As TensorFlow's server binds: every interface, past TIME_WAIT.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind(('', port))
    except OSError as e:
      raise UserError(
          f'TF_CONFIG task {tf_config.task_name(config)}: port {port} of '
          f'{address} is in use on this host ({e.strerror}); stop what holds '
          'it or give the task another port') from e


def _multi_worker_mirrored(num_cpu_devices: int, config: dict,
                           cluster_timeout: float):
  """MultiWorkerMirroredStrategy that fails instead of waiting forever.

  TensorFlow 2.21, measured on loopback (2 workers, defaults): a worker whose
  peer never starts waits inside the strategy's constructor for one hour
  (TF's WaitForAllTasks barrier), printing nothing, then dies with a
  DeadlineExceededError traceback; TensorFlow holds the GIL meanwhile, so no
  Python thread or signal handler runs, and TF's preemption notifier
  swallows SIGTERM. A peer SIGKILLed mid-run is noticed by TF itself: the
  survivors' next collective fails on the broken connection (~1-2 s), or
  the coordination service leader (worker 0, or the chief) misses the dead
  worker's heartbeats and aborts every collective (~8-14 s) - but as a
  multi-screen UnavailableError traceback.

  Chosen: the coordination service is configured here, before the strategy
  would configure it itself (it only does so when none is set), exactly as
  it would be, plus registration as a barrier that fails after
  `cluster_timeout` s with a DeadlineExceededError naming the tasks that did
  not register (at the leader) or the leader that did not answer (at the
  others), which becomes a one-line ClusterError here. The heartbeat timeout
  stays TensorFlow's default; `cluster_error` turns the mid-run errors into
  one line naming the dead task. Not chosen: a Python watchdog cannot run
  while the GIL is held; a TCP probe of the peers before the strategy
  exists cannot tell a slow worker from a missing one (a peer listens only
  once its own strategy is being built); collective timeouts
  (CommunicationOptions.timeout_seconds) would also fire on a slow but
  healthy step, e.g. a long checkpoint write or eval on the chief.

  With num_cpu_devices > 1 on a GPU-less host, every logical CPU is a
  replica: MultiWorkerMirroredStrategy takes one replica per GPU, or a
  single CPU replica when a worker has no GPU, whatever logical CPUs exist.
  To run N CPU replicas per worker (the multi-worker analogue of
  `--strategy=mirrored --num_cpu_devices=N`, and how multi-worker code is
  tested without accelerators), its local-device lookup is replaced while
  the strategy is built.
  """
  failures.watch(config)
  _configure_coordination_service(config['cluster'], cluster_timeout)
  try:
    return _build_multi_worker_mirrored(num_cpu_devices)
  except tf.errors.OpError as e:
    raise failures.startup_error(e, config, cluster_timeout) from e


def _configure_coordination_service(cluster: dict,
                                    cluster_timeout: float) -> None:
  """What MultiWorkerMirroredStrategy configures, with a registration timeout.

  Mirrors collective_all_reduce_strategy.py (TF 2.21), which skips its own
  configuration when `context.context().coordination_service` is set.
  """
  # pylint: disable=g-import-not-at-top
  from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
  from tensorflow.python.distribute import multi_worker_util
  from tensorflow.python.eager import context
  ctx = context.context()
  ctx.configure_coordination_service(
      service_type='standalone',
      service_leader=multi_worker_util.coordination_leader(cluster),
      cluster_register_timeout_in_ms=int(cluster_timeout * 1000),
      heartbeat_timeout_in_ms=0,  # TensorFlow's default, 10 s.
      coordinated_jobs=[
          coordination_config_pb2.CoordinatedJob(name=job,
                                                 num_tasks=len(cluster[job]))
          for job in tf_config.JOBS if job in cluster])
  # Without it the timeout above bounds only each task's own registration
  # RPC; the wait for the others is then WaitForAllTasks' one-hour barrier.
  ctx.coordination_service.cluster_register_with_barrier = True


def _build_multi_worker_mirrored(num_cpu_devices: int):
  if num_cpu_devices <= 1 or tf.config.list_physical_devices('GPU'):
    return tf.distribute.MultiWorkerMirroredStrategy()
  # pylint: disable=g-import-not-at-top,protected-access
  from tensorflow.python.distribute import collective_all_reduce_strategy
  extended = collective_all_reduce_strategy.CollectiveAllReduceExtended
  original = extended._initialize_local_devices

  def local_cpus(self, cluster_resolver, worker_device):
    del self, cluster_resolver
    return tuple(f'{worker_device}/device:CPU:{i}'
                 for i in range(num_cpu_devices)), 'CPU'

  extended._initialize_local_devices = local_cpus
  try:
    return tf.distribute.MultiWorkerMirroredStrategy()
  finally:
    extended._initialize_local_devices = original


def build_strategy(name: str, *, tpu: str = '', tpu_timeout: float = 300.0,
                   num_cpu_devices: int = 1, cluster_timeout: float = 300.0,
                   variable_shard_bytes: int = 0):
  """Returns the tf.distribute.Strategy for the --strategy flag.

  Args:
    name: one of STRATEGIES.
    tpu: --tpu: a TPU name, grpc://HOST:PORT, or 'local' on a TPU VM. Only
      valid with name='tpu'.
    tpu_timeout: seconds to wait for the TPU connection and initialisation.
    num_cpu_devices: logical CPUs made by configure_cpu_devices; with
      multi_worker_mirrored on a GPU-less host, the replicas per worker.
    cluster_timeout: with multi_worker_mirrored, seconds within which every
      task of TF_CONFIG's cluster must join (start its strategy).
    variable_shard_bytes: with parameter_server, the largest piece of a
      variable (train.variable_shard_bytes); 0 or any other strategy: whole.
  Raises:
    UserError: unknown name, --tpu without --strategy=tpu or the reverse, bad
      TF_CONFIG, or a TPU that cannot be reached.
    ClusterError: a worker did not join within cluster_timeout.
  """
  if name not in STRATEGIES:
    raise UserError(f'flag --strategy={name!r} is unknown; valid: '
                    f'{", ".join(STRATEGIES)}')
  if tpu and name != 'tpu':
    raise UserError(f'flag --tpu={tpu!r} needs --strategy=tpu (got '
                    f'--strategy={name}); drop --tpu or pass --strategy=tpu')
  if variable_shard_bytes and name != 'parameter_server':
    logging.info('train.variable_shard_bytes=%d: variables are whole with '
                 '--strategy=%s (only parameter_server holds them in pieces)',
                 variable_shard_bytes, name)
  if name == 'default':
    return tf.distribute.get_strategy()
  if name == 'one_device':
    return tf.distribute.OneDeviceStrategy(_local_devices()[0])
  if name == 'mirrored':
    return mirrored_strategy(_local_devices())
  if name == 'multi_worker_mirrored':
    # Checked here, before TensorFlow reads it: TF waits forever instead.
    config = tf_config.from_environ()
    logging.info('TF_CONFIG: task %s of %d workers%s',
                 tf_config.task_name(config), tf_config.num_workers(config),
                 ' (chief)' if tf_config.is_chief(config) else '')
    if not cluster_timeout > 0:
      raise UserError(f'flag --cluster_timeout={cluster_timeout:g} must be '
                      '> 0 (seconds to wait for every worker to join)')
    _check_port_free(config)
    return _multi_worker_mirrored(num_cpu_devices, config, cluster_timeout)
  if name == 'parameter_server':
    if not cluster_timeout > 0:
      raise UserError(f'flag --cluster_timeout={cluster_timeout:g} must be '
                      '> 0 (seconds to wait for every task to serve)')
    return parameter_server.build_strategy(cluster_timeout,
                                           variable_shard_bytes)
  if not tpu:
    raise UserError('flag --strategy=tpu needs --tpu=NAME, '
                    '--tpu=grpc://HOST:PORT or --tpu=local (on a TPU VM)')
  return _tpu_strategy(tpu, tpu_timeout)


def _tpu_strategy(tpu: str, timeout: float):
  """Connects to and initialises a TPU system, within `timeout` seconds.

  TPUClusterResolver fails at once off Google Cloud for a TPU name; at a
  grpc address with nothing listening, or a listener that accepts TCP and
  never speaks gRPC, TensorFlow waits forever (and may hold the GIL while it
  does, so no Python thread or signal handler can interrupt it). So:
  a grpc address is probed first - a TCP connection, then a gRPC handshake,
  both within `timeout` (a one-line error, exit 2); then TensorFlow connects
  and initialises the TPU under a watchdog process that, if the rest of
  `timeout` (at least 60 s: initialising a pod slice takes a while) runs
  out, prints the same kind of line and kills this process, which then
  exits with status 137 instead of hanging.
  """
  deadline = time.monotonic() + timeout
  if tpu.startswith('grpc://'):
    _probe(tpu, timeout, deadline)
  watchdog = _Watchdog(
      max(deadline - time.monotonic(), 60.0),
      f'error: flag --tpu={tpu}: the TPU did not connect and initialise '
      f'within --tpu_timeout={timeout:g}s (at least 60 s for '
      'initialisation); check the TPU is healthy, or raise --tpu_timeout')
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu='' if tpu == 'local' else tpu)
    if tpu != 'local':
      tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    strategy = tf.distribute.TPUStrategy(resolver)
  except Exception as e:  # pylint: disable=broad-except
    lines = str(e).strip().splitlines()
    fix = ('run on a TPU VM, or pass --tpu=NAME of a TPU node'
           if tpu == 'local' else
           'check the TPU name/address, or use --tpu=local on a TPU VM')
    raise UserError(f'flag --tpu={tpu}: could not connect to the TPU '
                    f'({type(e).__name__}: {lines[0][:200] if lines else ""});'
                    f' {fix}') from e
  finally:
    watchdog.stop()
  logging.info('Connected to TPU %s', tpu)
  return strategy


class _Watchdog:
  """A child process that kills this one after `seconds`, with a line on
  stderr, unless stopped: it runs whether or not this process's Python can
  (a C++ call that holds the GIL blocks every thread here)."""

  _CODE = (
      'import os, signal, sys\n'
      'import select\n'
      'ready, _, _ = select.select([sys.stdin], [], [], float(sys.argv[1]))\n'
      'if not ready:\n'
      '  sys.stderr.write(sys.argv[2] + "\\n"); sys.stderr.flush()\n'
      '  os.kill(int(sys.argv[3]), signal.SIGKILL)\n')

  def __init__(self, seconds: float, message: str):
    self._process = subprocess.Popen(
        [sys.executable, '-c', self._CODE, str(seconds), message,
         str(os.getpid())], stdin=subprocess.PIPE)

  def stop(self) -> None:
    self._process.stdin.close()  # Ready for reading: the child exits.
    self._process.wait()


def _probe(tpu: str, timeout: float, deadline: float) -> None:
  host, port = tf_config.tpu_address(tpu)
  try:
    socket.create_connection((host, port), timeout=timeout).close()
  except OSError as e:
    raise UserError(f'flag --tpu={tpu}: nothing answered at {host}:{port} '
                    f'within {timeout:g}s (--tpu_timeout) ({e}); check the '
                    'address and that the TPU is reachable from this host'
                    ) from e
  import grpc  # pylint: disable=import-outside-toplevel
  channel = grpc.insecure_channel(f'{host}:{port}')
  try:
    grpc.channel_ready_future(channel).result(
        timeout=max(deadline - time.monotonic(), 0.1))
  except grpc.FutureTimeoutError as e:
    raise UserError(f'flag --tpu={tpu}: {host}:{port} accepted a connection '
                    f'but did not answer gRPC within {timeout:g}s '
                    '(--tpu_timeout); is it a TPU worker\'s address (port '
                    '8470)?') from e
  finally:
    channel.close()

"""--strategy / --tpu / --num_cpu_devices / TF_CONFIG -> tf.distribute.Strategy."""

import concurrent.futures
import itertools
import re
import socket

from absl import logging
import tensorflow as tf

from trainer import tf_config
from trainer.errors import UserError

_MIRRORED_KEY_BASES = itertools.count(0, 100_000)
STRATEGIES = ('default', 'one_device', 'mirrored', 'multi_worker_mirrored',
              'tpu')


class ClusterError(Exception):
  """A worker did not join the cluster, or stopped while the others ran.

  Not a mistake in this worker's input (that is a UserError, status 2):
  nothing needs editing, but this worker cannot go on alone -
  MultiWorkerMirroredStrategy can neither shrink nor take a restarted worker
  back into a running cluster. main.py prints the message as one `error: `
  line and exits with EXIT_CODE, so that a job manager restarts every worker;
  training then resumes from the newest checkpoint.
  """

  # EX_TEMPFAIL of sysexits.h: a temporary failure, which a retry may fix.
  EXIT_CODE = 75


# The validated TF_CONFIG of the MultiWorkerMirroredStrategy built in this
# process (None: none was), for naming the failed peer in `cluster_error`.
_cluster = None


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
  global _cluster
  _cluster = config
  _configure_coordination_service(config['cluster'], cluster_timeout)
  try:
    return _build_multi_worker_mirrored(num_cpu_devices)
  except tf.errors.OpError as e:
    raise _startup_error(e, config, cluster_timeout) from e


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


def _startup_error(error, config: dict, cluster_timeout: float):
  """The ClusterError for a TF error while the cluster was forming."""
  tasks = _failed_tasks(str(error), config) or _unreachable_peers(config)
  if isinstance(error, tf.errors.DeadlineExceededError):
    what = (f'{_describe(tasks, config)} did not join the cluster' if tasks
            else f'the cluster of {tf_config.num_workers(config)} workers did '
            'not form')
    return ClusterError(
        f'{what} within --cluster_timeout={cluster_timeout:g}s; start every '
        'task of TF_CONFIG\'s cluster, check that this host can reach its '
        'address, or raise --cluster_timeout')
  who = _describe(tasks, config) or 'a worker'
  return ClusterError(
      f'{who} failed while the cluster was forming ({_reason(error)}); '
      'restart every worker')


def cluster_error(error: BaseException):
  """The ClusterError that `error`, raised in this process, stands for.

  Args:
    error: any exception that ended the run.
  Returns:
    `error` itself when it is a ClusterError; for a TensorFlow error that a
    peer's failure caused in a multi-worker run, a ClusterError naming the
    peer (from TF's message, else the peers that no longer accept
    connections); otherwise None (a bug, to be shown with its traceback).
  """
  if isinstance(error, ClusterError):
    return error
  config = _cluster
  if config is None:
    return None
  op_error = next((e for e in _chain(error)
                   if isinstance(e, _PEER_FAILURE_ERRORS)), None)
  if op_error is None:
    return None
  message = str(op_error)
  tasks = _failed_tasks(message, config)
  if not tasks:
    if not any(p in message.lower() for p in _PEER_FAILURE_PHRASES):
      return None
    tasks = _unreachable_peers(config)
  who = _describe(tasks, config) or 'another worker'
  return ClusterError(
      f'{who} stopped during the run ({_reason(op_error)}); '
      f'{tf_config.task_name(config)} cannot go on without it: restart '
      'every worker, training resumes from the newest checkpoint in '
      '--model_dir')


# What a peer's failure raises in the others (Unavailable: gone; Aborted /
# FailedPrecondition: restarted; Cancelled, Internal, Unknown: collectives
# aborted midway; DeadlineExceeded: a barrier timed out).
_PEER_FAILURE_ERRORS = (
    tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
    tf.errors.AbortedError, tf.errors.CancelledError,
    tf.errors.FailedPreconditionError, tf.errors.InternalError,
    tf.errors.UnknownError)
_PEER_FAILURE_PHRASES = (
    'heartbeat', 'unhealthy', 'collective ops is aborted', 'connection reset',
    'socket closed', 'connection refused', 'failed to connect',
    'coordination service', 'has restarted', 'disconnected')
_TASK = re.compile(r'/job:(\w+)(?:/replica:\d+)?/task:(\d+)')
# Where TF's messages list the failed tasks, one per line after the phrase
# (coordination service), or name the one that did not answer an RPC.
_LIST_MARKERS = ('stopped sending heartbeats):', 'timed out task names:')


def _failed_tasks(message: str, config: dict) -> list:
  """Tasks of `config`'s cluster that TF's `message` names as failed.

  In order of trust: the coordination service's lists ("The following tasks
  are unhealthy (stopped sending heartbeats):", "Some timed out task
  names:"), then the remote target of a failed RPC, then any other task
  the message mentions. Never this task itself.
  """
  me = tf_config.task_name(config)

  def known(found):
    names = []
    for job, index in found:
      name = f'{job}:{int(index)}'
      if (name != me and name not in names and
          int(index) < len(config['cluster'].get(job, ()))):
        names.append(name)
    return names

  for marker in _LIST_MARKERS:
    at = message.find(marker)
    if at >= 0:
      listed = []
      for line in message[at + len(marker):].splitlines()[1:]:
        match = _TASK.fullmatch(line.strip())
        if not match:
          break
        listed.append(match.groups())
      if known(listed):
        return known(listed)
  target = re.search(r'remote target ' + _TASK.pattern, message)
  if target and known([target.groups()]):
    return known([target.groups()])
  return known(_TASK.findall(message))


def _unreachable_peers(config: dict) -> list:
  """The other tasks whose TF_CONFIG address refuses a TCP connection.

  Probed in parallel, 2 s each, so that a large cluster of silent hosts
  does not delay the error.
  """
  me = tf_config.task_name(config)
  peers = [(f'{job}:{index}', address)
           for job, addresses in config['cluster'].items()
           for index, address in enumerate(addresses)
           if f'{job}:{index}' != me]

  def refuses(address):
    host, _, port = address.rpartition(':')
    try:
      socket.create_connection((host.strip('[]'), int(port)),
                               timeout=2).close()
      return False
    except (OSError, ValueError):
      return True

  if not peers:
    return []
  with concurrent.futures.ThreadPoolExecutor(min(32, len(peers))) as pool:
    down = list(pool.map(refuses, [address for _, address in peers]))
  return [name for (name, _), is_down in zip(peers, down) if is_down]


def _describe(tasks, config: dict) -> str:
  """'worker:1 (10.0.0.2:2222), worker:2 (...)'."""
  cluster = config['cluster']
  parts = []
  for name in tasks:
    job, _, index = name.partition(':')
    parts.append(f'{name} ({cluster[job][int(index)]})')
  return ', '.join(parts)


def _reason(error) -> str:
  text = str(error).lower()
  if 'heartbeat' in text:
    why = 'stopped sending heartbeats'
  elif any(p in text for p in ('connection reset', 'socket closed',
                               'connection refused', 'failed to connect')):
    why = 'connection lost'
  elif 'timed out' in text or 'deadline' in text:
    why = 'timed out'
  else:
    why = 'collectives aborted'
  return f'{type(error).__name__}: {why}'


def _chain(error):
  """error, its __cause__ and __context__, recursively, each once."""
  seen, todo = [], [error]
  while todo:
    e = todo.pop(0)
    if e is None or any(e is s for s in seen):
      continue
    seen.append(e)
    todo += [e.__cause__, e.__context__]
  return seen


def build_strategy(name: str, *, tpu: str = '', tpu_timeout: float = 300.0,
                   num_cpu_devices: int = 1, cluster_timeout: float = 300.0):
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
    return _multi_worker_mirrored(num_cpu_devices, config, cluster_timeout)
  if not tpu:
    raise UserError('flag --strategy=tpu needs --tpu=NAME, '
                    '--tpu=grpc://HOST:PORT or --tpu=local (on a TPU VM)')
  return _tpu_strategy(tpu, tpu_timeout)


def _tpu_strategy(tpu: str, timeout: float):
  """Connects to and initialises a TPU system.

  TPUClusterResolver fails at once off Google Cloud for a TPU name, and
  initialize_tpu_system waits forever when nothing listens at a grpc address
  (TensorFlow holds the GIL meanwhile, so no Python thread or signal handler
  can interrupt it). A grpc address is therefore probed with a plain TCP
  connection, under `timeout`, before TensorFlow is asked to connect.
  """
  if tpu.startswith('grpc://'):
    _probe(tpu, timeout)
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu='' if tpu == 'local' else tpu)
    if tpu != 'local':
      tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    strategy = tf.distribute.TPUStrategy(resolver)
  except Exception as e:  # pylint: disable=broad-except
    lines = str(e).strip().splitlines()
    raise UserError(f'flag --tpu={tpu}: could not connect to the TPU '
                    f'({type(e).__name__}: {lines[0][:200] if lines else ""});'
                    ' check the TPU name/address, or use --tpu=local on a TPU '
                    'VM') from e
  logging.info('Connected to TPU %s', tpu)
  return strategy


def _probe(tpu: str, timeout: float) -> None:
  host, _, port = tpu[len('grpc://'):].rpartition(':')
  if not host or not port.isdigit():
    raise UserError(f'flag --tpu={tpu} is not of the form grpc://HOST:PORT')
  try:
    socket.create_connection((host, int(port)), timeout=timeout).close()
  except OSError as e:
    raise UserError(f'flag --tpu={tpu}: nothing answered at {host}:{port} '
                    f'within {timeout:g}s (--tpu_timeout) ({e}); check the '
                    'address and that the TPU is reachable from this host'
                    ) from e

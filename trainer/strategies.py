"""--strategy / --tpu / --num_cpu_devices / TF_CONFIG -> tf.distribute.Strategy."""

import itertools
import socket

from absl import logging
import tensorflow as tf

from trainer import tf_config
from trainer.errors import UserError

_MIRRORED_KEY_BASES = itertools.count(0, 100_000)
STRATEGIES = ('default', 'one_device', 'mirrored', 'multi_worker_mirrored',
              'tpu')


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


def _multi_worker_mirrored(num_cpu_devices: int):
  """MultiWorkerMirroredStrategy, with every logical CPU of a GPU-less host.

  MultiWorkerMirroredStrategy takes one replica per GPU, or a single CPU
  replica when a worker has no GPU, whatever logical CPUs exist. To run
  N CPU replicas per worker (the multi-worker analogue of
  `--strategy=mirrored --num_cpu_devices=N`, and how multi-worker code is
  tested without accelerators), its local-device lookup is replaced while
  the strategy is built.
  """
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
                   num_cpu_devices: int = 1):
  """Returns the tf.distribute.Strategy for the --strategy flag.

  Args:
    name: one of STRATEGIES.
    tpu: --tpu: a TPU name, grpc://HOST:PORT, or 'local' on a TPU VM. Only
      valid with name='tpu'.
    tpu_timeout: seconds to wait for the TPU connection and initialisation.
    num_cpu_devices: logical CPUs made by configure_cpu_devices; with
      multi_worker_mirrored on a GPU-less host, the replicas per worker.
  Raises:
    UserError: unknown name, --tpu without --strategy=tpu or the reverse, bad
      TF_CONFIG, or a TPU that cannot be reached.
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
    return _multi_worker_mirrored(num_cpu_devices)
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

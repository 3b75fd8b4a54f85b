"""What the Trainer reads from a resolved config, checked against its devices."""

import contextlib
import dataclasses

import tensorflow as tf

from trainer.errors import UserError
from trainer.parts import precision as precision_lib

AUTO_SHARD = {
    'auto': tf.data.experimental.AutoShardPolicy.AUTO,
    'data': tf.data.experimental.AutoShardPolicy.DATA,
    'file': tf.data.experimental.AutoShardPolicy.FILE,
    'off': tf.data.experimental.AutoShardPolicy.OFF,
}


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What the step and the input pipeline read from config.

  Attributes:
    global_batch_size: examples per optimizer step over all replicas.
    eval_global_batch_size: examples per eval step over all replicas.
    pipeline: 'per_host' or 'global' (data.pipeline).
    auto_shard: the tf.data auto-shard policy for pipeline='global'.
    data_service: grpc://HOST:PORT of a tf.data service dispatcher the
      training input runs on, or '' (data.service).
    clip_norm: global-norm clipping of the all-reduced gradient (0: off).
    precision: the Keras dtype policy name.
    grad_accum_steps: micro-batches per optimizer step.
    jit_compile: XLA for the forward and backward pass.
    ema_decay: weight averaging decay (0: off).
  """
  global_batch_size: int
  eval_global_batch_size: int
  pipeline: str
  auto_shard: tf.data.experimental.AutoShardPolicy
  data_service: str
  clip_norm: float
  precision: str
  grad_accum_steps: int
  jit_compile: bool
  ema_decay: float

  @classmethod
  def from_config(cls, config, *, num_replicas: int, tpu: bool):
    """From a resolved config (trainer/schema.py has checked every value);
    raises UserError for what depends on the devices: batch sizes that do
    not divide by the replica count, a precision the devices lack."""
    train, data = config.train, config.data
    global_batch_size = train.global_batch_size
    if not _evaluating_only[0]:
      global_batch_size = _divisible('train.global_batch_size',
                                     global_batch_size, num_replicas)
    return cls(
        global_batch_size=global_batch_size,
        eval_global_batch_size=_divisible(
            'eval.global_batch_size', config.eval.global_batch_size,
            num_replicas),
        pipeline=data.pipeline, auto_shard=AUTO_SHARD[data.auto_shard],
        data_service=data.service,
        clip_norm=float(train.clip_norm),
        precision=precision_lib.resolve(train.precision, tpu=tpu),
        grad_accum_steps=train.grad_accum_steps if _evaluating_only[0] else
        _grad_accum_steps(train.grad_accum_steps, global_batch_size,
                          num_replicas),
        jit_compile=train.jit_compile, ema_decay=float(train.ema_decay))


_evaluating_only = [False]


@contextlib.contextmanager
def evaluating_only(yes: bool = True):
  """Trainers built within only evaluate or export (--mode=eval, export,
  continuous_eval): the training batch need not divide by this replica
  count, so a run trained on 4 devices evaluates on 3."""
  before, _evaluating_only[0] = _evaluating_only[0], yes
  try:
    yield
  finally:
    _evaluating_only[0] = before


def _grad_accum_steps(value: int, global_batch_size: int,
                      num_replicas: int) -> int:
  if global_batch_size % (num_replicas * value):
    raise UserError(
        f'config key train.grad_accum_steps={value} must divide the per-'
        f'replica batch {global_batch_size // num_replicas} '
        f'(train.global_batch_size={global_batch_size} over {num_replicas} '
        'replicas) into equal micro-batches; pick a divisor of it')
  return value


def _divisible(key: str, batch_size: int, num_replicas: int) -> int:
  if batch_size < 1 or batch_size % num_replicas:
    raise UserError(
        f'config key {key}={batch_size} must be a positive multiple of the '
        f'{num_replicas} replicas in sync; use e.g. '
        f'--config.{key}={max(1, round(batch_size / num_replicas)) * num_replicas}')
  return batch_size


def check_xla_with_sync_batch_norm(model, strategy, config) -> None:
  """train.jit_compile with synchronized batch norm on CPU replicas of a
  Mirrored or MultiWorkerMirrored strategy cannot work in TensorFlow 2.21:
  the batch-norm all-reduce would have to be inside the XLA computation, and
  XLA on CPUs has no cross-device all-reduce (CollectiveReduceV2 fails to
  compile), while merge_call is refused inside a nested tf.function. On GPUs
  MirroredStrategy all-reduces inside XLA itself; on TPUs the whole step is
  compiled. Raises UserError naming both settings."""
  if not isinstance(strategy, (tf.distribute.MirroredStrategy,
                               tf.distribute.MultiWorkerMirroredStrategy)):
    return
  devices = strategy.extended.worker_devices
  if all(tf.DeviceSpec.from_string(d).device_type == 'GPU' for d in devices):
    return
  synced = [layer for layer in model._flatten_layers(include_self=False)  # pylint: disable=protected-access
            if isinstance(layer, tf.keras.layers.BatchNormalization) and
            layer.synchronized]
  if synced:
    key = ('model.sync_batch_norm=False' if 'sync_batch_norm' in
           config.model else
           'BatchNormalization(synchronized=False) in build_model')
    raise UserError(
        f'config key train.jit_compile=True cannot compile synchronized batch '
        f'norm (layer {synced[0].name!r}) on CPU replicas: XLA has no '
        'cross-device all-reduce on CPUs; set --config.train.jit_compile='
        f'False or use {key} (on GPUs and TPUs both work)')

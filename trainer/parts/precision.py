"""train.precision -> the Keras dtype policy the model is built under."""

import contextlib

import tensorflow as tf

from trainer.errors import UserError
from trainer.parts import autograph


def resolve(value: str, *, tpu: bool) -> str:
  """The policy name for train.precision=value (one of
  schema.PRECISIONS): 'auto' is mixed_bfloat16 on TPU (its native matmul
  type: no loss scaling needed) and float32 elsewhere.

  Raises:
    UserError: mixed_float16 on TPU.
  """
  if value == 'auto':
    return 'mixed_bfloat16' if tpu else 'float32'
  if value == 'mixed_float16' and tpu:
    raise UserError('config key train.precision=mixed_float16 is for GPUs; '
                    'TPUs compute in bfloat16: use mixed_bfloat16 (or auto)')
  return value


@contextlib.contextmanager
def policy(name: str):
  """Within it layers are made under dtype policy `name`. The policy is
  process-global: it is set for the model alone, and other trainers in the
  process keep theirs."""
  previous = tf.keras.mixed_precision.global_policy()
  tf.keras.mixed_precision.set_global_policy(name)
  try:
    yield
  finally:
    tf.keras.mixed_precision.set_global_policy(previous)


@autograph.framework
def float32(outputs):
  """Float outputs of a mixed-precision model, as float32: the loss and
  metrics are computed in float32 whatever the compute dtype."""
  def cast(x):
    if isinstance(x, tf.Tensor) and x.dtype in (tf.float16, tf.bfloat16):
      return tf.cast(x, tf.float32)
    return x
  return tf.nest.map_structure(cast, outputs)

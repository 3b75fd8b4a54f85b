"""train.precision: the policy, and float32 outputs whatever it is."""

import pytest
import tensorflow as tf

from trainer.errors import UserError
from trainer.parts import precision


def test_auto_is_bfloat16_on_tpu_only_and_float16_is_refused_there():
  assert precision.resolve('auto', tpu=True) == 'mixed_bfloat16'
  assert precision.resolve('auto', tpu=False) == 'float32'
  with pytest.raises(UserError, match='mixed_float16 is for GPUs'):
    precision.resolve('mixed_float16', tpu=True)


def test_the_policy_is_set_for_the_model_alone():
  with precision.policy('mixed_bfloat16'):
    layer = tf.keras.layers.Dense(2)
  assert layer.compute_dtype == 'bfloat16'
  assert tf.keras.mixed_precision.global_policy().name == 'float32'
  outputs = precision.float32({'a': tf.ones([1], tf.bfloat16),
                               'b': tf.ones([1], tf.int32)})
  assert outputs['a'].dtype == tf.float32 and outputs['b'].dtype == tf.int32

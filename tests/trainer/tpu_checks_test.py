"""TPU input checks, on CPU datasets."""

import pytest
import tensorflow as tf

from input import digits
from trainer import tpu_checks
from trainer.errors import UserError


def digits_dataset(split, training):
  return digits.dataset(split, input_context=tf.distribute.InputContext(),
                        batch_size=32, training=training, seed=0)


def test_repeated_static_training_data_passes():
  tpu_checks.check_dataset(digits_dataset('train', True), split='train',
                           training=True)


def test_partial_batches_are_rejected_naming_drop_remainder():
  with pytest.raises(UserError, match=r"'test' dataset has dimensions unknown "
                     r'.*\(None, 64\).*drop_remainder=True'):
    tpu_checks.check_dataset(digits_dataset('test', False), split='test',
                             training=False)


def test_variable_length_features_are_rejected():
  ds = tf.data.Dataset.from_tensor_slices(tf.zeros([8, 5])).map(
      lambda x: {'tokens': x[:tf.random.uniform([], 1, 5, tf.int32)]})
  ds = ds.repeat().batch(4, drop_remainder=True)
  with pytest.raises(UserError, match=r'element\[tokens\] \(4, None\)'):
    tpu_checks.check_dataset(ds, split='train', training=True)


def test_training_data_that_ends_is_rejected():
  ds = tf.data.Dataset.from_tensor_slices(tf.zeros([64, 3])).batch(
      8, drop_remainder=True)
  with pytest.raises(UserError, match=r'ends \(cardinality 8\).*repeat\(\)'):
    tpu_checks.check_dataset(ds, split='train', training=True)

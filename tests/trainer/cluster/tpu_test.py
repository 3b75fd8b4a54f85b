"""TPU input checks, on CPU datasets."""

import pytest
import tensorflow as tf

from configs import digits_mlp
from input import digits
from models.classifier import ClassifierTrainer
from trainer.cluster import tpu
from trainer.errors import UserError


def digits_dataset(split, training):
  return digits.dataset(split, input_context=tf.distribute.InputContext(),
                        batch_size=32, training=training, seed=0)


def test_repeated_static_training_data_passes():
  tpu.check_dataset(digits_dataset('train', True), split='train',
                           training=True)


def test_partial_training_batches_are_rejected_naming_drop_remainder():
  ds = digits_dataset('train', True).unbatch().batch(32)
  with pytest.raises(UserError, match=r"'train' dataset has dimensions "
                     r'unknown .*\(None, 64\).*drop_remainder=True'):
    tpu.check_dataset(ds, split='train', training=True)


def test_an_eval_split_may_end_in_a_partial_batch():
  # TPUStrategy pads a dynamic batch dimension; other dimensions must be
  # static.
  tpu.check_dataset(digits_dataset('test', False), split='test',
                           training=False)
  ragged = digits_dataset('test', False).map(lambda x, y: (x[:, :y[0] + 1], y))
  with pytest.raises(UserError, match=r'\(None, None\)'):
    tpu.check_dataset(ragged, split='test', training=False)


class TpuClassifier(ClassifierTrainer):
  """The classifier with the Trainer's TPU input checks on (as under
  TPUStrategy), on CPU."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.is_tpu = True


class UnbatchedTrainTail(TpuClassifier):
  def dataset(self, split, input_context, batch_size):
    dataset = super().dataset(split, input_context, batch_size)
    return dataset.unbatch().batch(batch_size) if split == 'train' else dataset


@pytest.mark.parametrize('pipeline', ['per_host', 'global'])
def test_the_trainer_checks_its_datasets_before_a_tpu_sees_them(pipeline):
  config = digits_mlp.get_config('smoke')
  config.data.pipeline = pipeline
  strategy = tf.distribute.get_strategy()
  trainer = TpuClassifier(config=config, strategy=strategy)
  trainer.distribute_dataset('train', batch_size=64)  # Static, repeated.
  trainer.evaluate()  # Partial last batch: allowed.
  bad = UnbatchedTrainTail(config=config, strategy=strategy)
  with pytest.raises(UserError, match=r"'train' dataset has dimensions "
                     'unknown'):
    bad.distribute_dataset('train', batch_size=64)


def test_variable_length_features_are_rejected():
  ds = tf.data.Dataset.from_tensor_slices(tf.zeros([8, 5])).map(
      lambda x: {'tokens': x[:tf.random.uniform([], 1, 5, tf.int32)]})
  ds = ds.repeat().batch(4, drop_remainder=True)
  with pytest.raises(UserError, match=r'element\[tokens\] \(4, None\)'):
    tpu.check_dataset(ds, split='train', training=True)


def test_training_data_that_ends_is_rejected():
  ds = tf.data.Dataset.from_tensor_slices(tf.zeros([64, 3])).batch(
      8, drop_remainder=True)
  with pytest.raises(UserError, match=r'ends \(cardinality 8\).*repeat\(\)'):
    tpu.check_dataset(ds, split='train', training=True)

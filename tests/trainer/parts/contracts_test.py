"""The per-example contract: a loss or metric of the wrong shape is one error
naming the method, the shape returned and the shape expected."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from models.classifier import ClassifierTrainer
from trainer.cluster import strategies
from trainer.parts import contracts

CPUS = [d.name for d in tf.config.list_logical_devices('CPU')]


def make_config():
  config = ml_collections.ConfigDict()
  config.trainer = 'classifier'
  config.seed = 0
  config.data = dict(name='synthetic')
  config.model = dict(input_dim=100, hidden_sizes=(8,), num_classes=10)
  config.train = dict(steps=4, global_batch_size=32, steps_per_loop=2)
  config.eval = dict(global_batch_size=96)
  config.optimizer = dict(name='sgd', learning_rate=0.1)
  return config


class DoubledLoss(ClassifierTrainer):
  """Flattened per-token losses: [2B], which would double the gradient."""

  def compute_loss(self, batch, outputs):
    loss = super().compute_loss(batch, outputs)
    return tf.concat([loss, loss], axis=0)


class SquareMetric(ClassifierTrainer):
  """A broadcasting slip: [B] - [B, 1] is [B, B]."""

  def compute_metrics(self, batch, outputs):
    predictions = tf.cast(tf.argmax(outputs, -1), tf.float32)
    labels = tf.cast(batch[1], tf.float32)[:, None]
    return {'accuracy': tf.abs(predictions - labels)}


class MismatchedWeights(ClassifierTrainer):

  def compute_loss(self, batch, outputs):
    loss = super().compute_loss(batch, outputs)
    return loss, tf.ones([3])


def train_one(cls, replicas=2):
  strategy = strategies.mirrored_strategy(CPUS[:replicas])
  trainer = cls(config=make_config(), strategy=strategy)
  iterator = iter(trainer.distribute_dataset('train', batch_size=32))
  return trainer.train(iterator, 1)


@pytest.mark.parametrize('cls, message', [
    (DoubledLoss, r'DoubledLoss.compute_loss returned shape \[32\], expected '
     r'\[16\]: one value per example'),
    (SquareMetric, r"SquareMetric.compute_metrics \['accuracy'\] returned "
     r'shape \[16, 16\], expected \[16\]: one value per example of the '
     r'batch \(a \[B, 1\] output broadcast against \[B\] labels gives '
     r"\[B, B\]: squeeze the output's last axis first\)$"),
    (MismatchedWeights, r'MismatchedWeights.compute_loss \(weights\) returned '
     r'shape \[3\], expected \[16\]'),
], ids=['loss_2B', 'metric_BxB', 'weights'])
def test_wrong_shapes_are_refused_when_traced(cls, message):
  with pytest.raises(contracts.ContractError, match=message):
    train_one(cls)


def test_a_wrong_eval_shape_fails_when_it_runs():
  # Eval batches have a free batch dimension: checked as the step runs.
  trainer = DoubledLoss(config=make_config(),
                        strategy=tf.distribute.OneDeviceStrategy(CPUS[0]))
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match='DoubledLoss.eval_step .*one value per example'):
    trainer.evaluate('test')


def test_per_example_accepts_values_and_weight_pairs():
  values, weights = contracts.per_example(
      (tf.ones([4]), tf.constant([1, 2, 3, 4])), where='f', size=4)
  assert weights.dtype == tf.float32 and values.shape == [4]
  values, weights = contracts.per_example(tf.ones([4]), where='f', size=4)
  assert weights is None


@pytest.mark.parametrize('shape, hint', [
    ([4, 1], r'squeeze the last axis: tf.squeeze\(value, -1\)'),
    ([4, 7], 'reduce the other axes per example'),
    # What tf.keras.losses.MeanSquaredError(reduction=None) gives on [B].
    ([], r'a scalar or a mean is the wrong reduction: .* \(a Keras loss '
     r'object, even with reduction=None, averages over the last axis: give it '
     r'\[B, 1\] values to get \[B\]\)'),
    ([8], 'flattened per-token values belong in a per-example mean'),
])
def test_a_wrong_shape_names_its_likely_cause(shape, hint):
  with pytest.raises(contracts.ContractError,
                     match=rf'f returned shape .*, expected \[4\]: one value '
                     rf'per example of the batch \(.*{hint}'):
    contracts.per_example(tf.ones(shape), where='f', size=4)


def test_gathered_outputs_take_any_per_example_value():
  """Ragged (variable-length) and sparse values are gathered row by row as
  well; a batch-level scalar or a row count other than B is refused."""
  outputs = {'tokens': tf.ragged.constant([[1], [2, 3]]),
             'sparse': tf.sparse.from_dense([[0, 1], [2, 0]]),
             'score': tf.ones([2, 3])}
  assert contracts.gathered_outputs(outputs, where='f', size=2) is outputs
  with pytest.raises(contracts.ContractError, match=r"shape \[\] for 'mean'"):
    contracts.gathered_outputs({'mean': tf.ones([])}, where='f', size=2)
  with pytest.raises(contracts.ContractError, match=r"shape \[3\] for 'x'"):
    contracts.gathered_outputs({'x': tf.ones([3])}, where='f', size=2)


class HostMetrics:

  def __init__(self, result):
    self.result = result

  def derived_metrics(self, metrics):
    del metrics
    return self.result


def test_host_metrics_take_any_one_number():
  result = contracts.host_metrics(HostMetrics({
      'python': 3, 'flag': True, 'numpy': np.float32(0.5),
      'zero_d': np.array(2.0), 'tensor': tf.constant(1.5)}),
                                  'derived_metrics', {})
  assert result == {'python': 3.0, 'flag': 1.0, 'numpy': 0.5, 'zero_d': 2.0,
                    'tensor': 1.5}
  with pytest.raises(contracts.ContractError, match=r"^HostMetrics."
                     r"derived_metrics returned 'name' of shape \[\] and "
                     'dtype <U'):
    contracts.host_metrics(HostMetrics({'name': 'a'}), 'derived_metrics', {})

"""Metric sums: per-replica sums and weights, combined exactly."""

import numpy as np
import pytest
import tensorflow as tf

from trainer.cluster import strategies
from trainer.parts import metric_sums

CPUS = [d.name for d in tf.config.list_logical_devices('CPU')]


def test_weighted_means_over_replicas_of_uneven_batches():
  strategy = strategies.mirrored_strategy(CPUS[:2])
  with strategy.scope():
    sums = metric_sums.MetricSums(('loss', 'acc'), extras=('norm',))
  # Replica 0: 3 examples, replica 1: 1; 'loss' weighted, 'acc' not.
  loss = {0: ([1.0, 2.0, 3.0], [1.0, 1.0, 2.0]), 1: ([10.0], [4.0])}
  acc = {0: [1.0, 0.0, 1.0], 1: [1.0]}

  @tf.function
  def step():
    def replica():
      r = tf.distribute.get_replica_context().replica_id_in_sync_group
      values = tf.cond(r == 0, lambda: tf.constant(loss[0][0] + [0.0]),
                       lambda: tf.constant(loss[1][0] + [0.0] * 3))
      weights = tf.cond(r == 0, lambda: tf.constant(loss[0][1] + [0.0]),
                        lambda: tf.constant(loss[1][1] + [0.0] * 3))
      correct = tf.cond(r == 0, lambda: tf.constant(acc[0] + [0.0]),
                        lambda: tf.constant(acc[1] + [0.0] * 3))
      count = tf.where(r == 0, 3, 1)
      sums.add({'loss': (values[:count], weights[:count]),
                'acc': (correct[:count], None)}, examples=count, norm=2.0)
    strategy.run(replica)
    return sums.reduce_and_reset(strategy)

  total = step().numpy()
  means = sums.means(total)
  expected_loss = (1 + 2 + 6 + 40) / (1 + 1 + 2 + 4)
  assert means['loss'] == pytest.approx(expected_loss)
  assert means['acc'] == pytest.approx(3 / 4)  # Over examples, not replicas.
  assert means['examples'] == 4 and means['norm'] == 4.0
  assert sums.weights(total) == {'loss': 8.0, 'acc': 4.0}
  np.testing.assert_array_equal(step().numpy()[1:], total[1:])  # Reset.

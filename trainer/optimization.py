"""Optimizers from config, with Keras' own cross-replica aggregation disabled.

Why the aggregation is disabled: Keras 3's TensorFlow optimizer sums gradients
across replicas by itself when `apply_gradients` runs in a replica context
(`TFOptimizer._all_reduce_sum_gradients`). The Trainer all-reduces explicitly
(so the reduction is visible, and clipping sees the global gradient), so the
optimizer must not sum a second time, or every update would be N x too large
on N replicas. Keras 3 has no public switch for this, so `build_optimizer`
replaces that one method on the instance with the identity. The 1-vs-N replica
weight tests (tests/trainer/trainer_test.py) fail if gradients are ever summed
twice or not at all.
"""

import tensorflow as tf

from trainer.errors import UserError

OPTIMIZERS = ('sgd', 'adam')


def build_optimizer(config) -> tf.keras.optimizers.Optimizer:
  """Builds the optimizer named by `config.name` (call under strategy.scope()).

  Args:
    config: the `optimizer` ConfigDict: name, learning_rate, and for sgd
      momentum and nesterov.
  Raises:
    UserError: unknown name or a non-positive learning rate.
  """
  if config.learning_rate <= 0:
    raise UserError(f'config key optimizer.learning_rate={config.learning_rate}'
                    ' must be > 0')
  if config.name == 'sgd':
    optimizer = tf.keras.optimizers.SGD(
        learning_rate=config.learning_rate,
        momentum=config.get('momentum', 0.0),
        nesterov=config.get('nesterov', False))
  elif config.name == 'adam':
    optimizer = tf.keras.optimizers.Adam(learning_rate=config.learning_rate)
  else:
    raise UserError(f'config key optimizer.name={config.name!r} is unknown; '
                    f'valid: {", ".join(OPTIMIZERS)}')
  disable_cross_replica_aggregation(optimizer)
  return optimizer


def disable_cross_replica_aggregation(optimizer) -> None:
  """Makes `optimizer.apply_gradients` use the gradients it is given as-is."""
  if not hasattr(optimizer, '_all_reduce_sum_gradients'):
    raise RuntimeError(
        f'{type(optimizer).__name__} has no _all_reduce_sum_gradients: this '
        'Keras version aggregates gradients differently; pin keras==3.15.1 '
        '(requirements.txt) or update trainer/optimization.py')
  optimizer._all_reduce_sum_gradients = list  # pylint: disable=protected-access

"""Per-example values summed across steps, replicas and workers.

How metrics are exact for any replica count: each replica adds the *sums* of
its per-example values (times their weights) and of the weights into a
sync-on-read accumulator; at the end of a loop the per-replica sums are
combined with `strategy.reduce(SUM)` and each sum is divided by its weight.
A mean of per-replica means would weigh a short replica batch wrongly (the
last eval batch, or replicas holding different numbers of real tokens);
sums do not. Unweighted values have weight 1 per example, so their mean is
over examples.
"""

import tensorflow as tf

from trainer.parts import autograph

SUM = tf.distribute.ReduceOp.SUM


class MetricSums:
  """A sync-on-read accumulator: [examples, (sum, weight) per name, extras].

  Build under `strategy.scope()`.

  Args:
    names: the values summed: 'loss' and the metric names.
    extras: names of scalars summed as they are (e.g. 'grad_norm').
    name: the variable's name.
  """

  def __init__(self, names, *, extras=(), name='sums'):
    self.names = tuple(names)
    self.extras = tuple(extras)
    self.variable = tf.Variable(
        tf.zeros([1 + 2 * len(self.names) + len(self.extras)]),
        trainable=False, name=name,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.SUM)

  def add(self, values, examples, **extras):
    """Adds one step's values (replica context): one assign_add.

    Args:
      values: {name: (values [B], weights [B] or None)} for every name.
      examples: the number of examples in the step (this replica).
      **extras: one scalar per name in `extras`.
    """
    row = [tf.cast(examples, tf.float32)]
    for name in self.names:
      value, weight = values[name]
      if weight is None:
        row += [tf.reduce_sum(value), tf.cast(tf.size(value), tf.float32)]
      else:
        row += [tf.reduce_sum(value * weight), tf.reduce_sum(weight)]
    row += [tf.cast(extras[name], tf.float32) for name in self.extras]
    return self.variable.assign_add(tf.stack(row))

  @autograph.framework
  def reduce_and_reset(self, strategy):
    """The sums over every replica and worker (cross-replica context, in
    the loop's tf.function); the accumulator is zeroed after."""
    # Reading a sync-on-read variable inside strategy.run gives each
    # replica's own copy; strategy.reduce(SUM) combines them across replicas
    # and workers.
    local = strategy.run(lambda: tf.identity(self.variable))
    total = strategy.reduce(SUM, local, axis=None)
    with tf.control_dependencies([total]):
      strategy.run(lambda: self.variable.assign(tf.zeros_like(self.variable)))
    return tf.identity(total)

  def means(self, sums) -> dict[str, float]:
    """{name: weighted mean, extra: sum, 'examples': count} from the numpy
    result of reduce_and_reset (host)."""
    result = {}
    for i, name in enumerate(self.names):
      total, weight = float(sums[1 + 2 * i]), float(sums[2 + 2 * i])
      # Undefined, not 0 (which would read as a perfect error rate).
      result[name] = total / weight if weight else float('nan')
    for i, name in enumerate(self.extras):
      result[name] = float(sums[1 + 2 * len(self.names) + i])
    result['examples'] = float(sums[0])
    return result

  def weights(self, sums) -> dict[str, float]:
    """{name: sum of its weights} from the same numpy result: what a mean
    over several loops weighs each loop's mean by."""
    return {name: float(sums[2 + 2 * i]) for i, name in enumerate(self.names)}

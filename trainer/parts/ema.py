"""Exponential moving average (EMA) of the trainable weights.

Evaluation, export and the best-checkpoint metric use the average; training
continues on the raw weights. The average is updated after every applied
step, on each device from its own copy of the weights (no cross-device
traffic), and checkpointed under `ema`.
"""

import contextlib

import tensorflow as tf


class WeightAverage:
  """The averages of `variables`. Build under `strategy.scope()`.

  Args:
    decay: the decay d in [0, 1).
    variables: the trainable variables averaged (Keras or tf.Variables).
    strategy: the strategy they live under.
  """

  def __init__(self, decay: float, variables, strategy):
    self.decay = decay
    self.weights = list(variables)
    self.strategy = strategy
    self.averages = [
        tf.Variable(v, trainable=False, name='ema/' + variable_name(v))
        for v in self.weights]

  def update(self, applied, num_updates):
    """ema = d * ema + (1 - d) * weights after an applied step.

    Runs in cross-replica context, once per step. d = min(decay,
    (1 + n) / (10 + n)) with n the updates before this one (the first
    average is mostly the new weights), so the average does not start out
    dominated by the random initial weights; on a skipped step d = 1 and
    nothing changes.
    """
    n = tf.cast(num_updates, tf.float32)
    decay = tf.minimum(self.decay, (1.0 + n) / (10.0 + n))
    decay = tf.where(applied, decay, 1.0)

    def update(average, weight):
      return average.assign(decay * average + (1.0 - decay) * weight)
    for average, weight in zip(self.averages, self.weights):
      self.strategy.extended.update(average, update,
                                    args=(tf_variable(weight),))

  @contextlib.contextmanager
  def swapped_in(self):
    """Within it the weights hold the averages; the training weights come
    back on exit, bitwise."""
    with self.strategy.scope():
      backup = [tf.identity(tf_variable(v)) for v in self.weights]
      for weight, average in zip(self.weights, self.averages):
        weight.assign(tf.identity(average))
    try:
      yield
    finally:
      with self.strategy.scope():
        for weight, value in zip(self.weights, backup):
          weight.assign(value)


def tf_variable(variable):
  """The tf.Variable (possibly distributed) behind a Keras variable."""
  if isinstance(variable, tf.Variable):
    return variable
  return getattr(variable, 'value', variable)


def variable_name(variable) -> str:
  return getattr(variable, 'path', variable.name).replace(':', '_')

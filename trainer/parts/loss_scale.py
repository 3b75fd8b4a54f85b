"""Dynamic loss scaling for mixed_float16, as Keras' LossScaleOptimizer does.

The loss is multiplied by the scale before the backward pass, so that small
gradients do not flush to zero in float16, and the gradients are divided by
it right after (they are float32: the variables are). A step whose
gradients overflowed (Inf/NaN with a finite loss) is skipped on every
replica: the scale halves and training goes on. After GROWTH_STEPS good
steps in a row the scale doubles.

A skipped step is not a step: it does not count in `global_step`, does not
advance the optimizer's `iterations` (so neither the learning-rate schedule
nor Adam's bias correction moves) and is left out of the reported gradient
norm - as with Keras' LossScaleOptimizer. It still consumes its batch:
`data_position` counts batches taken, so a resumed run continues after it.
"""

import tensorflow as tf

from trainer.parts import status as status_lib

INITIAL_SCALE = 2.0 ** 15
GROWTH_STEPS = 2000
ONLY_FIRST = tf.VariableAggregation.ONLY_FIRST_REPLICA


class DynamicLossScale:
  """The scale and its counters. Build under `strategy.scope()`.

  Attributes:
    scale: float32 variable, the current loss scale (checkpointed).
    skipped: int64 variable, overflow steps skipped so far by this process
      (not checkpointed: the loop reads how much it grew during a loop).
  """

  def __init__(self):
    self.scale = tf.Variable(INITIAL_SCALE, trainable=False, name='loss_scale',
                             aggregation=ONLY_FIRST)
    self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                  name='good_steps', aggregation=ONLY_FIRST)
    self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False,
                               name='skipped_steps', aggregation=ONLY_FIRST)

  def scale_loss(self, loss):
    """The loss to differentiate (replica context)."""
    return loss * tf.cast(tf.identity(self.scale), loss.dtype)

  def unscale(self, grads):
    """The true gradients from those of the scaled loss (exact: the scale is
    a power of two)."""
    inverse = 1.0 / tf.identity(self.scale)
    return [g * tf.cast(inverse, g.dtype) for g in grads]

  def update(self, status):
    """After each step (cross-replica context): halve on an overflow,
    double after GROWTH_STEPS good steps, count skipped steps."""
    overflow = status == status_lib.OVERFLOW
    good = tf.where(
        overflow, tf.constant(0, tf.int64),
        self.good_steps + tf.cast(status != status_lib.NONFINITE, tf.int64))
    grow = good >= GROWTH_STEPS
    scale = tf.where(overflow, self.scale / 2.0,
                     tf.where(grow, self.scale * 2.0, self.scale))
    self.scale.assign(tf.maximum(scale, 1.0))
    self.good_steps.assign(tf.where(grow, tf.constant(0, tf.int64), good))
    self.skipped.assign_add(tf.cast(overflow, tf.int64))

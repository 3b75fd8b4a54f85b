"""The input wait, measured inside the traced loop."""

import time

import numpy as np
import tensorflow as tf

from trainer.parts import input_wait


def test_the_wait_covers_a_slow_pipeline_and_the_batch_is_unchanged():
  def slow(x):
    time.sleep(0.05)
    return x
  dataset = tf.data.Dataset.range(3).map(
      lambda x: tf.py_function(slow, [x], tf.int64))

  @tf.function
  def take(iterator):
    batch, wait = input_wait.timed_next(iterator)
    return batch, wait

  iterator = iter(dataset)
  batch, wait = take(iterator)
  assert int(batch) == 0
  assert 0.04 < float(wait) < 5.0
  assert input_wait.measurable()
  np.testing.assert_array_equal(int(take(iterator)[0]), 1)

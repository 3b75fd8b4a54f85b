"""The replica step's own arithmetic (trainer/step.py)."""

import numpy as np
import tensorflow as tf

from trainer import step


def test_the_global_batch_share_is_bitwise_compute_average_loss():
  """The step divides the replica's loss sum by the global batch itself,
  without compute_average_loss's per-step checks: same value, same
  gradient, for a batch size that is not a power of two."""
  rng = np.random.default_rng(0)
  x = tf.Variable(rng.normal(size=[200, 5, 3]).astype(np.float32))
  for size in (3, 7, 12, 100):
    results = []
    for share in (
        lambda loss: step._global_batch_share(loss, None, size),  # pylint: disable=protected-access,cell-var-from-loop
        lambda loss: tf.nn.compute_average_loss(loss, global_batch_size=size)):  # pylint: disable=cell-var-from-loop

      @tf.function
      def value_and_grad(share=share):
        with tf.GradientTape() as tape:
          # 200 independent losses, each the share of a batch of 5.
          loss = tf.vectorized_map(
              lambda v: share(tf.reduce_sum(tf.square(v) * 1.37, axis=1)), x)
        return loss, tape.gradient(loss, x)
      results.append([t.numpy() for t in value_and_grad()])
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert np.all(results[0][0] != 0)

"""Gradient accumulation: one optimizer step from k micro-batches.

The replica's batch is cut into k micro-batches along its first axis and run
one after another, so activations live for one micro-batch at a time. Each
micro-batch loss is scaled by the same global batch size, so the sum of
their gradients is exactly the gradient of the whole batch (up to float
rounding; batch-norm statistics are per micro-batch, as with any
accumulation).

Two ways to run the micro-batches, chosen by the strategy:

  a tf.while_loop: one copy of the forward/backward pass in the graph.
    Used where the replica step makes no `merge_call` (one device,
    TPUStrategy, GPUs under XLA).
  unrolled: k copies, chained by control dependencies so they still run one
    after another. Used under MirroredStrategy and MultiWorkerMirrored-
    Strategy on CPUs (and GPUs without XLA), which all-reduce through
    `merge_call`: TensorFlow refuses a merge_call inside a while loop of the
    replica function ("merge_call called while defining a new graph or a
    tf.function"), and synchronized batch norm all-reduces its statistics
    in every micro-batch. Costs k x the trace time, not step time.
"""

import tensorflow as tf


def uses_merge_call() -> bool:
  """Whether the current strategy all-reduces through merge_call here
  (call in a replica context, while tracing)."""
  return not tf.__internal__.distribute.strategy_supports_no_merge_call()


def accumulate(fn, batch, k: int, *, unrolled: bool | None = None):
  """Runs fn on k micro-batches of `batch`; sums and concatenates results.

  Args:
    fn: micro_batch -> (summed, concatenated), two nested structures of
      tensors: the first is summed over micro-batches (gradients, losses),
      the second concatenated along axis 0 (per-example values).
    batch: the replica's batch, a nested structure whose tensors all have
      the same leading dimension, divisible by k.
    k: the number of micro-batches.
    unrolled: unroll instead of a while loop (default: uses_merge_call()).
  Returns:
    (summed, concatenated) over the whole batch.
  """
  if k == 1:
    return fn(batch)
  if unrolled is None:
    unrolled = uses_merge_call()
  micro = tf.nest.map_structure(lambda x: _split(x, k), batch)

  def part(i, after=()):
    with tf.control_dependencies(after):
      return tf.nest.map_structure(lambda x: tf.identity(x[i]), micro)

  # The first micro-batch outside any loop: its results give the structure,
  # dtypes and shapes the rest accumulate into.
  summed, concatenated = fn(part(0))
  if unrolled:
    parts = [concatenated]
    for i in range(1, k):
      more, values = fn(part(i, after=tf.nest.flatten(summed)))
      summed = tf.nest.map_structure(tf.add, summed, more)
      parts.append(values)
    return summed, tf.nest.map_structure(lambda *x: tf.concat(x, 0), *parts)

  flat = tf.nest.flatten(concatenated)
  arrays = [tf.TensorArray(x.dtype, k, element_shape=x.shape).write(0, x)
            for x in flat]

  def body(i, summed, arrays):
    more, values = fn(part(i))
    summed = tf.nest.map_structure(tf.add, summed, more)
    arrays = [a.write(i, x) for a, x in zip(arrays, tf.nest.flatten(values))]
    return i + 1, summed, arrays

  _, summed, arrays = tf.while_loop(lambda i, *_: i < k, body,
                                    (tf.constant(1), summed, arrays))
  flat = [a.concat() for a in arrays]
  return summed, tf.nest.pack_sequence_as(concatenated, flat)


def _split(x, k):
  """x [B, ...] -> [k, B/k, ...]. B may be unknown while tracing (under
  MultiWorkerMirroredStrategy the batch dimension of a distributed dataset
  is not static)."""
  rest = x.shape[1:]
  if rest.is_fully_defined():
    size = x.shape[0] // k if x.shape[0] is not None else -1
    return tf.reshape(x, [k, size, *rest])
  return tf.reshape(x, tf.concat([[k, -1], tf.shape(x)[1:]], 0))

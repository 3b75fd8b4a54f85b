"""input/pipeline.finish: sharding and what the strategy learns of the stream."""

import numpy as np
import tensorflow as tf

from input import pipeline


def _finish(pipelines, pipeline_id, training=True):
  context = tf.distribute.InputContext(
      num_input_pipelines=pipelines, input_pipeline_id=pipeline_id,
      num_replicas_in_sync=pipelines)
  return pipeline.finish(tf.data.Dataset.range(12), input_context=context,
                         batch_size=2 if pipelines > 1 else 4,
                         training=training, seed=1, num_examples=12)


def test_training_stream_is_endless_and_sharded_by_global_batch():
  single = _finish(1, 0)
  halves = [_finish(2, p) for p in range(2)]
  # Said endless even after the sharding filter, which hides it: otherwise
  # MultiWorkerMirroredStrategy adds an all-reduce per step to agree on
  # whether every worker still has data.
  for dataset in [single] + halves:
    assert dataset.cardinality() == tf.data.INFINITE_CARDINALITY
  for whole, a, b in zip(single.take(9), halves[0].take(9),
                         halves[1].take(9)):
    np.testing.assert_array_equal(whole, np.concatenate([a, b]))


def test_eval_stream_is_read_once_with_its_partial_batch():
  values = np.concatenate([b.numpy() for p in range(2)
                           for b in _finish(2, p, training=False)])
  assert sorted(values) == list(range(12))

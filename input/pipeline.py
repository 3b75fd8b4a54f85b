"""Finishing a tf.data pipeline the same way for every data source.

Every source in input/ hands an *unbatched* dataset of examples to `finish`,
which shards it for one input pipeline, shuffles, repeats, batches and
prefetches. Keeping this in one place is what makes the example order a pure
function of the seed: the property exact resume relies on.

Training data is sharded so that the *global* order does not depend on how
many hosts read it: every pipeline shuffles the same stream with the same
seed, and pipeline p keeps, of every global batch, the p-th contiguous slice.
Global batch k is therefore the same set of examples, and each replica gets
the same rows, whether 1 process with 4 replicas or 2 workers with 2 each read
the data, so those runs end with the same weights. Put expensive per-example
work (decoding, augmentation) after `finish`'s filter, i.e. map the batches,
or pass cheap examples (indices, paths) in: each pipeline then decodes only
its own slice.
"""

import tensorflow as tf


def finish(
    examples: tf.data.Dataset,
    *,
    input_context: tf.distribute.InputContext,
    batch_size: int,
    training: bool,
    seed: int,
    num_examples: int,
) -> tf.data.Dataset:
  """Shards, shuffles, repeats and batches `examples` for one input pipeline.

  Args:
    examples: unbatched examples, in a fixed order.
    input_context: which input pipeline this is; examples are sharded
      data-level by `input_pipeline_id` (file-level sharding belongs to
      readers of many files).
    batch_size: the batch size this pipeline emits: per replica when the
      strategy calls a dataset function (`input_context` then says how many
      replicas there are), global for a single-pipeline context.
    training: training data is shuffled with `seed`, reshuffled every epoch,
      repeated forever and batched with `drop_remainder=True` (static shapes,
      every step a full global batch). Eval data is read once, in order, and
      keeps its partial last batch so every example counts exactly once.
    seed: the shuffle seed.
    num_examples: size of `examples`, used as the shuffle buffer (full shuffle).
  """
  ds = examples
  pipelines = input_context.num_input_pipelines
  if training:
    ds = ds.shuffle(num_examples, seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat()
    if pipelines > 1:
      # Keep this pipeline's contiguous slice of every global batch.
      global_batch = batch_size * input_context.num_replicas_in_sync
      per_pipeline = global_batch // pipelines
      pipeline_id = tf.constant(input_context.input_pipeline_id, tf.int64)
      ds = ds.enumerate().filter(
          lambda i, _: (i % global_batch) // per_pipeline == pipeline_id)
      ds = ds.map(lambda _, example: example)
      # The filter hides that the stream is still endless. Said again, a
      # multi-worker strategy can take batches with a plain get_next;
      # otherwise it agrees on "has data" with one extra all-reduce across
      # workers at every step.
      ds = ds.apply(tf.data.experimental.assert_cardinality(
          tf.data.INFINITE_CARDINALITY))
  elif pipelines > 1:
    # Eval metrics are sums over examples: any disjoint, complete split works.
    ds = ds.shard(pipelines, input_context.input_pipeline_id)
  ds = ds.batch(batch_size, drop_remainder=training)
  return ds.prefetch(tf.data.AUTOTUNE)

"""Finishing a tf.data pipeline the same way for every data source.

Every source in input/ hands an *unbatched* dataset of examples to `finish`,
which shards it for one input pipeline, shuffles, repeats, batches and
prefetches. Keeping this in one place is what makes the example order a pure
function of (seed, number of input pipelines, pipeline id): the property the
replica-equality tests and exact resume rely on.
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
    input_context: which input pipeline this is; the examples are sharded
      data-level by `input_pipeline_id` (file-level sharding belongs to
      readers of many files).
    batch_size: the batch size this pipeline emits (per replica when the
      strategy calls a dataset function, global otherwise).
    training: training data is shuffled with `seed`, reshuffled every epoch,
      repeated forever and batched with `drop_remainder=True` (static shapes,
      every step a full global batch). Eval data is read once, in order, and
      keeps its partial last batch so every example counts exactly once.
    seed: the shuffle seed.
    num_examples: size of `examples`, used as the shuffle buffer (full shuffle).
  """
  ds = examples
  if input_context.num_input_pipelines > 1:
    ds = ds.shard(input_context.num_input_pipelines,
                  input_context.input_pipeline_id)
  if training:
    ds = ds.shuffle(num_examples, seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat()
  ds = ds.batch(batch_size, drop_remainder=training)
  return ds.prefetch(tf.data.AUTOTUNE)

"""A Trainer's dataset, distributed over the strategy's replicas.

`data.pipeline='per_host'` (default): `distribute_datasets_from_function`,
one pipeline per host building per-replica batches (the dataset must shard by
`input_context.input_pipeline_id`). `'global'`: `experimental_distribute_
dataset` of one globally batched dataset, split by the strategy under the
auto-shard policy `data.auto_shard`, set explicitly.
"""

import tensorflow as tf

from trainer.cluster import tpu


def distribute(trainer, split: str, *, batch_size: int, skip_batches: int = 0):
  """The distributed dataset of `trainer.dataset(split, ...)`.

  `skip_batches` global batches are skipped: how training resumes exactly
  where a checkpoint was taken (`data_position`). The pipeline is a
  deterministic function of the seed, so skipping k batches of a fresh
  pipeline yields what the k+1-th batch of the interrupted one would have
  been, across epoch boundaries and reshuffles included. Skipping reads and
  discards those batches: cheap for in-memory data, a one-off cost
  proportional to the data already seen for heavy pipelines.

  Args:
    trainer: the Trainer (its dataset, strategy and settings).
    split: passed to `trainer.dataset`.
    batch_size: the global batch size.
    skip_batches: global batches to skip.
  """
  settings, strategy = trainer.settings, trainer.strategy

  def checked(input_context, size):
    dataset = trainer.dataset(split, input_context, size)
    if trainer.is_tpu:
      # Before the strategy sees it: a TPU compiles for static shapes, and
      # its own error comes at compile time, far from the cause.
      tpu.check_dataset(dataset, split=split, training=split == 'train')
    return dataset

  if settings.pipeline == 'global':
    dataset = checked(tf.distribute.InputContext(), batch_size)
    if skip_batches:
      dataset = dataset.skip(skip_batches)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = settings.auto_shard
    return strategy.experimental_distribute_dataset(
        dataset.with_options(options))

  def dataset_fn(input_context):
    dataset = checked(input_context,
                      input_context.get_per_replica_batch_size(batch_size))
    if skip_batches:
      # Each step takes one batch per local replica from this pipeline.
      per_step = (input_context.num_replicas_in_sync //
                  input_context.num_input_pipelines)
      dataset = dataset.skip(skip_batches * per_step)
    return dataset

  return strategy.distribute_datasets_from_function(dataset_fn)

"""A Trainer's dataset, distributed over the strategy's replicas.

`data.pipeline='per_host'` (default): `distribute_datasets_from_function`,
one pipeline per host building per-replica batches (the dataset must shard by
`input_context.input_pipeline_id`). `'global'`: `experimental_distribute_
dataset` of one globally batched dataset, split by the strategy under the
auto-shard policy `data.auto_shard`, set explicitly.

`data.service='grpc://HOST:PORT'`: the training pipeline runs on the workers
of a tf.data service (`python -m input.data_service`), each pipeline of the
trainer a consumer of one shared job. The service hands out pieces of the
source dynamically (distributed_epoch: every example once per epoch, over
all service workers), so a pipeline is built as if it were the only one and
the order in which batches arrive is not a function of the seed: no skipping
on resume, and no bitwise equality between runs (docs/cluster.md).
"""

import tensorflow as tf

from trainer.cluster import tpu


def distribute(trainer, split: str, *, batch_size: int, skip_batches: int = 0,
               service_job: str = 'distloop'):
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
    service_job: with data.service, the job's name: the same on every
      worker of this run and different for another run (the controller
      names it after model_dir and the data position). '': read the
      data here, not through the service (tracing needs no batches).
  """
  settings, strategy = trainer.settings, trainer.strategy
  if getattr(trainer, 'coordinated', None):  # --strategy=parameter_server
    return trainer.coordinated.distribute(split, batch_size, service_job,
                                          skip_batches)
  if settings.data_service and split == 'train' and service_job:
    return _through_service(trainer, batch_size,
                            f'{service_job}-train-{skip_batches}')

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


def _through_service(trainer, batch_size: int, job_name: str):
  """The training stream from a tf.data service job every pipeline of the
  run reads from: each batch goes to one of them."""
  settings, strategy = trainer.settings, trainer.strategy
  distribute_op = tf.data.experimental.service.distribute(
      tf.data.experimental.service.ShardingPolicy.DYNAMIC,
      settings.data_service, job_name=job_name)
  if settings.pipeline == 'global':
    dataset = trainer.dataset('train', tf.distribute.InputContext(),
                              batch_size).apply(distribute_op)
    options = tf.data.Options()
    # Workers already get different batches from the service.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF)
    return strategy.experimental_distribute_dataset(
        dataset.with_options(options))

  def dataset_fn(input_context):
    # One pipeline's worth of per-replica batches, built unsharded: the
    # service, not the pipeline, decides which examples this pipeline gets.
    alone = tf.distribute.InputContext(
        num_input_pipelines=1, input_pipeline_id=0,
        num_replicas_in_sync=input_context.num_replicas_in_sync)
    return trainer.dataset(
        'train', alone, input_context.get_per_replica_batch_size(batch_size)
    ).apply(distribute_op)

  return strategy.distribute_datasets_from_function(dataset_fn)

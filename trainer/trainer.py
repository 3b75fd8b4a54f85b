"""The Trainer base class: the replica step and the inner training loop.

A subclass supplies what is model-specific:

  build_model()                              -> tf.keras.Model
  dataset(split, input_context, batch_size)  -> batched tf.data.Dataset
  compute_loss(batch, outputs)               -> per-example loss, shape [B]
  compute_metrics(batch, outputs)            -> {name: per-example value [B]}
  metric_names                               -> names compute_metrics returns

The base class owns everything distributed: variables under `strategy.scope()`,
`strategy.run`, the loss scaling by the *global* batch, the explicit gradient
all-reduce, the optimizer update, the inner `tf.range` loop and the
`strategy.reduce` of metrics. A subclass with an unusual step (two optimizers,
a GAN) overrides `train_step` alone and keeps the rest.

How metrics are exact for any replica count: each replica adds the *sums* of
its per-example values and its example count into a sync-on-read accumulator;
at the end of an inner loop the per-replica sums are combined with
`strategy.reduce(SUM)` and divided by the combined count. A mean of per-replica
means would weigh a short replica batch wrongly; sums do not.
"""

import collections
from typing import Any

from absl import logging
import tensorflow as tf

from trainer import optimization
from trainer.errors import UserError

SUM = tf.distribute.ReduceOp.SUM
PIPELINES = ('per_host', 'global')
AUTO_SHARD = {
    'auto': tf.data.experimental.AutoShardPolicy.AUTO,
    'data': tf.data.experimental.AutoShardPolicy.DATA,
    'file': tf.data.experimental.AutoShardPolicy.FILE,
    'off': tf.data.experimental.AutoShardPolicy.OFF,
}


class Trainer:
  """Base class; see the module docstring for the subclass contract.

  Attributes:
    config: the resolved experiment ConfigDict.
    strategy: the tf.distribute.Strategy everything runs under.
    model, optimizer: built under `strategy.scope()` in the constructor.
    global_step: int64 variable, the number of optimizer steps taken.
    trace_counts: {function name: times traced}; after warm-up each stays 1.
  """

  metric_names: tuple[str, ...] = ()

  def __init__(self, *, config, strategy: tf.distribute.Strategy):
    self.config = config
    self.strategy = strategy
    self.num_replicas = strategy.num_replicas_in_sync
    self.global_batch_size = _divisible(
        'train.global_batch_size', config.train.global_batch_size,
        self.num_replicas)
    self.eval_global_batch_size = _divisible(
        'eval.global_batch_size', config.eval.global_batch_size,
        self.num_replicas)
    self.pipeline = config.data.get('pipeline', 'per_host')
    if self.pipeline not in PIPELINES:
      raise UserError(f'config key data.pipeline={self.pipeline!r} is unknown; '
                      f'valid: {", ".join(PIPELINES)}')
    auto_shard = config.data.get('auto_shard', 'data')
    if auto_shard not in AUTO_SHARD:
      raise UserError(f'config key data.auto_shard={auto_shard!r} is unknown; '
                      f'valid: {", ".join(AUTO_SHARD)}')
    self.auto_shard = AUTO_SHARD[auto_shard]
    self.clip_norm = float(config.train.get('clip_norm', 0.0))
    self.trace_counts = collections.Counter()
    self._warm = set()

    # Everything stateful is created here, under the scope and before the
    # first trace: optimizer slots created inside a traced step fail under a
    # strategy (keras#23085), so the optimizer is built eagerly.
    with strategy.scope():
      self.model = self.build_model()
      self.optimizer = optimization.build_optimizer(config.optimizer)
      self.optimizer.build(self.model.trainable_variables)
      self.global_step = tf.Variable(
          0, dtype=tf.int64, trainable=False, name='global_step',
          aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
      # Layout: [sum of per-example loss, example count, one sum per metric].
      self._train_sums = self._accumulator('train_sums')
      self._eval_sums = self._accumulator('eval_sums')

    self._train_loop = self._counted(self._train_loop_fn, 'train_loop')
    self._eval_loop = self._counted(self._eval_loop_fn, 'eval_loop')

  # ---------------------------------------------------------------------------
  # The subclass contract.

  def build_model(self) -> tf.keras.Model:
    """Returns the model. Runs once, eagerly, under `strategy.scope()`."""
    raise NotImplementedError

  def dataset(self, split: str, input_context: tf.distribute.InputContext,
              batch_size: int) -> tf.data.Dataset:
    """Returns the batched dataset of `split` for one input pipeline.

    Runs eagerly, once per input pipeline. With `data.pipeline='per_host'`
    (default) it is called through `distribute_datasets_from_function`:
    `batch_size` is the per-replica batch and the dataset must shard by
    `input_context.input_pipeline_id`. With `'global'`, it is called once with
    a single-pipeline context and the global batch, and the strategy splits
    batches (auto-shard policy `data.auto_shard`).

    'train' must repeat forever with `drop_remainder=True`; eval splits are
    read once and may end in a partial batch.
    """
    raise NotImplementedError

  def compute_loss(self, batch, outputs) -> tf.Tensor:
    """Returns the per-example loss, float shape [B] (replica context).

    Return one loss per example, not a mean: the base class scales by the
    global batch size so the all-reduced gradient is the global-batch mean.
    """
    raise NotImplementedError

  def compute_metrics(self, batch, outputs) -> dict[str, tf.Tensor]:
    """Returns {name: per-example value [B]} for `metric_names` (replica ctx).

    Reported values are means over all examples of all replicas.
    """
    del batch, outputs
    return {}

  def forward(self, batch, training: bool):
    """Returns the model outputs for a batch (replica context).

    The default reads (inputs, labels) tuples; override for other layouts.
    """
    return self.model(batch[0], training=training)

  # ---------------------------------------------------------------------------
  # The replica step. Override `train_step` for an unusual update.

  def train_step(self, batch) -> dict[str, tf.Tensor]:
    """One optimizer step on this replica's batch (replica context, traced).

    Returns:
      {'loss': per-example loss [B], metric: per-example value [B], ...}
    """
    with tf.GradientTape() as tape:
      outputs = self.forward(batch, training=True)
      per_example_loss = self._checked_loss(batch, outputs)
      # Sum over this replica / global batch; the SUM all-reduce below then
      # yields the mean over the global batch, whatever the replica count.
      loss = tf.nn.compute_average_loss(
          per_example_loss, global_batch_size=self.global_batch_size)
      if self.model.losses:
        loss += tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
    grads = tape.gradient(loss, self.model.trainable_variables)
    self.apply_gradients(grads, self.model.trainable_variables)
    return {'loss': per_example_loss, **self.compute_metrics(batch, outputs)}

  def apply_gradients(self, grads, variables) -> None:
    """All-reduces replica gradients (SUM), clips, applies (replica context).

    The optimizer's own aggregation is disabled (trainer/optimization.py), so
    this all-reduce is the only one: gradients are summed exactly once.
    """
    grads = tf.distribute.get_replica_context().all_reduce(SUM, grads)
    if self.clip_norm > 0:
      grads, _ = tf.clip_by_global_norm(grads, self.clip_norm)
    self.optimizer.apply_gradients(zip(grads, variables))

  def eval_step(self, batch) -> dict[str, tf.Tensor]:
    """Per-example loss and metrics of a batch (replica context, traced)."""
    outputs = self.forward(batch, training=False)
    return {'loss': self._checked_loss(batch, outputs),
            **self.compute_metrics(batch, outputs)}

  # ---------------------------------------------------------------------------
  # Input.

  def distribute_dataset(self, split: str, *, batch_size: int):
    """Returns the distributed dataset of `split` at `batch_size` (global)."""
    if self.pipeline == 'global':
      dataset = self.dataset(split, tf.distribute.InputContext(), batch_size)
      options = tf.data.Options()
      options.experimental_distribute.auto_shard_policy = self.auto_shard
      return self.strategy.experimental_distribute_dataset(
          dataset.with_options(options))

    def dataset_fn(input_context):
      return self.dataset(
          split, input_context,
          input_context.get_per_replica_batch_size(batch_size))

    return self.strategy.distribute_datasets_from_function(dataset_fn)

  # ---------------------------------------------------------------------------
  # Loops: called from the host by the controller.

  def train(self, iterator, num_steps: int) -> dict[str, float]:
    """Runs `num_steps` steps in one tf.function call; returns their metrics.

    Args:
      iterator: an iterator over `distribute_dataset('train', ...)`.
      num_steps: steps to run; passed as a tensor so no value retraces.
    Returns:
      {'loss': mean per-example loss, metric: mean, 'examples': count} over
      the examples of all replicas in these steps.
    """
    sums = self._train_loop(iterator, tf.constant(num_steps, tf.int32))
    return self._means(sums.numpy())

  def evaluate(self, split: str = 'test') -> dict[str, float]:
    """Loss and metrics over the whole of `split`, each example once."""
    dataset = self.distribute_dataset(split,
                                      batch_size=self.eval_global_batch_size)
    sums = self._eval_loop(iter(dataset))
    return self._means(sums.numpy())

  def _train_loop_fn(self, iterator, num_steps):
    for _ in tf.range(num_steps):
      self.strategy.run(self._accumulating(self.train_step, self._train_sums),
                        args=(next(iterator),))
    self.global_step.assign_add(tf.cast(num_steps, tf.int64))
    return self._reduce_and_reset(self._train_sums)

  def _eval_loop_fn(self, iterator):
    for batch in iterator:
      self.strategy.run(self._accumulating(self.eval_step, self._eval_sums),
                        args=(batch,))
    return self._reduce_and_reset(self._eval_sums)

  # ---------------------------------------------------------------------------
  # Metric accumulation.

  def _accumulator(self, name):
    return tf.Variable(
        tf.zeros([2 + len(self.metric_names)]), trainable=False, name=name,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.SUM)

  def _accumulating(self, step_fn, sums):
    """Wraps a replica step so its per-example outputs add into `sums`."""
    def step(batch):
      values = step_fn(batch)
      expected = {'loss', *self.metric_names}
      if set(values) != expected:
        raise ValueError(
            f'{type(self).__name__}: the step returned keys {sorted(values)} '
            f'but metric_names declares {sorted(expected - {"loss"})} (plus '
            "'loss'); make compute_metrics return exactly metric_names")
      loss = values['loss']
      row = [tf.reduce_sum(loss), tf.cast(tf.shape(loss)[0], tf.float32)]
      row += [tf.reduce_sum(tf.cast(values[k], tf.float32))
              for k in self.metric_names]
      sums.assign_add(tf.stack(row))
    return step

  def _reduce_and_reset(self, sums):
    # Reading a sync-on-read variable inside strategy.run gives each replica's
    # own copy; strategy.reduce(SUM) then combines them across replicas and
    # workers.
    local = self.strategy.run(lambda: tf.identity(sums))
    total = self.strategy.reduce(SUM, local, axis=None)
    with tf.control_dependencies([total]):
      self.strategy.run(lambda: sums.assign(tf.zeros_like(sums)))
    return tf.identity(total)

  def _means(self, sums) -> dict[str, float]:
    count = float(sums[1])
    means = {'loss': float(sums[0]) / max(count, 1.0)}
    for i, name in enumerate(self.metric_names):
      means[name] = float(sums[2 + i]) / max(count, 1.0)
    means['examples'] = count
    return means

  def _checked_loss(self, batch, outputs):
    loss = self.compute_loss(batch, outputs)
    if loss.shape.rank != 1:
      raise ValueError(
          f'{type(self).__name__}.compute_loss returned a loss of shape '
          f'{loss.shape}; return the per-example loss, shape [batch] (e.g. '
          'keras.losses.sparse_categorical_crossentropy(labels, logits, '
          'from_logits=True)), not a mean: the Trainer scales by the global '
          'batch itself')
    return loss

  # ---------------------------------------------------------------------------
  # Retrace detection.

  def _counted(self, fn, name):
    """tf.function(fn) that counts its traces and warns on a late retrace."""
    def traced(*args):
      self.trace_counts[name] += 1
      if name in self._warm:
        logging.warning(
            '%s: tf.function %r retraced (trace #%d) after warm-up; each '
            'retrace costs a full graph build. Pass tensors, not Python '
            'values, and keep input shapes and dtypes fixed.',
            type(self).__name__, name, self.trace_counts[name])
      return fn(*args)

    function = tf.function(traced)

    def call(*args: Any):
      result = function(*args)
      self._warm.add(name)
      return result
    return call


def _divisible(key: str, batch_size: int, num_replicas: int) -> int:
  if batch_size < 1 or batch_size % num_replicas:
    raise UserError(
        f'config key {key}={batch_size} must be a positive multiple of the '
        f'{num_replicas} replicas in sync; use e.g. '
        f'--config.{key}={max(1, round(batch_size / num_replicas)) * num_replicas}')
  return batch_size

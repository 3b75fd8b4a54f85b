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
import contextlib
from typing import Any

from absl import logging
import tensorflow as tf

from trainer import optimization
from trainer import tpu_checks
from trainer.errors import UserError

SUM = tf.distribute.ReduceOp.SUM
# Status of a train step, agreed by all replicas and workers (see
# apply_gradients): the inner loop stops early on anything but OK.
OK, STOP_REQUESTED, NONFINITE = 0, 1, 2
# A mixed_float16 step whose scaled gradients overflowed: the update is
# skipped, the loss scale halves and training goes on (not an error).
OVERFLOW = 3
# train.precision -> Keras dtype policy; 'auto' is mixed_bfloat16 on TPU
# (its native matmul type: no loss scaling needed) and float32 elsewhere.
PRECISIONS = ('auto', 'float32', 'mixed_float16', 'mixed_bfloat16')
# Dynamic loss scaling (mixed_float16), as in Keras' LossScaleOptimizer.
INITIAL_LOSS_SCALE = 2.0 ** 15
LOSS_SCALE_GROWTH_STEPS = 2000
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

  @property
  def measures_input_wait(self) -> bool:
    """Whether train() measures input_wait_secs: not under op determinism
    (--deterministic), where TensorFlow refuses tf.timestamp."""
    # TF 2.21 has no public getter (tf.config.experimental only enables it).
    from tensorflow.python.framework import config  # pylint: disable=g-direct-tensorflow-import,import-outside-toplevel
    return not config.is_op_determinism_enabled()

  def __init__(self, *, config, strategy: tf.distribute.Strategy):
    self.config = config
    self.strategy = strategy
    self.num_replicas = strategy.num_replicas_in_sync
    self.is_tpu = _is_tpu(strategy)
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
    self.precision = _precision(config.train.get('precision', 'auto'),
                                strategy)
    self.grad_accum_steps = _grad_accum_steps(
        config.train.get('grad_accum_steps', 1), self.global_batch_size,
        self.num_replicas)
    self.jit_compile = config.train.get('jit_compile', False)
    if not isinstance(self.jit_compile, bool):
      raise UserError(f'config key train.jit_compile={self.jit_compile!r} '
                      'must be True or False')
    self.ema_decay = config.train.get('ema_decay', 0.0)
    if (isinstance(self.ema_decay, bool) or
        not isinstance(self.ema_decay, (int, float)) or
        not 0.0 <= self.ema_decay < 1.0):
      raise UserError(f'config key train.ema_decay={self.ema_decay!r} must be '
                      'in [0, 1), e.g. 0.999 (0 disables the moving average)')
    if self.grad_accum_steps > 1 and type(self).train_step is not (
        Trainer.train_step):
      raise UserError(
          f'config key train.grad_accum_steps={self.grad_accum_steps}: '
          f'{type(self).__name__} overrides train_step, which then owns the '
          'step; accumulate there or set train.grad_accum_steps=1')
    self.trace_counts = collections.Counter()
    self._warm = set()
    self._step_status = None  # Set while tracing a step by apply_gradients.
    self._step_grad_norm = None  # Likewise.
    self.reports_grad_norm = False  # Set when the train step is traced.

    # Everything stateful is created here, under the scope and before the
    # first trace: optimizer slots created inside a traced step fail under a
    # strategy (keras#23085), so the optimizer is built eagerly.
    with strategy.scope():
      # The dtype policy is read when layers are made: set it for the model
      # alone (it is process-global; other trainers keep theirs).
      previous_policy = tf.keras.mixed_precision.global_policy()
      tf.keras.mixed_precision.set_global_policy(self.precision)
      try:
        self.model = self.build_model()
      finally:
        tf.keras.mixed_precision.set_global_policy(previous_policy)
      self.optimizer = optimization.build_optimizer(
          config.optimizer, variables=self.model.trainable_variables,
          total_steps=config.train.steps)
      self.optimizer.build(self.model.trainable_variables)
      self.global_step = tf.Variable(
          0, dtype=tf.int64, trainable=False, name='global_step',
          aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
      # Global batches taken from the training stream. Equal to global_step
      # unless a non-finite step was skipped (see the controller's recovery).
      self.data_position = tf.Variable(
          0, dtype=tf.int64, trainable=False, name='data_position',
          aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
      # Set to 1 from the host (a SIGTERM watcher thread) while a loop runs;
      # every replica reads it each step and the all-reduce makes them agree.
      self.stop_requested = tf.Variable(
          0.0, trainable=False, name='stop_requested',
          aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
      # Layout: [sum of per-example loss, example count, one sum per metric]
      # and, for training, the sum over steps of the global gradient norm.
      self._train_sums = self._accumulator('train_sums', extra=1)
      self._eval_sums = self._accumulator('eval_sums')
      # mixed_float16: the loss is multiplied by loss_scale before the
      # backward pass so small gradients do not flush to zero in float16;
      # the gradients are divided by it after the all-reduce.
      self.loss_scale = None
      if self.precision == 'mixed_float16':
        self.loss_scale = tf.Variable(
            INITIAL_LOSS_SCALE, trainable=False, name='loss_scale',
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self._good_steps = tf.Variable(
            0, dtype=tf.int64, trainable=False, name='good_steps',
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
      # Exponential moving average of the trainable weights, used for eval
      # and export (see ema_weights).
      self.ema_weights_list = []
      if self.ema_decay:
        self.ema_weights_list = [
            tf.Variable(v, trainable=False, name='ema/' + _name(v))
            for v in self.model.trainable_variables]

    self._gradients_fn = self._gradients
    if self.jit_compile:
      # XLA compiles the forward and backward pass. The all-reduce and the
      # update stay outside it: collectives of MirroredStrategy and
      # MultiWorkerMirroredStrategy are not XLA ops on CPU/GPU. (On TPU the
      # whole step is compiled anyway.)
      self._gradients_fn = tf.function(self._gradients, jit_compile=True)
    self._train_loop = self._counted(
        lambda it, n: self._train_loop_fn(it, n, timed=False), 'train_loop')
    # The same loop with the input wait measured (see train): a second graph,
    # traced on its first use.
    self._train_loop_timed = self._counted(
        lambda it, n: self._train_loop_fn(it, n, timed=True),
        'train_loop_timed')
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

  def serving_input_signature(self):
    """TensorSpecs of the exported serving function's inputs.

    The default reads the Keras model's inputs with a free batch dimension;
    override when the model has no static inputs (subclassed models).
    """
    return [tf.TensorSpec([None, *x.shape[1:]], x.dtype, name=f'input_{i}')
            for i, x in enumerate(self.model.inputs)]

  def serve(self, *inputs):
    """The exported serving computation (traced; no strategy, no training).

    The default returns {'outputs': model(inputs)}; override to add
    post-processing such as class ids or probabilities.
    """
    outputs = self.model(inputs[0] if len(inputs) == 1 else list(inputs),
                         training=False)
    return {'outputs': outputs}

  # ---------------------------------------------------------------------------
  # The replica step. Override `train_step` for an unusual update.

  def train_step(self, batch) -> dict[str, tf.Tensor]:
    """One optimizer step on this replica's batch (replica context, traced).

    Returns:
      {'loss': per-example loss [B], metric: per-example value [B], ...}
    """
    grads, loss, values = self.compute_gradients(batch)
    self.apply_gradients(grads, self.model.trainable_variables, loss=loss)
    return values

  def compute_gradients(self, batch):
    """This replica's gradients of its share of the global-batch mean loss.

    With `train.grad_accum_steps=k` the batch is cut into k micro-batches
    along its first axis, run one after another in a loop (activations
    live for one micro-batch at a time) and their gradients summed: every
    micro-batch loss is scaled by the same global batch size, so the sum is
    exactly the gradient of the whole batch (up to float rounding; batch
    norm statistics are per micro-batch, as with any accumulation). With
    `train.jit_compile` the forward and backward pass is compiled by XLA.

    Returns:
      (gradients, scaled loss, {'loss': per-example loss, metric: per-example
      values}); the gradients are multiplied by the loss scale under
      mixed_float16 (apply_gradients divides it out).
    """
    k = self.grad_accum_steps
    if k == 1:
      return self._gradients_fn(batch)
    variables = self.model.trainable_variables
    micro = tf.nest.map_structure(
        lambda x: tf.reshape(x, [k, x.shape[0] // k, *x.shape[1:]]), batch)
    names = ('loss', *self.metric_names)

    def body(i, grads, loss, arrays):
      part = tf.nest.map_structure(lambda x: x[i], micro)
      part_grads, part_loss, values = self._gradients_fn(part)
      grads = [g + tf.convert_to_tensor(p) for g, p in zip(grads, part_grads)]
      arrays = [a.write(i, values[n]) for a, n in zip(arrays, names)]
      return i + 1, grads, loss + part_loss, arrays

    arrays = [tf.TensorArray(tf.float32, k) for n in names]
    _, grads, loss, arrays = tf.while_loop(
        lambda i, *_: i < k, body,
        (tf.constant(0), [tf.zeros_like(v) for v in variables],
         tf.zeros([]), arrays))
    values = {n: a.concat() for n, a in zip(names, arrays)}
    return grads, loss, values

  def _gradients(self, batch):
    """(grads, scaled loss, per-example values) of one (micro-)batch."""
    with tf.GradientTape() as tape:
      outputs = _float32(self.forward(batch, training=True))
      per_example_loss = self._checked_loss(batch, outputs)
      # Sum over this replica / global batch; the SUM all-reduce then yields
      # the mean over the global batch, whatever the replica count.
      loss = tf.nn.compute_average_loss(
          per_example_loss, global_batch_size=self.global_batch_size)
      if self.model.losses:
        # Counted once per step: 1/k of it in each of k micro-batches.
        loss += tf.nn.scale_regularization_loss(
            tf.add_n(self.model.losses)) / self.grad_accum_steps
      scaled = loss if self.loss_scale is None else loss * self.loss_scale
    grads = tape.gradient(scaled, self.model.trainable_variables)
    grads = [tf.zeros_like(v) if g is None else g
             for g, v in zip(grads, self.model.trainable_variables)]
    values = {'loss': per_example_loss}
    values.update({k: tf.cast(v, tf.float32) for k, v in
                   self.compute_metrics(batch, outputs).items()})
    return grads, loss, values

  def apply_gradients(self, grads, variables, *, loss=None) -> None:
    """All-reduces replica gradients (SUM), clips, applies (replica context).

    The optimizer's own aggregation is disabled (trainer/optimization.py), so
    this all-reduce is the only one: gradients are summed exactly once.

    The same all-reduce carries two scalars: this replica's scaled `loss` and
    the host's stop request. Every replica and worker therefore sees the same
    global loss, gradient norm and stop flag, and takes the same decision:
    a non-finite loss or gradient norm skips the update everywhere (the
    weights stay as they were), and a stop request ends the inner loop after
    this step on every worker at once. Under mixed_float16 the gradients
    come multiplied by the loss scale: they are divided by it here, and
    non-finite gradients with a finite loss are an overflow of the scale
    (OVERFLOW: skip the update, halve the scale, go on), not an error.

    Args:
      grads: this replica's gradients, scaled by the global batch.
      variables: the variables they belong to.
      loss: this replica's scaled loss (optional; checked for finiteness).
    """
    # tf.identity places the reads on this replica's device; a bare variable
    # read has none, and the all-reduce then has no destination.
    extras = [tf.identity(self.stop_requested),
              tf.zeros([]) if loss is None else tf.identity(loss)]
    reduced = tf.distribute.get_replica_context().all_reduce(
        SUM, list(grads) + extras)
    grads, (stop, total_loss) = reduced[:-2], reduced[-2:]
    if self.loss_scale is not None:
      inverse = 1.0 / tf.identity(self.loss_scale)
      grads = [g * inverse for g in grads]
    grad_norm = tf.linalg.global_norm(grads)
    finite = tf.math.is_finite(grad_norm) & tf.math.is_finite(total_loss)
    self._step_grad_norm = grad_norm  # Reported by train(): mean over steps.
    if self.clip_norm > 0:
      grads, _ = tf.clip_by_global_norm(grads, self.clip_norm,
                                        use_norm=grad_norm)
    self._apply_if(finite, grads, variables)
    bad = NONFINITE
    if self.loss_scale is not None:
      bad = tf.where(tf.math.is_finite(total_loss), OVERFLOW, NONFINITE)
    self._step_status = tf.where(
        finite, tf.where(stop > 0, STOP_REQUESTED, OK), bad)

  def _apply_if(self, finite, grads, variables):
    """optimizer.apply_gradients only when `finite` (replica context).

    A cond whose branch calls merge_call (as apply_gradients does under
    MirroredStrategy) is not allowed in a replica context, so there the cond
    runs in cross-replica context, as Keras' LossScaleOptimizer does.
    """
    def apply():
      self.optimizer.apply_gradients(zip(grads, variables))

    if tf.__internal__.distribute.strategy_supports_no_merge_call():
      # Here the cond and everything it touches sit on this replica's one
      # device, so it can stay one functional If op. By default TensorFlow
      # lowers it to Switch/Merge nodes around every op of the update, which
      # made the seed MLP's step ~10-20% slower than the same step without
      # the guard; kept as an If op, the guard costs ~nothing measurable
      # (bench/throughput.py). (Across devices, as under MirroredStrategy
      # below, an unlowered If cannot be placed, so that path is lowered.)
      with _unlowered_conds():
        tf.cond(finite, apply, lambda: None)
      return

    def cross_replica(distribution, finite, grads):
      def apply_everywhere():
        distribution.extended.call_for_each_replica(
            lambda g: self.optimizer.apply_gradients(zip(g, variables)),
            args=(grads,))
      first = distribution.experimental_local_results(finite)[0]
      tf.cond(first, apply_everywhere, lambda: None)

    tf.distribute.get_replica_context().merge_call(
        cross_replica, args=(finite, grads))

  def eval_step(self, batch) -> dict[str, tf.Tensor]:
    """Per-example loss and metrics of a batch (replica context, traced)."""
    outputs = _float32(self.forward(batch, training=False))
    return {'loss': self._checked_loss(batch, outputs),
            **self.compute_metrics(batch, outputs)}

  # ---------------------------------------------------------------------------
  # Input.

  def distribute_dataset(self, split: str, *, batch_size: int,
                         skip_batches: int = 0):
    """Returns the distributed dataset of `split` at `batch_size` (global).

    Args:
      split: passed to `dataset`.
      batch_size: the global batch size.
      skip_batches: global batches to skip: how training resumes exactly
        where a checkpoint was taken (`data_position`). The pipeline is a
        deterministic function of the seed, so skipping k batches of a fresh
        pipeline yields what the k+1-th batch of the interrupted one would
        have been, across epoch boundaries and reshuffles included. Skipping
        reads and discards those batches: cheap for in-memory data, a
        one-off cost proportional to the data already seen for heavy
        pipelines.
    """
    if self.pipeline == 'global':
      dataset = self._checked_dataset(split, tf.distribute.InputContext(),
                                      batch_size)
      if skip_batches:
        dataset = dataset.skip(skip_batches)
      options = tf.data.Options()
      options.experimental_distribute.auto_shard_policy = self.auto_shard
      return self.strategy.experimental_distribute_dataset(
          dataset.with_options(options))

    def dataset_fn(input_context):
      dataset = self._checked_dataset(
          split, input_context,
          input_context.get_per_replica_batch_size(batch_size))
      if skip_batches:
        # Each step takes one batch per local replica from this pipeline.
        per_step = (input_context.num_replicas_in_sync //
                    input_context.num_input_pipelines)
        dataset = dataset.skip(skip_batches * per_step)
      return dataset

    return self.strategy.distribute_datasets_from_function(dataset_fn)

  def _checked_dataset(self, split, input_context, batch_size):
    dataset = self.dataset(split, input_context, batch_size)
    if self.is_tpu:
      # Before the strategy sees it: a TPU compiles for static shapes, and
      # its own error comes at compile time, far from the cause.
      tpu_checks.check_dataset(dataset, split=split,
                               training=split == 'train')
    return dataset

  # ---------------------------------------------------------------------------
  # Loops: called from the host by the controller.

  def train(self, iterator, num_steps: int, *,
            measure_input_wait: bool = False) -> dict[str, float]:
    """Runs up to `num_steps` steps in one tf.function call.

    The loop ends early, after the step in flight, when the host sets
    `stop_requested` or a step's loss or gradient norm is not finite (that
    step's update is skipped).

    Args:
      iterator: an iterator over `distribute_dataset('train', ...)`.
      num_steps: steps to run; passed as a tensor so no value retraces.
      measure_input_wait: time every step's wait for its batch (see
        _timed_next). That costs a few percent of step time on small models,
        so the controller measures one inner loop in several; it runs a
        second graph of the loop, traced on its first use. Ignored under op
        determinism (--deterministic), where tf.timestamp is refused.
    Returns:
      {'loss': mean per-example loss, metric: mean, 'examples': count,
       'steps': steps applied, 'status': OK | STOP_REQUESTED | NONFINITE,
       'grad_norm': mean over the applied steps of the global norm of the
       all-reduced gradient (absent when the train step does not call
       `apply_gradients`)}, means over the examples of all replicas in these
      steps; with the input wait measured also 'input_wait_secs', the
      seconds the loop was blocked taking batches from `iterator`, and
      'loop_secs', the seconds from the loop's start to its end measured by
      the same clock inside the graph (so tracing is not counted).
    """
    timed = measure_input_wait and self.measures_input_wait
    loop = self._train_loop_timed if timed else self._train_loop
    sums, steps, status, waited, elapsed = loop(
        iterator, tf.constant(num_steps, tf.int32))
    sums = sums.numpy()
    metrics = self._means(sums)
    metrics['steps'] = int(steps)
    metrics['status'] = int(status)
    if timed:
      metrics['input_wait_secs'] = float(waited)
      metrics['loop_secs'] = float(elapsed)
    if self.reports_grad_norm:
      # Every replica added the same norm (see _accumulating). A loop that
      # ended on a non-finite step reports that step's inf/nan here.
      metrics['grad_norm'] = float(sums[-1]) / (
          self.num_replicas * max(int(steps), 1))
    return metrics

  def weight_norm(self) -> float:
    """Global L2 norm of the trainable weights (host, eager; not traced)."""
    return float(tf.linalg.global_norm(self.model.trainable_variables))

  def learning_rate(self) -> float:
    """The optimizer's learning rate at the current step (host, eager)."""
    return float(tf.convert_to_tensor(self.optimizer.learning_rate))

  def evaluate(self, split: str = 'test') -> dict[str, float]:
    """Loss and metrics over the whole of `split`, each example once (with
    the moving-average weights when train.ema_decay is set)."""
    dataset = self.distribute_dataset(split,
                                      batch_size=self.eval_global_batch_size)
    with self.ema_weights():
      sums = self._eval_loop(iter(dataset))
    return self._means(sums.numpy())

  def _train_loop_fn(self, iterator, num_steps, timed):
    step_fn = self._accumulating(self.train_step, self._train_sums,
                                 grad_norm=True)
    start = tf.timestamp() if timed else None

    # A plain tf.while_loop whose condition ends the loop after a step that
    # was not OK (or OVERFLOW). Its only loop variables are the step index,
    # the last status and the input wait: every loop variable costs a few
    # executor ops per step, and an AutoGraph `for ... break` adds a cond and
    # more loop variables (~1-2% of the seed MLP's 0.3 ms step).
    def keep_going(i, status, *unused_waited):
      return (i < num_steps) & ((status == OK) | (status == OVERFLOW))

    def body(i, unused_status, *waited):
      if timed:
        batch, wait = _timed_next(iterator)
        waited = (waited[0] + wait,)
      else:
        batch = next(iterator)
      status = self.strategy.experimental_local_results(
          self.strategy.run(step_fn, args=(batch,)))[0]
      if self.loss_scale is not None:
        self._update_loss_scale(status)
      if self.ema_weights_list:
        # Every step before this one in the loop was applied (OK, or an
        # OVERFLOW step, which counts as a step taken, as in Keras).
        self._update_ema((status == OK) | (status == STOP_REQUESTED),
                         self.global_step + tf.cast(i, tf.int64))
      return (i + 1, status, *waited)

    initial = (tf.zeros([], num_steps.dtype), tf.constant(OK))
    if timed:
      initial += (tf.constant(0.0, tf.float64),)  # Seconds getting batches.
    final = tf.while_loop(keep_going, body, initial)
    # Batches taken from the stream, and updates applied: all of them but a
    # last NONFINITE step's.
    taken, status = tf.cast(final[0], tf.int64), final[1]
    applied = taken - tf.cast(status == NONFINITE, tf.int64)
    waited = elapsed = tf.constant(0.0, tf.float64)
    if timed:
      waited = final[2]
      with tf.control_dependencies([status, waited]):
        elapsed = tf.timestamp() - start
    self.global_step.assign_add(applied)
    self.data_position.assign_add(taken)
    return (self._reduce_and_reset(self._train_sums), applied, status, waited,
            elapsed)

  def _update_loss_scale(self, status):
    """Dynamic loss scaling (cross-replica context, once per step): halve
    on an overflow, double after LOSS_SCALE_GROWTH_STEPS good steps."""
    overflow = status == OVERFLOW
    good = tf.where(overflow, tf.constant(0, tf.int64),
                    self._good_steps + tf.cast(status != NONFINITE, tf.int64))
    grow = good >= LOSS_SCALE_GROWTH_STEPS
    scale = tf.where(overflow, self.loss_scale / 2.0,
                     tf.where(grow, self.loss_scale * 2.0, self.loss_scale))
    self.loss_scale.assign(tf.maximum(scale, 1.0))
    self._good_steps.assign(tf.where(grow, tf.constant(0, tf.int64), good))

  def _update_ema(self, applied, num_updates):
    """ema = d * ema + (1 - d) * weights after an applied step (cross-replica
    context). d = min(ema_decay, (1 + n) / (10 + n)) with n the updates
    before this one (the first average is mostly the new weights), so the
    average does not start out dominated by the random initial weights; on
    a skipped step d = 1 and nothing changes. Each device updates its own
    copy from its own weights (`extended.update`): no cross-device traffic.
    """
    n = tf.cast(num_updates, tf.float32)
    decay = tf.minimum(self.ema_decay, (1.0 + n) / (10.0 + n))
    decay = tf.where(applied, decay, 1.0)

    def update(average, weight):
      return average.assign(decay * average + (1.0 - decay) * weight)
    for average, weight in zip(self.ema_weights_list,
                               self.model.trainable_variables):
      self.strategy.extended.update(average, update,
                                    args=(_tf_variable(weight),))

  @contextlib.contextmanager
  def ema_weights(self):
    """Within it the model holds the moving-average weights (eval, export);
    the training weights come back on exit. A no-op without train.ema_decay.
    """
    if not self.ema_weights_list:
      yield
      return
    variables = self.model.trainable_variables
    with self.strategy.scope():
      backup = [tf.identity(_tf_variable(v)) for v in variables]
      for weight, average in zip(variables, self.ema_weights_list):
        weight.assign(tf.identity(average))
    try:
      yield
    finally:
      with self.strategy.scope():
        for weight, value in zip(variables, backup):
          weight.assign(value)

  def checkpoint_items(self, model_only: bool = False) -> dict:
    """What a checkpoint holds besides step and data position: the model,
    the optimizer, the weight average and the loss scale when present."""
    items = {'model': self.model}
    if self.ema_weights_list:
      items['ema'] = self.ema_weights_list
    if not model_only:
      items['optimizer'] = self.optimizer
      if self.loss_scale is not None:
        items['loss_scale'] = self.loss_scale
    return items

  def _eval_loop_fn(self, iterator):
    for batch in iterator:
      self.strategy.run(self._accumulating(self.eval_step, self._eval_sums),
                        args=(batch,))
    return self._reduce_and_reset(self._eval_sums)

  # ---------------------------------------------------------------------------
  # Metric accumulation.

  def _accumulator(self, name, extra=0):
    return tf.Variable(
        tf.zeros([2 + len(self.metric_names) + extra]), trainable=False,
        name=name,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.SUM)

  def _accumulating(self, step_fn, sums, grad_norm=False):
    """Wraps a replica step so its per-example outputs add into `sums`.

    With `grad_norm`, the step's global gradient norm (the same on every
    replica, set by apply_gradients) also adds into the last slot: one more
    element in the same assign_add and no other op per step; `train`
    divides the SUM over replicas by the replica count.

    The wrapped step returns the step status (an int32 scalar, the same on
    every replica).
    """
    def step(batch):
      self._step_status = None
      self._step_grad_norm = None
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
      if grad_norm:
        self.reports_grad_norm = self._step_grad_norm is not None
        row.append(tf.zeros([]) if self._step_grad_norm is None else
                   tf.cast(self._step_grad_norm, tf.float32))
      sums.assign_add(tf.stack(row))
      if self._step_status is not None:
        return self._step_status
      # A train_step that bypassed apply_gradients (or an eval step): decide
      # from this replica's own view, which is exact on a single worker.
      finite = tf.reduce_all(tf.math.is_finite(loss))
      return tf.where(finite, tf.where(self.stop_requested > 0,
                                       STOP_REQUESTED, OK), NONFINITE)
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


def _timed_next(iterator):
  """(next batch, seconds spent getting it), inside the traced inner loop.

  How the input wait is measured, honestly: a (host CPU) timestamp right
  before the iterator's GetNext ops start, and, for each device's part of the
  batch, one once all its tensors exist. That part of the batch then goes on through
  identities that depend on its timestamp, so the replica's compute starts
  only after it: otherwise the timestamp op could queue behind the step's own
  ops and count compute as waiting. Iterations of the inner loop run one
  after another (each waits for the previous step, optimizer update included,
  through the loop variables and the function's automatic control
  dependencies), so the wait is time in which that replica's step could not
  run: blocked on an empty prefetch buffer, plus the fixed cost of handing
  over a batch that was ready. Returned: the mean over devices (replicas of
  this worker), float64. On TPU these are the host's waits for its input
  pipeline, not infeed time on the device.
  """
  start = tf.timestamp()
  with tf.control_dependencies([start]):
    batch = next(iterator)
  flat = tf.nest.flatten(batch, expand_composites=True)
  by_device = {}
  for i, tensor in enumerate(flat):
    by_device.setdefault(tensor.device, []).append(i)
  waits = []
  for device, indices in by_device.items():
    # On the replica's device when it is a CPU (tf.timestamp has no GPU or
    # TPU kernel): a control edge across devices costs a send/receive pair.
    cpu = tf.DeviceSpec.from_string(device).device_type == 'CPU'
    with (tf.device(device) if cpu else contextlib.nullcontext()), \
         tf.control_dependencies([flat[i] for i in indices]):
      got = tf.timestamp()
    waits.append(got - start)
    with tf.control_dependencies([got]):
      for i in indices:
        with tf.device(flat[i].device):
          flat[i] = tf.identity(flat[i])
  batch = tf.nest.pack_sequence_as(batch, flat, expand_composites=True)
  return batch, waits[0] if len(waits) == 1 else tf.add_n(waits) / len(waits)


@contextlib.contextmanager
def _unlowered_conds():
  """tf.cond ops made within are not lowered to Switch/Merge.

  TF 2.21 has no public switch for this; the private flag is read when the
  If op is made (control_flow_util_v2.maybe_set_lowering_attr). Without it
  (another TF version) conds are lowered, which is correct, only slower.
  """
  from tensorflow.python.ops import control_flow_util_v2 as util  # pylint: disable=g-direct-tensorflow-import,import-outside-toplevel
  name = '_DISABLE_LOWER_USING_SWITCH_MERGE'
  if not hasattr(util, name):
    yield
    return
  previous = getattr(util, name)
  setattr(util, name, True)
  try:
    yield
  finally:
    setattr(util, name, previous)


def _float32(outputs):
  """Float outputs of a mixed-precision model, as float32: the loss and
  metrics are computed in float32 whatever the compute dtype."""
  def cast(x):
    if isinstance(x, tf.Tensor) and x.dtype in (tf.float16, tf.bfloat16):
      return tf.cast(x, tf.float32)
    return x
  return tf.nest.map_structure(cast, outputs)


def _tf_variable(variable):
  """The tf.Variable (possibly distributed) behind a Keras variable."""
  return getattr(variable, 'value', variable) if not isinstance(
      variable, tf.Variable) else variable


def _name(variable) -> str:
  return getattr(variable, 'path', variable.name).replace(':', '_')


def _is_tpu(strategy) -> bool:
  return isinstance(strategy, (tf.distribute.TPUStrategy,
                               tf.distribute.experimental.TPUStrategy))


def _precision(value, strategy) -> str:
  if value not in PRECISIONS:
    raise UserError(f'config key train.precision={value!r} is unknown; valid: '
                    f'{", ".join(PRECISIONS)}')
  tpu = _is_tpu(strategy)
  if value == 'auto':
    return 'mixed_bfloat16' if tpu else 'float32'
  if value == 'mixed_float16' and tpu:
    raise UserError('config key train.precision=mixed_float16 is for GPUs; '
                    'TPUs compute in bfloat16: use mixed_bfloat16 (or auto)')
  return value


def _grad_accum_steps(value, global_batch_size: int, num_replicas: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise UserError(f'config key train.grad_accum_steps={value!r} must be an '
                    'integer >= 1 (1: no accumulation)')
  if global_batch_size % (num_replicas * value):
    raise UserError(
        f'config key train.grad_accum_steps={value} must divide the per-'
        f'replica batch {global_batch_size // num_replicas} '
        f'(train.global_batch_size={global_batch_size} over {num_replicas} '
        'replicas) into equal micro-batches; pick a divisor of it')
  return value


def _divisible(key: str, batch_size: int, num_replicas: int) -> int:
  if batch_size < 1 or batch_size % num_replicas:
    raise UserError(
        f'config key {key}={batch_size} must be a positive multiple of the '
        f'{num_replicas} replicas in sync; use e.g. '
        f'--config.{key}={max(1, round(batch_size / num_replicas)) * num_replicas}')
  return batch_size

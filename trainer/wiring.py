"""What a Trainer's constructor builds: its state and its traced functions.

`build_state` creates every variable of a run under `strategy.scope()` and
before any trace: the model, the optimizer (built eagerly: slots created
inside a traced step fail under a strategy, keras#23085), the step and data
counters, the stop request, the metric sums, the loss scale and the weight
average. `build_functions` wraps the inner loops in counted tf.functions.
Both run once, from `Trainer.__init__`, on the host.
"""

import functools

import tensorflow as tf

from trainer import coordinated
from trainer import loops
from trainer import optimization
from trainer import settings as settings_lib
from trainer import step as step_lib
from trainer.errors import UserError
from trainer.parts import ema as ema_lib
from trainer.parts import loss_scale
from trainer.parts import metric_sums
from trainer.parts import precision as precision_lib
from trainer.parts import replica_copies
from trainer.parts import retrace
from trainer.parts import sharding

ONLY_FIRST = tf.VariableAggregation.ONLY_FIRST_REPLICA
# Keys of the results next to the metrics (loops.train, Trainer.evaluate).
RESERVED_NAMES = frozenset({'loss', 'examples', 'weights', 'steps', 'status',
                            'grad_norm', 'input_wait_secs', 'loop_secs',
                            'export'})


def build_state(trainer) -> None:
  """Sets the trainer's model, optimizer and every other variable."""
  t, s, strategy, config = (trainer, trainer.settings, trainer.strategy,
                            trainer.config)
  with strategy.scope():
    with precision_lib.policy(s.precision):
      t.model = t.build_model()
    if not isinstance(t.model, tf.keras.Model):
      raise UserError(
          f'{type(t).__name__}.build_model returned '
          f'{type(t.model).__name__}, not a tf.keras.Model'
          + (' (no return statement?)' if t.model is None else
             '; wrap a layer: tf.keras.Sequential([keras.Input(shape), '
             'layer])'))
    if not t.model.weights:
      # Built on its first call, later than the optimizer and checkpoint.
      raise UserError(
          f'{type(t).__name__}.build_model returned a {type(t.model).__name__} '
          'with no weights yet (it would be built on its first call, too late '
          'for the optimizer and the checkpoint): give it its input shape '
          '(keras.Input(shape) first in a Sequential) or call it once, e.g. '
          'model(tf.zeros([1, ...])), before returning it')
    # With train.variable_shard_bytes under parameter_server: large weights
    # in pieces over the ps tasks (parts/sharding.py).
    sharding.check_built(strategy)
    sharding.adopt(t.model)
    if s.jit_compile:
      settings_lib.check_xla_with_sync_batch_norm(t.model, strategy, config)
    t.optimizer = optimization.build_optimizer(
        config.optimizer, variables=t.trainable_variables,
        total_steps=config.train.steps)
    t.optimizer.build(t.trainable_variables)  # A slot set per piece.
    t.global_step = tf.Variable(0, dtype=tf.int64, trainable=False,
                                name='global_step', aggregation=ONLY_FIRST)
    t.data_position = tf.Variable(0, dtype=tf.int64, trainable=False,
                                  name='data_position', aggregation=ONLY_FIRST)
    # Set to 1 from the host (a SIGTERM watcher thread) while a loop runs;
    # every replica reads it each step and the all-reduce makes them agree.
    t.stop_requested = tf.Variable(0.0, trainable=False, name='stop_requested',
                                   aggregation=ONLY_FIRST)
    if (not isinstance(t.metric_names, (tuple, list)) or
        not all(isinstance(n, str) for n in t.metric_names)):
      raise UserError(
          f'{type(t).__name__}.metric_names={t.metric_names!r} must be a '
          'tuple of names, e.g. ' +
          (f'({t.metric_names!r},)' if isinstance(t.metric_names, str) else
           "('accuracy',)"))
    reserved = sorted(set(t.metric_names) & RESERVED_NAMES)
    if reserved:
      raise UserError(
          f'{type(t).__name__}.metric_names has {reserved[0]!r}, a name the '
          'framework reports itself (reserved: '
          f'{", ".join(sorted(RESERVED_NAMES))}); rename the metric')
    names = ('loss', *t.metric_names)
    t.train_sums = metric_sums.MetricSums(names, extras=('grad_norm',),
                                          name='train_sums')
    t.eval_sums = metric_sums.MetricSums(names, name='eval_sums')
    t.loss_scaling = (loss_scale.DynamicLossScale()
                      if s.precision == 'mixed_float16' else None)
    t.ema = (ema_lib.WeightAverage(s.ema_decay, t.model.trainable_variables,
                                   strategy) if s.ema_decay else None)
    # One set for training, one for evaluation (trainer/parts/streaming.py).
    t.streaming = {'train': t.build_streaming_metrics(),
                   'eval': t.build_streaming_metrics()}
  t.loss_scale = t.loss_scaling.scale if t.loss_scaling else None


def build_functions(trainer) -> None:
  """Sets the trainer's traced loops, each counted (trace_counts)."""
  t = trainer
  t.one_batch_gradients = lambda batch: step_lib.one_batch_gradients(t, batch)
  if t.settings.jit_compile:
    # XLA compiles the forward and backward pass. The all-reduce and the
    # update stay outside it: collectives of MirroredStrategy and
    # MultiWorkerMirroredStrategy are not XLA ops on CPU/GPU. (On TPU the
    # whole step is compiled anyway.)
    t.one_batch_gradients = tf.function(t.one_batch_gradients,
                                        jit_compile=True, autograph=False)
  traces = retrace.TraceCounter(type(t).__name__)
  t._traces = traces  # pylint: disable=protected-access
  t.trace_counts = traces.counts
  t._train_loop = traces.function(  # pylint: disable=protected-access
      lambda it, n: loops.train_loop(t, it, n, timed=False), 'train_loop')
  # The same loop with the input wait measured (Trainer.train): a second
  # graph, traced on its first use.
  t._train_loop_timed = traces.function(  # pylint: disable=protected-access
      lambda it, n: loops.train_loop(t, it, n, timed=True), 'train_loop_timed')
  t._eval_loop = traces.function(  # pylint: disable=protected-access
      functools.partial(loops.eval_loop, t), 'eval_loop', autograph=True)
  t.eval_batch_fns = {}  # By the eval dataset's element spec.
  t._eval_sums = traces.function(  # pylint: disable=protected-access
      lambda: t.eval_sums.reduce_and_reset(t.strategy), 'eval_sums')
  # --strategy=parameter_server: inner loops go to the workers (it counts
  # its own traces in trainer._traces too).
  t.coordinated = (coordinated.Loops(t) if isinstance(
      t.strategy, tf.distribute.experimental.ParameterServerStrategy) else None)
  # Per-replica batch norm's moving statistics made equal before evaluating
  # (parts/replica_copies.py); used only when the model has such layers.
  equalize = functools.partial(replica_copies.equalize, t.model, t.strategy)
  t._equalize_copies = (  # pylint: disable=protected-access
      traces.function(equalize, 'equalize_replica_copies')
      if t.num_replicas > 1 and not t.coordinated else None)

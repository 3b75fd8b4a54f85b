"""Where the Trainer's step cost goes: the minimal loop plus one feature at a time.

  python bench/step_cost.py                        # default strategy, ~3 min
  python bench/step_cost.py --strategy=mirrored --num_cpu_devices=2

bench/throughput.py compares the Trainer with the minimal hand-written loop
as a whole; this takes the difference apart. Every variant is the minimal
loop of bench/throughput.py (the seed MLP, Adam, batch 64, 100 steps per
tf.function call, the loss reduced per step) with one of the Trainer's
per-step features added:

  minimal     nothing else (the reference, 1.00)
  ours        the minimal loop with the Trainer's Adam (trainer/
              optimization.py: the step's scalars computed once per device,
              not once per variable), the same update bit for bit
  guard       the NaN/Inf guard: an explicit all-reduce of the gradients and
              the loss, and the optimizer update inside tf.cond(finite), kept
              as one functional If op as the Trainer does (under
              MirroredStrategy a cond in cross-replica context, lowered)
  guard_low   the same cond lowered to Switch/Merge (TensorFlow's default;
              under MirroredStrategy the same as guard)
  masked      no cond: each gradient selected with tf.where(finite, g, 0),
              then the update. The least an optimizer masking its own
              update (a 0/1 factor on the learning rate and the moments'
              steps) would cost; not a skip by itself (the moments decay)
  norm        the explicit all-reduce and the global gradient norm (summed
              for the report, as the Trainer does), no cond
  sums        the metric sums: one assign_add of a stacked vector per step
  accuracy    sums plus the accuracy's argmax/equal/cast
  all         guard + norm + accuracy sums: the Trainer's step by hand
  trainer     ClassifierTrainer.train, as bench/throughput.py runs it

Rounds are interleaved and rotated (bench/harness.py); each ratio is the
median of that variant's examples/sec over the minimal loop's, with the
min-max of the ratios within a round. All variants start from the same
weights and data.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
import tensorflow as tf

from bench import harness
from bench import throughput
from trainer import optimization
from trainer import step as step_lib
from trainer.cluster import strategies

flags.DEFINE_integer('step_cost_rounds', 9, 'Timed rounds.', lower_bound=1)
flags.DEFINE_float('step_cost_seconds', 1.0,
                   'Seconds each variant is timed per round, roughly.')
flags.register_validator('step_cost_seconds', lambda secs: secs > 0,
                         'must be > 0')
FLAGS = flags.FLAGS

# name: (guard, norm, sums, accuracy, ours); guard is None, 'if', 'lowered'
# or 'masked'; ours: the Trainer's Adam instead of Keras'.
VARIANTS = {
    'minimal': (None, False, False, False, False),
    'ours': (None, False, False, False, True),
    'guard': ('if', False, False, False, False),
    'guard_low': ('lowered', False, False, False, False),
    'masked': ('masked', False, False, False, False),
    'norm': (None, True, False, False, False),
    'sums': (None, False, True, False, False),
    'accuracy': (None, False, True, True, False),
    'all': ('if', True, True, True, False),
}
ORDER = (*VARIANTS, 'trainer')
SUM = tf.distribute.ReduceOp.SUM


def variant_method(strategy, guard, norm, sums, accuracy, ours):
  """The minimal loop of bench/throughput.py with the named features."""
  model, optimizer, iterator = throughput._model_optimizer_iterator(strategy)  # pylint: disable=protected-access
  variables = model.trainable_variables
  with strategy.scope():
    if ours:
      optimizer = optimization.Adam(learning_rate=throughput.LEARNING_RATE)
      optimizer.build(variables)
    norm_sum = tf.Variable(0.0, trainable=False,
                           synchronization=tf.VariableSynchronization.ON_READ,
                           aggregation=tf.VariableAggregation.SUM)
    totals = tf.Variable(tf.zeros([5]), trainable=False,
                         synchronization=tf.VariableSynchronization.ON_READ,
                         aggregation=tf.VariableAggregation.SUM)

  def step(batch):
    features, labels = batch
    with tf.GradientTape() as tape:
      logits = model(features, training=True)
      per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels,
                                                                   logits)
      loss = tf.nn.compute_average_loss(
          per_example, global_batch_size=throughput.GLOBAL_BATCH)
    grads = tape.gradient(loss, variables)
    if guard or norm:
      reduced = tf.distribute.get_replica_context().all_reduce(
          SUM, grads + [loss])
      grads, total = reduced[:-1], reduced[-1]
      finite = tf.math.is_finite(total)
      if norm:
        grad_norm = tf.linalg.global_norm(grads)
        finite &= tf.math.is_finite(grad_norm)
        # Summed for the report, as the Trainer does: a norm nothing reads
        # would be pruned from the graph and cost nothing.
        norm_sum.assign_add(tf.where(finite, grad_norm, 0.0))

      def apply():
        optimization.apply_reduced(optimizer, zip(grads, variables))
      if guard == 'masked':
        grads = [tf.where(finite, g, 0.0) for g in grads]
      if guard in (None, 'masked'):
        apply()
      # A cond around the update may stay in the replica context only where
      # no merge_call is needed; under MirroredStrategy it runs in
      # cross-replica context, always lowered.
      elif (guard == 'lowered' and
            tf.__internal__.distribute.strategy_supports_no_merge_call()):
        tf.cond(finite, apply, lambda: None)
      else:  # As the Trainer does (trainer/step.py).
        step_lib._apply_if(finite, optimizer, grads, variables)  # pylint: disable=protected-access
    else:
      optimizer.apply_gradients(zip(grads, variables))
    if sums:
      row = [tf.cast(tf.shape(per_example)[0], tf.float32),
             tf.reduce_sum(per_example),
             tf.cast(tf.size(per_example), tf.float32)]
      if accuracy:
        correct = tf.cast(tf.equal(
            tf.argmax(logits, -1, output_type=tf.int32),
            tf.cast(labels, tf.int32)), tf.float32)
        row += [tf.reduce_sum(correct), tf.cast(tf.size(correct), tf.float32)]
      else:
        row += [0.0, 0.0]
      totals.assign_add(tf.stack(row))
    return loss

  @tf.function
  def train_loop(iterator, num_steps):
    total = tf.constant(0.0)
    for _ in tf.range(num_steps):
      total += strategy.reduce(SUM, strategy.run(step, args=(next(iterator),)),
                               axis=None)
    return total / tf.cast(num_steps, tf.float32)

  def run(num_calls):
    for _ in range(num_calls):
      loss = float(train_loop(iterator,
                              tf.constant(throughput.STEPS_PER_LOOP)))
    return loss
  return run


def main(_):
  strategies.configure_cpu_devices(FLAGS.num_cpu_devices)
  strategy = strategies.build_strategy(FLAGS.strategy or 'default')
  calls, first_loss = {}, {}

  def prepare(name):
    run = (throughput.trainer_method(strategy) if name == 'trainer' else
           variant_method(strategy, *VARIANTS[name]))
    first_loss[name] = float(run(1))  # Traces.
    run(1)  # The trainer's 2nd call traces its input-wait graph.
    calls[name] = harness.calibrate(
        run, FLAGS.step_cost_seconds,
        multiple=throughput.INPUT_WAIT_EVERY if name == 'trainer' else 1)
    return run

  runs, failed = harness.warm_up(ORDER, prepare)
  examples = throughput.STEPS_PER_LOOP * throughput.GLOBAL_BATCH
  rates = {name: [] for name in runs}
  for _, name in harness.interleaved(list(runs), FLAGS.step_cost_rounds):
    _, elapsed = harness.timed(runs[name], calls[name])
    rates[name].append(calls[name] * examples / elapsed)
  median = harness.medians(rates)
  rows = []
  for name in runs:
    paired = harness.paired_ratios(rates[name], rates['minimal'])
    rows.append([name, f'{median[name]:,.0f}',
                 harness.format_ratio(harness.ratio(median, name, 'minimal')),
                 harness.format_range(harness.min_max(paired), '.2f'),
                 f'{first_loss[name]:.4f}'])
  print(f'\n{strategy.num_replicas_in_sync} replica(s), '
        f'{FLAGS.step_cost_rounds} rounds of ~{FLAGS.step_cost_seconds} s')
  harness.print_table(
      [['variant', 'examples/sec', '/ minimal', 'per round',
        'loss 1-100']] + rows, [10, 13, 10, 12, 11])
  for name, why in failed.items():
    print(f'{name}: failed at warm-up: {why}')


if __name__ == '__main__':
  app.run(main)

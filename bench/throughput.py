"""Training throughput: the Trainer against a hand-written loop and Keras fit.

  python bench/throughput.py            # full run (7 rounds), ~11 min on 2 CPU cores
  python bench/throughput.py --quick    # smoke check, ~1.5 min

Measures examples/sec of the seed MLP (100 features, Dense 64 relu, Dense 64
relu, Dense 10 logits; Adam lr 1e-3; sparse softmax cross-entropy; global batch
64; in-memory data from input/synthetic.py), 100 steps per tf.function call,
trained four ways:

  trainer    ClassifierTrainer: `trainer.train(iterator, 100)`, with the
             input wait timed on one call in 10 as the Controller does.
  minimal    the reference: the least a skilled user would write.
             `for _ in tf.range(n): strategy.run(step, ...)`, GradientTape,
             `tf.nn.compute_average_loss`, a plain Keras Adam, the step's
             loss reduced with strategy.reduce and summed per step; nothing
             else (no metric objects, no guard, no gradient norm).
  bare       the loop of the TF "custom training with tf.distribute" tutorial:
             `for _ in tf.range(n): strategy.run(step, ...)`, GradientTape,
             `tf.nn.compute_average_loss`, a plain Keras Adam (Keras' own
             gradient aggregation), Keras Mean and SparseCategoricalAccuracy
             metrics read and reset once per call.
  keras_fit  `compile(..., steps_per_execution=100)`, `fit(steps_per_epoch=100)`.

each under the default strategy, under MirroredStrategy on 2 logical CPUs
(where keras_fit fails with Keras 3.15.1, keras#19246, and shows n/a), and
under MultiWorkerMirroredStrategy in 2 worker processes of one CPU replica
each (TF_CONFIG with 127.0.0.1 ports; keras_fit not run there).
Logical CPUs must be split before TensorFlow initialises, so the parent runs
each strategy in child processes (`--strategy=default`, `--strategy=mirrored
--num_cpu_devices=2`, each in --build_orders processes, and 2 processes of
`--strategy=multi_worker_mirrored`) whose chief prints one JSON line; the
parent prints the table. On workers every method runs a fixed 10 calls per
segment (2 with --quick) instead of a calibrated count: both workers must
make the same calls.

Method (bench/harness.py): every method is warmed up (tracing, not timed:
one call, two for the trainer, whose second call traces the input-wait
graph) and calibrated so that one timed segment lasts ~--seconds_per_round
(for the trainer a whole multiple of 10 calls, so each segment holds one
input-wait call in 10). Each of --rounds rounds then times one segment of
every method in turn, rotating the order, so machine noise hits all methods
alike. All start from the same weights and data, so their mean loss over
the first 100 steps must agree: a check that they do the same work.

In one process the order the methods were built in moved trainer/minimal by
up to 0.12 (docs/benchmarks.md), so each single-process strategy runs in
--build_orders processes (default 2), each building the methods in another
order (the 2nd builds minimal first and the trainer last; the rounds rotate
the same fixed order in every process). Their rounds are pooled: a method's
examples/sec is the median of its rounds over all processes, and a ratio a/b
the median over all rounds of a/b within the round ("per round": their
min-max; "per process": each process's own trainer/minimal).

Target: trainer >= 0.95 x minimal in one process, >= 0.9 x on 2 workers. The trainer does
more per step than the minimal loop (the NaN/Inf guard, the stop request,
metric sums, the gradient norm): the target is that they cost < 5 %.
"""

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
import ml_collections
import tensorflow as tf

from bench import harness
from configs import digits_mlp
from input import synthetic
from models import classifier
from models import mlp
from trainer import schema
from trainer.cluster import launch
from trainer.cluster import strategies

flags.DEFINE_enum('strategy', None,
                  ['default', 'mirrored', 'multi_worker_mirrored'],
                  'Child mode: measure under this strategy and print one JSON '
                  'line. Unset: parent mode, runs every strategy.')
flags.DEFINE_integer('num_cpu_devices', 1, 'Child mode: logical CPU devices.',
                     lower_bound=1)
flags.DEFINE_bool('quick', False, 'Smoke check: 2 short rounds (~1.5 min).')
flags.DEFINE_integer('rounds', 7, 'Timed rounds per process (ignored with '
                     '--quick).', lower_bound=1)
flags.DEFINE_float('seconds_per_round', 2.0, 'Seconds each method is timed '
                   'per round, roughly (ignored with --quick).')
flags.register_validator('seconds_per_round', lambda secs: secs > 0,
                         'must be > 0')
flags.DEFINE_integer('build_orders', 2, 'Processes per single-process '
                     'strategy, each building the methods in another order '
                     '(1 with --quick); their rounds are pooled.',
                     lower_bound=1)
flags.DEFINE_integer('process_index', 0, 'Child mode: which of the '
                     '--build_orders orders this process builds in.',
                     lower_bound=0)
FLAGS = flags.FLAGS

METHODS = ('trainer', 'minimal', 'bare', 'keras_fit')
CHILDREN = (('default', 1), ('mirrored', 2))
# 2 worker processes on 127.0.0.1, one CPU replica each: collectives over gRPC.
WORKERS = 2
# On workers every method runs a fixed number of calls per segment: a
# calibration by time could pick different counts on the two workers, whose
# collectives would then never meet. 10 keeps the trainer's share of
# input-wait calls; a call is 100 steps of ~5 ms here.
WORKER_CALLS, QUICK_WORKER_CALLS = 10, 2
RESULT_TAG = 'THROUGHPUT_RESULT '
TARGET = 0.95
TARGETS = {'multi_worker_mirrored': 0.9}  # Per step, on 2 workers.
QUICK_ROUNDS, QUICK_SECONDS = 2, 0.5

GLOBAL_BATCH = 64
STEPS_PER_LOOP = 100
INPUT_DIM, HIDDEN_SIZES, NUM_CLASSES = 100, (64, 64), 10
LEARNING_RATE = 1e-3
SEED = 0
# The config file states only what differs from the defaults: resolve it.
INPUT_WAIT_EVERY = schema.resolve(
    digits_mlp.get_config()).summary.input_wait_every_loops


def bench_config() -> ml_collections.ConfigDict:
  """configs/digits_mlp.py with the benchmark's data, model and optimizer."""
  config = digits_mlp.get_config()
  config.seed = SEED
  config.data.name = 'synthetic'
  config.model.update(input_dim=INPUT_DIM, hidden_sizes=HIDDEN_SIZES,
                      num_classes=NUM_CLASSES)
  config.train.update(global_batch_size=GLOBAL_BATCH,
                      steps_per_loop=STEPS_PER_LOOP, clip_norm=0.0)
  config.optimizer.update(name='adam', learning_rate=LEARNING_RATE)
  return config


def train_dataset(input_context, batch_size):
  """The synthetic training data, exactly as ClassifierTrainer reads it."""
  return synthetic.dataset('train', input_context=input_context,
                           batch_size=batch_size, training=True, seed=SEED)


def build_model():
  tf.keras.utils.set_random_seed(SEED)  # Same initial weights for all methods.
  return mlp.build_mlp(input_dim=INPUT_DIM, hidden_sizes=HIDDEN_SIZES,
                       num_classes=NUM_CLASSES)


# Each method builder returns `run(num_calls) -> mean loss of the last call`,
# where one call is STEPS_PER_LOOP optimizer steps.


def trainer_method(strategy):
  tf.keras.utils.set_random_seed(SEED)
  trainer = classifier.ClassifierTrainer(config=bench_config(),
                                         strategy=strategy)
  iterator = iter(trainer.distribute_dataset('train',
                                             batch_size=GLOBAL_BATCH))

  calls = [0]

  def run(num_calls):
    for _ in range(num_calls):
      # As the Controller does by default: the input wait is measured on one
      # call in INPUT_WAIT_EVERY (the 2nd, 12th, ...).
      metrics = trainer.train(
          iterator, STEPS_PER_LOOP,
          measure_input_wait=calls[0] % INPUT_WAIT_EVERY == 1)
      calls[0] += 1
    return metrics['loss']
  return run


def _model_optimizer_iterator(strategy):
  """The seed MLP, a plain Keras Adam built under the strategy's scope, and
  an iterator over the distributed training data."""
  with strategy.scope():
    model = build_model()
    optimizer = tf.keras.optimizers.Adam(learning_rate=LEARNING_RATE)
    # Needed under MirroredStrategy: slots created lazily inside the traced
    # step fail with "must feed a value for placeholder" (keras#23085).
    optimizer.build(model.trainable_variables)
  dataset = strategy.distribute_datasets_from_function(
      lambda ctx: train_dataset(ctx, ctx.get_per_replica_batch_size(
          GLOBAL_BATCH)))
  return model, optimizer, iter(dataset)


def minimal_method(strategy):
  """The minimal loop: the step and the loss, nothing else."""
  model, optimizer, iterator = _model_optimizer_iterator(strategy)

  def step(batch):
    features, labels = batch
    with tf.GradientTape() as tape:
      logits = model(features, training=True)
      loss = tf.nn.compute_average_loss(
          tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits),
          global_batch_size=GLOBAL_BATCH)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  @tf.function
  def train_loop(iterator, num_steps):
    total = tf.constant(0.0)
    for _ in tf.range(num_steps):
      total += strategy.reduce(tf.distribute.ReduceOp.SUM,
                               strategy.run(step, args=(next(iterator),)),
                               axis=None)
    return total / tf.cast(num_steps, tf.float32)

  def run(num_calls):
    for _ in range(num_calls):
      loss = float(train_loop(iterator, tf.constant(STEPS_PER_LOOP)))
    return loss
  return run


def bare_method(strategy):
  """The tutorial's custom loop, as an engineer would write it by hand."""
  model, optimizer, iterator = _model_optimizer_iterator(strategy)
  with strategy.scope():
    train_loss = tf.keras.metrics.Mean(name='train_loss')
    train_accuracy = tf.keras.metrics.SparseCategoricalAccuracy(
        name='train_accuracy')
  loss_object = tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=None)

  def step(batch):
    features, labels = batch
    with tf.GradientTape() as tape:
      logits = model(features, training=True)
      per_example_loss = loss_object(labels, logits)
      loss = tf.nn.compute_average_loss(per_example_loss,
                                        global_batch_size=GLOBAL_BATCH)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    train_loss.update_state(per_example_loss)
    train_accuracy.update_state(labels, logits)

  @tf.function
  def train_loop(iterator, num_steps):
    for _ in tf.range(num_steps):
      strategy.run(step, args=(next(iterator),))

  def run(num_calls):
    for _ in range(num_calls):
      train_loop(iterator, tf.constant(STEPS_PER_LOOP))
      loss = float(train_loss.result())
      _ = float(train_accuracy.result())
      train_loss.reset_state()
      train_accuracy.reset_state()
    return loss
  return run


def keras_fit_method(strategy):
  with strategy.scope():
    model = build_model()
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate=LEARNING_RATE),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=['accuracy'], steps_per_execution=STEPS_PER_LOOP)
  dataset = train_dataset(tf.distribute.InputContext(), GLOBAL_BATCH)

  def run(num_calls):  # One fit per segment, one epoch (100 steps) per call.
    history = model.fit(dataset, epochs=num_calls,
                        steps_per_epoch=STEPS_PER_LOOP, verbose=0)
    return history.history['loss'][-1]
  return run


BUILDERS = {'trainer': trainer_method, 'minimal': minimal_method,
            'bare': bare_method,
            'keras_fit': keras_fit_method}


def measure(strategy, rounds: int, seconds_per_round: float) -> dict:
  """Warms up, calibrates and times every method; returns the JSON result.

  A method whose warm-up call fails (e.g. Keras fit with steps_per_execution
  under MirroredStrategy, keras#19246) is reported in 'failed', not timed;
  so is one whose build or calibration raises a tf.errors.OpError.
  """
  first_loss, calls = {}, {}

  workers = strategy.extended._in_multi_worker_mode()  # pylint: disable=protected-access
  # Keras fit is the single-process comparison; not run on workers.
  methods = [m for m in METHODS if not (workers and m == 'keras_fit')]

  def prepare(name):
    run = BUILDERS[name](strategy)
    first_loss[name] = float(run(1))  # Traces; not timed.
    if name == 'trainer':
      run(1)  # The 2nd call measures the input wait: traces that graph.
    if workers:
      calls[name] = QUICK_WORKER_CALLS if FLAGS.quick else WORKER_CALLS
      return run
    # Calibrated right after its own warm-up, before the next method is
    # built. The trainer's segments are whole multiples of INPUT_WAIT_EVERY
    # calls, so every segment has the Controller's share of input-wait calls.
    calls[name] = harness.calibrate(
        run, seconds_per_round,
        multiple=INPUT_WAIT_EVERY if name == 'trainer' else 1)
    return run

  order = harness.build_order(methods, FLAGS.process_index)
  runs, failed = harness.warm_up(order, prepare,
                                 errors=(tf.errors.OpError,),
                                 describe=_first_error_line)
  rates = {name: [] for name in runs}
  # The rounds rotate the methods' fixed order, not the build order: which
  # method runs before which, round by round, is the same in every process.
  for _, name in harness.interleaved([m for m in methods if m in runs],
                                     rounds):
    _, elapsed = harness.timed(runs[name], calls[name])
    rates[name].append(calls[name] * STEPS_PER_LOOP * GLOBAL_BATCH / elapsed)

  return {
      'strategy': FLAGS.strategy,
      'replicas': strategy.num_replicas_in_sync,
      'calls_per_round': calls,
      'first_loss': first_loss,  # Mean loss of steps 1-100: should agree.
      'rates': rates,
      'median': harness.medians(rates),
      'failed': failed,
  }


def _first_error_line(error: tf.errors.OpError) -> str:
  lines = [line.strip() for line in error.message.splitlines() if line.strip()]
  root = [line for line in lines if line.startswith('(0)')]
  return f'{type(error).__name__}: {(root or lines or [""])[0][:200]}'


def run_child():
  strategies.configure_cpu_devices(FLAGS.num_cpu_devices)
  strategy = strategies.build_strategy(FLAGS.strategy)
  rounds, seconds = ((QUICK_ROUNDS, QUICK_SECONDS) if FLAGS.quick else
                     (FLAGS.rounds, FLAGS.seconds_per_round))
  result = measure(strategy, rounds, seconds)
  if strategy.extended.should_checkpoint:  # One process, or the chief.
    print(RESULT_TAG + json.dumps(result), flush=True)


def launch_workers(num_workers: int) -> dict:
  """Runs the multi-worker child as `num_workers` processes with their own
  TF_CONFIG (127.0.0.1 ports) and returns the chief's result."""
  command = [sys.executable, os.path.abspath(__file__),
             '--strategy=multi_worker_mirrored', f'--rounds={FLAGS.rounds}']
  if FLAGS.quick:
    command.append('--quick')
  procs = [subprocess.Popen(command, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, TF_CONFIG=tf_config))
           for tf_config in launch.cluster_configs(
               launch.free_ports(num_workers))]
  outputs = [p.communicate(timeout=1800) for p in procs]
  for stdout, _ in outputs:
    for line in stdout.splitlines():
      if line.startswith(RESULT_TAG):
        return json.loads(line[len(RESULT_TAG):])
  for p, (stdout, stderr) in zip(procs, outputs):
    sys.stderr.write(stdout[-2000:] + stderr[-3000:])
  raise SystemExit(f'{num_workers} workers exited with '
                   f'{[p.returncode for p in procs]} and printed no result')


def launch_child(strategy_name: str, num_cpu_devices: int,
                 process_index: int, build_orders: int) -> dict:
  """Runs one child process and returns its parsed JSON result."""
  command = [sys.executable, os.path.abspath(__file__),
             f'--strategy={strategy_name}',
             f'--num_cpu_devices={num_cpu_devices}',
             f'--rounds={FLAGS.rounds}',
             f'--seconds_per_round={FLAGS.seconds_per_round}',
             f'--process_index={process_index}',
             f'--build_orders={build_orders}']
  if FLAGS.quick:
    command.append('--quick')
  proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                        check=False)
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_TAG):
      return json.loads(line[len(RESULT_TAG):])
  sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
  raise SystemExit(f'child {" ".join(command[2:])} failed with exit status '
                   f'{proc.returncode} and printed no result')


def combine(results: list[dict]) -> dict:
  """One result from the results of processes that measured the same
  strategy (harness.pooled_processes), with the medians of the pooled rounds
  and each process's own trainer/minimal ratio."""
  combined = harness.pooled_processes(results)
  return dict(
      combined, strategy=results[0]['strategy'],
      replicas=results[0]['replicas'],
      median=harness.medians(combined['rates']),
      process_ratios=[harness.median_paired_ratio(rates, 'trainer', 'minimal')
                      for rates in combined['process_rates']])


def _ratio(rates, a, b) -> str:
  return harness.format_ratio(harness.median_paired_ratio(rates, a, b))


def print_table(results) -> None:
  """Prints examples/sec and ratios, then failures, the loss check, verdicts."""
  print(f'\nexamples/sec, median of the rounds of every process (global '
        f'batch {GLOBAL_BATCH}, {STEPS_PER_LOOP} steps per call)\n')
  widths = (46, 9, 9, 9, 11, 17, 12, 16, 14, 13)
  rows = [('strategy', *METHODS, 'trainer/minimal', 'per round',
           'per process', 'trainer/bare', 'trainer/fit')]
  for result in results:
    med, rates = result['median'], result['rates']
    replicas = result['replicas']
    rounds = max(map(len, rates.values()), default=0)
    measured = 'trainer' in rates and 'minimal' in rates
    per_round = (harness.format_range(harness.min_max(harness.paired_ratios(
        rates['trainer'], rates['minimal'])), '.2f') if measured else 'n/a')
    rows.append((
        f'{result["strategy"]} ({replicas} replica{"s" * (replicas > 1)}, '
        f'{rounds} rounds)',
        *[f'{med[name]:,.0f}' if name in med else 'n/a' for name in METHODS],
        _ratio(rates, 'trainer', 'minimal'), per_round,
        ' '.join(harness.format_ratio(r, '.2f')
                 for r in result['process_ratios']),
        _ratio(rates, 'trainer', 'bare'),
        _ratio(rates, 'trainer', 'keras_fit')))
  harness.print_table(rows, widths)
  print()
  for result in results:
    name = result['strategy']
    for method, error in result['failed'].items():
      print(f'{name}: {method} failed at warm-up, not timed: {error}')
    losses = ', '.join(
        f'{method} ' + '/'.join(sorted({f'{loss:.4f}' for loss in values}))
        for method, values in result['first_loss'].items())
    print(f'{name}: mean loss of steps 1-100 (must agree): {losses}')
  for result in results:
    ratio = harness.median_paired_ratio(result['rates'], 'trainer',
                                        'minimal')
    target = TARGETS.get(result['strategy'], TARGET)
    if ratio is None:
      print(f'{result["strategy"]}: trainer/minimal not measured (a method '
            f'failed, above); the target is {target}')
      continue
    verdict = 'meets' if ratio >= target else 'is BELOW'
    print(f'{result["strategy"]}: trainer/minimal = {ratio:.3f} {verdict} '
          f'the target {target}')


def main(argv):
  del argv
  if FLAGS.strategy:
    run_child()
    return
  results = []
  start = time.perf_counter()
  build_orders = 1 if FLAGS.quick else FLAGS.build_orders
  for strategy_name, num_cpu_devices in CHILDREN:
    processes = []
    for index in range(build_orders):
      print(f'measuring --strategy={strategy_name} '
            f'--num_cpu_devices={num_cpu_devices}, build order {index + 1} '
            f'of {build_orders} ...', flush=True)
      processes.append(launch_child(strategy_name, num_cpu_devices, index,
                                    build_orders))
    results.append(combine(processes))
  print(f'measuring --strategy=multi_worker_mirrored, {WORKERS} worker '
        'processes ...', flush=True)
  results.append(combine([launch_workers(WORKERS)]))
  print_table(results)
  print(f'\ntotal {time.perf_counter() - start:.0f} s')


if __name__ == '__main__':
  app.run(main)

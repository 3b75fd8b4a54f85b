"""Speed on real models: the Trainer against a hand-written loop and Keras fit.

  python bench/models.py            # full run: ~5 min on 2 idle CPU cores
  python bench/models.py --quick    # smoke check, ~2 min (no XLA, no start-up)

Three questions, answered in one run for two real models:

  resnet20  ResNet-20 (configs/cifar_resnet20.py:synthetic: He et al.'s CIFAR
            net, 0.27M parameters, synchronized batch norm; SGD momentum 0.9,
            decoupled weight decay 1e-3, warmup + cosine schedule) on cached
            synthetic 32x32x3 images, 10 classes, global batch 128.
  lm        the byte-level Transformer LM of configs/lm_transformer.py
            (2 pre-LN blocks, width 128, 0.45M parameters; AdamW, warmup +
            cosine, global-norm clipping 1.0) on its real data, the Python
            standard library's source, sequences of 128 bytes, batch 32.

1. Trainer vs a bare loop vs Keras fit. Each model is trained three ways from
   the same initial weights (same seed, same model builder and arguments) on
   the same tf.data input function, with an optimizer of the same
   hyper-parameters, default strategy, one process:

     trainer      the registered Trainer (`image_classifier`, `lm`) called as
                  the Controller calls it: `trainer.train(iterator, n)`, the
                  input wait timed on one call in 10 (the 2nd, 12th, ...).
     bare         the loop of the TF "custom training with tf.distribute"
                  tutorial, written by hand: `for _ in tf.range(n):
                  strategy.run(step, ...)` in a tf.function, GradientTape,
                  `tf.nn.compute_average_loss`, a plain Keras optimizer
                  (Keras' own warmup + cosine schedule, weight decay and
                  `global_clipnorm`), Keras Mean and SparseCategoricalAccuracy
                  metrics read and reset once per call.
     keras_fit    `compile(steps_per_execution=n, jit_compile=False)` (what
                  'auto' picks on a CPU-only host) and `fit(epochs=1,
                  steps_per_epoch=n)` per call. Timed from epoch begin to end
                  by a callback: each fit() call also sets up and tears down a
                  data iterator, callbacks and so on, which a real run pays
                  once, so that part is left out (and printed).

2. XLA on vs off: the same Trainer with `train.jit_compile=True` (XLA compiles
   each replica's forward and backward pass), timed in the same rounds as
   method `trainer_xla`.

3. Start-up: `python main.py --config=...` for each config (the real model
   and training config, one step per inner loop) in a subprocess, killed
   after its 6th progress line. From its absl log timestamps: process start
   -> "Trainer on N replica(s)" (Python and TensorFlow imports, data read,
   model and optimizer built) -> the first `step 1/M:` line, the first
   training step done. The first inner loop traces the loop (graph building
   and optimisation) and starts the input pipeline; minus a steady step
   (median of the later lines) that is the "trace" column. The second inner
   loop traces the input-wait-timed copy of the loop (trainer/trainer.py):
   its extra time is printed too. The imports alone are timed in one more
   process.

Method (bench/harness.py, as bench/throughput.py): each model is measured in
its own child process (`--model=NAME`) that prints one JSON line; the parent
starts them one after another and prints the tables. In a child every method
is warmed up with two calls, not timed: the first traces (XLA: compiles) and
gives the mean loss over steps 1..n, which must agree between methods (same
weights, data and loss: they do the same work; XLA changes float rounding
only); the second traces the Trainer's input-wait-timed loop and finishes
Keras fit's set-up. Each of --rounds rounds then times one call of every
method in turn, rotating the order, so machine noise hits all methods alike.
A method's throughput is the median of its per-round examples/sec; ratio a/b
is median(a) / median(b) within one child ("per round": the min-max and
median of trainer/bare within each round, a paired view that load drifts
between rounds do not move). CPU ms/step (process CPU time, all threads,
median) is printed as well: on a machine shared with other jobs it moves
less than wall time.

Steps per call n are chosen so one call takes ~1-2 s on 2 idle CPU cores:
6 for ResNet-20 (~0.3 s steps), 8 for the LM (~0.15 s steps). With XLA,
ResNet-20 runs 4 steps per call: XLA's CPU backend is slower on its
convolutions (examples/sec is per example, so the ratio is unaffected).

Targets: trainer >= 0.95 x bare and >= 1.0 x keras_fit on both models.

The models and the loops compared are in bench/models_workloads.py, the
start-up timing in bench/models_startup.py.
"""

import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
import tensorflow as tf

from bench import harness
from bench.models_startup import print_startup, time_imports, time_startup
from bench.models_workloads import bare_method, get_workload
from bench.models_workloads import keras_fit_method, trainer_method
from trainer.cluster import strategies

flags.DEFINE_enum('model', None, ['resnet20', 'lm'],
                  'Child mode: measure this model and print one JSON line. '
                  'Unset: parent mode, runs everything.')
flags.DEFINE_bool('quick', False, 'Smoke check (~2 min): 2 rounds, no XLA, '
                  'no start-up runs.')
flags.DEFINE_integer('rounds', 9, 'Timed rounds (ignored with --quick).',
                     lower_bound=1)
flags.DEFINE_bool('xla', True, 'Also time the Trainer with XLA (off with '
                  '--quick).')
flags.DEFINE_bool('startup', True, 'Parent mode: also time main.py start-up '
                  '(off with --quick).')
flags.DEFINE_list('models', ['resnet20', 'lm'], 'Parent mode: the models.')
FLAGS = flags.FLAGS

METHODS = ('trainer', 'bare', 'keras_fit', 'trainer_xla')
RESULT_TAG = 'MODELS_RESULT '
TARGET_BARE, TARGET_FIT = 0.95, 1.0
QUICK_ROUNDS = 2
# The first-call mean losses must agree within this relative tolerance:
# float rounding (XLA fuses differently) only. Different initial weights,
# batches or a different loss moves them by far more.
LOSS_RTOL = 2e-3


def measure(workload, strategy, rounds: int, methods) -> dict:
  """Warms up and times every method; returns the JSON result.

  Warm-up, not timed: two calls. The first, of `workload.steps` steps for
  every method, traces (XLA: compiles) and gives the loss the methods must
  agree on; the second traces the Trainer's input-wait-timed loop (the
  Controller's 2nd inner loop) and finishes Keras fit's set-up. Then each
  round times one call of every method, in an order rotated by one each
  round.
  """
  builders = {
      'trainer': lambda: trainer_method(workload, strategy),
      'bare': lambda: bare_method(workload, strategy),
      'keras_fit': lambda: keras_fit_method(workload, strategy),
      'trainer_xla': lambda: trainer_method(workload, strategy,
                                            jit_compile=True),
  }
  steps = {name: workload.steps for name in methods}
  if 'trainer_xla' in steps:
    steps['trainer_xla'] = workload.xla_steps
  first_loss, warmup_secs = {}, {}

  def prepare(name):
    start = time.perf_counter()
    run = builders[name]()
    first_loss[name] = float(run(workload.steps)[0])
    warmup_secs[name] = [time.perf_counter() - start]
    warmup_secs[name].append(run(steps[name])[1])
    print(f'{workload.name} {name}: built + 1st call '
          f'{warmup_secs[name][0]:.1f} s, 2nd call {warmup_secs[name][1]:.1f}'
          ' s', file=sys.stderr, flush=True)
    return run

  runs, failed = harness.warm_up(methods, prepare,
                                 errors=(tf.errors.OpError, ValueError))
  rates = {name: [] for name in runs}
  cpu_per_example = {name: [] for name in runs}
  for _, name in harness.interleaved(list(runs), rounds):
    _, wall, cpu = runs[name](steps[name])
    examples = steps[name] * workload.batch
    rates[name].append(examples / wall)
    cpu_per_example[name].append(cpu / examples)

  result = {
      'model': workload.name,
      'title': workload.title,
      'steps_per_call': steps,
      'global_batch': workload.batch,
      'first_loss': first_loss,
      'warmup_secs': warmup_secs,
      'rates': rates,
      'median': harness.medians(rates),
      'cpu_per_example': harness.medians(cpu_per_example),
      'failed': failed,
  }
  if 'keras_fit' in runs:
    result['fit_setup_secs'] = statistics.median(runs['keras_fit'].setup[2:])
  return result


def run_child():
  load_start = os.getloadavg()[0]
  strategy = strategies.build_strategy('default')
  rounds = QUICK_ROUNDS if FLAGS.quick else FLAGS.rounds
  methods = [m for m in METHODS
             if m != 'trainer_xla' or (FLAGS.xla and not FLAGS.quick)]
  result = measure(get_workload(FLAGS.model), strategy, rounds, methods)
  result['load'] = [load_start, os.getloadavg()[0]]
  print(RESULT_TAG + json.dumps(result), flush=True)

# -----------------------------------------------------------------------------
# Parent: children, start-up runs, tables.


def launch_child(name: str) -> dict:
  """Runs the child process of one model and returns its parsed result."""
  command = [sys.executable, os.path.abspath(__file__), f'--model={name}',
             f'--rounds={FLAGS.rounds}', f'--xla={FLAGS.xla}',
             f'--quick={FLAGS.quick}']
  proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                        check=False)
  for line in proc.stderr.splitlines():
    if line.startswith(name + ' '):  # The child's warm-up report.
      print('  ' + line, flush=True)
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_TAG):
      return json.loads(line[len(RESULT_TAG):])
  sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
  raise SystemExit(f'child --model={name} failed with exit status '
                   f'{proc.returncode} and printed no result')


def _ratio(median, a, b) -> str:
  return harness.format_ratio(harness.ratio(median, a, b))


def print_model_table(result) -> None:
  """examples/sec and ratios, CPU time, warm-up time, the first-call loss."""
  med, rates, cpu = result['median'], result['rates'], result['cpu_per_example']
  rounds = len(next(iter(rates.values())))
  load = result['load']
  steps = result['steps_per_call']
  print(f'\n{result["title"]}\nexamples/sec: median of {rounds} rounds; '
        f'load average {load[0]:.1f} -> {load[1]:.1f} during the run\n')
  widths = (12, 7, 13, 8, 8, 13, 9, 15, 10)
  rows = [('method', 'steps', 'examples/sec', 'x bare', 'x fit',
           'CPU ms/step', 'warm-up', 'loss 1st call', 'agrees')]
  reference = result['first_loss'].get('trainer')
  for name in METHODS:
    if name not in med:
      continue
    loss = result['first_loss'][name]
    agrees = (reference is not None and
              abs(loss - reference) <= LOSS_RTOL * abs(reference))
    rows.append((name, str(steps[name]), f'{med[name]:,.1f}',
                 _ratio(med, name, 'bare'), _ratio(med, name, 'keras_fit'),
                 f'{1e3 * cpu[name] * result["global_batch"]:,.0f}',
                 f'{sum(result["warmup_secs"][name]):.0f} s', f'{loss:.5f}',
                 'yes' if agrees else 'NO'))
  harness.print_table(rows, widths)
  if 'trainer' in rates and 'bare' in rates:
    per_round = harness.paired_ratios(rates['trainer'], rates['bare'])
    print('trainer/bare per round: '
          f'{harness.format_range(harness.min_max(per_round), ".3f")} '
          f'(median {statistics.median(per_round):.3f})')
  if 'fit_setup_secs' in result:
    print(f'keras_fit: set-up per fit() call, not in its rate: '
          f'{result["fit_setup_secs"]:.2f} s')
  print(f'steps: per timed call; warm-up: build + 2 calls of '
        f'{steps["trainer"]} steps (tracing; XLA: compiling); loss 1st call: '
        f'mean over steps 1-{steps["trainer"]}, must agree (rtol {LOSS_RTOL})')
  for name, error in result['failed'].items():
    print(f'{name} failed at warm-up, not timed: {error}')


def print_summary(results) -> None:
  """The targets and the XLA ratio, one column per model."""
  print('\nsummary (ratios of medians)\n')
  rows = [('ratio', *[r['model'] for r in results])]
  for label, a, b, target in (
      (f'trainer / bare (target {TARGET_BARE})', 'trainer', 'bare',
       TARGET_BARE),
      (f'trainer / keras_fit (target {TARGET_FIT})', 'trainer', 'keras_fit',
       TARGET_FIT),
      ('bare / keras_fit', 'bare', 'keras_fit', None),
      ('XLA on / off (trainer)', 'trainer_xla', 'trainer', None)):
    cells = []
    for result in results:
      ratio = harness.ratio(result['median'], a, b)
      verdict = ''
      if ratio is not None and target is not None:
        verdict = ' meets' if ratio >= target else ' BELOW'
      cells.append(f'{harness.format_ratio(ratio)}{verdict}')
    rows.append((label, *cells))
  harness.print_table(rows, (34,) + (18,) * len(results))


def main(argv):
  del argv
  if FLAGS.model:
    run_child()
    return
  start = time.perf_counter()
  print(f'load average at start: {os.getloadavg()[0]:.2f}', flush=True)
  results = []
  for name in FLAGS.models:
    print(f'measuring {name} ...', flush=True)
    results.append(launch_child(name))
  startups, import_secs = [], None
  if FLAGS.startup and not FLAGS.quick:
    for name in FLAGS.models:
      print(f'timing main.py start-up of {name} ...', flush=True)
      startups.append(time_startup(get_workload(name)))
    import_secs = time_imports()
  for result in results:
    print_model_table(result)
  print_summary(results)
  if startups:
    print_startup(import_secs, startups)
  print(f'\nload average at end: {os.getloadavg()[0]:.2f}; total '
        f'{time.perf_counter() - start:.0f} s')


if __name__ == '__main__':
  app.run(main)

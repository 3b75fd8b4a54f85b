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

Method (as bench/throughput.py): each model is measured in its own child
process (`--model=NAME`) that prints one JSON line; the parent starts them
one after another and prints the tables. In a child every method is warmed
up with two calls, not timed: the first traces (XLA: compiles) and gives the
mean loss over steps 1..n, which must agree between methods (same weights,
data and loss: they do the same work; XLA changes float rounding only); the
second traces the Trainer's input-wait-timed loop and finishes Keras fit's
set-up. Each of --rounds rounds then times one call of every method in turn,
rotating the order, so machine noise hits all methods alike. A method's
throughput is the median of its per-round examples/sec; ratio a/b is
median(a) / median(b) within one child ("per round": the min-max and median
of trainer/bare within each round, a paired view that load drifts between
rounds do not move). CPU ms/step (process CPU time, all threads,
median) is printed as well: on a machine shared with other jobs it moves
less than wall time.

Steps per call n are chosen so one call takes ~1-2 s on 2 idle CPU cores:
6 for ResNet-20 (~0.3 s steps), 8 for the LM (~0.15 s steps). With XLA,
ResNet-20 runs 4 steps per call: XLA's CPU backend is slower on its
convolutions (examples/sec is per example, so the ratio is unaffected).

Targets: trainer >= 0.95 x bare and >= 1.0 x keras_fit on both models.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
import tensorflow as tf

from configs import cifar_resnet20
from configs import lm_transformer
import models  # noqa: F401  (registers the trainers)
from input import synthetic_images
from input import text
from models import resnet
from models import transformer
from trainer import registry
from trainer import strategies

flags.DEFINE_enum('model', None, ['resnet20', 'lm'],
                  'Child mode: measure this model and print one JSON line. '
                  'Unset: parent mode, runs everything.')
flags.DEFINE_bool('quick', False, 'Smoke check (~2 min): 2 rounds, no XLA, '
                  'no start-up runs.')
flags.DEFINE_integer('rounds', 9, 'Timed rounds (ignored with --quick).')
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
SEED = 0
# The first-call mean losses must agree within this relative tolerance:
# float rounding (XLA fuses differently) only. Different initial weights,
# batches or a different loss moves them by far more.
LOSS_RTOL = 2e-3
STARTUP_STEPS = 6  # Progress lines read from each start-up run.


class Workload:
  """One benchmarked model: its config and the Trainer's pieces, replayed
  with plain Keras and TensorFlow for the bare loop and Keras fit.

  Each piece mirrors the Trainer's own code path (same builder and
  arguments, same input function, same hyper-parameters), so the methods
  differ only in the training loop around them.
  """

  def __init__(self, name, *, config_file, variant, config, steps, xla_steps,
               title):
    self.name = name
    self.config_file = config_file
    self.variant = variant
    self.config = config
    self.config.seed = SEED
    # Steps per call, so that one call takes ~1-2 s on 2 CPU cores; XLA's
    # CPU backend is slower on ResNet-20's convolutions: fewer steps there.
    self.steps = steps
    self.xla_steps = xla_steps
    self.title = title
    self.batch = config.train.global_batch_size

  def trainer(self, strategy, jit_compile=False):
    """The registered Trainer of the config (`image_classifier`, `lm`)."""
    config = self.config.copy_and_resolve_references()
    config.train.jit_compile = jit_compile
    config.train.steps_per_loop = self.steps
    tf.keras.utils.set_random_seed(SEED)  # Same initial weights everywhere.
    return registry.get(config.trainer)(config=config, strategy=strategy)

  def build_model(self):
    """The Trainer's model, built by the same builder with the same
    arguments and seed (so with the same initial weights)."""
    tf.keras.utils.set_random_seed(SEED)
    model = self.config.model
    if self.name == 'resnet20':  # As ImageClassifierTrainer.build_model.
      size = self.config.data.image_size
      return resnet.build_cifar_resnet(
          depth=20, num_classes=model.num_classes,
          base_filters=model.base_filters, input_shape=(size, size, 3),
          sync_batch_norm=model.sync_batch_norm,
          bn_momentum=model.bn_momentum)
    return transformer.build_transformer_lm(  # As LMTrainer.build_model.
        vocab_size=text.VOCAB_SIZE, seq_len=model.seq_len, width=model.width,
        depth=model.depth, num_heads=model.heads, mlp_ratio=model.mlp_ratio,
        positions=model.positions, tie_embeddings=model.tie_embeddings,
        dropout=model.dropout)

  def dataset(self, input_context, batch_size):
    """The training stream, from the input function the Trainer uses."""
    data = self.config.data
    if self.name == 'resnet20':
      return synthetic_images.dataset(
          'train', input_context=input_context, batch_size=batch_size,
          training=True, seed=SEED, image_size=data.image_size,
          num_classes=self.config.model.num_classes,
          num_examples=data.synthetic_examples)
    return text.dataset('train', source=text.Source.from_config(data),
                        seq_len=self.config.model.seq_len,
                        input_context=input_context, batch_size=batch_size,
                        seed=SEED)

  def per_example_loss(self, labels, logits):
    """Cross-entropy per image, or per sequence (mean over its tokens)."""
    loss = tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None)(labels, logits)
    return loss if loss.shape.rank == 1 else tf.reduce_mean(loss, axis=-1)

  def keras_optimizer(self, variables):
    """A plain Keras optimizer with the config's hyper-parameters.

    Keras' CosineDecay with a linear warmup from 0 and alpha = the end
    factor computes what trainer/optimization.py's WarmupDecay does; weight
    decay skips the same variables; clipping is Keras' `global_clipnorm`.
    """
    opt = self.config.optimizer
    if opt.schedule != 'cosine':
      raise ValueError(f'{self.name}: schedule {opt.schedule!r} is not '
                       'replayed here')
    schedule = tf.keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, warmup_target=opt.learning_rate,
        warmup_steps=opt.warmup_steps,
        decay_steps=self.config.train.steps - opt.warmup_steps,
        alpha=opt.get('end_learning_rate_factor', 0.0))
    clip = self.config.train.clip_norm or None
    if opt.name == 'sgd':
      optimizer = tf.keras.optimizers.SGD(
          learning_rate=schedule, momentum=opt.momentum,
          nesterov=opt.nesterov, weight_decay=opt.weight_decay or None,
          global_clipnorm=clip)
    elif opt.name == 'adamw':
      optimizer = tf.keras.optimizers.AdamW(
          learning_rate=schedule, beta_1=opt.beta_1, beta_2=opt.beta_2,
          weight_decay=opt.weight_decay, global_clipnorm=clip)
    else:
      raise ValueError(f'{self.name}: optimizer {opt.name!r} is not replayed')
    excluded = [v for v in variables
                if any(p in v.path for p in opt.weight_decay_exclude)]
    optimizer.exclude_from_weight_decay(var_list=excluded)
    return optimizer


def get_workload(name: str) -> Workload:
  """The benchmarked model `name` ('resnet20' or 'lm')."""
  if name == 'resnet20':
    return Workload(
        name, config_file='configs/cifar_resnet20.py', variant='synthetic',
        config=cifar_resnet20.get_config('synthetic'), steps=6, xla_steps=4,
        title='ResNet-20 (configs/cifar_resnet20.py:synthetic): 32x32x3 '
        'synthetic images, 10 classes, batch 128, SGD momentum')
  return Workload(
      name, config_file='configs/lm_transformer.py', variant='',
      config=lm_transformer.get_config(), steps=8, xla_steps=8,
      title='Transformer LM (configs/lm_transformer.py): stdlib bytes, '
      'sequence 128, batch 32, AdamW')


# Each method builder returns `run(steps) -> (mean loss, wall seconds, CPU
# seconds)` of one call of `steps` optimizer steps. A call runs its steps in
# one tf.function (keras_fit: one epoch of one execution; its `steps` is fixed
# by steps_per_execution).


def trainer_method(workload, strategy, jit_compile=False):
  """The registered Trainer, called as trainer/controller.py calls it."""
  trainer = workload.trainer(strategy, jit_compile=jit_compile)
  iterator = iter(trainer.distribute_dataset('train',
                                             batch_size=workload.batch))
  every = workload.config.summary.input_wait_every_loops  # 10 in both.
  calls = [0]

  def run(steps):
    wall, cpu = time.perf_counter(), time.process_time()
    # As the Controller does: the input wait is measured on one inner loop
    # in `every` (the 2nd, 12th, ...). `steps` goes in as a tensor: no
    # retrace for a different count.
    metrics = trainer.train(iterator, steps,
                            measure_input_wait=calls[0] % every == 1)
    calls[0] += 1
    return (metrics['loss'], time.perf_counter() - wall,
            time.process_time() - cpu)
  return run


def bare_method(workload, strategy):
  """The tutorial's custom loop, as an engineer would write it by hand."""
  with strategy.scope():
    model = workload.build_model()
    optimizer = workload.keras_optimizer(model.trainable_variables)
    # Built eagerly: slots created inside the traced step fail under
    # MirroredStrategy (keras#23085); harmless under the default strategy.
    optimizer.build(model.trainable_variables)
    train_loss = tf.keras.metrics.Mean(name='train_loss')
    train_accuracy = tf.keras.metrics.SparseCategoricalAccuracy(
        name='train_accuracy')
  batch_size = workload.batch
  dataset = strategy.distribute_datasets_from_function(
      lambda ctx: workload.dataset(ctx, ctx.get_per_replica_batch_size(
          batch_size)))
  iterator = iter(dataset)

  def step(batch):
    inputs, labels = batch
    with tf.GradientTape() as tape:
      logits = model(inputs, training=True)
      per_example_loss = workload.per_example_loss(labels, logits)
      loss = tf.nn.compute_average_loss(per_example_loss,
                                        global_batch_size=batch_size)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    train_loss.update_state(per_example_loss)
    train_accuracy.update_state(labels, logits)

  @tf.function
  def train_loop(iterator, num_steps):
    for _ in tf.range(num_steps):
      strategy.run(step, args=(next(iterator),))

  def run(steps):
    wall, cpu = time.perf_counter(), time.process_time()
    train_loop(iterator, tf.constant(steps))
    loss = float(train_loss.result())
    _ = float(train_accuracy.result())
    train_loss.reset_state()
    train_accuracy.reset_state()
    return loss, time.perf_counter() - wall, time.process_time() - cpu
  return run


class _EpochTimer(tf.keras.callbacks.Callback):
  """Wall and CPU seconds of each epoch of a fit: the train function's call
  and its logs, without fit's per-call set-up (data adapter, iterator,
  callbacks), which a real run pays once."""

  def __init__(self):
    super().__init__()
    self.wall, self.cpu, self._start = [], [], None

  def on_epoch_begin(self, epoch, logs=None):
    self._start = (time.perf_counter(), time.process_time())

  def on_epoch_end(self, epoch, logs=None):
    self.wall.append(time.perf_counter() - self._start[0])
    self.cpu.append(time.process_time() - self._start[1])


def keras_fit_method(workload, strategy):
  """Keras fit, one epoch (one execution of n steps) per call."""
  with strategy.scope():
    model = workload.build_model()
    model.compile(
        optimizer=workload.keras_optimizer(model.trainable_variables),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=['accuracy'], steps_per_execution=workload.steps,
        jit_compile=False)  # What 'auto' picks on a CPU-only host anyway.
  # Global batches from one pipeline; the in-memory data is generated or
  # read once and cached, so fit's fresh iterator per call starts at once.
  dataset = workload.dataset(tf.distribute.InputContext(), workload.batch)
  setup = []

  def run(steps):
    assert steps == workload.steps, (steps, workload.steps)
    timer = _EpochTimer()
    start = time.perf_counter()
    history = model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0,
                        callbacks=[timer])
    setup.append(time.perf_counter() - start - timer.wall[0])
    return history.history['loss'][-1], timer.wall[0], timer.cpu[0]
  run.setup = setup
  return run


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
  runs, first_loss, warmup_secs, failed = {}, {}, {}, {}
  for name in methods:
    start = time.perf_counter()
    try:
      run = builders[name]()
      first_loss[name] = float(run(workload.steps)[0])
      warmup_secs[name] = [time.perf_counter() - start]
      warmup_secs[name].append(run(steps[name])[1])
    except (tf.errors.OpError, ValueError) as e:
      failed[name] = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
      continue
    runs[name] = run
    print(f'{workload.name} {name}: built + 1st call '
          f'{warmup_secs[name][0]:.1f} s, 2nd call {warmup_secs[name][1]:.1f}'
          ' s', file=sys.stderr, flush=True)

  names = list(runs)
  rates = {name: [] for name in names}
  cpu_per_example = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
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
      'median': {name: statistics.median(rates[name]) for name in names},
      'cpu_per_example': {name: statistics.median(cpu_per_example[name])
                          for name in names},
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


# absl's line prefix: severity, MMDD HH:MM:SS.micros (local time), thread id,
# file:line] message.
_LOG_LINE = re.compile(
    r'^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d+) +\d+ \S+\] (.*)$')
_STEP_LINE = re.compile(r'^step (\d+)/(\d+):')


def _log_time(match) -> float:
  """Seconds since the epoch of an absl log line (its local-time stamp)."""
  month, day, hour, minute, second, micros = (
      int(g) for g in match.groups()[:6])
  now = time.localtime()
  return time.mktime((now.tm_year, month, day, hour, minute, second, 0, 0,
                      -1)) + micros / 1e6


def time_imports() -> float:
  """Seconds to import TensorFlow, Keras and the project in a fresh process
  (what main.py does before anything else)."""
  code = ('import time; t = time.perf_counter(); import tensorflow, keras; '
          'import models, trainer.experiment; '
          'print(time.perf_counter() - t)')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, cwd=REPO, check=True)
  return float(proc.stdout.split()[-1])


def _cpu_seconds(pid: int) -> float | None:
  """CPU seconds (user + system, all threads) used so far by process `pid`;
  None where /proc is not available."""
  try:
    with open(f'/proc/{pid}/stat', encoding='ascii') as f:
      fields = f.read().rsplit(')', 1)[1].split()
  except OSError:
    return None
  # utime and stime are fields 14 and 15 of stat(5); fields[0] is field 3.
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def time_startup(workload: Workload, steps: int = STARTUP_STEPS) -> dict:
  """Times `python main.py` from process start to its first training steps.

  The run is the config's real model and training config, one step per
  inner loop, so each progress line marks one step done; it is killed after
  `steps` lines (what follows, checkpoint and eval, is not start-up).
  Each marker is taken twice: wall seconds since the process started (from
  the absl timestamps) and the CPU seconds the process had used when the
  line arrived (/proc), which a machine shared with other jobs inflates far
  less than wall time (tracing is single-threaded Python).

  Returns {'config', 'load', and for each of 'built' (the "Trainer on N
  replica(s)" line), 'first_step' (the `step 1/M:` line), 'steady' (median
  per step from the 3rd line on), 'trace' (the first inner loop minus a
  steady one: tracing, graph optimisation, the input pipeline's start) and
  'retrace_timed' (the 2nd loop minus a steady one: tracing the
  input-wait-timed loop): a (wall, CPU) pair}.
  """
  config = workload.config_file + (f':{workload.variant}'
                                   if workload.variant else '')
  with tempfile.TemporaryDirectory(prefix='bench_models_') as model_dir:
    command = [sys.executable, 'main.py', f'--config={config}',
               '--config.train.steps_per_loop=1', f'--model_dir={model_dir}']
    start = time.time()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    built, lines, tail = None, [], []  # (wall, CPU) pairs.
    try:
      for line in proc.stderr:
        tail = (tail + [line])[-20:]
        match = _LOG_LINE.match(line)
        if not match:
          continue
        message = match.group(7)
        if built is None and ' replica(s) ' in message:
          built = (_log_time(match) - start, _cpu_seconds(proc.pid))
        if _STEP_LINE.match(message):
          lines.append((_log_time(match) - start, _cpu_seconds(proc.pid)))
          if len(lines) == steps:
            break
    finally:
      proc.kill()  # Our own child, by its handle.
      proc.wait()
  if built is None or len(lines) < steps:
    sys.stderr.write(''.join(tail))
    raise SystemExit(f'main.py --config={config} printed {len(lines)} of '
                     f'{steps} progress lines')

  def pair(fn):
    try:
      return fn(0), fn(1)
    except TypeError:  # No CPU readings.
      return fn(0), None

  steady = pair(lambda i: statistics.median(
      b[i] - a[i] for a, b in zip(lines[2:], lines[3:])))
  return {
      'config': config,
      'load': os.getloadavg()[0],
      'built': built,
      'first_step': lines[0],
      'steady': steady,
      'trace': pair(lambda i: lines[0][i] - built[i] - steady[i]),
      'retrace_timed': pair(lambda i: lines[1][i] - lines[0][i] - steady[i]),
  }


def _ratio(median, a, b) -> float | None:
  return median[a] / median[b] if a in median and b in median else None


def _fmt(value, spec='.3f') -> str:
  return 'n/a' if value is None else format(value, spec)


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
                 _fmt(_ratio(med, name, 'bare')),
                 _fmt(_ratio(med, name, 'keras_fit')),
                 f'{1e3 * cpu[name] * result["global_batch"]:,.0f}',
                 f'{sum(result["warmup_secs"][name]):.0f} s', f'{loss:.5f}',
                 'yes' if agrees else 'NO'))
  for i, row in enumerate(rows):
    print(row[0].ljust(widths[0]) +
          ''.join(cell.rjust(w) for cell, w in zip(row[1:], widths[1:])))
    if i == 0:
      print('-' * sum(widths))
  if 'trainer' in rates and 'bare' in rates:
    per_round = [t / b for t, b in zip(rates['trainer'], rates['bare'])]
    print(f'trainer/bare per round: {min(per_round):.3f}-'
          f'{max(per_round):.3f} (median {statistics.median(per_round):.3f})')
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
  names = [r['model'] for r in results]
  print('ratio'.ljust(34) + ''.join(n.rjust(18) for n in names))
  print('-' * (34 + 18 * len(names)))
  for label, a, b, target in (
      (f'trainer / bare (target {TARGET_BARE})', 'trainer', 'bare',
       TARGET_BARE),
      (f'trainer / keras_fit (target {TARGET_FIT})', 'trainer', 'keras_fit',
       TARGET_FIT),
      ('bare / keras_fit', 'bare', 'keras_fit', None),
      ('XLA on / off (trainer)', 'trainer_xla', 'trainer', None)):
    cells = []
    for result in results:
      ratio = _ratio(result['median'], a, b)
      verdict = ''
      if ratio is not None and target is not None:
        verdict = ' meets' if ratio >= target else ' BELOW'
      cells.append(f'{_fmt(ratio)}{verdict}')
    print(label.ljust(34) + ''.join(c.rjust(18) for c in cells))


def print_startup(import_secs, startups) -> None:
  """Wall seconds (CPU seconds) of each start-up marker."""
  print('\nstart-up of `python main.py`: wall seconds since process start '
        '(CPU seconds used by then)\n')
  widths = (35, 14, 14, 14, 14, 16, 6)
  rows = [('config', 'Trainer built', 'first step', 'of it trace',
           'steady step', '2nd loop trace', 'load')]

  def cell(value, spec='.1f'):
    wall, cpu = value
    return f'{wall:{spec}}' + ('' if cpu is None else f' ({cpu:{spec}})')
  for s in startups:
    rows.append((s['config'], cell(s['built']), cell(s['first_step']),
                 cell(s['trace']), cell(s['steady'], '.2f'),
                 cell(s['retrace_timed']), f'{s["load"]:.1f}'))
  for i, row in enumerate(rows):
    print(row[0].ljust(widths[0]) +
          ''.join(c.rjust(w) for c, w in zip(row[1:], widths[1:])))
    if i == 0:
      print('-' * sum(widths))
  print('Trainer built: imports, config, data read, model and optimizer '
        'built; first step: the `step 1/M:` line; trace: first inner loop '
        'minus a steady step (tracing, graph optimisation, input pipeline '
        'start); 2nd loop trace: the input-wait-timed loop traced on the 2nd '
        f'inner loop. Imports alone (tensorflow, keras, the project; fresh '
        f'process): {import_secs:.1f} s wall.')


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

"""Multi-worker overhead: 1 process against 2 worker processes, one machine.

  python bench/multiworker.py              # full run, ~4-6 min on 2 CPU cores
  python bench/multiworker.py --quick      # smoke check, ~1 min (MLP only)
  python bench/multiworker.py --with_2x2   # adds 2 workers x 2 logical CPUs

Answers "what does going from one process to N worker processes cost here":
the same experiment, with the same global batch, steps and config, is trained
by real `main.py` runs in these setups:

  1x1  1 process x 1 CPU device      --strategy=default
  1x2  1 process x 2 logical CPUs    --strategy=mirrored --num_cpu_devices=2
  2x1  2 worker processes x 1 CPU    --strategy=multi_worker_mirrored, started
                                     by `python -m trainer.launch` (TF_CONFIG
                                     with 127.0.0.1 ports: loopback only)
  2x2  2 workers x 2 logical CPUs    with --with_2x2 only

for two workloads:

  mlp       the seed MLP (configs/digits_mlp.py: 100-64-64-10, Adam) on
            in-memory synthetic data (data.name='synthetic'), global batch
            64, as in bench/throughput.py: sub-millisecond steps, so the
            per-step costs of distribution dominate.
  resnet20  ResNet-20 (configs/cifar_resnet20.py:synthetic, the registered
            'image_classifier' trainer: 0.27M parameters, synchronized batch
            norm, SGD momentum) on synthetic 32x32 images, global batch 128:
            ~0.3 s steps on 2 cores, so compute dominates.

What it measures. The machine has 2 CPU cores and every setup uses both:
2 workers share the cores that 1 process has. So this is NOT a speed-up
across machines. It is what the framework's multi-worker path costs on top
of the same compute: collectives over gRPC (here on loopback) instead of
in-process ones, a synchronisation of all workers at every step (each
all-reduce, including synchronized batch norm's, waits for the slowest
worker), a Python and TensorFlow runtime per worker with its own thread
pools competing for the cores; and, at start-up, each worker's own imports,
TensorFlow server and cluster join. Ratios below 1 are the expected result.
The column "2 workers / 1x2" compares equal replica counts (2 replicas,
same per-replica batch), so it isolates crossing process boundaries from
having 2 replicas at all. On real machines each worker brings its own cores
and a network slower than loopback, so these ratios predict no multi-machine
speed-up; they show what the multi-worker path itself adds to a step.

Method. Each (workload, setup) is a `main.py --mode=train` run (through the
launcher for workers) into a temporary model_dir. Runs go one at a time, so
they never compete with each other; other jobs on the machine may, so the
--rounds rounds are interleaved (setups in order, then in reverse order, ...)
so that a load that drifts during the benchmark hits every setup alike, and
the 1-minute load average at the end of each run is printed. Work unrelated
to the training step is off, identically everywhere: no periodic checkpoint
(one at the end), no input-wait timing (it traces a second graph), a small
synthetic image pool. A run is stopped as soon as the chief has written the
training point of the last step: the final eval and the shutdown are not
measured, and took up to half of a ResNet run's time.

  examples/sec  read back from the chief's TensorBoard event files
                (model_dir/train, tag throughput/examples_per_sec): each
                point is steps x global batch over the time spent inside
                `Trainer.train` calls since the previous point, leaving out
                calls that traced (trainer/controller.py). Start-up,
                tracing, checkpoints, eval and host work between inner loops
                are therefore excluded. A run's first third of points is
                dropped (warm-up: thread pools, allocator, caches); the value
                is the median of the remaining points of all rounds, and
                "spread" their min-max.
  examples/CPU-s
                examples trained per CPU-second used by all of a run's
                processes (user + system time from /proc, launcher and
                workers included) between the chief's first and last
                progress lines; median over rounds. Why: on a shared,
                overloaded machine the scheduler gives a setup with more
                processes and threads a larger share of the cores, so
                wall-clock ratios between setups drift with the other jobs
                (ResNet-20's 2x1/1x1 read 0.36 in one run, 1.14 in another);
                CPU time per example is the cost itself, and ResNet-20's
                ratios moved by a few percent between rounds (the MLP's
                sub-millisecond steps stay sensitive to cache and scheduling
                either way).
  ratios        within a workload, computed per round (runs of a round
                ran minutes apart at most, under the most similar load) from
                that round's values; the median over rounds, and "(a-b)"
                its range.
  start-up      seconds from starting the process (the launcher, for
                workers) to the chief's first progress line, i.e. to the end
                of the first inner loop: imports, cluster join, model and
                data build, tracing, and that loop's steps (100 MLP steps,
                a few ms at 1x1; 5 ResNet steps, ~1 s); median over rounds.
                A throw-away import of main.py runs first, so the first
                setup is not charged for reading TensorFlow from disk.

A run that fails is retried once and the failure is printed with the table.
"""

import collections
import dataclasses
import glob
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

from absl import app
from absl import flags
from tensorboard.compat.proto import event_pb2  # Protobuf only, no TF.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_bool('quick', False, 'Smoke check (~1 min): the MLP workload, '
                  'one round of fewer steps.')
flags.DEFINE_bool('with_2x2', False, 'Also run 2 workers x 2 logical CPUs '
                  '(~+2 min).')
flags.DEFINE_list('workloads', None, 'Workloads to run (default: mlp,resnet20; '
                  'with --quick: mlp).')
flags.DEFINE_integer('rounds', 2, 'Interleaved rounds (with --quick: 1).')
flags.DEFINE_integer('timeout', 420, 'Seconds after which one run is stopped '
                     'and counted as failed.')
FLAGS = flags.FLAGS

TAG = 'throughput/examples_per_sec'
WARMUP_FRACTION = 1 / 3  # A run's leading summary points left out.
CHILD_ENV = {'TF_CPP_MIN_LOG_LEVEL': '2', 'PYTHONUNBUFFERED': '1'}
_DT_FLOAT, _DT_DOUBLE = 1, 2  # tensorflow/core/framework/types.proto


@dataclasses.dataclass(frozen=True)
class Setup:
  key: str
  label: str
  workers: int
  devices: int  # Logical CPU devices per process.
  strategy: str

  @property
  def replicas(self) -> int:
    return self.workers * self.devices


SETUPS = (
    Setup('1x1', '1 process x 1 CPU', 1, 1, 'default'),
    Setup('1x2', '1 process x 2 CPUs', 1, 2, 'mirrored'),
    Setup('2x1', '2 workers x 1 CPU', 2, 1, 'multi_worker_mirrored'),
    Setup('2x2', '2 workers x 2 CPUs', 2, 2, 'multi_worker_mirrored'),
)
BASELINE = '1x1'
SAME_REPLICAS = {'2x1': '1x2'}  # Setup -> the 1-process setup it matches.


@dataclasses.dataclass(frozen=True)
class Workload:
  """A main.py experiment; the same steps for every setup.

  The summary cadence sets how many throughput points a run gives: one per
  200 MLP steps (two inner loops), one per 5 ResNet steps (one loop).
  """
  name: str
  description: str
  config: str
  overrides: tuple
  global_batch: int
  steps: int  # Per run; with --quick: quick_steps.
  quick_steps: int

  def args(self, steps: int) -> list:
    return [f'--config={self.config}', *self.overrides,
            f'--config.train.global_batch_size={self.global_batch}',
            f'--config.train.steps={steps}']


_COMMON = ('--config.checkpoint.every_steps=0',
           '--config.summary.input_wait_every_loops=0')
WORKLOADS = {
    'mlp': Workload(
        'mlp', 'seed MLP 100-64-64-10, Adam, synthetic data, global batch 64',
        'configs/digits_mlp.py',
        ('--config.data.name=synthetic', '--config.model.input_dim=100',
         '--config.train.steps_per_loop=100',
         '--config.summary.every_steps=200', *_COMMON),
        global_batch=64, steps=1600, quick_steps=1200),
    'resnet20': Workload(
        'resnet20', 'ResNet-20 (synchronized BN), SGD momentum, synthetic '
        '32x32 images, global batch 128',
        'configs/cifar_resnet20.py:synthetic',
        ('--config.data.synthetic_examples=256',
         '--config.train.steps_per_loop=5', '--config.summary.every_steps=5',
         *_COMMON),
        global_batch=128, steps=30, quick_steps=15),
}


@dataclasses.dataclass
class Run:
  """One main.py run (one round of one setup)."""
  ok: bool = False
  points: list = dataclasses.field(default_factory=list)  # examples/sec
  startup_secs: float | None = None
  examples_per_cpu_sec: float | None = None
  wall_secs: float = 0.0
  load: float = 0.0  # 1-minute load average when the run ended.
  error: str = ''

  @property
  def steady(self) -> list:
    """The points after the warm-up ones."""
    return self.points[int(len(self.points) * WARMUP_FRACTION):]

  @property
  def examples_per_sec(self) -> float:
    return statistics.median(self.steady)


@dataclasses.dataclass
class Measurement:
  """Every round of one (workload, setup)."""
  workload: str
  setup: Setup
  runs: list = dataclasses.field(default_factory=list)  # Per round, or None.
  errors: list = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    return any(r and r.ok for r in self.runs)

  @property
  def steady(self) -> list:
    return [p for r in self.runs if r and r.ok for p in r.steady]

  @property
  def examples_per_sec(self) -> float:
    return statistics.median(self.steady)

  @property
  def startup_secs(self) -> float:
    return statistics.median(r.startup_secs for r in self.runs if r and r.ok)

  @property
  def examples_per_cpu_sec(self) -> float | None:
    values = [r.examples_per_cpu_sec for r in self.runs
              if r and r.ok and r.examples_per_cpu_sec]
    return statistics.median(values) if values else None

  @property
  def load(self) -> float:
    return statistics.mean(r.load for r in self.runs if r)


# ---------------------------------------------------------------------------
# Reading the chief's event files without TensorFlow (the parent stays light).


def _records(path: str):
  """Yields the records of a TFRecord file (CRCs not checked); stops at a
  record cut short."""
  with open(path, 'rb') as f:
    while True:
      header = f.read(12)  # uint64 length, uint32 masked CRC of the length.
      if len(header) < 12:
        return
      (length,) = struct.unpack('<Q', header[:8])
      data = f.read(length)
      if len(data) < length or len(f.read(4)) < 4:
        return
      yield data


def _scalar(value) -> float:
  if value.HasField('tensor'):
    tensor = value.tensor
    if tensor.float_val:
      return float(tensor.float_val[0])
    if tensor.double_val:
      return float(tensor.double_val[0])
    fmt = {_DT_FLOAT: '<f', _DT_DOUBLE: '<d'}[tensor.dtype]
    return float(struct.unpack(fmt, tensor.tensor_content)[0])
  return float(value.simple_value)


def read_scalars(logdir: str, tag: str) -> list:
  """[(step, value)] of `tag` in the event files directly in logdir."""
  found = []
  for path in sorted(glob.glob(os.path.join(logdir, '*tfevents*'))):
    for record in _records(path):
      event = event_pb2.Event.FromString(record)
      found.extend((event.step, _scalar(v)) for v in event.summary.value
                   if v.tag == tag)
  return sorted(found)


# ---------------------------------------------------------------------------
# CPU time of a process tree, from /proc (Linux).

_CLK_TCK = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100


def _stat(pid: int):
  """(parent pid, user + system CPU seconds) of a process, or None."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rpartition(')')[2].split()
  except OSError:
    return None
  return int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK_TCK


def tree_cpu_seconds(root_pid: int) -> float | None:
  """CPU seconds used so far by root_pid and all its descendants (the
  launcher and its workers); None without /proc."""
  if not os.path.isdir('/proc'):
    return None
  stats = {}
  for name in os.listdir('/proc'):
    if name.isdigit():
      stat = _stat(int(name))
      if stat:
        stats[int(name)] = stat
  children = collections.defaultdict(list)
  for pid, (ppid, _) in stats.items():
    children[ppid].append(pid)
  total, stack = 0.0, [root_pid]
  while stack:
    pid = stack.pop()
    if pid in stats:
      total += stats[pid][1]
      stack.extend(children[pid])
  return total


# ---------------------------------------------------------------------------
# Running one setup.


def command(workload: Workload, setup: Setup, steps: int,
            model_dir: str) -> list:
  main_args = [*workload.args(steps), f'--strategy={setup.strategy}',
               f'--num_cpu_devices={setup.devices}', f'--model_dir={model_dir}']
  if setup.workers == 1:
    return [sys.executable, os.path.join(REPO, 'main.py'), *main_args]
  return [sys.executable, '-m', 'trainer.launch',
          f'--num_workers={setup.workers}', '--', *main_args]


def _chief_progress_pattern(setup: Setup):
  """The chief's progress line: `[worker 0] ` prefixed under the launcher."""
  prefix = re.escape('[worker 0] ') if setup.workers > 1 else ''
  return re.compile(prefix + r'I\d{4} [^\]]*progress\.py:\d+\] step (\d+)/\d+')


def run_once(workload: Workload, setup: Setup, steps: int, root: str) -> Run:
  """One main.py (or launcher) run, with its output read live.

  The run is stopped as soon as the chief has written the training point of
  the last step: what follows (final eval, shutdown) is not measured, and
  took up to half of a ResNet run's time. Everything the processes write
  (model_dir, the other workers' temporary directories via TMPDIR) is under
  `root`, so nothing is left behind when they are killed.
  """
  run = Run()
  model_dir = tempfile.mkdtemp(prefix=f'{workload.name}-{setup.key}-',
                               dir=root)
  train_dir = os.path.join(model_dir, 'train')
  pattern = _chief_progress_pattern(setup)
  tail = collections.deque(maxlen=30)
  first_progress, trained = [], threading.Event()
  cpu = []  # (step, CPU seconds of the tree) at the first and last lines.
  start = time.monotonic()
  proc = subprocess.Popen(command(workload, setup, steps, model_dir),
                          cwd=REPO, env=dict(os.environ, TMPDIR=root,
                                             **CHILD_ENV),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors='replace')

  def pump():
    for line in proc.stdout:
      match = pattern.match(line)
      if match:
        step = int(match.group(1))
        if not first_progress:
          first_progress.append(time.monotonic() - start)
          cpu.append((step, tree_cpu_seconds(proc.pid)))
        if step >= steps and not trained.is_set():
          cpu.append((step, tree_cpu_seconds(proc.pid)))
          trained.set()
      tail.append(line.rstrip())

  def last_step():
    return max((step for step, _ in read_scalars(train_dir, TAG)), default=0)

  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  stopped = timed_out = False
  try:
    while proc.poll() is None:
      if trained.is_set() and last_step() >= steps:
        stopped = True
        break
      if time.monotonic() - start > FLAGS.timeout:
        timed_out = True
        break
      time.sleep(0.1)
  finally:
    if proc.poll() is None:  # Done, timed out, or Ctrl-C in the parent.
      _stop(proc, launcher=setup.workers > 1)
  reader.join(timeout=10)
  run.wall_secs = time.monotonic() - start
  run.load = os.getloadavg()[0]
  scalars = read_scalars(train_dir, TAG)
  run.points = [v for _, v in scalars]
  complete = bool(scalars) and scalars[-1][0] >= steps
  if ((stopped or proc.returncode == 0) and complete and
      len(run.points) >= 2 and first_progress):
    run.ok = True
    run.startup_secs = first_progress[0]
    if len(cpu) == 2 and None not in (cpu[0][1], cpu[1][1]):
      (step0, cpu0), (step1, cpu1) = cpu
      if step1 > step0 and cpu1 > cpu0:
        run.examples_per_cpu_sec = ((step1 - step0) * workload.global_batch /
                                    (cpu1 - cpu0))
    return run
  if timed_out:
    how = f'stopped after --timeout={FLAGS.timeout}s'
  elif proc.returncode and not stopped:
    how = f'exit status {proc.returncode}'
  else:
    how = (f'{len(run.points)} throughput point(s) up to step '
           f'{scalars[-1][0] if scalars else 0}, progress line '
           f'{"seen" if first_progress else "not seen"}')
  errors = [line for line in tail if 'error' in line.lower()]
  run.error = f'{how}: {(errors or list(tail) or [""])[-1][:300]}'
  print(f'  failed ({how}); last output:\n    ' + '\n    '.join(tail),
        flush=True)
  return run


def _stop(proc, *, launcher: bool) -> None:
  """Ends a run at once.

  main.py alone: SIGKILL (SIGTERM would be taken for a preemption while the
  training loop's handler is installed, and save a checkpoint first). The
  launcher: SIGTERM, forwarded to the workers; a second SIGTERM makes it
  SIGKILL them (trainer/launch.py), then it exits.
  """
  if not launcher:
    proc.kill()
  else:
    proc.terminate()
    try:
      proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
      proc.terminate()
  try:
    proc.wait(timeout=30)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


def warm_up() -> None:
  """Imports everything main.py imports once, in a throw-away process.

  The first TensorFlow import after other jobs have used the machine reads
  its files from disk (seen here: 22 s to the first step instead of 5 s);
  without this the first setup's start-up would be charged for it.
  """
  subprocess.run([sys.executable, os.path.join(REPO, 'main.py'),
                  '--print_config'], cwd=REPO,
                 env=dict(os.environ, **CHILD_ENV), stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL, check=False)


def measure(workload: Workload, setup: Setup, steps: int, root: str,
            errors: list) -> Run:
  """One round of one setup: a run, and one retry if it fails (the failure
  is appended to `errors`, to be printed with the table)."""
  for attempt in range(2):
    run = run_once(workload, setup, steps, root)
    if run.ok:
      cpu = (f'{run.examples_per_cpu_sec:,.0f}' if run.examples_per_cpu_sec
             else '-')
      print(f'  {run.examples_per_sec:,.0f} examples/sec (median of '
            f'{len(run.steady)} of {len(run.points)} points), {cpu} '
            f'examples/CPU-s, start-up {run.startup_secs:.1f} s, run '
            f'{run.wall_secs:.0f} s, load {run.load:.2f}', flush=True)
      return run
    errors.append(f'attempt {attempt + 1}: {run.error}')
  return run


# ---------------------------------------------------------------------------
# Report.


def _ratio(a: Measurement, b: Measurement | None,
           metric: str = 'examples_per_sec') -> str:
  """metric(a) / metric(b) within each round: their median and min-max.

  Runs of one round ran close together in time, so other jobs' load is
  most alike within a round; a ratio of medians pooled over rounds would
  mix rounds run under different loads. Without a round where both
  succeeded: the ratio of the pooled values.
  """
  if not (b and a.ok and b.ok and getattr(a, metric) and getattr(b, metric)):
    return '-'
  if a is b:
    return '1'
  per_round = [getattr(x, metric) / getattr(y, metric)
               for x, y in zip(a.runs, b.runs)
               if x and x.ok and y and y.ok and getattr(x, metric) and
               getattr(y, metric)]
  if not per_round:
    return f'{getattr(a, metric) / getattr(b, metric):.3f}'
  text = f'{statistics.median(per_round):.3f}'
  if len(per_round) > 1:
    text += f' ({min(per_round):.2f}-{max(per_round):.2f})'
  return text


def print_table(measurements: list, steps: dict, rounds: int) -> None:
  """The table, what its columns mean, and any failed attempts."""
  header = ('workload', 'setup', 'replicas', 'examples/sec', 'spread',
            'vs 1x1', '2 workers / 1x2', 'examples/CPU-s', 'vs 1x1',
            'start-up s', 'load')
  widths = (10, 24, 9, 13, 17, 19, 19, 16, 19, 11, 6)
  rows = [header]
  for workload in steps:
    mine = {m.setup.key: m for m in measurements if m.workload == workload}
    for key, m in mine.items():
      cpu = m.examples_per_cpu_sec if m.ok else None
      rows.append((
          workload, f'{key} {m.setup.label}', str(m.setup.replicas),
          f'{m.examples_per_sec:,.0f}' if m.ok else 'failed',
          f'{min(m.steady):,.0f}-{max(m.steady):,.0f}' if m.ok else '-',
          _ratio(m, mine.get(BASELINE)),
          _ratio(m, mine.get(SAME_REPLICAS[key])) if key in SAME_REPLICAS
          else '',
          f'{cpu:,.0f}' if cpu else '-',
          _ratio(m, mine.get(BASELINE), 'examples_per_cpu_sec'),
          f'{m.startup_secs:.1f}' if m.ok else '-', f'{m.load:.1f}'))
  print()
  for i, row in enumerate(rows):
    print(row[0].ljust(widths[0]) + row[1].ljust(widths[1]) +
          ''.join(cell.rjust(w) for cell, w in zip(row[2:], widths[2:])))
    if i == 0:
      print('-' * sum(widths))
  print()
  for name, n in steps.items():
    print(f'{name}: {WORKLOADS[name].description}; {n} steps per run, '
          f'{rounds} interleaved round(s)')
  print("examples/sec: median of the chief's TensorBoard throughput points "
        "after each run's first third (start-up, tracing, eval excluded); "
        'spread: their min-max. Ratios: median over rounds of the ratio '
        'within a round; (a-b): its range. '
        'examples/CPU-s: examples trained per CPU-second of all the run\'s '
        'processes (user + system, /proc) between the chief\'s first and '
        'last progress lines, median over rounds: the cost, which other '
        'jobs on the machine change far less than the wall-clock rate. '
        'start-up: process start to the end of the first inner loop. '
        'load: 1-minute load average at the end of the runs.')
  print('Every setup shares the same 2 CPU cores: this is the multi-worker '
        'overhead (gRPC collectives on 127.0.0.1, per-step synchronisation, '
        'a runtime per worker), not a speed-up across machines.')
  for m in measurements:
    for error in m.errors:
      print(f'{m.workload} {m.setup.key} failed, {error}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  names = FLAGS.workloads or (['mlp'] if FLAGS.quick else list(WORKLOADS))
  unknown = [n for n in names if n not in WORKLOADS]
  if unknown:
    raise app.UsageError(f'--workloads: unknown {unknown}; valid: '
                         f'{", ".join(WORKLOADS)}')
  rounds = 1 if FLAGS.quick else FLAGS.rounds
  setups = [s for s in SETUPS if s.key != '2x2' or FLAGS.with_2x2]
  steps = {n: (WORKLOADS[n].quick_steps if FLAGS.quick else WORKLOADS[n].steps)
           for n in names}
  load_before = os.getloadavg()
  print(f'{os.cpu_count()} CPU cores; load average (1, 5, 15 min) '
        f'{", ".join(f"{x:.2f}" for x in load_before)}', flush=True)
  start = time.monotonic()
  warm_up()
  measurements = []
  with tempfile.TemporaryDirectory(prefix='distloop-bench-mw-') as root:
    for name in names:
      mine = [Measurement(name, s) for s in setups]
      measurements.extend(mine)
      for r in range(rounds):
        for m in (mine if r % 2 == 0 else mine[::-1]):
          print(f'round {r + 1}/{rounds}: {name} {m.setup.key} '
                f'({m.setup.label}, --strategy={m.setup.strategy}) ...',
                flush=True)
          run = measure(WORKLOADS[name], m.setup, steps[name], root,
                        m.errors)
          m.runs.append(run if run.ok else None)
  print_table(measurements, steps, rounds)
  load_after = os.getloadavg()
  print(f'\nload average (1, 5, 15 min): before '
        f'{", ".join(f"{x:.2f}" for x in load_before)}; after '
        f'{", ".join(f"{x:.2f}" for x in load_after)}')
  print(f'total {time.monotonic() - start:.0f} s')
  return 0 if all(m.ok for m in measurements) else 1


if __name__ == '__main__':
  app.run(main)

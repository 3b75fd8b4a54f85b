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
                                     by `python -m trainer.cluster.launch`
                                     (TF_CONFIG with 127.0.0.1 ports:
                                     loopback only)
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
How one run is started, stopped and read back is in bench/multiworker_runs.py;
the interleaving, medians and table are bench/harness.py's.
"""

import dataclasses
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=wrong-import-position
from absl import app
from absl import flags

from bench import harness
from bench.multiworker_runs import Run, Setup, Workload, run_once, warm_up

flags.DEFINE_bool('quick', False, 'Smoke check (~1 min): the MLP workload, '
                  'one round of fewer steps.')
flags.DEFINE_bool('with_2x2', False, 'Also run 2 workers x 2 logical CPUs '
                  '(~+2 min).')
flags.DEFINE_list('workloads', None, 'Workloads to run (default: mlp,resnet20; '
                  'with --quick: mlp).')
flags.DEFINE_integer('rounds', 2, 'Interleaved rounds (with --quick: 1).',
                     lower_bound=1)
flags.DEFINE_integer('timeout', 420, 'Seconds after which one run is stopped '
                     'and counted as failed.', lower_bound=1)
FLAGS = flags.FLAGS

# What is compared: setups (processes x logical CPUs) on workloads.
SETUPS = (
    Setup('1x1', '1 process x 1 CPU', 1, 1, 'default'),
    Setup('1x2', '1 process x 2 CPUs', 1, 2, 'mirrored'),
    Setup('2x1', '2 workers x 1 CPU', 2, 1, 'multi_worker_mirrored'),
    Setup('2x2', '2 workers x 2 CPUs', 2, 2, 'multi_worker_mirrored'),
)
BASELINE = '1x1'
SAME_REPLICAS = {'2x1': '1x2'}  # Setup -> the 1-process setup it matches.

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


def measure(workload: Workload, setup: Setup, steps: int, root: str,
            errors: list) -> Run:
  """One round of one setup: a run, and one retry if it fails (the failure
  is appended to `errors`, to be printed with the table)."""
  for attempt in range(2):
    run = run_once(workload, setup, steps, root, timeout=FLAGS.timeout)
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
    return harness.format_ratio(getattr(a, metric) / getattr(b, metric))
  text = harness.format_ratio(statistics.median(per_round))
  if len(per_round) > 1:
    text += f' ({harness.format_range(harness.min_max(per_round), ".2f")})'
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
          harness.format_range(harness.min_max(m.steady), ',.0f')
          if m.ok else '-',
          _ratio(m, mine.get(BASELINE)),
          _ratio(m, mine.get(SAME_REPLICAS[key])) if key in SAME_REPLICAS
          else '',
          f'{cpu:,.0f}' if cpu else '-',
          _ratio(m, mine.get(BASELINE), 'examples_per_cpu_sec'),
          f'{m.startup_secs:.1f}' if m.ok else '-', f'{m.load:.1f}'))
  print()
  harness.print_table(rows, widths, left=2)
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
      # Setups in order, then in reverse order, ...: a load that drifts
      # during the benchmark hits every setup alike.
      for r, m in harness.interleaved(mine, rounds,
                                      order=harness.back_and_forth):
        print(f'round {r + 1}/{rounds}: {name} {m.setup.key} '
              f'({m.setup.label}, --strategy={m.setup.strategy}) ...',
              flush=True)
        run = measure(WORKLOADS[name], m.setup, steps[name], root, m.errors)
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

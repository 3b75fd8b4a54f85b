"""One `main.py` training run of bench/multiworker.py, watched from outside.

`run_once` starts a setup (one process, or workers through the launcher,
on 127.0.0.1 only) on a workload, reads the chief's progress lines as they
come, stops the run as soon as the chief has written the training point of
the last step, and returns a `Run`: the throughput points read back from
the chief's TensorBoard event files, the start-up time and the CPU time of
the whole process tree (/proc).

No TensorFlow: event files are read with their protobuf only, so the
parent process stays light while the runs use the cores.
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

from tensorboard.compat.proto import event_pb2  # Protobuf only, no TF.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = 'throughput/examples_per_sec'
WARMUP_FRACTION = 1 / 3  # A run's leading summary points left out.
CHILD_ENV = {'TF_CPP_MIN_LOG_LEVEL': '2', 'PYTHONUNBUFFERED': '1'}
_DT_FLOAT, _DT_DOUBLE = 1, 2  # tensorflow/core/framework/types.proto


@dataclasses.dataclass(frozen=True)
class Setup:
  """How a run is spread: processes (workers) x logical CPUs in each."""
  key: str
  label: str
  workers: int
  devices: int  # Logical CPU devices per process.
  strategy: str

  @property
  def replicas(self) -> int:
    return self.workers * self.devices


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
  return [sys.executable, '-m', 'trainer.cluster.launch',
          f'--num_workers={setup.workers}', '--', *main_args]


def _chief_progress_pattern(setup: Setup):
  """The chief's progress line: `[worker 0] ` prefixed under the launcher."""
  prefix = re.escape('[worker 0] ') if setup.workers > 1 else ''
  return re.compile(prefix + r'I\d{4} [^\]]*progress\.py:\d+\] step (\d+)/\d+')


def run_once(workload: Workload, setup: Setup, steps: int, root: str, *,
             timeout: float) -> Run:
  """One main.py (or launcher) run, with its output read live.

  The run is stopped as soon as the chief has written the training point of
  the last step: what follows (final eval, shutdown) is not measured, and
  took up to half of a ResNet run's time. Everything the processes write
  (model_dir, the other workers' temporary directories via TMPDIR) is under
  `root`, so nothing is left behind when they are killed. A run still going
  after `timeout` seconds (the benchmark's --timeout) is stopped and fails.
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
      if time.monotonic() - start > timeout:
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
    how = f'stopped after --timeout={timeout}s'
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
  SIGKILL them (trainer/cluster/launch.py), then it exits.
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

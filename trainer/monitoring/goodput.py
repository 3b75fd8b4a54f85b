"""Goodput: where every second of a run went, across restarts.

For each process that trains (the chief of a multi-worker run), the wall
time from the process start (the kernel's record of it, so imports count)
is split into parts, in seconds:

  startup      process start -> the first inner loop: imports, joining the
               cluster, building the model, restoring, validation (which
               traces the steps)
  tracing      inner loops that traced or retraced (first call of a graph)
  productive   the other inner loops, less their input wait and lost work
  input_wait   the inner loops' wait for batches, measured in the graph on
               one loop in summary.input_wait_every_loops, applied to all
  input_teardown  deleting the training iterator at the end of training
               (TensorFlow's distributed iterators: 0.2-6 s seen)
  checkpoints  the host's share of saves (async: taking the values),
               waits for writes, restores after a non-finite step
  eval         evaluations, periodic and final
  summaries    TensorBoard summaries, progress lines, host actions
  export       the SavedModel export at the end
  lost         steps computed after the last checkpoint and computed again
               after a crash (kill -9, a lost worker), a preemption or a
               NaN rollback: at the pace of the process that lost them

`unaccounted` is the rest (iterator creation, shutdown): small, and shown.

On disk (chief only): `model_dir/goodput/NNNN.jsonl` holds one process
start each, appended a snapshot of its totals after every inner loop, so a
process killed with kill -9 leaves its last loop on record. The process
after it compares that record's step with the step it restored: the
difference was lost (a line to a file kept open: ~0.02 ms per loop).
`model_dir/goodput.json` is the sum over every process, rewritten at each
training summary and at the end (~0.5 ms); TensorBoard shows `goodput/*` scalars with the
training summaries and the run ends with one line:

  goodput: 87.3% productive; startup 4.1%, tracing 1.0%, checkpoints 0.8%,
  eval 3.0%, input wait 4.2%, lost 0.6% (120 steps after a restart)
"""

import contextlib
import glob
import json
import os
import time

from absl import logging

PARTS = ('startup', 'tracing', 'productive', 'input_wait', 'input_teardown',
         'checkpoints', 'eval', 'summaries', 'export', 'lost')
_LABELS = {'input_wait': 'input wait', 'input_teardown': 'input teardown'}


def process_start_time() -> float:
  """This process's start (Unix seconds) as the kernel recorded it; now
  when /proc is not there."""
  try:
    with open('/proc/self/stat', encoding='ascii') as f:
      # Field 22 (after the parenthesised command, which may hold spaces).
      fields = f.read().rsplit(')', 1)[1].split()
    started = int(fields[19]) / os.sysconf('SC_CLK_TCK')  # Since boot.
    # The process's age from the uptime (1/100 s), not from /proc/stat's
    # boot time, which is in whole seconds (up to 1 s early).
    now = time.time()
    with open('/proc/uptime', encoding='ascii') as f:
      uptime = float(f.read().split()[0])
    return now - max(0.0, uptime - started)
  except (OSError, ValueError, IndexError):
    return time.time()


class Ledger:
  """This process's parts, and the record of the processes before it.

  Args:
    directory: the run's model_dir, or None to keep everything in memory
      (non-chief workers, tests).
    start: the process start (Unix seconds).
    clock: returns Unix seconds; injected by tests.
  """

  def __init__(self, directory: str | None = None, *,
               start: float | None = None, clock=time.time):
    self.directory = directory
    self.clock = clock
    self.start = process_start_time() if start is None else start
    self.parts = dict.fromkeys(PARTS, 0.0)
    self.lost_steps = 0
    self.step = None  # The global step after the last inner loop.
    self.steps_run = 0  # Steps computed by this process's productive loops.
    self._loop_secs = 0.0  # Of the productive loops, input wait included.
    self._wait = [0.0, 0.0]  # Measured: seconds waited, loop seconds.
    self._previous = []  # Last snapshot of each earlier process.
    # Steps the previous process computed after the checkpoint this one
    # restored, and their seconds: charged to `lost` in the totals.
    self.lost_before = {'steps': 0, 'secs': 0.0}
    self._startup_done = False
    self._path = None
    self._file = None
    self.last_totals = None  # As of the last write().

  # ---------------------------------------------------------------------------
  # Recording.

  def begin_training(self, restored_step: int) -> None:
    """Called once before the first inner loop: ends the start-up, reads
    the earlier processes' record and charges the steps they computed
    after `restored_step` as lost."""
    if self._startup_done:
      return
    self._startup_done = True
    self.parts['startup'] = max(0.0, self.clock() - self.start)
    self.step = restored_step
    if self.directory:
      try:
        os.makedirs(os.path.join(self.directory, 'goodput'), exist_ok=True)
        self._previous, number = _read_records(self.directory)
        self._path = os.path.join(self.directory, 'goodput',
                                  f'{number:04d}.jsonl')
      except OSError as e:  # Accounting must never stop training.
        self._warn(e)
    if self._previous:
      last = self._previous[-1]
      lost = max(0, (last.get('step') or 0) - restored_step)
      if lost:
        # The compute time of the lost steps, at the pace of the process
        # that computed them (its wait for input stays input wait).
        pace = (last['parts']['productive'] / last['steps_run']
                if last.get('steps_run') else 0.0)
        secs = min(lost * pace, last['parts']['productive'])
        self.lost_before = {'steps': lost, 'secs': secs}
        logging.info('goodput: %d steps computed after step %d by the '
                     'previous process were lost; they are computed again',
                     lost, restored_step)
    self.write()

  def loop(self, *, step: int, steps: int, seconds: float, traced: bool,
           input_wait: float | None = None,
           loop_secs: float | None = None) -> None:
    """An inner loop of `steps` steps that ended at global `step`.

    Args:
      input_wait, loop_secs: the wait for batches and the loop's in-graph
        time, when this loop measured them.
    """
    self.step = step
    if traced:
      self.parts['tracing'] += seconds
    else:
      self.steps_run += steps
      self._loop_secs += seconds
      self.parts['productive'] += seconds
    if input_wait is not None and loop_secs:
      self._wait[0] += input_wait
      self._wait[1] += loop_secs
    self._split_input_wait()
    self.record()

  def _split_input_wait(self):
    """productive + input_wait = productive loop time - lost, the wait at
    the share measured so far."""
    total = self.parts['productive'] + self.parts['input_wait']
    share = min(1.0, self._wait[0] / self._wait[1]) if self._wait[1] else 0.0
    self.parts['input_wait'] = total * share
    self.parts['productive'] = total - self.parts['input_wait']

  @contextlib.contextmanager
  def timed(self, part: str):
    """Adds the time spent within to `part`."""
    start = self.clock()
    try:
      yield
    finally:
      self.parts[part] += self.clock() - start

  def lose(self, steps: int) -> None:
    """`steps` steps of this process were rolled back (a non-finite step
    restored an older checkpoint): their time moves to `lost`."""
    if steps <= 0:
      return
    if self.step is not None:
      self.step -= steps  # Where training goes on from.
    moved = min(steps * self.step_secs(), self.parts['productive'])
    self.parts['productive'] -= moved
    self.parts['lost'] += moved
    self.lost_steps += steps

  def step_secs(self) -> float:
    """Seconds per productive step of this process, input wait included."""
    return self._loop_secs / self.steps_run if self.steps_run else 0.0

  # ---------------------------------------------------------------------------
  # Reporting.

  def snapshot(self) -> dict:
    """This process's record: wall seconds, parts, steps."""
    return {'start': self.start, 'wall': max(0.0, self.clock() - self.start),
            'parts': dict(self.parts), 'step': self.step,
            'steps_run': self.steps_run, 'step_secs': self.step_secs(),
            'lost_steps': self.lost_steps, 'lost_before': self.lost_before}

  def totals(self) -> dict:
    """The whole run so far: every earlier process and this one."""
    return combine(self._previous + [self.snapshot()])

  def record(self) -> None:
    """Appends a snapshot to this process's record (after every inner loop:
    ~0.03 ms, a line to a file kept open and flushed to the OS, so a kill -9
    leaves the last loop on record)."""
    if not (self.directory and self._path):
      return
    try:
      if self._file is None:
        self._file = open(self._path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with
      self._file.write(json.dumps(self.snapshot()) + '\n')
      self._file.flush()
    except OSError as e:  # Accounting must never stop training.
      self._warn(e)

  def write(self) -> None:
    """record(), and the run's totals so far into goodput.json and
    `last_totals` (at each training summary and at the end: the totals
    take ~0.5 ms, too much for every inner loop of a fast model)."""
    self.record()
    self.last_totals = self.totals()
    if not (self.directory and self._path):
      return
    try:
      path = os.path.join(self.directory, 'goodput.json')
      with open(path + '.tmp', 'w', encoding='utf-8') as f:
        json.dump(self.last_totals, f, indent=2, sort_keys=True)
      os.replace(path + '.tmp', path)
    except OSError as e:
      self._warn(e)

  def _warn(self, error):
    logging.warning('goodput: could not write to %s: %s', self.directory,
                    error)

  def scalars(self, totals: dict | None = None) -> dict[str, float]:
    """TensorBoard scalars of `totals` (default: the run so far):
    goodput/productive_share, goodput/<part>_share, goodput/lost_steps."""
    totals = totals or self.totals()
    scalars = {f'goodput/{name}_share': share
               for name, share in totals['shares'].items()}
    scalars['goodput/productive_share'] = totals['shares']['productive']
    scalars['goodput/lost_steps'] = float(totals['lost_steps'])
    return scalars

  def finish(self) -> str:
    """Writes the last snapshot and returns the end-of-run line; the
    totals it reports (those of goodput.json) stay in `last_totals`."""
    self.write()
    return line(self.last_totals)


def combine(records: list[dict]) -> dict:
  """Sums process records: {'wall', 'parts', 'shares', 'unaccounted',
  'lost_steps', 'restarts', 'processes'}."""
  parts = dict.fromkeys(PARTS, 0.0)
  wall = 0.0
  # lost_steps: rolled back within a process, and lost to a restart.
  lost_steps = lost_after_restart = 0
  for record in records:
    wall += record['wall']
    lost_steps += record.get('lost_steps', 0)
    for name in PARTS:
      parts[name] += record['parts'].get(name, 0.0)
    before = record.get('lost_before') or {'steps': 0, 'secs': 0.0}
    # Computed by the process before, and computed again by this one.
    parts['productive'] -= before['secs']
    parts['lost'] += before['secs']
    lost_steps += before['steps']
    lost_after_restart += before['steps']
  return {
      'wall_secs': wall,
      'parts_secs': parts,
      'shares': {name: value / wall if wall else 0.0
                 for name, value in parts.items()},
      'unaccounted_secs': wall - sum(parts.values()),
      'lost_steps': lost_steps,
      'lost_steps_after_restarts': lost_after_restart,
      'processes': len(records),
  }


def line(totals: dict) -> str:
  """'goodput: 87.3% productive; startup 4.1%, ..., lost 0.6% (120 steps
  after a restart)': the parts over 0.05% of the wall time."""
  shares = totals['shares']
  rest = [f'{_LABELS.get(name, name)} {shares[name]:.1%}' for name in PARTS
          if name not in ('productive', 'lost') and shares[name] >= 5e-4]
  lost = f'lost {shares["lost"]:.1%}'
  if totals['lost_steps']:
    after = totals['lost_steps_after_restarts']
    rolled_back = totals['lost_steps'] - after
    why = [f'{after} steps after a restart'] if after else []
    why += [f'{rolled_back} steps rolled back'] if rolled_back else []
    lost += f' ({", ".join(why)})'

  return (f'goodput: {shares["productive"]:.1%} productive; '
          f'{", ".join(rest + [lost])}; {totals["wall_secs"]:.1f} s of wall '
          f'time in {totals["processes"]} process'
          f'{"es" * (totals["processes"] != 1)}')


def _read_records(directory: str) -> tuple[list[dict], int]:
  """(the last snapshot of every earlier process, oldest first; the number
  of the next process's record file). A record that cannot be read (cut
  short, not JSON, not a snapshot) is left out with a warning: accounting
  must never stop training."""
  records, number = [], 0
  for path in sorted(glob.glob(os.path.join(directory, 'goodput',
                                            '*.jsonl'))):
    name = os.path.basename(path)[:-len('.jsonl')]
    if name.isdigit():
      number = max(number, int(name) + 1)
    last = None
    try:
      with open(path, encoding='utf-8', errors='replace') as f:
        for text in f:
          try:
            last = json.loads(text)
          except ValueError:  # A line cut short by a kill.
            continue
      if last is not None:
        last['parts'] = {**dict.fromkeys(PARTS, 0.0), **last['parts']}
        last.setdefault('lost_steps', 0)
        last['wall'] = float(last['wall'])
        records.append(last)
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:
      logging.warning('goodput: left out the unreadable record %s: %s', path,
                      e)
  return records, number

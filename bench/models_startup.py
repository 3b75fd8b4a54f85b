"""Start-up of `python main.py`: bench/models.py's third question.

How long a real run takes from process start to its first training steps:
`time_startup` runs main.py on a config (one step per inner loop) and reads
the markers off its absl log timestamps, each also as the CPU seconds the
process had used by then (/proc); `time_imports` times the imports alone in
a fresh process; `print_startup` prints the table.

No TensorFlow here: all of it happens in the processes started.
"""

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from bench import harness

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTUP_STEPS = 6  # Progress lines read from each start-up run.


# absl's line prefix: severity, MMDD HH:MM:SS.micros (local time), thread id,
# file:line] message.
_LOG_LINE = re.compile(
    r'^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d+) +\d+ \S+\] (.*)$')
STEP_LINE = re.compile(r'^step (\d+)/(\d+):')


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


class MainRun:
  """`python main.py --config=CONFIG` with one step per inner loop, started
  in `repo` (by `python`, default this interpreter) and killed when the
  `with` block ends.

  `marks()` yields (message, (wall, CPU)) for each absl log line: the
  seconds since the process started, from the line's timestamp, and the CPU
  seconds it had used when the line arrived (/proc; None where there is
  none). `tail` holds the last 20 lines of its output, for errors.
  """

  def __init__(self, config: str, repo: str = REPO, python: str = ''):
    self.config, self.repo, self.tail = config, repo, []
    self.python = python or sys.executable

  def __enter__(self):
    self._model_dir = tempfile.TemporaryDirectory(prefix='bench_startup_')
    command = [self.python, 'main.py', f'--config={self.config}',
               '--config.train.steps_per_loop=1',
               f'--model_dir={self._model_dir.name}']
    self._start = time.time()
    self._proc = subprocess.Popen(command, cwd=self.repo,
                                  stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
    return self

  def marks(self):
    for line in self._proc.stderr:
      self.tail = (self.tail + [line])[-20:]
      match = _LOG_LINE.match(line)
      if match:
        yield match.group(7), (_log_time(match) - self._start,
                               _cpu_seconds(self._proc.pid))

  def __exit__(self, *unused):
    self._proc.kill()  # Our own child, by its handle.
    self._proc.wait()
    self._model_dir.cleanup()


def time_startup(workload, steps: int = STARTUP_STEPS) -> dict:
  """Times `python main.py` from process start to its first training steps.

  The run is the config's real model and training config, one step per
  inner loop, so each progress line marks one step done; it is killed after
  `steps` lines (what follows, checkpoint and eval, is not start-up).
  Each marker is taken twice: wall seconds since the process started (from
  the absl timestamps) and the CPU seconds the process had used when the
  line arrived (/proc), which a machine shared with other jobs inflates far
  less than wall time (tracing is single-threaded Python).

  `workload` is a bench/models_workloads.py Workload: its config_file and
  variant name the config.

  Returns {'config', 'load', and for each of 'built' (the "Trainer on N
  replica(s)" line), 'first_step' (the `step 1/M:` line), 'steady' (median
  per step from the 3rd line on), 'trace' (the first inner loop minus a
  steady one: tracing, graph optimisation, the input pipeline's start) and
  'retrace_timed' (the 2nd loop minus a steady one: tracing the
  input-wait-timed loop): a (wall, CPU) pair}.
  """
  config = workload.config_file + (f':{workload.variant}'
                                   if workload.variant else '')
  built, lines = None, []  # (wall, CPU) pairs.
  with MainRun(config) as run:
    for message, mark in run.marks():
      if built is None and ' replica(s) ' in message:
        built = mark
      if STEP_LINE.match(message):
        lines.append(mark)
        if len(lines) == steps:
          break
  if built is None or len(lines) < steps:
    sys.stderr.write(''.join(run.tail))
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
  harness.print_table(rows, widths)
  print('Trainer built: imports, config, data read, model and optimizer '
        'built; first step: the `step 1/M:` line; trace: first inner loop '
        'minus a steady step (tracing, graph optimisation, input pipeline '
        'start); 2nd loop trace: the input-wait-timed loop traced on the 2nd '
        f'inner loop. Imports alone (tensorflow, keras, the project; fresh '
        f'process): {import_secs:.1f} s wall.')

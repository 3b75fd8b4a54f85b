"""Runs N workers of main.py on this machine as one MultiWorkerMirrored job
(or, with --num_ps, a ParameterServerStrategy cluster).

  python -m trainer.cluster.launch --num_workers=2 -- \
      --config=configs/digits_mlp.py:smoke --strategy=multi_worker_mirrored \
      --model_dir=/tmp/x

Every worker gets its own TF_CONFIG: the same cluster of free 127.0.0.1 ports
and its own task index. Their output is streamed live, each line prefixed
with `[worker I] `. MultiWorkerMirroredStrategy waits forever for a peer that
died (tensorflow#35878), so when a worker exits non-zero the others are
stopped (SIGTERM, then SIGKILL after --grace_period) and the launcher exits
with that worker's status: 42 (preempted) stays 42. SIGTERM or SIGINT sent to
the launcher is forwarded to every worker, so preempting the launcher
preempts the job; a worker still running --grace_period seconds after
another exited is killed (one preempted before its training loop leaves the
others blocked in their next all-reduce). The last line on stderr says how
the job ended.

With --num_ps=M (and --strategy=parameter_server after --): a chief, N
workers and M ps tasks, output prefixed `[chief] `, `[worker I] `, `[ps I] `.
The job is the chief's: a worker that fails is tolerated (the chief's
coordinator runs its work elsewhere), SIGTERM/SIGINT go to the chief only
(its preemption checkpoint reads the variables from the ps tasks, which
must still be up), and when the chief exits the workers and ps tasks are
stopped and the launcher exits with the chief's status.

Imports no TensorFlow, so it starts at once.
"""

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import flags

from trainer import errors
from trainer.errors import UserError

MAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'main.py')
_POLL_SECS = 0.05


def free_ports(n: int, host: str = '127.0.0.1') -> list[int]:
  """`n` distinct ports that were free on `host` a moment ago.

  All n sockets are bound (port 0: the OS picks) before any is released, so
  the ports are distinct; another process may still take one before the
  worker binds it, which the worker then reports as an error.
  """
  sockets = [socket.socket() for _ in range(n)]
  try:
    for s in sockets:
      s.bind((host, 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def cluster_tasks(num_workers: int, num_ps: int = 0) -> list[tuple[str, int]]:
  """(type, index) of every task: N workers; with ps tasks, the chief first."""
  if not num_ps:
    return [('worker', i) for i in range(num_workers)]
  return ([('chief', 0)] + [('worker', i) for i in range(num_workers)] +
          [('ps', i) for i in range(num_ps)])


def cluster_configs(ports, num_ps: int = 0) -> list[str]:
  """The TF_CONFIG JSON of each task of a cluster on 127.0.0.1:`ports`
  (in cluster_tasks order)."""
  tasks = cluster_tasks(len(ports) - (1 + num_ps if num_ps else 0), num_ps)
  cluster = {}
  for (job, _), port in zip(tasks, ports):
    cluster.setdefault(job, []).append(f'127.0.0.1:{port}')
  return [json.dumps({'cluster': cluster,
                      'task': {'type': job, 'index': index}})
          for job, index in tasks]


def launch(num_workers: int, program_args, *, program: str = MAIN,
           num_ps: int = 0, grace_period: float = 10.0, cluster_timeout=None,
           stdout=None, stderr=None) -> int:
  """Runs `python program *program_args` as `num_workers` workers (and,
  with num_ps, a chief and num_ps ps tasks).

  Must be called from the main thread (it installs SIGTERM/SIGINT handlers
  while the workers run).

  Args:
    num_workers: how many workers (>= 1).
    program_args: arguments for every worker.
    num_ps: ps tasks (0: a MultiWorkerMirroredStrategy job of workers).
    program: the Python script each worker runs (default: main.py).
    grace_period: seconds between SIGTERM and SIGKILL when stopping workers.
    cluster_timeout: seconds within which every running worker must listen
      on its TF_CONFIG port (its TensorFlow server is up); None: no limit.
      Not used with ps tasks: the chief waits for them itself.
    stdout, stderr: where the prefixed worker output and the summary go
      (default: sys.stdout, sys.stderr).
  Returns:
    0 when every worker exits 0; otherwise the status of the first worker
    that failed (128 + N for a worker killed by signal N), or 1 when the
    cluster did not come up within cluster_timeout. With ps tasks: the
    chief's status.
  Raises:
    UserError: num_workers < 1, or main.py arguments that cannot form one
      job.
  """
  if num_workers < 1:
    raise UserError(f'flag --num_workers={num_workers} must be >= 1')
  if num_ps < 0:
    raise UserError(f'flag --num_ps={num_ps} must be >= 0')
  if os.path.abspath(program) == MAIN:
    _check_main_args(program_args, num_ps)
  tasks = cluster_tasks(num_workers, num_ps)
  job = _Job(stdout or sys.stdout, stderr or sys.stderr, grace_period,
             tasks)
  handled = (signal.SIGTERM, signal.SIGINT)
  old_handlers = {s: signal.signal(s, job.on_signal) for s in handled}
  try:
    job.start(program, list(program_args), free_ports(len(tasks)), num_ps)
    if num_ps:
      return job.wait_for_chief()
    return job.wait(cluster_timeout)
  finally:
    job.kill_all()  # A no-op unless an exception left workers running.
    for s, handler in old_handlers.items():
      signal.signal(s, handler)


class _Job:
  """The worker processes, their output threads and how the job ended."""

  def __init__(self, stdout, stderr, grace_period: float, tasks):
    self._labels = [job if job == 'chief' else f'{job} {index}'
                    for job, index in tasks]
    self._has_chief = tasks[0][0] == 'chief'
    self._out = {'stdout': stdout, 'stderr': stderr}
    self._grace_period = grace_period
    self._lock = threading.Lock()  # One whole line at a time.
    self._procs, self._threads, self._ports = [], [], []
    self._signals = []

  def start(self, program, args, ports, num_ps=0):
    configs = cluster_configs(ports, num_ps)
    for config in configs:
      env = dict(os.environ, TF_CONFIG=config, PYTHONUNBUFFERED='1')
      # A session of its own: a Ctrl-C in the terminal reaches only the
      # launcher, which forwards it once.
      self._procs.append(subprocess.Popen(
          [sys.executable, program, *args], env=env, stdout=subprocess.PIPE,
          stderr=subprocess.PIPE, start_new_session=True,
          preexec_fn=_die_with_parent))
    self._ports = list(ports)
    # Started after every fork: preexec_fn is unsafe while threads run.
    for i, proc in enumerate(self._procs):
      for name in ('stdout', 'stderr'):
        thread = threading.Thread(target=self._pump, daemon=True,
                                  args=(getattr(proc, name), name, i))
        thread.start()
        self._threads.append(thread)

  def _pump(self, pipe, name, index):
    prefix = f'[{self._labels[index]}] '
    for line in iter(pipe.readline, b''):
      text = line.decode('utf-8', 'replace').rstrip('\r\n')
      with self._lock:
        print(prefix + text, file=self._out[name], flush=True)
    pipe.close()

  def on_signal(self, signum, frame):
    """Forwards the launcher's SIGTERM/SIGINT to every worker."""
    del frame
    self._signals.append(signum)
    # A second signal means "now": the workers did not stop on the first.
    self._send(signum if len(self._signals) == 1 else signal.SIGKILL,
               only=[0] if self._has_chief else None)

  def wait_for_chief(self) -> int:
    """Waits for the chief (task 0) of a parameter-server cluster; then
    stops the workers and ps tasks; returns the chief's exit status. (The
    chief itself waits --cluster_timeout for the others to serve, and
    exits 75 naming those that did not.)"""
    chief = self._procs[0]
    while chief.poll() is None:
      time.sleep(_POLL_SECS)
    failed = [self._labels[i] for i, p in enumerate(self._procs)
              if i and p.poll() not in (None, 0)]
    self.stop()
    status, lost = _exit_status(chief.returncode), ''
    if failed:
      lost = f' ({", ".join(failed)} had exited before it, status != 0)'
    return self._summary(status, f'chief exited with status {status}{lost}; '
                         'stopped the workers and ps tasks')

  def wait(self, cluster_timeout) -> int:
    """Waits for the job to end; returns the launcher's exit status.

    The job ends when every worker has exited, or at the first failure: the
    others would wait for the failed one forever. After a signal was
    forwarded, the workers are left to finish (e.g. their preemption
    checkpoint) and all are waited for, until one has exited: the rest
    then have the grace period, and are killed after it.
    """
    deadline = (None if cluster_timeout is None else
                time.monotonic() + cluster_timeout)
    waiting = set(range(len(self._procs)))  # Ports not yet seen listening.
    failed = None
    first_exit = None  # When a worker first exited after a forwarded signal.
    while True:
      codes = [p.poll() for p in self._procs]
      if failed is None:
        failed = next((i for i, c in enumerate(codes) if c), None)
      if None not in codes or (failed is not None and not self._signals):
        break
      if self._signals and any(c is not None for c in codes):
        # A worker that got the signal before its training loop exits at
        # once; one inside it stops at the next step's all-reduce, which
        # waits for the exited peer forever: it has the grace period.
        first_exit = first_exit or time.monotonic()
        if time.monotonic() - first_exit > self._grace_period:
          break
      waiting -= {i for i, c in enumerate(codes) if c is not None}
      waiting -= {i for i in waiting if _listening(self._ports[i])}
      if (waiting and deadline is not None and not self._signals and
          time.monotonic() > deadline):
        self.stop()
        return self._summary(
            1, f'worker(s) {_names(waiting)} did not listen on their '
            f'TF_CONFIG ports {_names(self._ports[i] for i in waiting)} '
            f'within {cluster_timeout:g}s (--cluster_timeout); stopped all '
            f'{len(self._procs)} workers')
      time.sleep(_POLL_SECS)
    running = [i for i, c in enumerate(codes) if c is None]
    if running and self._signals:
      self.kill_all()
      stopped = (f'; killed worker(s) {_names(running)}, still running '
                 f'{self._grace_period:g}s (--grace_period) after another '
                 'exited')
      if failed is None:  # The others exited 0: the killed one failed.
        failed = running[0]
        codes = [p.returncode for p in self._procs]
    else:
      stopped = None
    signalled = self.stop()  # Those still running now, not at the last poll.
    if stopped is None:
      stopped = f'; stopped worker(s) {_names(signalled)}' if signalled else ''
    if failed is None:
      return self._summary(0, f'all {len(codes)} workers exited 0')
    status = _exit_status(codes[failed])
    how = (f'was killed by signal {-codes[failed]}' if codes[failed] < 0
           else f'exited with status {codes[failed]}')
    return self._summary(status, f'worker {failed} {how}{stopped}; exiting '
                         f'with status {status}')

  def stop(self):
    """Stops the workers still running and waits for the rest of the output.

    SIGTERM first, so that a worker can save what it can; SIGKILL after the
    grace period, as a worker blocked in a collective never gets to.
    Returns the indices of the tasks it had to stop.
    """
    running = [i for i, p in enumerate(self._procs) if p.poll() is None]
    if running:
      self._send(signal.SIGTERM)
      deadline = time.monotonic() + self._grace_period
      while (any(p.poll() is None for p in self._procs) and
             time.monotonic() < deadline):
        time.sleep(_POLL_SECS)
      self.kill_all()
    for thread in self._threads:
      # A grandchild that escaped the process group may hold the pipe open.
      thread.join(timeout=5)
    return running

  def kill_all(self):
    self._send(signal.SIGKILL)
    for p in self._procs:
      p.wait()

  def _send(self, signum, only=None):
    for i, p in enumerate(self._procs):
      if p.poll() is None and (only is None or i in only):
        try:
          os.killpg(p.pid, signum)  # The worker and anything it started.
        except ProcessLookupError:
          pass

  def _summary(self, status: int, message: str) -> int:
    names = [signal.Signals(s).name for s in self._signals]
    whom = 'the chief' if self._has_chief else 'the workers'
    if len(names) > 1:
      message = f'got {names[1]} again, killed {whom}; {message}'
    if names:
      message = f'got {names[0]}, forwarded to {whom}; {message}'
    with self._lock:
      print(f'launch: {message}', file=self._out['stderr'], flush=True)
    return status


def _exit_status(returncode: int) -> int:
  """A worker's returncode as a shell exit status (-N -> 128 + N)."""
  return 128 - returncode if returncode < 0 else returncode


def _names(items) -> str:
  return ', '.join(str(i) for i in sorted(items))


def _listening(port: int) -> bool:
  try:
    socket.create_connection(('127.0.0.1', port), timeout=0.2).close()
    return True
  except OSError:
    return False


try:
  _PRCTL = ctypes.CDLL(None).prctl  # Looked up here: the child only calls it.
except (OSError, AttributeError):  # Not Linux.
  _PRCTL = None


def _die_with_parent():
  """In the child: get SIGTERM when the launcher dies, even by SIGKILL.

  Otherwise its workers would wait for each other forever.
  """
  if _PRCTL is not None:
    _PRCTL(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG.


flags.DEFINE_integer('num_workers', 2, 'How many workers to run.')
flags.DEFINE_integer('num_ps', 0, 'Parameter-server tasks; > 0 also starts a '
                     'chief, for --strategy=parameter_server.')
flags.DEFINE_string('program', MAIN, 'The Python script every worker runs.')
flags.DEFINE_float('grace_period', 10.0, 'Seconds between SIGTERM and SIGKILL '
                   'when stopping the workers after one failed; after a '
                   'forwarded SIGTERM, seconds the others have to exit once '
                   'one has.')
flags.DEFINE_float('cluster_timeout', 300.0, 'Seconds within which every '
                   'worker must listen on its TF_CONFIG port (its TensorFlow '
                   'server is up); 0: no limit (for a --program that starts '
                   'no server). With --num_ps the chief\'s own '
                   '--cluster_timeout applies.')


def _check_main_args(args, num_ps: int = 0) -> None:
  """main.py workers must form one cluster writing to one directory."""
  strategy = _flag_value(args, 'strategy')
  if num_ps and strategy != 'parameter_server':
    raise UserError(f'flag --num_ps={num_ps} needs --strategy=parameter_'
                    f'server after -- (got {_given(strategy)}); or drop '
                    '--num_ps for a multi_worker_mirrored job')
  if not num_ps and strategy == 'parameter_server':
    raise UserError('--strategy=parameter_server after -- needs --num_ps=M '
                    '(M >= 1 ps tasks to hold the variables)')
  if not num_ps and strategy != 'multi_worker_mirrored':
    raise UserError('the arguments after -- need '
                    '--strategy=multi_worker_mirrored; without it the '
                    'workers train independent models into one --model_dir')
  if not _flag_value(args, 'model_dir'):
    raise UserError('the arguments after -- need --model_dir=DIR: each '
                    'worker would otherwise pick its own timestamped default')


def _given(strategy) -> str:
  return 'no --strategy' if strategy is None else f'--strategy={strategy}'


def _flag_value(args, name: str):
  """The last value of --name in args (`--name=V` or `--name V`), or None."""
  value = None
  for i, arg in enumerate(args):
    flag, eq, rest = arg.lstrip('-').partition('=')
    if arg.startswith('-') and flag == name:
      value = rest if eq else (args[i + 1] if i + 1 < len(args) else '')
  return value


def main(argv) -> int:
  """`python -m trainer.cluster.launch [FLAGS] -- [WORKER ARGS]`; returns the status."""
  split = argv.index('--') if '--' in argv else len(argv)
  try:
    rest = flags.FLAGS(argv[:split])
  except flags.UnrecognizedFlagError as e:
    errors.fail(f'{errors.one_line(e)}; the workers\' flags go after --, e.g. '
             'python -m trainer.cluster.launch --num_workers=2 -- --model_dir=DIR ...')
  except flags.Error as e:
    errors.fail(errors.one_line(e))
  if len(rest) > 1:
    errors.fail(f'unexpected argument(s) {rest[1:]} before --; usage: python -m '
             'trainer.cluster.launch --num_workers=N -- MAIN.PY ARGS')
  program_args = argv[split + 1:]
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  try:
    if not os.path.isfile(FLAGS.program):
      raise UserError(f'flag --program={FLAGS.program}: no such file; '
                      'give the Python script every worker runs')
    return launch(FLAGS.num_workers, program_args, program=FLAGS.program,
                  num_ps=FLAGS.num_ps, grace_period=FLAGS.grace_period,
                  cluster_timeout=FLAGS.cluster_timeout or None)
  except UserError as e:
    errors.fail(str(e))


if __name__ == '__main__':
  sys.exit(main(sys.argv))

"""trainer.cluster.launch with real processes: a tiny fake worker stands in for main.py.

The fake worker prints its TF_CONFIG, then runs the steps given for its task
index on its command line, e.g. `0=sleep:60 1=exit:3` or `all=exit:42`.
"""

import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests import runner
from trainer.cluster import launch

REPO = runner.REPO

FAKE_WORKER = r'''
import json, os, signal, socket, sys, time

config = json.loads(os.environ['TF_CONFIG'])
index = config['task']['index']
print('TF_CONFIG ' + json.dumps(config))
print(f'stderr of {index}', file=sys.stderr)
steps = dict(a.split('=', 1) for a in sys.argv[1:])
for step in (steps.get(str(index)) or steps.get('all') or 'exit:0').split(','):
  name, _, value = step.partition(':')
  if name == 'record_term':  # A preempted main.py: note it, exit 42.
    def on_term(signum, frame, record_dir=value):
      open(os.path.join(record_dir, f'sigterm-{index}'), 'w').close()
      sys.exit(42)
    signal.signal(signal.SIGTERM, on_term)
  elif name == 'slow_term':  # A chief whose save takes a while: exit 42.
    def on_term(signum, frame, seconds=float(value)):
      time.sleep(seconds)
      sys.exit(42)
    signal.signal(signal.SIGTERM, on_term)
  elif name == 'ignore_term':
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
  elif name == 'listen':  # As a TensorFlow server would.
    port = int(config['cluster']['worker'][index].rpartition(':')[2])
    server = socket.create_server(('127.0.0.1', port))
  elif name == 'ready':
    print('ready')
  elif name == 'sleep':
    time.sleep(float(value))
  elif name == 'kill_self':
    os.kill(os.getpid(), signal.SIGKILL)
  elif name == 'exit':
    sys.exit(int(value))
'''


@pytest.fixture(name='fake_worker')
def fixture_fake_worker(tmp_path):
  path = tmp_path / 'fake_worker.py'
  path.write_text(FAKE_WORKER)
  return str(path)


def _command(fake_worker, *worker_args, num_workers=2, flags=()):
  return [sys.executable, '-m', 'trainer.cluster.launch',
          f'--num_workers={num_workers}', f'--program={fake_worker}',
          '--cluster_timeout=0', *flags, '--', *worker_args]


def _run(fake_worker, *worker_args, **kwargs):
  """Runs the launcher to the end; returns (CompletedProcess, seconds)."""
  start = time.monotonic()
  result = subprocess.run(_command(fake_worker, *worker_args, **kwargs),
                          cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
  return result, time.monotonic() - start


def _configs(stdout: str) -> dict:
  """{task index: TF_CONFIG} from the workers' prefixed output."""
  configs = {}
  for line in stdout.splitlines():
    prefix, _, rest = line.partition('] TF_CONFIG ')
    if rest:
      config = json.loads(rest)
      assert prefix == f'[worker {config["task"]["index"]}'
      configs[config['task']['index']] = config
  return configs


@pytest.mark.parametrize('num_workers', [2, 3])
def test_workers_share_a_cluster_of_free_local_ports(fake_worker, num_workers):
  out, err = io.StringIO(), io.StringIO()
  status = launch.launch(num_workers, [], program=fake_worker, stdout=out,
                         stderr=err)
  assert status == 0
  configs = _configs(out.getvalue())
  assert sorted(configs) == list(range(num_workers))
  cluster = configs[0]['cluster']
  assert all(c['cluster'] == cluster for c in configs.values())
  assert list(cluster) == ['worker']
  hosts, ports = zip(*(a.split(':') for a in cluster['worker']))
  assert set(hosts) == {'127.0.0.1'}
  assert len(set(ports)) == num_workers
  assert all(c['task'] == {'type': 'worker', 'index': i}
             for i, c in configs.items())
  assert err.getvalue().splitlines()[-1] == (
      f'launch: all {num_workers} workers exited 0')


def test_output_lines_are_prefixed_per_worker(fake_worker):
  result, _ = _run(fake_worker)
  assert result.returncode == 0, result.stderr
  assert all(l.startswith(('[worker 0] ', '[worker 1] '))
             for l in result.stdout.splitlines())
  lines = result.stderr.splitlines()
  assert sorted(lines[:-1]) == ['[worker 0] stderr of 0',
                                '[worker 1] stderr of 1']
  assert lines[-1] == 'launch: all 2 workers exited 0'


def test_failed_worker_stops_the_others_and_sets_the_status(fake_worker):
  result, seconds = _run(fake_worker, '0=sleep:60', '1=exit:3')
  assert result.returncode == 3
  assert seconds < 10
  assert result.stderr.splitlines()[-1] == (
      'launch: worker 1 exited with status 3; stopped worker(s) 0; exiting '
      'with status 3')


def test_only_workers_still_running_are_stopped_and_named(fake_worker):
  job = launch._Job(io.StringIO(), io.StringIO(), 5,  # pylint: disable=protected-access
                    launch.cluster_tasks(2))
  job.start(fake_worker, ['0=exit:42', '1=sleep:60'], launch.free_ports(2))
  procs = job._procs  # pylint: disable=protected-access
  assert procs[0].wait(timeout=20) == 42
  # Worker 0 exited by itself after the launcher's last look: not "stopped".
  assert job.stop() == [1]
  assert procs[1].returncode == -signal.SIGTERM


def test_worker_ignoring_sigterm_is_killed_after_the_grace_period(
    fake_worker):
  result, seconds = _run(fake_worker, '0=ignore_term,sleep:60', '1=exit:3',
                         flags=['--grace_period=1'])
  assert result.returncode == 3
  assert 1 <= seconds < 10


def test_preempted_worker_status_42_propagates(fake_worker):
  result, _ = _run(fake_worker, '0=sleep:60', '1=exit:42', num_workers=3)
  assert result.returncode == 42
  assert 'worker 1 exited with status 42' in result.stderr


def test_worker_killed_by_a_signal_exits_128_plus_it(fake_worker):
  result, _ = _run(fake_worker, '0=sleep:60', '1=kill_self')
  assert result.returncode == 128 + signal.SIGKILL
  assert 'worker 1 was killed by signal 9' in result.stderr


def test_sigterm_to_the_launcher_reaches_every_worker(fake_worker, tmp_path):
  proc = subprocess.Popen(
      _command(fake_worker, f'all=record_term:{tmp_path},ready,sleep:60'),
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_until_ready(proc, 2)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 42, proc.stderr.read()
    assert time.monotonic() - start < 10
  finally:
    proc.kill()
  assert sorted(os.listdir(tmp_path)) == [
      'fake_worker.py', 'sigterm-0', 'sigterm-1']
  assert proc.stderr.read().splitlines()[-1] == (
      'launch: got SIGTERM, forwarded to the workers; worker 0 exited with '
      'status 42; exiting with status 42')


def test_second_sigterm_kills_workers_that_ignore_the_first(fake_worker):
  proc = subprocess.Popen(
      _command(fake_worker, 'all=ignore_term,ready,sleep:60'), cwd=REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_until_ready(proc, 2)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None  # The workers ignore it; the launcher waits.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGKILL
  finally:
    proc.kill()
  # Both die by the launcher's SIGKILL; whichever it reaps first is named.
  assert re.match(
      'launch: got SIGTERM, forwarded to the workers; got SIGTERM again, '
      'killed the workers; worker [01] was killed by signal 9',
      proc.stderr.read().splitlines()[-1])


def _sigterm_to_launcher(command):
  """Starts `command`, SIGTERMs it once every worker is ready; returns
  (exit status, seconds from SIGTERM to exit, last line on stderr)."""
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    _wait_until_ready(proc, 2)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(timeout=20)
    seconds = time.monotonic() - start
  finally:
    proc.kill()
  return status, seconds, proc.stderr.read().splitlines()[-1]


def test_after_sigterm_a_worker_blocked_on_an_exited_one_is_killed(
    fake_worker, tmp_path):
  """Worker 1 exits 42 on SIGTERM (preempted before its training loop);
  worker 0 ignores it, as one waiting in an all-reduce for worker 1 does."""
  status, seconds, last_line = _sigterm_to_launcher(_command(
      fake_worker, '0=ignore_term,ready,sleep:60',
      f'1=record_term:{tmp_path},ready,sleep:60', flags=['--grace_period=1']))
  assert status == 42, last_line
  assert 1 <= seconds < 10
  assert (tmp_path / 'sigterm-1').exists()
  assert last_line == (
      'launch: got SIGTERM, forwarded to the workers; worker 1 exited with '
      'status 42; killed worker(s) 0, still running 1s (--grace_period) '
      'after another exited; exiting with status 42')


def test_after_sigterm_a_worker_slower_to_save_is_waited_for(fake_worker,
                                                             tmp_path):
  """Worker 0 exits 2 s after worker 1 (the chief's checkpoint write takes
  longer): within the grace period, so it finishes."""
  status, seconds, last_line = _sigterm_to_launcher(_command(
      fake_worker, '0=slow_term:2,ready,sleep:60',
      f'1=record_term:{tmp_path},ready,sleep:60', flags=['--grace_period=8']))
  assert status == 42, last_line
  assert 2 <= seconds < 8
  assert last_line == (
      'launch: got SIGTERM, forwarded to the workers; worker 1 exited with '
      'status 42; exiting with status 42')


def test_worker_not_listening_within_cluster_timeout_fails(fake_worker):
  result, seconds = _run(fake_worker, '0=listen,sleep:60', '1=sleep:60',
                         flags=['--cluster_timeout=1'])
  assert result.returncode == 1
  assert seconds < 10
  assert 'launch: worker(s) 1 did not listen on their TF_CONFIG ports' in (
      result.stderr)
  assert 'within 1s (--cluster_timeout)' in result.stderr


def test_workers_listening_within_cluster_timeout_run_on(fake_worker):
  result, _ = _run(fake_worker, 'all=listen,sleep:1.5',
                   flags=['--cluster_timeout=1'])
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('args, expected', [
    (['--model_dir=/tmp/x'], 'the arguments after -- need '
     '--strategy=multi_worker_mirrored; without it the workers train '
     'independent models into one --model_dir'),
    (['--strategy', 'multi_worker_mirrored'], 'the arguments after -- need '
     '--model_dir=DIR: each worker would otherwise pick its own timestamped '
     'default'),
])
def test_main_py_workers_need_multi_worker_strategy_and_model_dir(
    args, expected):
  result = subprocess.run(
      [sys.executable, '-m', 'trainer.cluster.launch', '--num_workers=2', '--',
       '--config=configs/digits_mlp.py:smoke', *args],
      cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 2
  assert result.stderr.strip() == f'error: {expected}'


def test_main_py_flags_before_the_separator_are_explained():
  result = subprocess.run(
      [sys.executable, '-m', 'trainer.cluster.launch', '--num_workers=2',
       '--model_dir=/tmp/x'],
      cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 2
  assert result.stderr.startswith(
      "error: Unknown command line flag 'model_dir'; the workers' flags go "
      'after --')


def test_launcher_does_not_import_tensorflow():
  code = 'import sys, trainer.cluster.launch; print("tensorflow" in sys.modules)'
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          check=True)
  assert result.stdout.strip() == 'False'


def _wait_until_ready(proc, num_workers, timeout=20):
  """Reads the launcher's stdout until every worker printed 'ready'."""
  lines = queue.Queue()

  def read():  # In a thread, so that waiting for a line can time out.
    for line in proc.stdout:
      lines.put(line.rstrip('\n'))

  threading.Thread(target=read, daemon=True).start()
  ready = 0
  while ready < num_workers:
    ready += lines.get(timeout=timeout).endswith('] ready')


def test_the_launcher_binds_its_workers_to_loopback_only():
  ports = launch.free_ports(3)
  for raw in launch.cluster_configs(ports):
    config = json.loads(raw)
    hosts = {a.rpartition(':')[0] for a in config['cluster']['worker']}
    assert hosts == {'127.0.0.1'}

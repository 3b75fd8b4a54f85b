"""No hangs with plain TF_CONFIG: a worker that never starts, or dies mid-run.

Real main.py processes on loopback, started by hand as Kubernetes or Slurm
would (no launcher, which would stop the others itself), a real SIGKILL, and
measured times. The bounds are the issue's: --cluster_timeout plus a
generous start-up margin for a worker that never joins, 60 s for a worker
that dies.
"""

import os
import signal
import subprocess
import time

import pytest
import tensorflow as tf

from tests import runner
from trainer.cluster import launch
from trainer.cluster import failures
from trainer.cluster import strategies
from trainer.cluster import tf_config
from trainer.errors import UserError

MWMS = '--strategy=multi_worker_mirrored'
# Long enough that nothing finishes before the kill; a checkpoint (the sign
# that training runs) after every inner loop of 100 steps.
LONG_RUN = ('--config=configs/digits_mlp.py:smoke',
            '--config.train.steps=100000', '--config.train.steps_per_loop=100',
            MWMS)
# Python, TensorFlow and the strategy start in ~5 s here; a loaded CI machine
# may take several times that.
STARTUP_MARGIN = 60


@pytest.fixture(name='start_worker')
def fixture_start_worker(tmp_path):
  """start_worker(TF_CONFIG, LOG_PREFIX, *ARGS) starts main.py as one worker
  (stdout/stderr to LOG_PREFIX.out/.err, temporary files in tmp_path/tmp);
  whatever still runs at the end of the test is killed."""
  started = []
  (tmp_path / 'tmp').mkdir()

  def start(tf_config_json, log_prefix, *args):
    env = dict(os.environ, TF_CONFIG=tf_config_json, TF_CPP_MIN_LOG_LEVEL='2',
               TMPDIR=str(tmp_path / 'tmp'))
    with open(f'{log_prefix}.out', 'w') as out, \
         open(f'{log_prefix}.err', 'w') as err:
      started.append(subprocess.Popen(runner.main_command(*args),
                                      cwd=runner.REPO, env=env, stdout=out,
                                      stderr=err))
    return started[-1]

  yield start
  for process in started:
    if process.poll() is None:
      process.kill()
    process.wait()


def read(path) -> str:
  with open(path) as f:
    return f.read()


def one_error_line(stderr: str) -> str:
  lines = runner.error_lines(stderr)
  assert len(lines) == 1, stderr[-4000:]
  assert 'Traceback' not in stderr, stderr[-4000:]
  return lines[0]


def test_worker_that_never_starts_fails_the_others_within_cluster_timeout(
    tmp_path, start_worker):
  # Two clusters at once, to keep the test short: in one only worker 0 (the
  # coordination service leader) starts, in the other only worker 1.
  started = {}
  for alone in (0, 1):
    ports = launch.free_ports(2)
    config = launch.cluster_configs(ports)[alone]
    started[alone] = (ports, start_worker(
        config, tmp_path / f'alone{alone}', *LONG_RUN, '--cluster_timeout=10',
        f'--model_dir={tmp_path / f"run{alone}"}'), time.monotonic())
  for alone, (ports, worker, start) in started.items():
    worker.wait(timeout=10 + 5 + STARTUP_MARGIN + 60)
    elapsed = time.monotonic() - start
    stderr = read(tmp_path / f'alone{alone}.err')
    missing = 1 - alone
    print(f'worker {alone} alone: exit {worker.returncode} {elapsed:.1f}s '
          'after it started')
    assert worker.returncode == failures.ClusterError.EXIT_CODE, (
        stderr[-4000:])
    # The leader times out after exactly --cluster_timeout; the other worker
    # ~5 s later (its registration RPC's own deadline).
    assert 10 <= elapsed < 10 + 5 + STARTUP_MARGIN, elapsed
    line = one_error_line(stderr)
    assert line == (
        f'error: worker:{missing} (127.0.0.1:{ports[missing]}) did not join '
        'the cluster within --cluster_timeout=10s; start every task of '
        "TF_CONFIG's cluster, check that this host can reach its address, or "
        'raise --cluster_timeout'), line
    assert not (tmp_path / f'run{alone}').exists()  # Nothing was written.


@pytest.mark.parametrize('victim', [1, 0], ids=['kill_worker1',
                                                 'kill_worker0_the_leader'])
def test_worker_killed_mid_run_stops_the_other_within_60s(tmp_path, victim,
                                                          start_worker):
  """The survivor's next collective fails on the broken connection (~1 s
  here), or the coordination service leader (worker 0) misses the dead
  worker's heartbeats (~10 s) and aborts every collective."""
  ports = launch.free_ports(2)
  model_dir = tmp_path / 'run'
  workers = [start_worker(config, tmp_path / f'w{i}', *LONG_RUN,
                          f'--model_dir={model_dir}')
             for i, config in enumerate(launch.cluster_configs(ports))]
  survivor = 1 - victim
  deadline = time.monotonic() + 240
  while not list(model_dir.glob('ckpt-[1-9]*.index')):
    assert time.monotonic() < deadline, read(tmp_path / 'w0.err')[-4000:]
    assert all(w.poll() is None for w in workers), (
        read(tmp_path / 'w0.err')[-4000:], read(tmp_path / 'w1.err')[-4000:])
    time.sleep(0.2)
  time.sleep(1)  # Both are in the middle of an inner loop.
  workers[victim].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  workers[survivor].wait(timeout=120)
  elapsed = time.monotonic() - killed
  stderr = read(tmp_path / f'w{survivor}.err')
  print(f'worker {victim} killed: worker {survivor} exit '
        f'{workers[survivor].returncode} {elapsed:.1f}s later')
  assert workers[survivor].returncode == failures.ClusterError.EXIT_CODE, (
      stderr[-4000:])
  assert elapsed < 60, elapsed
  line = one_error_line(stderr)
  assert line.startswith(
      f'error: worker:{victim} (127.0.0.1:{ports[victim]}) stopped during the '
      'run ('), line
  assert line.endswith(
      f'); worker:{survivor} cannot go on without it: restart every worker, '
      'training resumes from the newest checkpoint in --model_dir'), line
  if survivor == 1:  # It removed its private directory on the way out.
    assert not list((tmp_path / 'tmp').glob('distloop-worker*'))


def test_cluster_timeout_must_be_positive(monkeypatch):
  monkeypatch.setenv('TF_CONFIG', launch.cluster_configs([2222, 2223])[0])
  with pytest.raises(UserError,
                     match=r'flag --cluster_timeout=0 must be > 0'):
    strategies.build_strategy('multi_worker_mirrored', cluster_timeout=0)


# TensorFlow 2.21's messages, as measured in the runs above.
HEARTBEATS = (
    'Graph execution error:\n\nDetected at node while/CollectiveReduceV2 '
    'defined at (most recent call last):\n  File "main.py", line 100, in '
    '<module>\n\nCollective ops is aborted by: Error reported from '
    '/job:worker/task:1: The following tasks are unhealthy (stopped sending '
    'heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed. '
    'Check the task logs for an earlier error, or scheduler events (e.g. '
    'preemption, eviction) to debug further.\nThe error could be from a '
    'previous operation. Restart your program to reset.\n\t [[{{node '
    'while/CollectiveReduceV2}}]] [Op:__inference_traced_1136]')
CONNECTION_RESET = (
    'Graph execution error:\n\nCollective ops is aborted by: recvmsg:'
    'Connection reset by peer\nAdditional GRPC error information from remote '
    'target /job:worker/replica:0/task:0 while calling '
    '/tensorflow.WorkerService/CompleteInstance:\n:UNKNOWN:Error received '
    'from peer  {grpc_status:14, grpc_message:"recvmsg:Connection reset by '
    'peer"}\nThe error could be from a previous operation.')
REGISTER_BARRIER = (
    'Barrier timed out. Id: [Init]Wait_for_all_tasks_to_register::0. This '
    'usually happens because a task triggered the barrier too early or too '
    'slowly.\n# of tasks that reached the barrier: 2/3.\nThe first task at '
    'the barrier: /job:worker/replica:0/task:0. Some timed out task names:\n'
    '/job:worker/replica:0/task:2\n\nAdditional GRPC error information from '
    'remote target /job:worker/replica:0/task:0 while calling '
    '/tensorflow.CoordinationService/RegisterTask:\n:UNKNOWN:Error received')


def cluster(index, num_workers=3):
  return tf_config.parse(launch.cluster_configs(
      range(2222, 2222 + num_workers))[index])


@pytest.mark.parametrize('message, me, expected', [
    (HEARTBEATS, 0, ['worker:1']),
    (CONNECTION_RESET, 1, ['worker:0']),
    # Worker 1 is told by the leader (worker 0, the remote target) which task
    # is missing: the list wins over the remote target.
    (REGISTER_BARRIER, 1, ['worker:2']),
    ('Deadline Exceeded\nAdditional GRPC error information from remote '
     'target /job:worker/replica:0/task:0 while calling '
     '/tensorflow.CoordinationService/RegisterTask:', 1, ['worker:0']),
    ('no task named here', 1, []),
])
def test_failed_tasks_are_read_from_tensorflow_messages(message, me,
                                                        expected):
  # pylint: disable=protected-access
  assert failures._failed_tasks(message, cluster(me)) == expected


def test_cluster_error_names_the_peer_only_for_peer_failures(monkeypatch):
  monkeypatch.setattr(failures, '_cluster', None)
  unavailable = tf.errors.UnavailableError(None, None, HEARTBEATS)
  assert failures.cluster_error(unavailable) is None  # Not multi-worker.
  monkeypatch.setattr(failures, '_cluster', cluster(0))
  error = failures.cluster_error(unavailable)
  assert str(error).startswith(
      'worker:1 (127.0.0.1:2223) stopped during the run (UnavailableError: '
      'stopped sending heartbeats); worker:0 cannot go on without it'), error
  wrapped = RuntimeError('while saving')
  wrapped.__cause__ = unavailable
  assert failures.cluster_error(wrapped) is not None
  # A bug keeps its traceback.
  assert failures.cluster_error(tf.errors.InvalidArgumentError(
      None, None, 'Incompatible shapes: [32,10] vs. [32]')) is None
  assert failures.cluster_error(ValueError('bad value')) is None

"""--strategy=parameter_server on loopback: a chief, two workers and a ps
task as real processes through the launcher (TF_CONFIG of their own).

Asynchronous training has no bitwise reference, so the tests compare the
accuracy with one process's, and check what is exact: the step count, the
checkpoints, the exit codes, a killed worker tolerated.
"""

import glob
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
from tensorboard.util import tensor_util

from tests import docs
from tests import resume_test
from tests import runner
from tests.trainer.experiment import cli_test
from trainer.cluster import launch

PS = '--strategy=parameter_server'
DIGITS = ('--config=configs/digits_mlp.py:smoke',
          '--config.train.steps_per_loop=50',
          '--config.eval.every_steps=0', '--config.summary.every_steps=100')


def start_cluster(*args, env=None, num_ps=1):
  """The launcher of a chief, 2 workers and `num_ps` ps tasks running
  main.py ARGS."""
  return subprocess.Popen(
      [sys.executable, '-m', 'trainer.cluster.launch', '--num_workers=2',
       f'--num_ps={num_ps}', '--', *args, PS], cwd=runner.REPO,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', **(env or {})),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=300):
  try:
    stdout, stderr = process.communicate(timeout=timeout)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  return process.returncode, stdout, stderr


def tagged(stdout: str, tag: str) -> list[str]:
  """The lines of `tag` (e.g. '[chief] ') without it."""
  return [line[len(tag):] for line in stdout.splitlines()
          if line.startswith(tag)]


def saved_step(model_dir) -> int:
  return int(runner.checkpoint_values(str(model_dir))[
      'step/.ATTRIBUTES/VARIABLE_VALUE'])


def task_pid(launcher_pid: int, task: str, index: int) -> int:
  """The pid of the launcher's child whose TF_CONFIG task is task:index."""
  wanted = {'type': task, 'index': index}
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat') as f:
        ppid = int(f.read().rsplit(')', 1)[1].split()[1])
      if ppid != launcher_pid:
        continue
      with open(f'/proc/{entry}/environ', 'rb') as f:
        environ = dict(item.split(b'=', 1) for item in f.read().split(b'\0')
                       if b'=' in item)
    except OSError:
      continue
    if json.loads(environ.get(b'TF_CONFIG', b'{}')).get('task') == wanted:
      return int(entry)
  raise AssertionError(f'no {task}:{index} task under pid {launcher_pid}')


def wait_for_line(path, text: str, process, timeout=120) -> None:
  deadline = time.monotonic() + timeout
  while True:
    with open(path, encoding='utf-8', errors='replace') as f:
      if text in f.read():
        return
    assert process.poll() is None, f'exited before {text!r}'
    assert time.monotonic() < deadline, f'no {text!r} in {timeout}s'
    time.sleep(0.2)


def finished_600_steps(cluster, single, model_dir):
  """Waits for a cluster's launcher and a one-process run of 600 steps;
  returns (the chief's final eval, the single run's, the launcher's stderr)
  once both exited 0 and the cluster's checkpoint is at step 600."""
  code, stdout, stderr = finish(cluster)
  assert code == 0, stderr[-4000:]
  single_code, single_out, single_err = finish(single)
  assert single_code == 0, single_err[-3000:]
  assert saved_step(model_dir) == 600
  return (runner.final_eval('\n'.join(tagged(stdout, '[chief] '))),
          runner.final_eval(single_out), stderr)


def test_chief_two_workers_and_a_ps_train_like_one_process(tmp_path):
  """docs/cluster.md's launcher command, 600 asynchronous steps: exactly 600
  counted and saved, an accuracy in one process's band; an evaluator task
  with the same TF_CONFIG cluster evaluates the checkpoints by itself and
  exits when training has ended; --strategy=default evaluates them too."""
  (printed,) = docs.commands('docs/cluster.md', 'ps-launch')
  argv = shlex.split(printed.replace('/tmp/ps', str(tmp_path / 'ps')))
  assert argv[:3] == ['python', '-m', 'trainer.cluster.launch']
  args = (*DIGITS[1:], '--config.train.steps=600',
          '--config.checkpoint.every_steps=200')
  cluster = subprocess.Popen(
      [sys.executable, *argv[1:], *args], cwd=runner.REPO,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  single = runner.start_main(*DIGITS[:1], *args,
                             f'--model_dir={tmp_path / "single"}')
  evaluator_config = json.dumps({
      'cluster': {'chief': ['127.0.0.1:1'], 'worker': ['127.0.0.1:2'],
                  'ps': ['127.0.0.1:3']},
      'task': {'type': 'evaluator', 'index': 0}})
  evaluator = subprocess.Popen(
      runner.main_command(*DIGITS[:1], *args, PS,
                          f'--model_dir={tmp_path / "ps"}'),
      cwd=runner.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
                          TF_CONFIG=evaluator_config))
  chief, expected, stderr = finished_600_steps(cluster, single,
                                               tmp_path / 'ps')
  evaluated = runner.start_main(*DIGITS[:1], '--mode=eval',
                                f'--model_dir={tmp_path / "ps"}')
  assert chief['examples'] == expected['examples'] == 360
  assert chief['accuracy'] > 0.9
  assert abs(chief['accuracy'] - expected['accuracy']) < 0.04, (chief,
                                                                 expected)
  lines = stderr.strip().splitlines()
  assert lines[-1] == ('launch: chief exited with status 0; stopped the '
                       'workers and ps tasks')
  # Every task of the cluster started its server.
  assert all(any('serves the chief' in line for line in tagged(stderr, tag))
             for tag in ('[worker 0] ', '[worker 1] ', '[ps 0] '))
  eval_code, eval_out, eval_err = finish(evaluated)
  assert eval_code == 0, eval_err[-3000:]
  assert runner.final_eval(eval_out) == pytest.approx(chief, rel=1e-4)
  eval_code, _, eval_err = finish(evaluator)
  assert eval_code == 0, eval_err[-3000:]
  assert 'evaluator task' in eval_err
  assert glob.glob(str(tmp_path / 'ps' / 'continuous_eval' / 'events.*'))


def test_a_users_own_trainer_outside_models_trains_on_the_cluster(tmp_path):
  """examples/regression.py (dict batches, its own forward, loss and metric,
  imported by path from outside models/) on a chief, 2 workers and a ps:
  600 steps counted and saved, an error far below predicting the mean
  (0.67), as one process's run is; the checkpoint restored without the
  cluster evaluates to the chief's numbers."""
  args = ('--config=examples/regression_config.py', '--config.train.steps=600',
          '--config.eval.every_steps=0')
  cluster = start_cluster(*args, f'--model_dir={tmp_path}/ps')
  single = runner.start_main(*args, f'--model_dir={tmp_path}/single')
  chief, alone, _ = finished_600_steps(cluster, single, tmp_path / 'ps')
  # Measured: 0.14-0.20 on the cluster, 0.29 alone (600 of the example's
  # 1,500 steps; asynchronous updates are not the same trajectory).
  assert chief['examples'] == alone['examples'] == 2048
  assert chief['abs_error'] < 0.33 and alone['abs_error'] < 0.33, (chief,
                                                                   alone)
  evaluated = runner.run_main('--config=examples/regression_config.py',
                              '--mode=eval', f'--model_dir={tmp_path}/ps')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert runner.final_eval(evaluated.stdout) == pytest.approx(chief, rel=1e-4)


# Builds the LM's layers under a ParameterServerStrategy over 2 in-process
# ps tasks and a worker (127.0.0.1) and prints where each variable lives.
PLACEMENT = """
import json, sys
import tensorflow as tf
from models import transformer
from tests import runner

strategy = tf.distribute.experimental.ParameterServerStrategy(
    runner.loopback_cluster(num_ps=2))
with strategy.scope():
  model = transformer.build_transformer_lm(
      vocab_size=256, seq_len=32, width=32, depth=1, num_heads=2,
      embedding_shard_bytes=int(sys.argv[1]))
print(json.dumps({v.path: v.value.device for v in model.weights}))
"""


@pytest.mark.parametrize('shard_bytes, pieces', [(0, 1), (16384, 2),
                                                 (8192, 4)])
def test_the_token_table_is_spread_over_the_ps_tasks(shard_bytes, pieces):
  """model.embedding_shard_bytes cuts the LM's 32 KB token table into pieces
  that a parameter-server cluster places on different ps tasks."""
  result = subprocess.run(
      [sys.executable, '-c', PLACEMENT, str(shard_bytes)], cwd=runner.REPO,
      capture_output=True, text=True, timeout=120,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert result.returncode == 0, result.stderr[-3000:]
  devices = json.loads(result.stdout.strip().splitlines()[-1])
  table = {path: device for path, device in devices.items()
           if path.startswith('token_embedding/')}
  assert len(table) == pieces
  tasks = [device.split('/device:')[0] for device in table.values()]
  assert all('/job:ps/' in task for task in tasks), tasks
  # Round-robin: as many ps tasks as there are pieces, up to 2.
  assert len(set(tasks)) == min(pieces, 2), tasks


def test_a_sharded_token_table_trains_on_two_ps_tasks_and_restores_alone(
    tmp_path):
  """The smoke LM with its table in 2 pieces on a chief, 2 workers and 2
  ps: runs its 6 steps, saves at the last one, and the checkpoint evaluates
  without the cluster to the chief's numbers."""
  args = ('--config=configs/lm_transformer.py:smoke',
          '--config.model.embedding_shard_bytes=16384')
  code, stdout, stderr = finish(start_cluster(
      *args, f'--model_dir={tmp_path}', num_ps=2))
  assert code == 0, stderr[-4000:]
  assert saved_step(tmp_path) == 6
  # The table is saved as its 2 pieces of 128 rows (the variables keyed as
  # the optimizer's, in creation order: the table's pieces first).
  saved = runner.checkpoint_values(str(tmp_path))
  shapes = [saved[f'optimizer/_trainable_variables/{i}/.ATTRIBUTES/'
                  'VARIABLE_VALUE'].shape for i in range(3)]
  assert shapes == [(128, 32), (128, 32), (32, 32)], shapes
  chief = runner.final_eval('\n'.join(tagged(stdout, '[chief] ')))
  evaluated = runner.run_main(*args, '--mode=eval', f'--model_dir={tmp_path}')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert runner.final_eval(evaluated.stdout) == pytest.approx(chief, rel=1e-4)


def test_variables_in_pieces_train_resume_and_evaluate_whole(tmp_path):
  """train.variable_shard_bytes=4096 on a chief, 2 workers and 2 ps: the
  digits MLP's two 16 KB kernels train as 4 pieces each; the checkpoint
  holds them whole and once (with slots per piece), evaluates without the
  cluster to the chief's numbers, and resumes on the cluster with the same
  pieces; resuming it held whole is refused in one line, nothing touched."""
  run = tmp_path / 'run'
  args = (*DIGITS, '--config.train.variable_shard_bytes=4096',
          '--config.checkpoint.every_steps=200',
          '--config.summary.histograms_every_steps=200', f'--model_dir={run}')
  code, stdout, stderr = finish(start_cluster(
      *args, '--config.train.steps=400', num_ps=2))
  assert code == 0, stderr[-4000:]
  assert saved_step(run) == 400
  with open(run / 'run.json') as f:
    assert json.load(f)['pieces'] == {'mlp/dense_0/kernel': [16] * 4,
                                      'mlp/dense_1/kernel': [16] * 4}
  saved = runner.checkpoint_values(str(run))
  kernels = sorted(value.shape for key, value in saved.items()
                   if key.startswith('model/') and '_kernel' in key)
  assert kernels == [(64, 10), (64, 64), (64, 64)], kernels
  assert not [key for key in saved if '_trainable_variables' in key]
  slots = [value.shape for key, value in saved.items()
           if key.startswith('optimizer/_variables/')]
  assert slots.count((16, 64)) == 16  # Adam's 2 per piece.
  chief = runner.final_eval('\n'.join(tagged(stdout, '[chief] ')))
  assert chief['accuracy'] > 0.9, chief
  # The weight histograms read each kernel whole.
  histograms = runner.summary_values(str(run / 'train'))
  (kernel,) = [v for step, v in histograms['weights/mlp/dense_0/kernel']
               if step == 400]
  assert kernel.metadata.plugin_data.plugin_name == 'histograms'
  assert tensor_util.make_ndarray(kernel.tensor)[:, 2].sum() == 4096
  evaluated = runner.run_main(DIGITS[0], '--mode=eval', f'--model_dir={run}')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert runner.final_eval(evaluated.stdout) == pytest.approx(chief, rel=1e-4)

  before = resume_test.snapshot(run)
  whole = runner.run_main(*args, '--config.train.steps=600')
  assert whole.returncode == 2, whole.stderr[-3000:]
  assert runner.error_lines(whole.stderr) == [
      f'error: cannot resume --model_dir={run}: variable '
      "'mlp/dense_0/kernel' was 4 pieces (train.variable_shard_bytes=4096 "
      'with --strategy=parameter_server) and is now whole (train.variable_'
      'shard_bytes=4096 with --strategy=default), and the optimizer keeps its '
      'slots per piece; resume as it was, or start a new --model_dir '
      '(--mode=eval and export read it either way)']
  assert resume_test.snapshot(run) == before

  code, stdout, stderr = finish(start_cluster(
      *args, '--config.train.steps=600', num_ps=2))
  assert code == 0, stderr[-4000:]
  assert any(line.endswith(f'restored {run}/ckpt-400 (step 400, data '
                           'position 400)')
             for line in tagged(stderr, '[chief] ')), stderr[-3000:]
  assert saved_step(run) == 600
  assert runner.final_eval('\n'.join(tagged(stdout, '[chief] ')))[
      'accuracy'] > 0.9


def test_a_second_optimizer_on_pieces_trains_and_saves_them_once(tmp_path):
  """TwoOptimizerTrainer (tests/user_trainers.py) updates its output layer
  with a second optimizer of its own: with both layers in pieces it trains
  on the cluster, the checkpoint holds each kernel once, whole, and the
  second optimizer's slots per piece, and evaluates alone to the chief's
  numbers."""
  args = ('--config=tests/user_config.py:two_optimizers',
          '--config.train.variable_shard_bytes=128')
  code, stdout, stderr = finish(start_cluster(
      *args, f'--model_dir={tmp_path}', num_ps=2))
  assert code == 0, stderr[-4000:]
  assert any(line.endswith('in pieces over the ps tasks (train.variable_'
                           'shard_bytes=128): sequence_model/hidden/kernel '
                           '(4), sequence_model/logits/kernel (2)')
             for line in tagged(stderr, '[chief] ')), stderr[-3000:]
  saved = runner.checkpoint_values(str(tmp_path))
  assert not [key for key in saved if '_trainable_variables' in key]
  kernels = sorted(value.shape for key, value in saved.items()
                   if key.startswith('model/') and key.endswith(
                       'kernel/.ATTRIBUTES/VARIABLE_VALUE'))
  assert kernels == [(8, 16), (16, 4)], kernels
  second = [value.shape for key, value in saved.items()
            if key.startswith('second_optimizer/_variables/')]
  assert second.count((8, 4)) == 4, second  # Adam's 2 slots per piece.
  chief = runner.final_eval('\n'.join(tagged(stdout, '[chief] ')))
  evaluated = runner.run_main(args[0], '--mode=eval', f'--model_dir={tmp_path}')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert runner.final_eval(evaluated.stdout) == pytest.approx(chief, rel=1e-4)


def test_a_tutorial_step_on_pieces_is_one_line_with_the_fix(tmp_path):
  """A train_step taking gradients of self.model.trainable_variables (the
  tutorial pattern) cannot differentiate a weight held in pieces: the chief
  refuses it while tracing, naming self.trainable_variables, before it
  writes anything."""
  cluster = start_cluster('--config=tests/user_config.py:model_variables',
                          '--config.train.variable_shard_bytes=64',
                          f'--model_dir={tmp_path}/run')
  code, _, stderr = finish(cluster)
  assert code == 2, stderr[-3000:]
  (line,) = [l for l in stderr.splitlines() if l.startswith('[chief] error:')]
  assert line.startswith('[chief] error: ModelVariablesTutorial.train_step '
                         'raised '
                         'AttributeError while the train step was traced: ')
  assert line.endswith('; a weight is held in pieces (train.variable_shard_'
                       'bytes): take gradients of and apply them to self.'
                       'trainable_variables, not self.model.trainable_'
                       'variables')
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.parametrize('restarted', [False, True],
                         ids=['not_restarted', 'restarted'])
def test_a_worker_killed_mid_run_is_tolerated(tmp_path, restarted):
  """kill -9 of worker 1 while the chief trains: its work goes to worker 0
  (and to worker 1 again once it is started again with the same command),
  and the run ends at exactly train.steps. For the restart the chief is
  paused (SIGSTOP) from the kill until the new worker serves, so that the
  run cannot end first however slowly TensorFlow imports."""
  steps = 800
  log = tmp_path / 'launch.log'
  with open(log, 'w') as out:
    cluster = subprocess.Popen(
        [sys.executable, '-m', 'trainer.cluster.launch', '--num_workers=2',
         '--num_ps=1', '--', *DIGITS, PS, f'--config.train.steps={steps}',
         '--config.checkpoint.every_steps=400',
         f'--model_dir={tmp_path / "run"}'],
        cwd=runner.REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'),
        stdout=subprocess.DEVNULL, stderr=out)
  replacement = chief = None
  try:
    wait_for_line(log, f'] training from step 0 to step {steps}', cluster)
    time.sleep(2)
    pid = task_pid(cluster.pid, 'worker', 1)
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      command = [a.decode() for a in f.read().split(b'\0') if a]
    with open(f'/proc/{pid}/environ', 'rb') as f:
      environ = dict(item.decode().split('=', 1)
                     for item in f.read().split(b'\0') if b'=' in item)
    assert cluster.poll() is None  # Mid-run: the chief is still training.
    chief = task_pid(cluster.pid, 'chief', 0)
    if restarted:
      os.kill(chief, signal.SIGSTOP)
    os.kill(pid, signal.SIGKILL)
    if restarted:
      time.sleep(1)
      replacement_log = tmp_path / 'replacement.log'
      with open(replacement_log, 'w') as out:
        replacement = subprocess.Popen(command, env=environ, cwd=runner.REPO,
                                       stdout=subprocess.DEVNULL, stderr=out)
      wait_for_line(replacement_log, 'worker:1 serves the chief', replacement)
      assert cluster.poll() is None
      os.kill(chief, signal.SIGCONT)
    assert cluster.wait(timeout=240) == 0, log.read_text()[-4000:]
  finally:
    if chief and restarted:
      try:
        os.kill(chief, signal.SIGCONT)  # Never left paused.
      except ProcessLookupError:
        pass
    if cluster.poll() is None:
      cluster.kill()
    if replacement:
      replacement.terminate()  # Not the launcher's child: stopped here.
      replacement.wait(timeout=60)
  stderr = log.read_text()
  assert saved_step(tmp_path / 'run') == steps
  assert stderr.strip().splitlines()[-1] == (
      'launch: chief exited with status 0 (worker 1 had exited before it, '
      'status != 0); stopped the workers and ps tasks')
  assert f'step {steps}/{steps}' in stderr
  if restarted:
    assert replacement.returncode == 42


def test_sigterm_saves_exits_42_and_the_restart_counts_every_step_once(
    tmp_path):
  """SIGTERM to the launcher reaches the chief, which saves the step it
  stopped at and exits 42 (the workers and ps tasks are stopped after it);
  the restarted cluster resumes there and ends at exactly train.steps."""
  args = (*DIGITS, '--config.train.steps=600', '--config.checkpoint.every_steps=0',
          f'--model_dir={tmp_path / "run"}')
  log = tmp_path / 'launch.log'
  with open(log, 'w') as out:
    cluster = subprocess.Popen(
        [sys.executable, '-m', 'trainer.cluster.launch', '--num_workers=2',
         '--num_ps=1', '--', *args, PS],
        cwd=runner.REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'),
        stdout=subprocess.DEVNULL, stderr=out)
  try:
    wait_for_line(log, '] training from step 0 to step 600', cluster)
    time.sleep(1)
    cluster.send_signal(signal.SIGTERM)
    assert cluster.wait(timeout=120) == 42, log.read_text()[-4000:]
  finally:
    if cluster.poll() is None:
      cluster.kill()
  stderr = log.read_text()
  (saved,) = glob.glob(str(tmp_path / 'run' / 'ckpt-*.index'))
  step = int(saved.rsplit('-', 1)[1].split('.')[0])
  assert 0 < step < 600, stderr[-3000:]
  assert (f'preempted by SIGTERM during training: saved '
          f'{tmp_path / "run"}/ckpt-{step} at step {step}') in stderr
  assert 'launch: got SIGTERM, forwarded to the chief; chief exited with ' \
         'status 42' in stderr
  code, _, stderr = finish(start_cluster(*args))
  assert code == 0, stderr[-4000:]
  assert f'training from step {step} to step 600' in stderr
  assert saved_step(tmp_path / 'run') == 600


def test_a_lost_ps_task_ends_the_run_with_75_in_one_line(tmp_path):
  log = tmp_path / 'launch.log'
  with open(log, 'w') as out:
    cluster = subprocess.Popen(
        [sys.executable, '-m', 'trainer.cluster.launch', '--num_workers=2',
         '--num_ps=1', '--', *DIGITS, PS, '--config.train.steps=3000',
         f'--model_dir={tmp_path / "run"}'],
        cwd=runner.REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'),
        stdout=subprocess.DEVNULL, stderr=out)
  try:
    wait_for_line(log, '] training from step 0 to step 3000', cluster)
    os.kill(task_pid(cluster.pid, 'ps', 0), signal.SIGKILL)
    assert cluster.wait(timeout=180) == 75, log.read_text()[-4000:]
  finally:
    if cluster.poll() is None:
      cluster.kill()
  errors = [line for line in log.read_text().splitlines()
            if line.startswith('[chief] error: ')]
  assert len(errors) == 1, errors
  assert errors[0].startswith('[chief] error: ps:0 (127.0.0.1:')
  assert 'stopped during the run' in errors[0]


def test_a_nan_loss_exits_3_and_per_replica_metrics_are_refused(tmp_path):
  """A non-finite step is not applied and ends the run (3); a Trainer with
  streaming metrics (kept per replica) is refused in one line (2) before
  anything is written."""
  nan = start_cluster(*DIGITS, '--config.train.steps=300',
                      '--config.optimizer.learning_rate=1e12',
                      f'--model_dir={tmp_path}/nan')
  extras = start_cluster('--config=examples/extras_config.py:smoke',
                         f'--model_dir={tmp_path}/extras')
  code, _, stderr = finish(nan)
  assert code == 3, stderr[-3000:]
  (line,) = [l for l in stderr.splitlines() if l.startswith('[chief] error:')]
  assert re.search(r'non-finite (loss|gradient norm \(the loss was finite\)) '
                   r'at step', line), line
  assert 'no checkpoint was written after it' in line
  code, _, stderr = finish(extras)
  assert code == 2, stderr[-3000:]
  (line,) = [l for l in stderr.splitlines() if l.startswith('[chief] error:')]
  assert line.endswith('.build_streaming_metrics is not supported with '
                       '--strategy=parameter_server: streaming metrics are '
                       'kept per replica, not on the ps tasks; return them '
                       'only without --strategy=parameter_server')
  assert not os.path.exists(tmp_path / 'extras')


@pytest.mark.parametrize('args, message', [
    (('--mode=eval',), 'flag --mode=eval with --strategy=parameter_server: '
     'the cluster only trains'),
    (('--deterministic',), 'flag --deterministic with --strategy=parameter_'
     'server: workers apply their updates asynchronously'),
    (('--config.train.ema_decay=0.99',), 'config key train.ema_decay=0.99 is '
     'not supported with --strategy=parameter_server: the average would be '
     'updated by every worker at once; set train.ema_decay=0'),
    (('--config.train.grad_accum_steps=2',), 'config key '
     'train.grad_accum_steps=2 is not supported with --strategy=parameter_'
     'server'),
    (('--config.train.precision=mixed_float16',), "config key train."
     "precision='mixed_float16' is not supported"),
    (('--config.data.service=grpc://127.0.0.1:1',), "config key data.service="
     "'grpc://127.0.0.1:1' is not supported"),
    (('--config.optimizer.name=lamb', '--config.train.variable_shard_bytes=64'),
     "config key optimizer.name='lamb' with train.variable_shard_bytes=64 is "
     "not supported with --strategy=parameter_server: LAMB's trust ratio is a "
     'norm per variable, and would be taken per piece; use adam, adamw or sgd, '
     'or set train.variable_shard_bytes=0'),
], ids=['mode', 'deterministic', 'ema', 'grad_accum', 'mixed_float16',
        'service', 'lamb_in_pieces'])
@pytest.mark.parametrize('task', [0, 3], ids=['chief', 'ps'])
def test_what_the_cluster_cannot_do_is_refused_before_tensorflow(
    tmp_path, args, message, task):
  """On every task, before TensorFlow is imported: nothing is written."""
  env = dict(os.environ, TF_CONFIG=launch.cluster_configs([1, 2, 3, 4], 1)[task])
  result = subprocess.run(
      [sys.executable, '-c', cli_test.PROBE, PS, *args,
       f'--model_dir={tmp_path / "run"}'], env=env, capture_output=True,
      text=True, cwd=runner.REPO, timeout=60, check=False)
  assert result.stdout.strip() == 'exit 2 False', result.stderr[-2000:]
  (line,) = runner.error_lines(result.stderr)
  assert message in line
  assert not os.path.exists(tmp_path / 'run')


def test_the_launcher_lays_out_a_chief_workers_and_ps_tasks():
  configs = [json.loads(c) for c in launch.cluster_configs([5, 6, 7, 8], 1)]
  assert configs[0]['cluster'] == {'chief': ['127.0.0.1:5'],
                                   'worker': ['127.0.0.1:6', '127.0.0.1:7'],
                                   'ps': ['127.0.0.1:8']}
  assert [c['task'] for c in configs] == [
      {'type': 'chief', 'index': 0}, {'type': 'worker', 'index': 0},
      {'type': 'worker', 'index': 1}, {'type': 'ps', 'index': 0}]
  for args, message in (
      (('--strategy=multi_worker_mirrored', '--model_dir=x'),
       'flag --num_ps=1 needs --strategy=parameter_server'),
  ):
    result = subprocess.run(
        [sys.executable, '-m', 'trainer.cluster.launch', '--num_ps=1', '--',
         *args], capture_output=True, text=True, cwd=runner.REPO, timeout=60,
        check=False)
    assert result.returncode == 2
    assert message in result.stderr
  result = subprocess.run(
      [sys.executable, '-m', 'trainer.cluster.launch', '--', PS,
       '--model_dir=x'], capture_output=True, text=True, cwd=runner.REPO,
      timeout=60, check=False)
  assert result.returncode == 2
  assert 'needs --num_ps=M' in result.stderr


def test_a_chief_whose_tasks_never_serve_exits_75_naming_them(tmp_path):
  """TensorFlow would wait for them forever, deaf to SIGTERM."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
             TF_CONFIG=launch.cluster_configs(launch.free_ports(4), 1)[0])
  result = subprocess.run(
      runner.main_command(*DIGITS, PS, '--cluster_timeout=2',
                          f'--model_dir={tmp_path / "run"}'),
      env=env, capture_output=True, text=True, cwd=runner.REPO, timeout=120,
      check=False)
  assert result.returncode == 75, result.stderr[-3000:]
  (line,) = runner.error_lines(result.stderr)
  assert line.startswith('error: worker:0 (127.0.0.1:')
  assert ', worker:1 (127.0.0.1:' in line and ', ps:0 (127.0.0.1:' in line
  assert 'did not serve within --cluster_timeout=2s' in line
  assert not os.path.exists(tmp_path / 'run')


def test_a_task_that_cannot_serve_is_one_line(tmp_path):
  """A worker whose TF_CONFIG port is taken (by a listener here)."""
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = {'cluster': {'chief': ['127.0.0.1:1'],
                          'worker': [f'127.0.0.1:{port}'],
                          'ps': ['127.0.0.1:2']},
              'task': {'type': 'worker', 'index': 0}}
    result = subprocess.run(
        runner.main_command(*DIGITS, PS, f'--model_dir={tmp_path / "run"}'),
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
                 TF_CONFIG=json.dumps(config)),
        capture_output=True, text=True, cwd=runner.REPO, timeout=120,
        check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  (line,) = runner.error_lines(result.stderr)
  assert line == (f'error: TF_CONFIG task worker:0: could not serve at '
                  f'127.0.0.1:{port} (UnknownError: Could not start gRPC '
                  'server); is another process using the port?')

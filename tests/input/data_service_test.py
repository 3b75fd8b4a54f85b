"""Training through a real tf.data service: `python -m input.data_service`
(a dispatcher and two workers on loopback) feeding main.py."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from input import make_tfrecords
from input import shapes
from tests import runner

SMOKE = '--config=configs/digits_mlp.py:smoke'


class Service:
  """`python -m input.data_service --port=0 --workers=2`, its output kept."""

  def __init__(self, tmp_path):
    self.log = tmp_path / f'service-{len(list(tmp_path.glob("service-*")))}.log'
    self._out = open(self.log, 'w')
    self.process = subprocess.Popen(
        [sys.executable, '-m', 'input.data_service', '--port=0',
         '--workers=2'], cwd=runner.REPO, stdout=self._out,
        stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
    deadline = time.monotonic() + 120
    while not (found := re.search(r'dispatcher (grpc://127\.0\.0\.1:\d+)',
                                  self.log.read_text())):
      assert self.process.poll() is None, self.log.read_text()
      assert time.monotonic() < deadline, self.log.read_text()
      time.sleep(0.2)
    self.address = found.group(1)

  def tasks_seen(self) -> list[int]:
    """Every task count the service printed, in order."""
    return [int(n) for n in re.findall(r'(\d+) pipeline task',
                                       self.log.read_text())]

  def tasks_started(self) -> int:
    """Tasks started so far (a finished job's tasks linger a while)."""
    seen = self.tasks_seen()
    return sum(max(0, now - before)
               for before, now in zip([0] + seen, seen))

  def stop(self) -> int:
    self.process.send_signal(signal.SIGTERM)
    code = self.process.wait(timeout=60)
    self._out.close()
    return code


@pytest.fixture
def service(tmp_path):
  running = Service(tmp_path)
  yield running
  assert running.stop() == 0, running.log.read_text()
  assert 'tf.data service: stopped' in running.log.read_text()


def test_resnet20_trains_and_evaluates_through_the_service(tmp_path, service):
  root = tmp_path / 'shapes'
  shapes.write(str(root / 'images'), per_class=100, size=24)
  make_tfrecords.convert(str(root / 'images'), str(root / 'records'),
                         num_shards=4, eval_fraction=0.2)
  model_dir = tmp_path / 'run'
  result = runner.run_main(
      '--config=configs/cifar_resnet20.py:shapes', '--mode=train_and_eval',
      f'--config.data.train_pattern={root}/records/train-*',
      f'--config.data.eval_pattern={root}/records/eval-*',
      '--config.data.image_size=24', '--config.data.shuffle_buffer=64',
      '--config.model.base_filters=4', '--config.train.steps=40',
      '--config.train.global_batch_size=16', '--config.train.steps_per_loop=20',
      '--config.optimizer.warmup_steps=2', '--strategy=mirrored',
      '--num_cpu_devices=2', f'--config.data.service={service.address}',
      f'--model_dir={model_dir}')
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = runner.final_eval(result.stdout)
  assert metrics['examples'] == 80  # The eval split, read here, once.
  assert 0 <= metrics['accuracy'] <= 1 and metrics['loss'] > 0
  assert 'not reproducible' in result.stderr
  # The training pipeline ran on the service: one task on each worker.
  assert max(service.tasks_seen()) == 2, service.log.read_text()
  values = runner.checkpoint_values(str(model_dir))
  assert values['step/.ATTRIBUTES/VARIABLE_VALUE'] == 40


def test_resume_through_the_service_counts_every_step_once(tmp_path, service):
  model_dir = tmp_path / 'run'
  flags = (SMOKE, f'--config.data.service={service.address}',
           '--config.checkpoint.every_steps=10', f'--model_dir={model_dir}')
  first = runner.run_main(*flags, '--config.train.steps=20')
  assert first.returncode == 0, first.stderr[-3000:]
  second = runner.run_main(*flags, '--config.train.steps=40')
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'restored' in second.stderr and 'ckpt-20' in second.stderr
  steps = sorted(int(name.split('-')[1].split('.')[0])
                 for name in os.listdir(model_dir)
                 if name.startswith('ckpt-') and name.endswith('.index'))
  assert steps[-1] == 40, steps
  values = runner.checkpoint_values(str(model_dir))
  # 40 steps trained and the data position at 40: the second run went on
  # from the first one's checkpoint, not from 0 and not past it.
  assert values['step/.ATTRIBUTES/VARIABLE_VALUE'] == 40
  assert values['data_position/.ATTRIBUTES/VARIABLE_VALUE'] == 40
  # Each run was a job of its own (named after model_dir and the position).
  assert service.tasks_started() == 4, service.log.read_text()
  # Evaluation reads its split here: it needs no service running.
  result = runner.run_main(SMOKE, '--mode=eval', f'--model_dir={model_dir}',
                           '--config.data.service=grpc://127.0.0.1:1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert runner.final_eval(result.stdout)['examples'] == 360


def test_two_workers_share_one_service_job(tmp_path, service):
  model_dir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'trainer.cluster.launch', '--num_workers=2',
       '--', SMOKE, '--strategy=multi_worker_mirrored',
       f'--config.data.service={service.address}',
       f'--model_dir={model_dir}'],
      cwd=runner.REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'), check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  for worker in (0, 1):  # Both report the eval of the whole test split.
    lines = [line[len(f'[worker {worker}] '):]
             for line in result.stdout.splitlines()
             if line.startswith(f'[worker {worker}] ')]
    assert runner.final_eval('\n'.join(lines))['examples'] == 360
  # Both workers read one job (one task per service worker), not two.
  assert max(service.tasks_seen()) == 2, service.log.read_text()
  values = runner.checkpoint_values(str(model_dir))
  assert values['step/.ATTRIBUTES/VARIABLE_VALUE'] == 20


def test_a_lost_dispatcher_ends_the_run_with_75_and_it_resumes(tmp_path):
  model_dir = tmp_path / 'run'
  common = (SMOKE, '--config.train.steps=100000',
            '--config.checkpoint.every_steps=20', '--cluster_timeout=6',
            f'--model_dir={model_dir}')
  lost = Service(tmp_path)
  process = runner.start_main(*common,
                              f'--config.data.service={lost.address}')
  try:
    deadline = time.monotonic() + 180
    while not list(model_dir.glob('ckpt-*.index')):
      assert process.poll() is None, process.communicate()[1][-3000:]
      assert time.monotonic() < deadline
      time.sleep(0.5)
  finally:
    lost.process.kill()  # The dispatcher and its workers, at once.
    lost.process.wait()
  try:
    _, stderr = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == 75, stderr[-3000:]
  errors = [line for line in stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, stderr[-3000:]
  assert f"data.service='{lost.address}': the dispatcher has not answered " \
      'for --cluster_timeout=6s' in errors[0]
  saved = runner.checkpoint_values(str(model_dir))[
      'step/.ATTRIBUTES/VARIABLE_VALUE']
  assert saved >= 20
  # A new service, the same model_dir: training goes on from the checkpoint.
  again = Service(tmp_path)
  try:
    result = runner.run_main(*common, f'--config.train.steps={saved + 20}',
                             f'--config.data.service={again.address}')
  finally:
    assert again.stop() == 0
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'ckpt-{saved}' in result.stderr
  values = runner.checkpoint_values(str(model_dir))
  assert values['step/.ATTRIBUTES/VARIABLE_VALUE'] == saved + 20


def test_a_lost_dispatcher_ends_two_workers_and_leaves_no_private_dir(
    tmp_path):
  """The watch exits the process from its own thread, past every `finally`:
  the non-chief's private write directory (a whole checkpoint copy) must
  still go."""
  model_dir, temp_dir = tmp_path / 'run', tmp_path / 'tmp'
  temp_dir.mkdir()
  lost = Service(tmp_path)
  with open(tmp_path / 'launch.log', 'w') as log:
    launcher = subprocess.Popen(
        [sys.executable, '-m', 'trainer.cluster.launch', '--num_workers=2',
         '--', SMOKE, '--strategy=multi_worker_mirrored',
         '--config.train.steps=100000', '--config.checkpoint.every_steps=20',
         # Also the deadline for joining the cluster: room for two processes
         # importing TensorFlow on a busy machine.
         '--cluster_timeout=20', f'--config.data.service={lost.address}',
         f'--model_dir={model_dir}'],
        cwd=runner.REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', TMPDIR=str(temp_dir)))
  try:
    deadline = time.monotonic() + 240
    # The non-chief has saved into its directory too.
    while not list(temp_dir.glob('distloop-worker1-*/ckpt-*.index')):
      assert launcher.poll() is None, (tmp_path / 'launch.log').read_text()
      assert time.monotonic() < deadline
      time.sleep(0.5)
  finally:
    lost.process.kill()
    lost.process.wait()
  try:
    code = launcher.wait(timeout=120)
  finally:
    launcher.kill()
  output = (tmp_path / 'launch.log').read_text()
  assert code == 75, output[-3000:]
  # The dispatcher was lost to both at once, and the watches probe every
  # 2 s: both end through their watch, or the second to get there has
  # already seen its peer go (a broken all-reduce: exit 75 as well). Either
  # way each says why in one line.
  watched = [bool(re.search(rf'^\[worker {worker}\] error: .* the dispatcher '
                            r'has not answered for --cluster_timeout=20s',
                            output, re.MULTILINE)) for worker in (0, 1)]
  assert any(watched), output[-3000:]
  for worker in (0, 1):
    assert watched[worker] or re.search(
        rf'^\[worker {worker}\] error: worker:{1 - worker} .* stopped during '
        'the run', output, re.MULTILINE), output[-3000:]
  assert list(model_dir.glob('ckpt-*.index'))  # The chief's are kept.
  assert not list(temp_dir.glob('distloop-worker*')), output[-3000:]


@pytest.mark.parametrize('flags, message', [
    (('--config.data.service=127.0.0.1:5050',),
     "config key data.service='127.0.0.1:5050' is not a tf.data service "
     'address'),
    (('--config.data.service=grpc://127.0.0.1:1',),
     "config key data.service='grpc://127.0.0.1:1': no dispatcher answers "
     'there'),
    (('--config.data.service=grpc://127.0.0.1:1', '--deterministic'),
     "flag --deterministic with config key data.service="),
])
def test_bad_service_setting_is_one_line_and_writes_nothing(tmp_path, flags,
                                                            message):
  model_dir = tmp_path / 'run'
  result = runner.run_main(SMOKE, *flags, f'--model_dir={model_dir}')
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines()
            if line.startswith('error:')]
  assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
  assert not model_dir.exists()


def test_service_command_refuses_a_bad_dispatcher_flag():
  result = subprocess.run(
      [sys.executable, '-m', 'input.data_service', '--dispatcher=nohost'],
      cwd=runner.REPO, capture_output=True, text=True, timeout=120,
      check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "error: flag --dispatcher='nohost' must be HOST:PORT")


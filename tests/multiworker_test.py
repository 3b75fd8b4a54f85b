"""Multi-worker runs over TF_CONFIG on loopback: same numbers as one process.

Real worker processes, through the launcher and through hand-written
TF_CONFIG; weights are compared with single-process MirroredStrategy runs of
the same global batch and seed.
"""

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from tests import runner
from trainer import launch

SMOKE = ('--config=configs/digits_mlp.py:smoke', '--config.train.steps=24',
         '--config.train.steps_per_loop=8', '--config.optimizer.name=sgd',
         '--config.optimizer.momentum=0.9',
         '--config.optimizer.learning_rate=0.05')
MWMS = '--strategy=multi_worker_mirrored'


def launch_command(num_workers, *args):
  return [sys.executable, '-m', 'trainer.launch', f'--num_workers={num_workers}',
          '--', *args]


def run_launcher(num_workers, *args, timeout=240):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run(launch_command(num_workers, *args), cwd=runner.REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env=env, check=False)


def assert_same_weights(dir_a, dir_b, rtol=1e-5):
  a = runner.restored_model_weights(str(dir_a))
  b = runner.restored_model_weights(str(dir_b))
  for i, (x, y) in enumerate(zip(a, b)):
    np.testing.assert_allclose(y, x, rtol=rtol, atol=1e-6,
                               err_msg=f'weight {i}')


def worker_temp_dirs():
  return set(glob.glob(os.path.join(tempfile.gettempdir(), 'distloop-worker*')))


def test_two_workers_match_one_process_through_the_launcher(tmp_path):
  before = worker_temp_dirs()
  single = {n: runner.start_main(*SMOKE, '--strategy=mirrored',
                                 f'--num_cpu_devices={n}',
                                 f'--model_dir={tmp_path / f"single{n}"}')
            for n in (2, 4)}
  for n, process in single.items():
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
  for cpus in (1, 2):
    model_dir = tmp_path / f'workers2x{cpus}'
    result = run_launcher(2, *SMOKE, MWMS, f'--num_cpu_devices={cpus}',
                          f'--model_dir={model_dir}')
    assert result.returncode == 0, result.stderr[-4000:]
    assert 'launch: all 2 workers exited 0' in result.stderr
    assert_same_weights(tmp_path / f'single{2 * cpus}', model_dir)
    # The chief alone wrote into model_dir; the other worker's temporary
    # directory is gone.
    # (TensorBoard's event file there is tests/tensorboard_test.py's.)
    assert sorted(f for f in os.listdir(model_dir) if 'tfevents' not in f) == [
        'checkpoint', 'ckpt-10.data-00000-of-00001', 'ckpt-10.index',
        'ckpt-20.data-00000-of-00001', 'ckpt-20.index',
        'ckpt-24.data-00000-of-00001', 'ckpt-24.index', 'config.json', 'eval',
        'run.json', 'train']
    evals = (model_dir / 'eval' / 'metrics.jsonl').read_text().splitlines()
    assert len(evals) == 1  # Both workers evaluated; only the chief wrote.
  assert worker_temp_dirs() == before


def test_hand_written_tf_config_matches_one_process(tmp_path):
  reference = runner.start_main(*SMOKE, '--strategy=mirrored',
                                '--num_cpu_devices=2',
                                f'--model_dir={tmp_path / "single"}')
  ports = launch.free_ports(2)
  workers = []
  for tf_config in launch.cluster_configs(ports):
    env = dict(os.environ, TF_CONFIG=tf_config, TF_CPP_MIN_LOG_LEVEL='2')
    workers.append(subprocess.Popen(
        runner.main_command(*SMOKE, MWMS, f'--model_dir={tmp_path / "mw"}'),
        cwd=runner.REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  outputs = [w.communicate(timeout=240) for w in workers]
  for w, (_, stderr) in zip(workers, outputs):
    assert w.returncode == 0, stderr[-3000:]
  _, stderr = reference.communicate(timeout=240)
  assert reference.returncode == 0, stderr[-3000:]
  assert_same_weights(tmp_path / 'single', tmp_path / 'mw')
  assert runner.final_eval(outputs[0][0]) == runner.final_eval(outputs[1][0])


def test_sigterm_to_launcher_preempts_every_worker_then_resumes(tmp_path):
  long_run = ('--config=configs/digits_mlp.py:smoke', '--deterministic',
              '--config.train.steps=3000', '--config.train.steps_per_loop=3000',
              '--config.checkpoint.every_steps=0', MWMS)
  model_dir = tmp_path / 'run'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  log = tmp_path / 'launch.log'
  with open(log, 'w') as out:
    job = subprocess.Popen(
        launch_command(2, *long_run, f'--model_dir={model_dir}'),
        cwd=runner.REPO, env=env, stdout=subprocess.DEVNULL, stderr=out,
        text=True)
  # Each worker logs where its summaries go just before it starts training.
  ready = {'[worker 0]': 'TensorBoard summaries in',
           '[worker 1]': 'not the chief: this worker writes no TensorBoard'}

  def both_ready():
    lines = log.read_text().splitlines()
    return all(any(line.startswith(worker) and text in line for line in lines)
               for worker, text in ready.items())
  deadline = time.monotonic() + 120
  while not both_ready():
    assert job.poll() is None, log.read_text()[-4000:]
    assert time.monotonic() < deadline, log.read_text()[-4000:]
    time.sleep(0.2)
  time.sleep(4)  # Both workers are in the 3000-step inner loop by now.
  job.send_signal(signal.SIGTERM)
  signalled = time.monotonic()
  job.wait(timeout=120)
  stderr = log.read_text()
  assert job.returncode == 42, stderr[-4000:]
  assert time.monotonic() - signalled < 30
  assert stderr.count('preempted by SIGTERM') == 2, '\n'.join(
      line for line in stderr.splitlines()
      if 'SIGTERM' in line or 'rror' in line or 'launch:' in line)
  (saved,) = glob.glob(str(model_dir / 'ckpt-*.index'))
  step = int(saved.rsplit('-', 1)[1].split('.')[0])
  assert 0 < step < 3000
  resumed = run_launcher(2, *long_run, f'--model_dir={model_dir}')
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  reference = run_launcher(2, *long_run, f'--model_dir={tmp_path / "ref"}')
  assert reference.returncode == 0, reference.stderr[-4000:]
  assert_same_weights(tmp_path / 'ref', model_dir, rtol=0)

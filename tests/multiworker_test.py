"""Multi-worker runs over TF_CONFIG on loopback: same numbers as one process.

Real worker processes, through the launcher and through hand-written
TF_CONFIG; weights are compared with single-process MirroredStrategy runs of
the same global batch and seed.
"""

import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import docs
from tests import runner
from trainer.cluster import launch

SMOKE = ('--config=configs/digits_mlp.py:smoke', '--config.train.steps=24',
         '--config.train.steps_per_loop=8', '--config.optimizer.name=sgd',
         '--config.optimizer.momentum=0.9',
         '--config.optimizer.learning_rate=0.05')
MWMS = '--strategy=multi_worker_mirrored'


def launch_command(num_workers, *args):
  return [sys.executable, '-m', 'trainer.cluster.launch', f'--num_workers={num_workers}',
          '--', *args]


def run_launcher(num_workers, *args, timeout=240):
  (result,) = run_launchers(
      args, launcher_flags=(f'--num_workers={num_workers}',), timeout=timeout)
  return result


def start_launcher(*args, launcher_flags=('--num_workers=2',), temp_dir=None):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  if temp_dir:
    env['TMPDIR'] = str(temp_dir)  # The workers' temporary directories.
  return subprocess.Popen([sys.executable, '-m', 'trainer.cluster.launch',
                           *launcher_flags, '--', *args],
                          cwd=runner.REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish_launchers(processes, timeout=240):
  """Waits for launchers; returns their CompletedProcess in order. A
  timeout leaves none running (the launcher stops its workers on SIGTERM)."""
  results = []
  try:
    for process in processes:
      stdout, stderr = process.communicate(timeout=timeout)
      results.append(subprocess.CompletedProcess(process.args,
                                                 process.returncode, stdout,
                                                 stderr))
  finally:
    for process in processes:
      if process.poll() is None:
        process.terminate()
        process.wait(timeout=60)
  return results


def run_launchers(*arg_lists, launcher_flags=('--num_workers=2',),
                  timeout=240, temp_dir=None):
  """Runs one launcher per list of worker arguments side by side (start-up,
  mostly TensorFlow's import, is one core's work per process)."""
  return finish_launchers([start_launcher(*args, launcher_flags=launcher_flags,
                                          temp_dir=temp_dir)
                           for args in arg_lists], timeout)


def assert_same_weights(dir_a, dir_b, rtol=1e-5):
  a = runner.restored_model_weights(str(dir_a))
  b = runner.restored_model_weights(str(dir_b))
  for i, (x, y) in enumerate(zip(a, b)):
    np.testing.assert_allclose(y, x, rtol=rtol, atol=1e-6,
                               err_msg=f'weight {i}')


def test_two_workers_match_one_process_through_the_launcher(tmp_path):
  """The launcher command of docs/cluster.md, as printed (/tmp/ moved under
  tmp_path), and with 2 CPU replicas per worker; each against one process
  with as many replicas."""
  (printed,) = docs.commands('docs/cluster.md', 'launch')
  argv = shlex.split(printed.replace('/tmp/', f'{tmp_path}/'))
  assert argv[:3] == ['python', '-m', 'trainer.cluster.launch']
  launcher, worker_args = argv[3:argv.index('--')], argv[argv.index('--') + 1:]
  config = [a for a in worker_args if a.startswith('--config')]
  # The workers' temporary directories go here, away from other runs'.
  temp_dir = tmp_path / 'tmp'
  temp_dir.mkdir()
  untouched = temp_dir.stat().st_mtime_ns
  single = {n: runner.start_main(*config, '--strategy=mirrored',
                                 f'--num_cpu_devices={n}',
                                 f'--model_dir={tmp_path / f"single{n}"}')
            for n in (2, 4)}
  for n, process in single.items():
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
  args = [a for a in worker_args if not a.startswith('--model_dir')]
  results = run_launchers(*([*args, f'--model_dir={tmp_path}/workers2x{cpus}',
                             f'--num_cpu_devices={cpus}'] for cpus in (1, 2)),
                          launcher_flags=launcher, temp_dir=temp_dir)
  for cpus, result in zip((1, 2), results):
    model_dir = tmp_path / f'workers2x{cpus}'
    assert result.returncode == 0, result.stderr[-4000:]
    assert 'launch: all 2 workers exited 0' in result.stderr
    assert_same_weights(tmp_path / f'single{2 * cpus}', model_dir)
    # The chief alone wrote into model_dir; the other worker's temporary
    # directory is gone.
    # (TensorBoard's event file there is tests/tensorboard_test.py's.)
    assert sorted(f for f in os.listdir(model_dir) if 'tfevents' not in f) == [
        'checkpoint', 'ckpt-10.data-00000-of-00001', 'ckpt-10.index',
        'ckpt-20.data-00000-of-00001', 'ckpt-20.index', 'config.json', 'eval',
        'goodput', 'goodput.json', 'run.json', 'train']
    evals = (model_dir / 'eval' / 'metrics.jsonl').read_text().splitlines()
    assert len(evals) == 1  # Both workers evaluated; only the chief wrote.
  # The non-chief workers made their directories there, and removed them.
  assert temp_dir.stat().st_mtime_ns != untouched
  assert not glob.glob(str(temp_dir / 'distloop-worker*'))


def test_hand_written_tf_config_matches_one_process(tmp_path):
  """Two workers and the evaluator task, each with its own TF_CONFIG and the
  same command, as a TFJob runs them: the evaluator (outside "cluster")
  evaluates the run's checkpoints by itself and exits when training ends."""
  reference = runner.start_main(*SMOKE, '--strategy=mirrored',
                                '--num_cpu_devices=2',
                                f'--model_dir={tmp_path / "single"}')
  ports = launch.free_ports(2)
  evaluator_config = json.dumps({
      'cluster': json.loads(launch.cluster_configs(ports)[0])['cluster'],
      'task': {'type': 'evaluator', 'index': 0}})
  processes = []
  for tf_config in launch.cluster_configs(ports) + [evaluator_config]:
    env = dict(os.environ, TF_CONFIG=tf_config, TF_CPP_MIN_LOG_LEVEL='2')
    processes.append(subprocess.Popen(
        runner.main_command(*SMOKE, MWMS, '--config.checkpoint.every_steps=8',
                            f'--model_dir={tmp_path / "mw"}'),
        cwd=runner.REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  outputs = [p.communicate(timeout=240) for p in processes]
  for p, (_, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]
  _, stderr = reference.communicate(timeout=240)
  assert reference.returncode == 0, stderr[-3000:]
  assert_same_weights(tmp_path / 'single', tmp_path / 'mw')
  workers, evaluator = outputs[:2], outputs[2]
  assert runner.final_eval(workers[0][0]) == runner.final_eval(workers[1][0])
  # The evaluator read the last checkpoint: the trained weights' metrics.
  assert runner.final_eval(evaluator[0]) == pytest.approx(
      runner.final_eval(workers[0][0]), rel=1e-4)  # 1 vs 2 replicas' sums.
  assert 'evaluator task' in evaluator[1], evaluator[1][-2000:]
  assert glob.glob(str(tmp_path / 'mw' / 'continuous_eval' / 'events.*'))


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT],
                         ids=['sigterm', 'ctrl_c'])
def test_sigterm_to_launcher_preempts_every_worker_then_resumes(tmp_path,
                                                                signum):
  """SIGTERM (a preemption) or SIGINT (Ctrl-C in the launcher's terminal)
  is forwarded to both workers, which save at the same step and exit 42 or
  130; the launcher exits with that status. (The resume is checked after
  SIGTERM; after SIGINT it is the same restore.)"""
  long_run = ('--config=configs/digits_mlp.py:smoke', '--deterministic',
              '--config.train.steps=800', '--config.train.steps_per_loop=800',
              '--config.checkpoint.every_steps=0', MWMS)
  model_dir = tmp_path / 'run'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  log = tmp_path / 'launch.log'
  with open(log, 'w') as out:
    job = subprocess.Popen(
        launch_command(2, *long_run, f'--model_dir={model_dir}'),
        cwd=runner.REPO, env=env, stdout=subprocess.DEVNULL, stderr=out,
        text=True)
  # Each worker logs this once SIGTERM saves rather than ends the run at
  # once (a worker that exits at once leaves the other blocked in its next
  # all-reduce until the launcher kills it).
  def both_ready():
    lines = log.read_text().splitlines()
    return all(any(line.startswith(worker) and '] training from step 0 ' in
                   line for line in lines)
               for worker in ('[worker 0]', '[worker 1]'))
  deadline = time.monotonic() + 120
  while not both_ready():
    assert job.poll() is None, log.read_text()[-4000:]
    assert time.monotonic() < deadline, log.read_text()[-4000:]
    time.sleep(0.2)
  # A second later both are inside the 800-step (~4-6 s) loop.
  time.sleep(1)
  job.send_signal(signum)
  signalled = time.monotonic()
  job.wait(timeout=120)
  stderr = log.read_text()
  message, code = {signal.SIGTERM: ('preempted by SIGTERM', 42),
                   signal.SIGINT: ('interrupted by SIGINT (Ctrl-C)', 130)}[
                       signum]
  assert job.returncode == code, stderr[-4000:]
  assert time.monotonic() - signalled < 30
  assert stderr.count(message) == 2, '\n'.join(
      line for line in stderr.splitlines()
      if 'SIG' in line or 'rror' in line or 'launch:' in line)
  assert 'Traceback' not in stderr
  (saved,) = glob.glob(str(model_dir / 'ckpt-*.index'))
  step = int(saved.rsplit('-', 1)[1].split('.')[0])
  assert 0 < step < 800
  if signum == signal.SIGINT:
    return
  resumed, reference = run_launchers(
      (*long_run, f'--model_dir={model_dir}'),
      (*long_run, f'--model_dir={tmp_path / "ref"}'))
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert reference.returncode == 0, reference.stderr[-4000:]
  assert_same_weights(tmp_path / 'ref', model_dir, rtol=0)


def stop_lines(stderr):
  """The two workers' last lines when worker 1 alone got SIGTERM: it was
  preempted, worker 0 stopped with it."""
  lines = [line for line in stderr.splitlines()
           if 'preempted by SIGTERM during training' in line or
           'stopped during training with the other workers' in line]
  assert sorted(line[:10] for line in lines) == ['[worker 0]', '[worker 1]']
  assert 'with the other workers, one of which got SIGTERM or Ctrl-C' in (
      min(lines)), lines
  return lines


KILLED_AT_STEP = ('--config=configs/digits_mlp.py:smoke', '--deterministic',
                  '--config.trainer=tests.user_trainers:KilledAtStep',
                  '--config.train.steps=60', '--config.train.steps_per_loop=10',
                  '--config.checkpoint.every_steps=0', MWMS)


@pytest.fixture(scope='module')
def uninterrupted_run(tmp_path_factory):
  """The SIGTERM-to-one-worker cases' common reference: started when the
  first case starts (it runs beside that case's preempted run), awaited
  when a case needs its weights."""
  model_dir = tmp_path_factory.mktemp('uninterrupted') / 'ref'
  process = start_launcher(*KILLED_AT_STEP, f'--model_dir={model_dir}')
  finished = []

  def wait():
    if not finished:
      finished.extend(finish_launchers([process]))
    assert finished[0].returncode == 0, finished[0].stderr[-4000:]
    return model_dir

  yield wait
  finish_launchers([process])


# (step of the SIGTERM, steps the save may be at): between loops the stop
# request reaches one of the next loop's first steps (the watcher thread
# sets it a moment after the signal); after the last loop, step 60.
@pytest.mark.parametrize('at, saved', [(20, range(21, 30)), (60, [60])])
def test_sigterm_to_one_worker_between_loops_stops_both_at_one_step(
    tmp_path, uninterrupted_run, at, saved):
  """Worker 1 alone gets SIGTERM, from an action between two inner loops
  (as a preempted node's pod does), or after the last one: both workers
  stop after the same step, save one checkpoint and exit 42; the resumed
  run ends where an uninterrupted one does."""
  model_dir = tmp_path / 'run'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
             DISTLOOP_TEST_KILL_AT=str(at),
             DISTLOOP_TEST_KILL_SIGNAL='SIGTERM',
             DISTLOOP_TEST_KILL_WORKER='1')
  preempted = subprocess.run(
      launch_command(2, *KILLED_AT_STEP, f'--model_dir={model_dir}'),
      cwd=runner.REPO, capture_output=True, text=True, timeout=240, env=env,
      check=False)
  assert preempted.returncode == 42, preempted.stderr[-4000:]
  lines = stop_lines(preempted.stderr)
  # Both stopped after the same step and saved it once.
  steps = {int(line.split(' at step ')[1].split(';')[0]) for line in lines}
  assert len(steps) == 1 and steps <= set(saved), lines
  step = steps.pop()
  # Both name the checkpoint the job resumes from, not a private copy.
  assert all(f'saved {model_dir}/ckpt-{step} at step' in line
             for line in lines), lines
  assert 'killed worker' not in preempted.stderr
  checkpoints = glob.glob(str(model_dir / 'ckpt-*.index'))
  assert [os.path.basename(p) for p in checkpoints] == [f'ckpt-{step}.index']
  (resumed,) = run_launchers((*KILLED_AT_STEP, f'--model_dir={model_dir}'))
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert_same_weights(uninterrupted_run(), model_dir, rtol=0)


def test_sigterm_to_one_worker_stops_both_with_a_tutorial_step(tmp_path):
  """The same with a train_step of the user's own that bypasses
  Trainer.apply_gradients: the stop request is still agreed in the step, so
  the other worker does not run on alone into a collective save."""
  model_dir = tmp_path / 'run'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', DISTLOOP_TEST_KILL_AT='20',
             DISTLOOP_TEST_KILL_SIGNAL='SIGTERM',
             DISTLOOP_TEST_KILL_WORKER='1')
  args = [a.replace(':KilledAtStep', ':TutorialKilledAtStep')
          for a in KILLED_AT_STEP]
  preempted = subprocess.run(
      launch_command(2, *args, f'--model_dir={model_dir}'),
      cwd=runner.REPO, capture_output=True, text=True, timeout=240, env=env,
      check=False)
  assert preempted.returncode == 42, preempted.stderr[-4000:]
  lines = stop_lines(preempted.stderr)
  steps = {int(line.split(' at step ')[1].split(';')[0]) for line in lines}
  assert len(steps) == 1 and steps <= set(range(21, 30)), lines
  assert 'killed worker' not in preempted.stderr
  assert [os.path.basename(p) for p in glob.glob(
      str(model_dir / 'ckpt-*.index'))] == [f'ckpt-{steps.pop()}.index']


@pytest.mark.parametrize('variant', ['two_optimizers', 'sync_norm_accum'])
def test_user_trainers_on_two_workers_match_one_process(tmp_path, variant):
  """A user's Trainer from outside models/ (registered by import path):
  two optimizers, one through Keras' own apply_gradients; or synchronized
  batch norm with gradient accumulation. Weighted (padded) losses in both."""
  args = (f'--config=tests/user_config.py:{variant}',)
  single = runner.start_main(*args, '--strategy=mirrored',
                             '--num_cpu_devices=2',
                             f'--model_dir={tmp_path / "single"}')
  workers = run_launcher(2, *args, MWMS, f'--model_dir={tmp_path / "mw"}')
  _, stderr = single.communicate(timeout=240)
  assert single.returncode == 0, stderr[-3000:]
  assert workers.returncode == 0, workers.stderr[-4000:]
  expected = runner.checkpoint_values(str(tmp_path / 'single'))
  got = runner.checkpoint_values(str(tmp_path / 'mw'))
  assert set(got) == set(expected)
  assert any('second_optimizer' in k for k in got) == (
      variant == 'two_optimizers')
  for key, value in expected.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6,
                               err_msg=key)


def test_two_workers_evaluate_the_model_their_checkpoint_keeps(tmp_path):
  """Per-replica batch norm: each worker's moving statistics follow its own
  slice. Before evaluating, every copy takes the chief's first replica's
  (tests/trainer/parts/replica_copies_test.py: one process)."""
  args = ('--config=tests/user_config.py:unsynced_norm',
          f'--model_dir={tmp_path}')
  workers = run_launcher(2, *args, MWMS)
  assert workers.returncode == 0, workers.stderr[-4000:]
  again = runner.run_main(*args, '--mode=eval')
  assert again.returncode == 0, again.stderr[-3000:]
  expected = again.stdout.strip().splitlines()[-1]
  finals = [line for line in workers.stdout.splitlines()
            if 'final eval:' in line]
  assert sorted(finals) == [f'[worker 0] {expected}',
                            f'[worker 1] {expected}']


def test_streaming_and_aggregated_metrics_on_two_workers(tmp_path):
  """AUC, F1 (Keras metric state summed over workers) and the median of
  every example's loss (gathered from both workers) equal their definitions
  computed on the host from the exported model's predictions."""
  from tests.trainer.parts import streaming_test  # pylint: disable=import-outside-toplevel
  model_dir = tmp_path / 'mw'
  result = run_launcher(2, '--config=examples/extras_config.py:smoke', MWMS,
                        '--config.export.at_end=True',
                        f'--model_dir={model_dir}')
  assert result.returncode == 0, result.stderr[-4000:]
  chief = [line[len('[worker 0] '):] for line in result.stdout.splitlines()
           if line.startswith('[worker 0] final eval: ')]
  final = runner.final_eval(chief[-1])
  expected = streaming_test.host_metrics(str(model_dir / 'export'))
  assert final['eval_examples'] == 360
  assert final['median_loss'] == pytest.approx(expected['median_loss'],
                                               rel=1e-3)
  assert final['f1'] == pytest.approx(expected['f1'], abs=1e-3)
  assert final['auc'] == pytest.approx(expected['auc'], abs=2e-3)


def test_resume_between_one_process_and_two_workers_both_ways(tmp_path):
  """12 steps on one layout, then to 24 on the other: the same weights as
  24 steps on one process (data.pipeline=per_host keeps the stream). The
  two directions run side by side."""
  common = (*SMOKE[:1], '--config.train.steps_per_loop=4',
            '--config.checkpoint.every_steps=12', '--config.eval.every_steps=0')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')

  def launcher(*args):
    return subprocess.Popen(launch_command(2, *common, MWMS, *args),
                            cwd=runner.REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

  def finish(*processes):
    for process in processes:
      _, stderr = process.communicate(timeout=300)
      assert process.returncode == 0, stderr[-3000:]

  reference = runner.start_main(*common, '--config.train.steps=24',
                                f'--model_dir={tmp_path / "reference"}')
  finish(runner.start_main(*common, '--config.train.steps=12',
                           f'--model_dir={tmp_path / "to_workers"}'),
         launcher('--config.train.steps=12',
                  f'--model_dir={tmp_path / "to_process"}'))
  finish(launcher('--config.train.steps=24',
                  f'--model_dir={tmp_path / "to_workers"}'),
         runner.start_main(*common, '--config.train.steps=24',
                           f'--model_dir={tmp_path / "to_process"}'),
         reference)
  for name in ('to_workers', 'to_process'):
    assert_same_weights(tmp_path / 'reference', tmp_path / name)
    assert runner.checkpoint_values(str(tmp_path / name))[
        'step/.ATTRIBUTES/VARIABLE_VALUE'] == 24

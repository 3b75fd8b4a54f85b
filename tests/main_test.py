"""main.py end to end, in subprocesses: results, files on disk, bad input."""

import json
import os
import re

import numpy as np
import pytest

from tests import runner

SMOKE = '--config=configs/digits_mlp.py:smoke'


def test_default_run_reaches_accuracy_bound(tmp_path):
  model_dir, temp = tmp_path / 'run', tmp_path / 'tmp'
  temp.mkdir()
  result = runner.run_main(f'--model_dir={model_dir}', env={'TMPDIR': str(temp)})
  assert result.returncode == 0, result.stderr[-3000:]
  # AutoGraph's generated files, removed although main.py ends in os._exit.
  assert not list(temp.iterdir())
  metrics = runner.final_eval(result.stdout)
  assert metrics['accuracy'] >= 0.95
  assert metrics['examples'] == 360
  weights = runner.restored_model_weights(str(model_dir))
  assert [w.shape for w in weights] == [(64, 64), (64,), (64, 64), (64,),
                                        (64, 10), (10,)]
  config = json.loads((model_dir / 'config.json').read_text())
  assert config['train']['steps'] == 3000
  assert config['data']['name'] == 'digits'
  # The progress lines docs/monitoring.md#console shows: the first loop was
  # traced at validation (speed, no input wait or ETA yet), the second
  # measures the input wait and traces that graph (no speed), then both.
  lines = re.findall(r'\] (step \d+/3000: .*)', result.stderr)
  assert len(lines) == 30, lines
  number = r'[\d.e-]+'
  assert re.fullmatch(rf'step 100/3000: loss={number} accuracy={number} '
                      r'examples/sec=[\d,]+', lines[0]), lines[0]
  assert re.fullmatch(rf'step 200/3000: loss={number} accuracy={number} '
                      r'input_wait=\d+% ETA \d:\d\d:\d\d', lines[1]), lines[1]
  assert re.fullmatch(rf'step 300/3000: loss={number} accuracy={number} '
                      r'examples/sec=[\d,]+ input_wait=\d+% ETA \d:\d\d:\d\d',
                      lines[2]), lines[2]
  assert lines[-1].startswith('step 3000/3000: ') and lines[-1].endswith(
      ' done'), lines[-1]


def test_default_model_dir_is_under_runs(tmp_path):
  # Run from an empty working directory so the default lands there.
  result = runner.run_main(
      f'--config={runner.REPO}/configs/digits_mlp.py:smoke', cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  (run_dir,) = (tmp_path / 'runs').iterdir()
  assert run_dir.name.startswith('digits_mlp-smoke-')
  assert (run_dir / 'config.json').exists()
  assert runner.restored_model_weights(str(run_dir))


@pytest.mark.parametrize('optimizer_flags', [
    ('--config.optimizer.name=sgd', '--config.optimizer.momentum=0.9',
     '--config.optimizer.learning_rate=0.05'),
    ('--config.optimizer.name=adam',),
], ids=['sgd_momentum', 'adam'])
def test_replica_counts_give_same_weights_through_main(tmp_path,
                                                       optimizer_flags):
  processes = {}
  for n in (1, 2, 4):
    processes[n] = runner.start_main(
        SMOKE, '--config.train.steps=24', '--config.train.steps_per_loop=8',
        *optimizer_flags, '--strategy=mirrored', f'--num_cpu_devices={n}',
        f'--model_dir={tmp_path / str(n)}')
  outputs = {n: p.communicate(timeout=300) for n, p in processes.items()}
  for n, p in processes.items():
    assert p.returncode == 0, outputs[n][1][-3000:]
  weights = {n: runner.restored_model_weights(str(tmp_path / str(n)))
             for n in processes}
  for n in (2, 4):
    for i, (a, b) in enumerate(zip(weights[1], weights[n])):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6,
                                 err_msg=f'weight {i} on {n} replicas')
  evals = {n: runner.final_eval(outputs[n][0]) for n in processes}
  for n in (2, 4):
    assert evals[n]['accuracy'] == pytest.approx(evals[1]['accuracy'],
                                                 abs=1e-6)
    assert evals[n]['loss'] == pytest.approx(evals[1]['loss'], rel=1e-5)


def test_deterministic_runs_write_bitwise_identical_checkpoints(tmp_path):
  processes = [runner.start_main(SMOKE, '--deterministic',
                                 f'--model_dir={tmp_path / str(i)}')
               for i in range(2)]
  for p in processes:
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
  first = runner.checkpoint_values(str(tmp_path / '0'))
  second = runner.checkpoint_values(str(tmp_path / '1'))
  assert first.keys() == second.keys() and len(first) > 6
  for key in first:
    assert first[key].tobytes() == second[key].tobytes(), key


def test_print_config_prints_and_writes_nothing(tmp_path):
  model_dir = tmp_path / 'run'
  result = runner.run_main(SMOKE, '--config.train.steps=7', '--print_config',
                           f'--model_dir={model_dir}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'steps: 7' in result.stdout
  assert 'trainer: classifier' in result.stdout
  assert not model_dir.exists()


@pytest.mark.parametrize('args, message', [
    (('--strategy=gpu',), "flag --strategy='gpu' is unknown; valid: default"),
    (('--tpu=my-tpu',), "flag --tpu='my-tpu' needs --strategy=tpu"),
    (('--strategy=tpu',), 'flag --strategy=tpu needs --tpu='),
    (('--config.train.stepz=5',),
     "flag --config.train.stepz=5: config has no key 'train.stepz'"),
    (('--config=configs/digits_mlp.py:tiny',),
     "config variant 'tiny' is unknown in configs/digits_mlp.py; valid: "
     'default, smoke, sgd'),
    (('--config=configs/missing.py',),
     "flag --config=configs/missing.py: no such file 'configs/missing.py'; "
     'available: configs/'),
    (('--strategy=mirrored', '--num_cpu_devices=4',
      '--config.train.global_batch_size=30'),
     'config key train.global_batch_size=30 must be a positive multiple of '
     'the 4 replicas'),
    (('--config.train.steps=many',),
     'error: flag --config.train.steps=many: not an int; e.g. '
     '--config.train.steps=20'),
    (('--config.optimizer.name=rmsprop',),
     "config key optimizer.name='rmsprop' is unknown; valid: sgd, adam"),
    (('--config.train.steps=0',), 'config key train.steps=0 must be'),
    (('--config.eval.split=train',), "config key eval.split='train' is the "
     'endless training stream'),
    (('--num_cpu_devices=2',), 'flag --num_cpu_devices=2 makes replicas '
     'only under --strategy=mirrored (or multi_worker_mirrored), not '
     '--strategy=default; add --strategy=mirrored'),
    (('--config.trainer=tests.user_trainers:SubclassedModel',
      '--config.export.at_end=True'),
     'error: SubclassedModel keeps the default serving_input_signature, which '
     "reads the model's inputs, but its Net has none"),
    (('--config.optimizer.weight_decay_exclude=bias,norm',),
     "config key optimizer.weight_decay_exclude=('bias,norm',) must be a "
     "tuple of strings ('bias,norm' is one string, not several); e.g. "
     '--config.optimizer.weight_decay_exclude='
     '"(\'bias\','),
    (('--config=configs/digits_mlp.py:smoke', '--config=configs/digits_mlp.py'),
     'flag --config is given 2 times (--config=configs/digits_mlp.py:smoke, '
     '--config=configs/digits_mlp.py); give one config file and change its '
     'keys with --config.KEY=VALUE'),
], ids=['strategy', 'tpu_without_strategy', 'tpu_strategy_without_tpu',
        'config_key', 'variant', 'config_file', 'batch_not_divisible',
        'config_type', 'optimizer', 'steps', 'eval_split', 'cpu_devices',
        'serving', 'tuple_as_one_string', 'two_configs'])
def test_bad_input_is_one_line_error_and_writes_nothing(tmp_path, args,
                                                        message):
  model_dir = tmp_path / 'run'
  config = [] if any(a.startswith('--config=') for a in args) else [SMOKE]
  result = runner.run_main(*config, *args, f'--model_dir={model_dir}')
  assert result.returncode == 2, result.stderr[-3000:]
  errors = runner.error_lines(result.stderr)
  assert len(errors) == 1, result.stderr[-3000:]
  assert message in errors[0]
  assert result.stderr.strip().splitlines()[-1] == errors[0]
  assert 'Traceback' not in result.stderr
  assert not model_dir.exists()


def test_unwritable_model_dir_is_one_line_error(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  result = runner.run_main(SMOKE, f'--model_dir={blocker}/run')
  assert result.returncode == 2
  (error,) = runner.error_lines(result.stderr)
  assert f"flag --model_dir='{blocker}/run' is not a writable directory" in error
  assert blocker.read_text() == 'not a directory'
  assert os.listdir(tmp_path) == ['file']


def test_eval_and_export_modes_read_the_trained_run(tmp_path):
  model_dir = tmp_path / 'run'
  trained = runner.run_main(SMOKE, f'--model_dir={model_dir}')
  assert trained.returncode == 0, trained.stderr[-3000:]
  # What a training job's checkpoint write in flight has on disk: a reader
  # beside the job must leave it alone (only a training run tidies it).
  in_flight = [model_dir / 'ckpt-900_temp' / (
      'part-00000-of-00002.data-00000-of-00001.tempstate123'),
               model_dir / 'ckpt-900.index.tempstate456',
               model_dir / 'checkpoint.tmp789']
  in_flight[0].parent.mkdir()
  for path in in_flight:
    path.write_bytes(b'being written')
  # Side by side: none changes the checkpoints the others read (eval
  # appends to eval/metrics.jsonl, export writes model_dir/export,
  # continuous_eval writes model_dir/continuous_eval).
  # Evaluation may use another batch size, seed or optimizer: it reads the
  # model only (a changed model is refused, run_record.MODEL_KEYS).
  evaluating, exporting, watching = (
      runner.start_main(SMOKE, f'--mode={mode}', f'--model_dir={model_dir}',
                        *changed)
      for mode, changed in (('eval', ('--config.train.global_batch_size=32',
                                      '--config.eval.global_batch_size=50',
                                      '--config.seed=7',
                                      '--config.optimizer.name=sgd')),
                            ('export', ('--config.seed=7',)),
                            ('continuous_eval', ())))
  try:
    (evaluated, eval_err), (exported, export_err), (watched, watch_err) = (
        p.communicate(timeout=300) for p in (evaluating, exporting, watching))
  finally:
    for p in (evaluating, exporting, watching):
      if p.poll() is None:
        p.kill()
  assert [path.read_bytes() for path in in_flight] == [b'being written'] * 3
  assert evaluating.returncode == 0, eval_err[-3000:]
  assert runner.final_eval(evaluated) == runner.final_eval(trained.stdout)
  assert watching.returncode == 0, watch_err[-3000:]
  assert runner.final_eval(watched) == runner.final_eval(trained.stdout)
  assert exporting.returncode == 0, export_err[-3000:]
  assert exported.strip() == f'exported: {model_dir / "export"}'
  assert (model_dir / 'export' / 'saved_model.pb').exists()


def test_eval_without_a_run_is_one_line_error(tmp_path):
  result = runner.run_main(SMOKE, '--mode=eval',
                           f'--model_dir={tmp_path / "none"}')
  assert result.returncode == 2
  (error,) = runner.error_lines(result.stderr)
  assert '--mode=eval needs a trained run in --model_dir' in error
  assert not (tmp_path / 'none').exists()


def test_unknown_mode_is_one_line_error(tmp_path):
  result = runner.run_main(SMOKE, '--mode=serve', f'--model_dir={tmp_path}/r')
  assert result.returncode == 2
  (error,) = runner.error_lines(result.stderr)
  assert "flag --mode='serve' is unknown; valid: train, eval" in error


def tf_config(task_type: str) -> dict:
  """A TFJob's chief (under a one-process strategy) and its evaluator."""
  return {'TF_CONFIG': json.dumps({'cluster': {'chief': ['127.0.0.1:2222']},
                                   'task': {'type': task_type, 'index': 0}})}


@pytest.mark.parametrize('evaluator_by', ['flag', 'tf_config'])
def test_continuous_eval_beside_training_evaluates_each_checkpoint_once(
    tmp_path, evaluator_by):
  """--mode=continuous_eval, or the same command as the chief's where
  TF_CONFIG names the evaluator task (a TFJob's side-car)."""
  model_dir = tmp_path / 'run'
  common = (SMOKE, '--config.train.steps=40', '--config.train.steps_per_loop=5',
            '--config.checkpoint.every_steps=10',
            '--config.checkpoint.max_to_keep=10', f'--model_dir={model_dir}',
            '--config.eval.timeout_secs=120')
  by_tf_config = evaluator_by == 'tf_config'
  evaluator = runner.start_main(
      *common, *(() if by_tf_config else ('--mode=continuous_eval',)),
      env=tf_config('evaluator') if by_tf_config else None)
  trained = runner.run_main(*common,
                            env=tf_config('chief') if by_tf_config else None)
  assert trained.returncode == 0, trained.stderr[-3000:]
  stdout, stderr = evaluator.communicate(timeout=180)
  assert evaluator.returncode == 0, stderr[-3000:]
  assert ('TF_CONFIG (or CLUSTER_SPEC) names this process the evaluator '
          'task' in stderr) is (
      by_tf_config)
  records = [json.loads(line) for line in
             (model_dir / 'eval' / 'metrics.jsonl').read_text().splitlines()]
  # The trainer's own final eval is one line; the evaluator's are the rest.
  steps = sorted(r['step'] for r in records)
  assert steps == [10, 20, 30, 40, 40]
  assert runner.final_eval(stdout) == runner.final_eval(trained.stdout)

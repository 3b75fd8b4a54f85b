"""The command line: errors before TensorFlow is imported, Trainers from any
module, the resolved config shown and saved whole."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests import runner
from trainer.experiment import cli
from trainer.experiment import config_file
from trainer.errors import UserError
from trainer.experiment import registry

# Runs main.py with ARGS and reports, after it exits, whether TensorFlow was
# imported: the error path must not pay for it.
PROBE = textwrap.dedent('''
    import runpy, sys
    sys.argv = ['main.py'] + sys.argv[1:]
    try:
      runpy.run_path('main.py', run_name='__main__')
    except SystemExit as e:
      print('exit', e.code, 'tensorflow' in sys.modules)
''')


@pytest.mark.parametrize('args, message', [
    (('--config.train.stepz=5',), "config has no key 'train.stepz'"),
    (('--config.data.poison=5',), "config has no key 'data.poison' (no "
     "'poison' under 'data'); valid there: auto_shard, name, pipeline, "
     'service; a key of your own is declared in the config file first: '
     'config.data.poison = DEFAULT in get_config(), then overridden'),
    (('--config.train.clip_norm=-1',), 'train.clip_norm=-1.0 must be >= 0'),
    (('--config.optimizer.learning_rate=-1',),
     'optimizer.learning_rate=-1.0 must be > 0'),
    (('--config.train.steps=abc',), 'error: flag --config.train.steps=abc: '
     'not an int; e.g. --config.train.steps=3000'),
    (('--config.train.jit_compile=maybe',), 'error: flag --config.train.'
     'jit_compile=maybe: not true or false; e.g. --config.train.'
     'jit_compile=false'),
    (('--config=configs/digits_mlp.py:huge',), "config variant 'huge' is "
     'unknown'),
    (('--mode=fit',), "flag --mode='fit' is unknown"),
    (('--strategy=tpu',), 'flag --strategy=tpu needs --tpu='),
    (('--strategy=tpu', '--tpu=grpc://127.0.0.1'), 'flag --tpu=grpc://'
     '127.0.0.1 is not of the form grpc://HOST:PORT'),
    (('--strategy=multi_worker_mirrored', '--worker_hosts=a:1,b:2'),
     '--task_index'),
    (('--profile_steps=5,1',), 'flag --profile_steps='),
    (('--model_dir=README.md/runs/a',), "flag --model_dir='README.md/runs/a' "
     f"is not a writable directory ('{os.path.realpath(runner.REPO)}/"
     "README.md' is a file)"),
    (('--mode=export', '--model_dir=/nonexistent/never-trained'),
     "--mode=export needs a trained run in --model_dir, but "
     "'/nonexistent/never-trained' does not exist"),
    (('--model_dir=gs://bucket/run1',), "flag --model_dir='gs://bucket/run1' "
     'is a URL; distloop writes model_dir through the local file system'),
], ids=['key', 'own_key', 'value', 'learning_rate', 'int', 'bool', 'variant', 'mode', 'tpu', 'tpu_address',
        'worker_hosts',
        'profile', 'model_dir', 'export_without_run', 'model_dir_url'])
def test_a_bad_flag_or_key_exits_2_without_importing_tensorflow(args,
                                                                 message):
  result = subprocess.run([sys.executable, '-c', PROBE, *args],
                          capture_output=True, text=True, cwd=runner.REPO,
                          timeout=60, check=False)
  assert result.stdout.strip() == 'exit 2 False', (result.stdout,
                                                   result.stderr[-2000:])
  (line,) = runner.error_lines(result.stderr)
  assert message in line


@pytest.mark.parametrize('arg, line', [
    ('--deterministic=yes', "error: flag --deterministic=yes: ('Non-boolean "
     "argument to boolean flag', 'yes')"),
    ('--num_cpu_devices=two', 'error: flag --num_cpu_devices=two: invalid '
     "literal for int() with base 10: 'two'"),
    ('--model-dir=x', "error: Unknown command line flag 'model-dir'. Did you "
     'mean: model_dir ?'),
    ('--model_dir', 'error: flag --model_dir: no value given; write it as '
     '--model_dir=VALUE'),
    ('--config.train.steps', 'error: flag --config.train.steps: no value '
     'given; write it as --config.train.steps=VALUE'),
])
def test_a_bad_flag_other_than_config_is_not_blamed_on_config(arg, line):
  result = subprocess.run([sys.executable, '-c', PROBE, arg],
                          capture_output=True, text=True, cwd=runner.REPO,
                          timeout=60, check=False)
  assert result.stdout.strip() == 'exit 2 False', result.stderr[-2000:]
  assert runner.error_lines(result.stderr) == [line]


@pytest.mark.parametrize('task, strategy, mode, refused', [
    ('worker', 'default', 'train', True),
    ('worker', 'mirrored', 'train_and_eval', True),
    ('worker', 'default', 'eval', False),
    ('evaluator', 'default', 'train', False),
])
def test_a_cluster_tf_config_is_refused_to_one_process_training(
    tmp_path, task, strategy, mode, refused):
  """A job's TF_CONFIG with the default --strategy: each task would train
  alone into the one --model_dir (the launcher refuses it too)."""
  tf_config = json.dumps({
      'cluster': {'worker': ['127.0.0.1:1', '127.0.0.1:2']},
      'task': {'type': task, 'index': 1 if task == 'worker' else 0}})
  result = subprocess.run(
      [sys.executable, '-c', PROBE, f'--strategy={strategy}', f'--mode={mode}',
       '--print_config'], capture_output=True, text=True, cwd=runner.REPO,
      timeout=60, check=False, env=dict(os.environ, TF_CONFIG=tf_config))
  if not refused:
    assert result.stdout.strip().endswith('exit None False'), result.stderr
    return
  assert result.stdout.strip() == 'exit 2 False', result.stderr[-2000:]
  assert runner.error_lines(result.stderr) == [
      f'error: TF_CONFIG names a cluster of 2 tasks, but --strategy={strategy} '
      'trains in this process alone: each task would train a model of its '
      'own into one --model_dir; pass --strategy=multi_worker_mirrored (or '
      'parameter_server), or unset TF_CONFIG']


def test_a_missing_config_file_lists_the_shipped_ones_as_paths_that_work(
    tmp_path):
  """From the repository, as configs/NAME.py; from elsewhere, whole (not
  as ../../ paths)."""
  configs = os.path.join(runner.REPO, 'configs')
  for cwd, shown in ((runner.REPO, 'configs'), (tmp_path, configs)):
    result = runner.run_main('--config=missing.py', cwd=str(cwd))
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = runner.error_lines(result.stderr)
    assert line.endswith(f"no such file 'missing.py'; available: "
                         f'{shown}/cifar_resnet20.py, {shown}/digits_mlp.py, '
                         f'{shown}/imagenet_resnet50.py, '
                         f'{shown}/lm_transformer.py'), line


HOLD_LOCK = textwrap.dedent('''
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print('locked', flush=True)
    time.sleep(120)
''')


def test_a_model_dir_in_use_is_refused_before_importing_tensorflow(
    tmp_path):
  """A second training run into a locked model_dir stops at once; other
  workers of a cluster and readers are not refused by it."""
  model_dir = tmp_path / 'run'
  model_dir.mkdir()
  holder = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(model_dir)],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == 'locked\n'
    result = subprocess.run(
        [sys.executable, '-c', PROBE, '--config=configs/digits_mlp.py:smoke',
         f'--model_dir={model_dir}'], capture_output=True, text=True,
        cwd=runner.REPO, timeout=60, check=False)
    assert result.stdout.strip() == 'exit 2 False', result.stderr[-2000:]
    assert runner.error_lines(result.stderr) == [
        f"error: flag --model_dir='{model_dir}' is in use by another "
        f'training run (pid {holder.pid}); wait for it to end or stop it, or '
        'pass another --model_dir']
    cli.check_model_dir(str(model_dir), 'train', chief=False)
    cli.check_model_dir(str(model_dir), 'eval')
  finally:
    holder.kill()
    holder.wait()
  cli.check_model_dir(str(model_dir), 'train')  # Free again.
  assert os.listdir(model_dir) == []


MODULE = '''
import tensorflow as tf
from trainer.trainer import Trainer


class Mean(Trainer):
  """Regresses a constant: the smallest Trainer there is."""

  def build_model(self):
    return tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)],
                               name='mean_model')

  def dataset(self, split, input_context, batch_size):
    data = tf.data.Dataset.from_tensor_slices(
        (tf.ones([64, 2]), 3.0 * tf.ones([64])))
    if split == 'train':
      data = data.repeat()
    return data.batch(batch_size, drop_remainder=split == 'train')

  def compute_loss(self, batch, outputs):
    return tf.square(outputs[:, 0] - batch[1])
'''
CONFIG = '''
def get_config():
  return dict(trainer='my_trainers:Mean',
              train=dict(steps=20, global_batch_size=8, steps_per_loop=10),
              optimizer=dict(learning_rate=0.1))
'''


def test_a_trainer_from_the_working_directory_trains(tmp_path):
  (tmp_path / 'my_trainers.py').write_text(MODULE)
  (tmp_path / 'my_config.py').write_text(CONFIG)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
             PYTHONPATH=runner.REPO)  # distloop itself, as an install would.
  result = subprocess.run(
      [sys.executable, runner.MAIN, '--config=my_config.py',
       '--model_dir=run'], capture_output=True, text=True, cwd=tmp_path,
      timeout=300, env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  final = runner.final_eval(result.stdout)
  assert final['examples'] == 64 and final['loss'] < 9.0  # 9 at the start.
  saved = json.loads((tmp_path / 'run' / 'config.json').read_text())
  # The whole resolved config: keys the file never mentioned included.
  assert saved['checkpoint']['max_to_keep'] == 3
  assert saved['eval']['global_batch_size'] == 8


@pytest.mark.parametrize('name, message', [
    ('no_such_module:Trainer', "no module 'no_such_module' on the path"),
    ('tests.user_trainers:Nope', "module 'tests.user_trainers' has no 'Nope'; "
     'Trainer subclasses there: AggregateRaises'),
    ('tests.user_trainers:sequence_arrays', 'sequence_arrays is not a '
     'subclass of trainer.trainer.Trainer'),
    ('clasifier', "trainer='clasifier' names no registered trainer; valid: "),
    ('/home/me/my_trainers.py:MyTrainer', "trainer='/home/me/my_trainers.py:"
     "MyTrainer' is a file path; name its module as Python imports it: "
     'trainer="my_trainers:MyTrainer" with PYTHONPATH=/home/me'),
])
def test_a_wrong_trainer_is_one_line(name, message):
  with pytest.raises(UserError, match=None) as error:
    registry.get(name)
  assert message in str(error.value)
  assert '\n' not in str(error.value)


BROKEN = {  # A user's file that does not import, and the error's line.
    'syntax': ('class X(:\n  pass\n', 'SyntaxError: invalid syntax', 1),
    'import': ('import os\nimport no_such_package_here\n',
               "ModuleNotFoundError: No module named 'no_such_package_here'", 2),
    'raises': ('def f():\n  return 1 / 0\n\nf()\n',
               'ZeroDivisionError: division by zero', 2),
    # A NameError has a .name too: not 'no module broken' (its own name).
    'name': ('x = broken + 1\n', "NameError: name 'broken' is not defined", 1),
}


@pytest.mark.parametrize('kind', list(BROKEN))
def test_a_trainer_module_that_does_not_import_is_one_line(tmp_path,
                                                           monkeypatch, kind):
  """Named with the error and its line, not a traceback (exit 1)."""
  source, error, line = BROKEN[kind]
  (tmp_path / f'broken_{kind}.py').write_text(source)
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(UserError) as raised:
    registry.get(f'broken_{kind}:MyTrainer')
  assert str(raised.value) == (
      f"config key trainer='broken_{kind}:MyTrainer': module 'broken_{kind}' "
      f"does not import: {error} ({tmp_path / f'broken_{kind}.py'}, line "
      f'{line})')


@pytest.mark.parametrize('kind', list(BROKEN))
def test_a_config_file_that_does_not_load_is_one_line(tmp_path, kind):
  source, error, line = BROKEN[kind]
  path = tmp_path / f'config_{kind}.py'
  path.write_text(source + 'def get_config():\n  return {}\n')
  with pytest.raises(UserError) as raised:
    config_file.load_config(str(path))
  assert str(raised.value) == (
      f'flag --config={path}: the config file does not load: {error} '
      f'({path}, line {line})')


def test_a_placeholder_key_of_a_config_is_overridden(tmp_path):
  """ml_collections' placeholder(int): None by default, an int when given."""
  path = tmp_path / 'placeholder_config.py'
  path.write_text(
      'import ml_collections\n'
      'from configs import digits_mlp\n\n'
      'def get_config():\n'
      "  config = digits_mlp.get_config('smoke')\n"
      '  config.model.width = ml_collections.config_dict.placeholder(int)\n'
      '  return config\n')
  assert config_file.load_config(str(path)).model.width is None
  result = runner.run_main(f'--config={path}', '--config.model.width=24',
                           '--print_config')
  assert result.returncode == 0, result.stderr[-2000:]
  assert '  width: 24\n' in result.stdout


@pytest.mark.parametrize('value, fix', [
    ('None', 'is None in {path}, which no override can set; give it a '
     'default there, or declare it '
     'ml_collections.config_dict.placeholder(TYPE)'),
    ('[64, 32]', 'is a list in {path}, which no override can set; make it a '
     'tuple there, e.g. width=(64, 32)'),
], ids=['none', 'list'])
def test_a_key_no_override_can_set_names_the_key_and_the_fix(tmp_path, value,
                                                              fix):
  path = tmp_path / 'unset_config.py'
  path.write_text(
      'from configs import digits_mlp\n\n'
      'def get_config():\n'
      "  config = digits_mlp.get_config('smoke')\n"
      f'  config.model.width = {value}\n'
      '  return config\n')
  result = runner.run_main(f'--config={path}', '--config.model.width=24',
                           '--print_config')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      'error: flag --config.model.width: config key model.width '
      + fix.format(path=path))


@pytest.mark.parametrize('body, message', [
    # A misspelt section, then a variant setting a key of the real one.
    ("  config.checkpiont = dict(max_to_keep=2)\n"
     '  config.checkpoint.every_steps = 10\n',
     "config has no key 'checkpoint' yet (it has 'checkpiont': a "
     "misspelling?); the framework's defaults are added only after "
     'get_config() returns, so get_config() must create it before using it: '
     'config.checkpoint = dict(...)'),
    ('  config.train.steps_per_loop += 10\n',
     "config has no key 'train.steps_per_loop' yet; the framework's defaults "
     'are added only after get_config() returns, so get_config() must create '
     'it before using it: config.train.steps_per_loop = ...'),
], ids=['misspelt_section', 'framework_default'])
def test_get_config_reading_a_framework_key_it_has_not_set(tmp_path, body,
                                                           message):
  """Not 'add it to the model or data section': the key is the framework's;
  get_config() runs before its defaults are laid over."""
  path = tmp_path / 'early_config.py'
  path.write_text(
      'import ml_collections\n\n'
      'def get_config():\n'
      '  config = ml_collections.ConfigDict()\n'
      "  config.trainer = 'classifier'\n"
      '  config.train = dict(steps=20, global_batch_size=64)\n'
      + body + '  return config\n')
  with pytest.raises(UserError) as error:
    config_file.load_config(str(path))
  assert str(error.value) == (f'flag --config={path}: get_config() raised '
                              f'AttributeError: {message}')

"""Every config file and variant loads; every smoke variant trains."""

import glob
import os

import pytest

from tests import runner
from trainer import schema
from trainer.errors import UserError
from trainer.experiment import config_file
from trainer.experiment import run as experiment

CONFIG_FILES = sorted(glob.glob(os.path.join(runner.REPO, 'configs', '*.py')))


def all_variants():
  """(file, variant) of every config; a file that does not even load is
  collected too (and fails in the test), so it cannot stop collection."""
  for path in CONFIG_FILES:
    try:
      names = config_file.variants(config_file.load_module(path)) or ('',)
    except Exception:  # pylint: disable=broad-except
      names = ('',)
    for variant in names:
      yield os.path.basename(path), variant


def test_there_are_configs():
  assert 'digits_mlp.py' in [os.path.basename(p) for p in CONFIG_FILES]


@pytest.mark.parametrize('name, variant', list(all_variants()))
def test_variant_resolves_against_the_schema(name, variant):
  path = os.path.join(runner.REPO, 'configs', name)
  config = config_file.load_config(f'{path}:{variant}' if variant else path)
  schema.validate(config)
  assert config.trainer and config.train.steps >= 1


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_docstring_states_command_runtime_and_metric(path):
  doc = config_file.load_module(path).__doc__
  for word in ('Command:', 'Runtime:', 'Expected:', 'smoke'):
    assert word in doc, f'{path} docstring lacks {word!r}'


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_smoke_variant_trains(path, tmp_path):
  config = config_file.load_module(path).get_config('smoke')
  metrics = experiment.run(config, model_dir=str(tmp_path),
                           strategy_name='default')
  assert metrics['examples'] > 0
  assert metrics['loss'] > 0
  assert os.path.exists(tmp_path / 'config.json')
  assert any(f.startswith('ckpt-') for f in os.listdir(tmp_path))


def test_unknown_variant_lists_valid_ones():
  path = os.path.join(runner.REPO, 'configs', 'digits_mlp.py')
  with pytest.raises(UserError, match='valid: default, smoke, sgd'):
    config_file.load_config(f'{path}:huge')


def test_a_file_without_variants_refuses_any(tmp_path):
  path = tmp_path / 'mine.py'
  path.write_text('def get_config():\n  return dict(trainer="classifier", '
                  'train=dict(steps=1, global_batch_size=8))\n')
  # The framework's default:
  assert config_file.load_config(str(path)).train.steps_per_loop == 100
  with pytest.raises(UserError, match="variant 'smoke' is unknown in .*none: "
                     'it declares no VARIANTS'):
    config_file.load_config(f'{path}:smoke')


def test_a_typo_in_a_framework_key_of_a_file_is_one_line(tmp_path):
  path = tmp_path / 'typo.py'
  path.write_text('def get_config():\n  return dict(trainer="classifier", '
                  'train=dict(steps=1, global_batch_size=8, clip_nrom=1.0))\n')
  with pytest.raises(UserError, match=r'typo.py: config key train.clip_nrom '
                     r'is not a framework key; did you mean train.clip_norm\?'
                     ) as error:
    config_file.load_config(str(path))
  assert '\n' not in str(error.value)

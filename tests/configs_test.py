"""Every config file and variant loads; every smoke variant trains."""

import glob
import importlib.util
import os

import pytest

from tests import runner
from trainer import experiment

CONFIG_FILES = sorted(glob.glob(os.path.join(runner.REPO, 'configs', '*.py')))


def load_module(path):
  spec = importlib.util.spec_from_file_location(
      os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def all_variants():
  for path in CONFIG_FILES:
    for variant in load_module(path).VARIANTS:
      yield os.path.basename(path), variant


def test_there_are_configs():
  assert 'digits_mlp.py' in [os.path.basename(p) for p in CONFIG_FILES]


@pytest.mark.parametrize('name, variant', list(all_variants()))
def test_variant_loads_with_required_keys(name, variant):
  module = load_module(os.path.join(runner.REPO, 'configs', name))
  config = module.get_config(variant)
  experiment.check_config(config)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_docstring_states_command_runtime_and_metric(path):
  doc = load_module(path).__doc__
  for word in ('Command:', 'Runtime:', 'Expected:', 'smoke'):
    assert word in doc, f'{path} docstring lacks {word!r}'


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_smoke_variant_trains(path, tmp_path):
  config = load_module(path).get_config('smoke')
  metrics = experiment.run(config, model_dir=str(tmp_path),
                           strategy_name='default')
  assert metrics['examples'] > 0
  assert metrics['loss'] > 0
  assert os.path.exists(tmp_path / 'config.json')
  assert any(f.startswith('ckpt-') for f in os.listdir(tmp_path))


def test_unknown_variant_lists_valid_ones():
  module = load_module(os.path.join(runner.REPO, 'configs', 'digits_mlp.py'))
  with pytest.raises(ValueError, match='valid: default, smoke, sgd'):
    module.get_config('huge')

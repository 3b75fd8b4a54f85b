"""The config schema: one place for every framework key, its default and
meaning; partial configs merge over it; every mistake is one line."""

import ml_collections
import pytest

from trainer import schema
from trainer.errors import UserError


def minimal(**sections):
  config = dict(trainer='classifier',
                train=dict(steps=10, global_batch_size=8))
  for name, values in sections.items():
    config.setdefault(name, {}).update(values)
  return config


def test_a_minimal_config_gets_every_framework_key():
  config = schema.resolve(minimal())
  for path in schema._leaf_paths(schema.SCHEMA):  # pylint: disable=protected-access
    section, _, key = path.rpartition('.')
    assert key in (config[section] if section else config), path
  assert config.checkpoint.every_steps == 1000
  assert config.eval.split == 'test'
  # Derived defaults.
  assert config.eval.global_batch_size == 8
  assert config.summary.every_steps == config.train.steps_per_loop == 100
  assert config.data.pipeline == 'per_host' and config.model.to_dict() == {}


def test_partial_sections_merge_over_the_defaults():
  config = schema.resolve(minimal(optimizer=dict(name='sgd', momentum=0.9),
                                  data=dict(name='digits', extra=[1, 2])))
  assert config.optimizer.learning_rate == 1e-3  # Default kept.
  assert config.optimizer.momentum == 0.9
  assert config.data.name == 'digits' and config.data.extra == [1, 2]
  assert config.data.auto_shard == 'data'


def test_resolve_is_idempotent_and_keeps_types():
  once = schema.resolve(minimal(train=dict(clip_norm=1)))
  assert isinstance(once.train.clip_norm, float)
  assert schema.resolve(once).to_dict() == once.to_dict()


def test_any_framework_key_takes_an_override_type_from_the_schema():
  config = schema.merge(minimal())
  config.lock()
  config.log.every_secs = 2  # An int for a float key: cast, as a flag would.
  assert config.log.every_secs == 2.0


@pytest.mark.parametrize('user, message', [
    (minimal(train=dict(stpes_per_loop=5)),
     'config key train.stpes_per_loop is not a framework key; did you mean '
     'train.steps_per_loop?'),
    (minimal(evaluation=dict(split='x')),
     'config key evaluation is not a framework key; valid under the top '
     'level:'),
    (minimal(train=dict(clip_norm=-1.0)), 'train.clip_norm=-1.0 must be >= 0'),
    (minimal(train=dict(precision='fp16')),
     "train.precision='fp16' is unknown; valid: auto, float32"),
    (minimal(train=dict(jit_compile='yes')),
     "train.jit_compile='yes' must be True or False"),
    (minimal(train=dict(ema_decay=1.0)), 'train.ema_decay=1.0 must be in '
     '[0, 1)'),
    (minimal(train=dict(grad_accum_steps=3)), 'train.grad_accum_steps=3 must '
     'divide train.global_batch_size=8'),
    (minimal(eval=dict(split='train')), "eval.split='train' is the endless "
     'training stream'),
    (minimal(optimizer=dict(name='adam', momentum=0.9)),
     'optimizer.momentum/nesterov apply to sgd only'),
    (dict(trainer='x', train=dict(global_batch_size=8)),
     'config key train.steps is required: set it in the config file or with '
     '--config.train.steps=64'),
    (dict(trainer='x', train=5), 'config key train must be a section'),
    (minimal(train=dict(variable_shard_bytes=-1)),
     'train.variable_shard_bytes=-1 must be >= 0'),
    (minimal(train=dict(variable_shard_bytes='4k')),
     "train.variable_shard_bytes='4k' must be an integer"),
    # A tuple key's elements have a type too (a traceback at start-up).
    (minimal(optimizer=dict(weight_decay_exclude=(1, 2))),
     'optimizer.weight_decay_exclude=(1, 2) must be a tuple of strings; e.g. '
     '--config.optimizer.weight_decay_exclude="(\'bias\',\'norm\','),
    (minimal(optimizer=dict(step_boundaries=(10, 20.5))),
     'optimizer.step_boundaries=(10, 20.5) must be a tuple of integers'),
    (minimal(optimizer=dict(step_boundaries=[True])),
     'optimizer.step_boundaries=(True,) must be a tuple of integers'),
    # What --config.KEY=bias,norm gives: one pattern that matches nothing.
    (minimal(optimizer=dict(weight_decay_exclude=('bias,norm',))),
     "optimizer.weight_decay_exclude=('bias,norm',) must be a tuple of "
     "strings ('bias,norm' is one string, not several); e.g."),
], ids=['typo', 'section_typo', 'negative', 'choice', 'bool', 'range',
        'accum', 'eval_train', 'momentum', 'required', 'section',
        'shard_bytes_negative', 'shard_bytes_not_int', 'tuple_of_ints',
        'tuple_of_floats', 'tuple_of_bools', 'tuple_as_one_string'])
def test_mistakes_are_one_line_errors(user, message):
  with pytest.raises(UserError) as error:
    schema.resolve(user, source='configs/mine.py')
  assert message in str(error.value)
  assert '\n' not in str(error.value)


def test_every_key_is_described_with_its_default():
  lines = schema.describe().splitlines()[2:]
  assert len(lines) == len(list(schema._leaf_paths(schema.SCHEMA)))  # pylint: disable=protected-access
  assert '| `train.steps` | required | optimizer updates to train for |' in lines
  assert any(l.startswith('| `checkpoint.max_to_keep` | `3` |') for l in lines)


def test_a_section_resolves_on_its_own():
  optimizer = schema.resolve_section(
      'optimizer', ml_collections.ConfigDict(dict(name='sgd')))
  assert optimizer.learning_rate == 1e-3 and optimizer.momentum == 0.0
  with pytest.raises(UserError, match='optimizer.name=.rmsprop. is unknown'):
    schema.resolve_section('optimizer', dict(name='rmsprop'))

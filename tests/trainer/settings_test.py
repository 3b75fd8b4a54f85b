"""The step's settings from config: XLA, the one-line errors of invalid
settings; the helpers the tests of trainer/parts/ build Trainers with."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from models.classifier import ClassifierTrainer
from trainer.cluster import strategies
from trainer import schema
from trainer.errors import UserError

CPUS = [d.name for d in tf.config.list_logical_devices('CPU')]


def make_config(**train):
  config = ml_collections.ConfigDict()
  config.trainer = 'classifier'
  config.seed = 5
  config.data = dict(name='synthetic', pipeline='per_host', auto_shard='data')
  config.model = dict(input_dim=100, hidden_sizes=(16, 16), num_classes=10)
  config.train = dict(steps=12, global_batch_size=32, steps_per_loop=4,
                      clip_norm=0.0)
  config.train.update(train)
  config.eval = dict(global_batch_size=96)
  config.optimizer = dict(name='sgd', learning_rate=0.1, momentum=0.9,
                          nesterov=False)
  return config


def build(config, replicas=1):
  tf.keras.utils.set_random_seed(config.seed)
  if replicas == 1:
    strategy = tf.distribute.OneDeviceStrategy(CPUS[0])
  else:
    strategy = strategies.mirrored_strategy(CPUS[:replicas])
  return ClassifierTrainer(config=config, strategy=strategy)


def run(trainer, steps=12):
  iterator = iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size))
  results = [trainer.train(iterator, 4) for _ in range(steps // 4)]
  return results


def test_jit_compile_gives_the_same_weights():
  reference = build(make_config())
  initial = reference.model.get_weights()
  run(reference)
  jitted = build(make_config(jit_compile=True), replicas=2)
  jitted.model.set_weights(initial)
  run(jitted)
  for a, b in zip(reference.model.get_weights(), jitted.model.get_weights()):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('key, value, message', [
    ('grad_accum_steps', 32, 'train.grad_accum_steps=32 must divide the per-'
     'replica batch 16'),
    ('grad_accum_steps', 3, 'train.grad_accum_steps=3 must divide '
     'train.global_batch_size=32'),
    ('grad_accum_steps', 0, 'train.grad_accum_steps=0 must be >= 1'),
    ('ema_decay', 1.0, 'train.ema_decay=1.0 must be in [0, 1)'),
    ('precision', 'float16', "train.precision='float16' is unknown"),
    ('jit_compile', 'yes', "train.jit_compile='yes' must be True or False"),
])
def test_invalid_settings_are_one_line_errors(key, value, message):
  with pytest.raises(UserError, match=message.replace('[', r'\[').replace(
      ']', r'\]').replace('(', r'\(').replace(')', r'\)')) as error:
    build(make_config(**{key: value}), replicas=2)
  assert '\n' not in str(error.value)


def test_accumulation_with_an_overridden_train_step_is_refused():
  class Custom(ClassifierTrainer):
    def train_step(self, batch):
      return super().train_step(batch)

  with pytest.raises(UserError, match='Custom overrides train_step'):
    Custom(config=make_config(grad_accum_steps=2),
           strategy=tf.distribute.OneDeviceStrategy(CPUS[0]))


@pytest.mark.parametrize('value, message', [
    (-1, 'must be >= 0'), (2.5, 'must be an integer')])
def test_bad_input_wait_cadence_is_a_one_line_error(value, message):
  config = make_config()
  config.summary = dict(input_wait_every_loops=value)
  with pytest.raises(UserError, match=r'config key summary\.input_wait_every_'
                     rf'loops={value} {message}') as error:
    schema.resolve(config)
  assert '\n' not in str(error.value)

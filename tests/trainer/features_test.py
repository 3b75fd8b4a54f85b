"""Training features from config: gradient accumulation, EMA, mixed precision,
XLA, and the one-line errors of their invalid settings."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from models.classifier import ClassifierTrainer
from trainer import checkpointing
from trainer import strategies
from trainer import trainer as trainer_lib
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


@pytest.mark.parametrize('replicas', [1, 2])
def test_k_micro_batches_of_b_equal_one_batch_of_kb(replicas):
  reference = build(make_config())
  initial = reference.model.get_weights()
  whole = run(reference)
  accumulated = build(make_config(grad_accum_steps=4), replicas)
  accumulated.model.set_weights(initial)
  parts = run(accumulated)
  for a, b in zip(reference.model.get_weights(),
                  accumulated.model.get_weights()):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  moved = [np.abs(a - b).max() for a, b in
           zip(initial, reference.model.get_weights())]
  assert min(moved) > 1e-3  # The comparison is not between unmoved weights.
  # Metrics cover every example of the big batch, in both runs.
  for w, p in zip(whole, parts):
    assert p['examples'] == w['examples'] == 4 * 32
    assert p['loss'] == pytest.approx(w['loss'], rel=1e-5)
    assert p['accuracy'] == pytest.approx(w['accuracy'])
    assert p['grad_norm'] == pytest.approx(w['grad_norm'], rel=1e-5)


def test_ema_is_the_moving_average_used_for_eval_and_checkpointed(tmp_path):
  decay = 0.9
  trainer = build(make_config(ema_decay=decay))
  iterator = iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size))
  # The average by hand, one step at a time, from the initial weights.
  average = trainer.model.get_weights()
  for n in range(6):
    trainer.train(iterator, 1)
    d = min(decay, (1 + n) / (10 + n))
    average = [d * a + (1 - d) * w
               for a, w in zip(average, trainer.model.get_weights())]
  for a, e in zip(average, trainer.ema_weights_list):
    np.testing.assert_allclose(e.numpy(), a, rtol=1e-5, atol=1e-7)
  training_weights = trainer.model.get_weights()
  with trainer.ema_weights():
    for a, w in zip(average, trainer.model.get_weights()):
      np.testing.assert_allclose(w, a, rtol=1e-5, atol=1e-7)
  for a, b in zip(training_weights, trainer.model.get_weights()):
    np.testing.assert_array_equal(a, b)  # Swapped back exactly.
  # evaluate() uses the average: equal to a plain trainer holding it.
  plain = build(make_config())
  plain.model.set_weights(
      [e.numpy() for e in trainer.ema_weights_list] +
      [w.numpy() for w in trainer.model.non_trainable_weights])
  assert trainer.evaluate() == pytest.approx(plain.evaluate())
  assert trainer.evaluate() != pytest.approx(build(make_config()).evaluate())
  # Checkpointed and restored.
  saved = checkpointing.Checkpointer(trainer, str(tmp_path), async_save=False)
  saved.save()
  restored = build(make_config(ema_decay=decay))
  checkpointing.Checkpointer(restored, str(tmp_path)).restore_latest()
  for a, b in zip(trainer.ema_weights_list, restored.ema_weights_list):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_ema_updates_on_the_step_that_carries_a_stop_request():
  """A stop request ends the loop after that step, whose update is applied:
  the average takes it in, as an uninterrupted run's would."""
  stopped, reference = (build(make_config(ema_decay=0.9)) for _ in range(2))
  for trainer in (stopped, reference):
    iterator = iter(trainer.distribute_dataset(
        'train', batch_size=trainer.global_batch_size))
    trainer.train(iterator, 2)
    if trainer is stopped:
      trainer.stop_requested.assign(1.0)
      result = trainer.train(iterator, 4)
      assert result['status'] == trainer_lib.STOP_REQUESTED
      assert result['steps'] == 1
    else:
      trainer.train(iterator, 1)
  for a, b in zip(reference.model.get_weights(), stopped.model.get_weights()):
    np.testing.assert_array_equal(b, a)
  for a, b in zip(reference.ema_weights_list, stopped.ema_weights_list):
    np.testing.assert_array_equal(b.numpy(), a.numpy())


def test_ema_on_two_replicas_matches_one():
  one = build(make_config(ema_decay=0.99))
  initial = one.model.get_weights()
  run(one)
  two = build(make_config(ema_decay=0.99), replicas=2)
  two.model.set_weights(initial)
  for e, w in zip(two.ema_weights_list, initial):
    e.assign(w)
  run(two)
  for a, b in zip(one.ema_weights_list, two.ema_weights_list):
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('precision', ['mixed_float16', 'mixed_bfloat16'])
def test_mixed_precision_trains_close_to_float32(precision):
  reference = build(make_config())
  initial = reference.model.get_weights()
  run(reference)
  trainer = build(make_config(precision=precision))
  assert trainer.model.layers[1].compute_dtype == precision.split('_')[1]
  assert all(v.dtype == tf.float32 for v in trainer.model.trainable_weights)
  trainer.model.set_weights(initial)
  results = run(trainer)
  # The reported loss is the unscaled loss, close to float32's.
  assert results[0]['loss'] == pytest.approx(
      run(build(make_config()))[0]['loss'], rel=0.05)
  assert results[-1]['loss'] < results[0]['loss']
  # The global policy is left as it was for the next model.
  assert tf.keras.mixed_precision.global_policy().name == 'float32'
  if precision == 'mixed_float16':
    assert float(trainer.loss_scale.numpy()) == trainer_lib.INITIAL_LOSS_SCALE


@pytest.mark.parametrize('replicas', [1, 2])
def test_float16_overflow_halves_the_scale_and_skips_the_update(replicas):
  trainer = build(make_config(precision='mixed_float16'), replicas)
  trainer.loss_scale.assign(2.0 ** 40)  # Gradients overflow float16.
  before = trainer.model.get_weights()
  iterator = iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size))
  result = trainer.train(iterator, 1)
  assert result['status'] == trainer_lib.OVERFLOW
  # Overflows are not errors: the loop goes on; each one halved the scale
  # and left the weights alone until the scale fits.
  assert float(trainer.loss_scale.numpy()) == 2.0 ** 39
  for a, b in zip(before, trainer.model.get_weights()):
    np.testing.assert_array_equal(a, b)
  result = trainer.train(iterator, 40)
  assert result['status'] == trainer_lib.OK and result['steps'] == 40
  assert float(trainer.loss_scale.numpy()) < 2.0 ** 39
  assert int(trainer.global_step.numpy()) == 41
  assert np.isfinite(result['loss'])


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
    ('grad_accum_steps', 3, 'train.grad_accum_steps=3 must divide the per-'
     'replica batch 16'),
    ('grad_accum_steps', 0, 'train.grad_accum_steps=0 must be an integer'),
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


@pytest.mark.parametrize('value', [-1, 2.5])
def test_bad_input_wait_cadence_is_a_one_line_error(value):
  from trainer import experiment  # pylint: disable=import-outside-toplevel
  config = make_config()
  config.summary = dict(input_wait_every_loops=value)
  trainer = build(make_config())
  with pytest.raises(UserError, match=r'config key summary\.input_wait_every_'
                     rf'loops={value} must be an integer >= 0') as error:
    experiment.controller_options(config, trainer)
  assert '\n' not in str(error.value)

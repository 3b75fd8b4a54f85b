"""Optimizers and schedules from config: values, weight decay, errors."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from models.classifier import ClassifierTrainer
from tests.trainer.trainer_test import make_config, strategy_for, train
from trainer import optimization
from trainer import schema
from trainer.errors import UserError


def opt_config(**overrides):
  values = dict(name='sgd', learning_rate=0.1, momentum=0.0, nesterov=False)
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def schedule_of(**overrides):
  """A resolved optimizer section: what build_schedule is given."""
  return schema.resolve_section('optimizer', opt_config(**overrides))


def rate(schedule, step):
  return float(schedule(tf.constant(step)))


def test_cosine_with_warmup():
  schedule = optimization.build_schedule(
      schedule_of(schedule='cosine', warmup_steps=10,
                 end_learning_rate_factor=0.1), total_steps=110)
  assert rate(schedule, 0) == 0.0
  assert rate(schedule, 5) == pytest.approx(0.05)
  assert rate(schedule, 10) == pytest.approx(0.1)
  assert rate(schedule, 60) == pytest.approx(0.055)  # Half-way: mid value.
  assert rate(schedule, 110) == pytest.approx(0.01)
  assert rate(schedule, 500) == pytest.approx(0.01)


def test_linear_and_step_decay():
  linear = optimization.build_schedule(schedule_of(schedule='linear'),
                                       total_steps=100)
  assert [rate(linear, s) for s in (0, 50, 100)] == pytest.approx(
      [0.1, 0.05, 0.0])
  step = optimization.build_schedule(
      schedule_of(schedule='step', step_boundaries=(30, 60), step_factor=0.5),
      total_steps=100)
  assert [rate(step, s) for s in (0, 29, 30, 59, 60, 99)] == pytest.approx(
      [0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_constant_without_warmup_is_a_plain_float():
  assert optimization.build_schedule(schedule_of(), total_steps=100) == 0.1


@pytest.mark.parametrize('name', ['sgd', 'adamw', 'lamb'])
def test_decoupled_weight_decay_skips_excluded_variables(name):
  kernel = tf.keras.Variable(np.ones([2, 2], np.float32), name='kernel')
  bias = tf.keras.Variable(np.ones([2], np.float32), name='bias')
  optimizer = optimization.build_optimizer(
      opt_config(name=name, weight_decay=0.5), variables=[kernel, bias])
  optimizer.build([kernel, bias])
  optimizer.apply_gradients([(tf.zeros([2, 2]), kernel),
                             (tf.zeros([2]), bias)])
  # Zero gradients: only the decay moves the kernel, by lr * wd.
  np.testing.assert_allclose(kernel.numpy(), np.full([2, 2], 0.95), rtol=1e-6)
  np.testing.assert_array_equal(bias.numpy(), np.ones([2]))


@pytest.mark.parametrize('name', ['sgd', 'adamw', 'lamb'])
def test_optimizers_match_across_replica_counts(name):
  config = make_config('sgd')
  config.optimizer = dict(name=name, learning_rate=0.01, momentum=0.0,
                          nesterov=False, weight_decay=0.01,
                          schedule='cosine', warmup_steps=5)
  tf.keras.utils.set_random_seed(config.seed)
  initial = ClassifierTrainer(config=config,
                              strategy=strategy_for(1)).model.get_weights()
  one, _ = train(config, 1, initial=initial)
  two, _ = train(config, 2, initial=initial)
  for a, b in zip(one.model.get_weights(), two.model.get_weights()):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  assert not all(np.allclose(a, b) for a, b in
                 zip(initial, one.model.get_weights()))


KERAS_CLASSES = {'adam': tf.keras.optimizers.Adam,
                 'adamw': tf.keras.optimizers.AdamW,
                 'lamb': tf.keras.optimizers.Lamb}


@pytest.mark.parametrize('num_replicas', [1, 2])
@pytest.mark.parametrize('name, extra', [
    ('adam', {}), ('adamw', dict(weight_decay=0.01)), ('lamb', {}),
    ('adam', dict(amsgrad=True))], ids=['adam', 'adamw', 'lamb', 'amsgrad'])
def test_shared_step_scalars_update_bitwise_as_keras(name, extra,
                                                      num_replicas):
  """Our Adam/AdamW/Lamb (step scalars computed once per device) give the
  same bits as Keras' classes over several traced steps, on each replica."""
  strategy = strategy_for(num_replicas)
  rng = np.random.default_rng(0)
  shapes = ([3, 4], [4], [4, 2], [2])
  initial = [rng.normal(size=s).astype(np.float32) for s in shapes]
  # Gradients ~ epsilon, so every term of the update shows in the result.
  grads = [[rng.normal(scale=1e-3, size=s).astype(np.float32) for s in shapes]
           for _ in range(5)]
  kwargs = dict(learning_rate=0.01, beta_1=0.8, beta_2=0.95, epsilon=1e-3,
                **extra)
  results = []
  for cls in (KERAS_CLASSES[name], type(optimization.build_optimizer(
      opt_config(name=name, learning_rate=0.01)))):
    with strategy.scope():
      variables = [tf.Variable(v) for v in initial]
      optimizer = cls(**kwargs)
      optimizer.build(variables)

    @tf.function
    def step(g):
      # As the Trainer applies them: the same (already summed) gradients.
      strategy.run(lambda: optimization.apply_reduced(  # pylint: disable=cell-var-from-loop
          optimizer, zip(g, variables)))  # pylint: disable=cell-var-from-loop

    for g in grads:
      step([tf.constant(x) for x in g])
    results.append([strategy.experimental_local_results(v)[-1].numpy()
                    for v in variables])
  assert type(optimization.build_optimizer(
      opt_config(name=name, learning_rate=0.01))) is not KERAS_CLASSES[name]
  for keras_value, ours in zip(*results):
    np.testing.assert_array_equal(ours, keras_value)
  assert not np.array_equal(results[0][0], initial[0])


@pytest.mark.parametrize('overrides, message', [
    (dict(name='rmsprop'), "optimizer.name='rmsprop' is unknown; valid: sgd, "
     'adam, adamw, lamb'),
    (dict(name='adam', momentum=0.9), 'apply to sgd only'),
    (dict(schedule='exponential'), "optimizer.schedule='exponential' is "
     'unknown'),
    (dict(schedule='cosine', warmup_steps=100), 'warmup_steps=100 leaves no '
     'steps to decay in train.steps=100'),
    (dict(schedule='step'), 'step_boundaries=() must be a non-empty '
     'increasing tuple'),
    (dict(schedule='step', step_boundaries=('abc',)),
     "step_boundaries=('abc',) must be a tuple of integers; e.g. "
     '--config.optimizer.step_boundaries="(1000,2000)"'),
    (dict(weight_decay=-1.0), 'weight_decay=-1.0 must be >= 0'),
    (dict(learning_rate=0.0), 'learning_rate=0.0 must be > 0'),
], ids=['name', 'momentum_adam', 'schedule', 'warmup', 'step', 'step_text',
        'decay', 'lr'])
def test_bad_settings_are_one_line_errors(overrides, message):
  with pytest.raises(UserError, match=None) as raised:
    optimization.build_optimizer(opt_config(**overrides), total_steps=100)
  assert message in str(raised.value)
  assert '\n' not in str(raised.value)

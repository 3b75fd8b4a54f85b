"""Trainer: same weights and metrics on 1, 2 and 4 replicas; contract checks."""

import logging

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from models.classifier import ClassifierTrainer
from trainer import optimization
from trainer import schema
from trainer.cluster import strategies
from trainer.errors import UserError
from trainer.persistence import best as best_lib

CPUS = [d.name for d in tf.config.list_logical_devices('CPU')]
STEPS = 24


def make_config(optimizer='sgd', data='synthetic', pipeline='per_host',
                batch=32, clip_norm=0.0):
  config = ml_collections.ConfigDict()
  config.trainer = 'classifier'
  config.seed = 3
  config.data = dict(name=data, pipeline=pipeline, auto_shard='data')
  input_dim = 64 if data == 'digits' else 100
  config.model = dict(input_dim=input_dim, hidden_sizes=(16, 16),
                      num_classes=10)
  config.train = dict(steps=STEPS, global_batch_size=batch, steps_per_loop=8,
                      clip_norm=clip_norm)
  config.eval = dict(global_batch_size=96)
  if optimizer == 'sgd':
    config.optimizer = dict(name='sgd', learning_rate=0.1, momentum=0.9,
                            nesterov=False)
  else:
    config.optimizer = dict(name='adam', learning_rate=0.01)
  return config


def strategy_for(num_replicas):
  if num_replicas == 1:
    return tf.distribute.OneDeviceStrategy(CPUS[0])
  return strategies.mirrored_strategy(CPUS[:num_replicas])


def train(config, num_replicas, initial=None, trainer_cls=ClassifierTrainer,
          loops=(8, 8, 8)):
  """Returns (trainer, per-loop metrics) after sum(loops) steps."""
  tf.keras.utils.set_random_seed(config.seed)
  trainer = trainer_cls(config=config, strategy=strategy_for(num_replicas))
  if initial is not None:
    trainer.model.set_weights(initial)
  iterator = iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size))
  metrics = [trainer.train(iterator, n) for n in loops]
  return trainer, metrics


@pytest.mark.parametrize('optimizer', ['sgd', 'adam'])
@pytest.mark.parametrize('pipeline', ['per_host', 'global'])
def test_weights_match_across_replica_counts(optimizer, pipeline):
  config = make_config(optimizer, pipeline=pipeline)
  reference, _ = train(config, 1)
  initial_check = reference.model.get_weights()
  assert reference.global_step.numpy() == STEPS
  for n in (2, 4):
    tf.keras.utils.set_random_seed(config.seed)
    fresh = ClassifierTrainer(config=config, strategy=strategy_for(1))
    trainer, _ = train(config, n, initial=fresh.model.get_weights())
    assert trainer.global_step.numpy() == STEPS
    for a, b in zip(initial_check, trainer.model.get_weights()):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_training_moves_the_weights():
  # Guards the equality test above against a step that updates nothing.
  config = make_config('sgd')
  tf.keras.utils.set_random_seed(config.seed)
  before = ClassifierTrainer(config=config,
                             strategy=strategy_for(1)).model.get_weights()
  trainer, metrics = train(config, 2, initial=before)
  changed = [not np.allclose(a, b) for a, b in
             zip(before, trainer.model.get_weights())]
  assert all(changed)
  assert metrics[-1]['loss'] < metrics[0]['loss']


class DoubleSumTrainer(ClassifierTrainer):
  """All-reduces explicitly, then lets Keras' optimizer sum a second time."""

  def apply_gradients(self, grads, variables, *, loss=None, optimizer=None):
    reduced = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, grads)
    self.optimizer.apply_gradients(zip(reduced, variables))


def test_gradients_summed_twice_change_the_weights():
  # The mistake the equality test exists to catch (DESIGN.md fact 1) really
  # changes the result, so the equality above is not vacuous.
  config = make_config('sgd')
  single, _ = train(config, 1, trainer_cls=DoubleSumTrainer)
  tf.keras.utils.set_random_seed(config.seed)
  initial = ClassifierTrainer(config=config,
                              strategy=strategy_for(1)).model.get_weights()
  double, _ = train(config, 2, initial=initial, trainer_cls=DoubleSumTrainer)
  assert not all(np.allclose(a, b, rtol=1e-3) for a, b in
                 zip(single.model.get_weights(), double.model.get_weights()))


@pytest.mark.parametrize('reduced', [True, False])
def test_optimizer_sums_replica_gradients_exactly_once(reduced):
  # Two replicas with different gradients: SGD lr 1 from ones must give
  # ones - (g0 + g1), the sum taken once: by the explicit all-reduce before
  # apply_reduced, or by Keras itself in a plain apply_gradients.
  strategy = strategy_for(2)
  config = ml_collections.ConfigDict(dict(name='sgd', learning_rate=1.0,
                                          momentum=0.0, nesterov=False))
  with strategy.scope():
    var = tf.Variable(tf.ones([4]))
    optimizer = optimization.build_optimizer(config)
    optimizer.build([var])

  @tf.function
  def step():
    def replica_fn():
      ctx = tf.distribute.get_replica_context()
      grad = tf.one_hot(ctx.replica_id_in_sync_group, 4)
      if reduced:
        grad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grad)
        optimization.apply_reduced(optimizer, [(grad, var)])
      else:
        optimizer.apply_gradients([(grad, var)])
    strategy.run(replica_fn)

  step()
  np.testing.assert_array_equal(var.numpy(), [0, 0, 1, 1])


def test_metrics_identical_across_replica_counts():
  config = make_config('adam')
  tf.keras.utils.set_random_seed(config.seed)
  initial = ClassifierTrainer(config=config,
                              strategy=strategy_for(1)).model.get_weights()
  results = {n: train(config, n, initial=initial)[1] for n in (1, 2, 4)}
  for n in (2, 4):
    for loop_1, loop_n in zip(results[1], results[n]):
      assert loop_n['examples'] == loop_1['examples'] == 8 * 32
      for key in ('loss', 'accuracy'):
        assert loop_n[key] == pytest.approx(loop_1[key], rel=1e-5)


def test_eval_counts_each_example_once_on_3_replicas():
  # 360 test images in global batches of 96: the last batch is partial (72)
  # and is split unevenly across 3 replicas.
  config = make_config('sgd', data='digits', batch=96)
  tf.keras.utils.set_random_seed(config.seed)
  one = ClassifierTrainer(config=config, strategy=strategy_for(1))
  three = ClassifierTrainer(config=config,
                            strategy=strategies.mirrored_strategy(CPUS[:3]))
  three.model.set_weights(one.model.get_weights())
  from input import digits  # pylint: disable=import-outside-toplevel
  features, labels = digits.load('test')
  logits = one.model(features, training=False)
  loss = tf.keras.losses.sparse_categorical_crossentropy(
      labels, logits, from_logits=True).numpy().mean()
  accuracy = (np.argmax(logits, -1) == labels).mean()
  for trainer in (one, three):
    metrics = trainer.evaluate('test')
    assert metrics['examples'] == 360
    assert metrics['loss'] == pytest.approx(loss, rel=1e-5)
    assert metrics['accuracy'] == pytest.approx(accuracy, abs=1e-6)


class NonEmptyForward(ClassifierTrainer):
  """Fails on an empty batch, as a conv model does on CPUs whose oneDNN
  conv2d mis-shapes one."""

  def forward(self, batch, training):
    features, _ = batch
    tf.debugging.assert_greater(tf.shape(features)[0], 0,
                                message='forward got an empty batch')
    return super().forward(batch, training)


class OwnEvalStep(NonEmptyForward):

  def eval_step(self, batch):
    return super().eval_step(batch)


def test_eval_skips_an_empty_replica_batch_unless_eval_step_is_overridden():
  # 360 = 3 x 96 + 72: in the last batch replicas 0-2 get 24 examples and
  # replica 3 none.
  config = make_config('sgd', data='digits', batch=96)
  tf.keras.utils.set_random_seed(config.seed)
  one = NonEmptyForward(config=config, strategy=strategy_for(1))
  four = NonEmptyForward(config=config, strategy=strategy_for(4))
  four.model.set_weights(one.model.get_weights())
  expected = one.evaluate('test')
  metrics = four.evaluate('test')
  assert metrics['examples'] == expected['examples'] == 360
  assert metrics['loss'] == pytest.approx(expected['loss'], rel=1e-5)
  assert metrics['accuracy'] == pytest.approx(expected['accuracy'], abs=1e-6)
  # An overridden eval_step may call a collective that every replica must
  # reach: it runs on the empty batch too.
  own = OwnEvalStep(config=config, strategy=strategy_for(4))
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match='forward got an empty batch'):
    own.evaluate('test')


def test_clipping_after_all_reduce_matches_across_replicas():
  config = make_config('sgd', clip_norm=0.05)
  tf.keras.utils.set_random_seed(config.seed)
  initial = ClassifierTrainer(config=config,
                              strategy=strategy_for(1)).model.get_weights()
  one, _ = train(config, 1, initial=initial)
  four, _ = train(config, 4, initial=initial)
  unclipped, _ = train(make_config('sgd'), 1, initial=initial)
  for a, b in zip(one.model.get_weights(), four.model.get_weights()):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  assert not all(np.allclose(a, b) for a, b in
                 zip(one.model.get_weights(), unclipped.model.get_weights()))


class ScalarLossTrainer(ClassifierTrainer):

  def compute_loss(self, batch, outputs):
    return tf.reduce_mean(super().compute_loss(batch, outputs))


def test_scalar_loss_is_rejected():
  with pytest.raises(UserError, match='one value per example'):
    train(make_config(), 1, trainer_cls=ScalarLossTrainer, loops=(1,))


class ArgmaxLossTrainer(ClassifierTrainer):
  """A slip: the error rate as the loss, which has no gradient."""

  def compute_loss(self, batch, outputs):
    _, labels = batch
    wrong = tf.argmax(outputs, -1) != tf.cast(labels, tf.int64)
    return tf.cast(wrong, tf.float32)


class UndeclaredMetricTrainer(ClassifierTrainer):
  metric_names = ()


def test_undeclared_metric_is_rejected():
  with pytest.raises(UserError, match='metric_names'):
    train(make_config(), 1, trainer_cls=UndeclaredMetricTrainer, loops=(1,))


class ReservedMetricTrainer(ClassifierTrainer):
  """A metric named like a result the framework reports itself."""
  metric_names = ('accuracy', 'steps')

  def compute_metrics(self, batch, outputs):
    metrics = super().compute_metrics(batch, outputs)
    return dict(metrics, steps=metrics['accuracy'])


def test_a_metric_named_like_a_framework_result_is_rejected():
  with pytest.raises(UserError, match=r"^ReservedMetricTrainer.metric_names "
                     r"has 'steps', a name the framework reports itself "
                     r'\(reserved: .*\); rename the metric$'):
    ReservedMetricTrainer(config=make_config(), strategy=strategy_for(1))


@pytest.mark.parametrize('metric, mode', [
    ('loss', 'min'), ('abs_error', 'min'), ('val_loss', 'min'),
    ('rating_mae', 'min'), ('mse', 'min'), ('rmse', 'min'),
    ('perplexity', 'min'), ('bits_per_byte', 'min'), ('accuracy', 'max'),
    ('', 'max')])
def test_best_mode_auto_is_min_for_a_loss_or_an_error(metric, mode, caplog):
  names = ('loss', 'accuracy', 'abs_error', 'val_loss', 'rating_mae', 'mse',
           'rmse', 'perplexity', 'bits_per_byte')
  config = schema.resolve(make_config())
  config.eval.best_metric = metric
  with caplog.at_level(logging.INFO, logger='absl'):
    assert best_lib.checked_eval_keys(config.eval, names, 'T') == (metric,
                                                                    mode)
  if metric:  # The mode auto chose is said.
    assert (f"eval.best_mode=auto: the best checkpoint has the "
            f"{'lowest' if mode == 'min' else 'highest'} {metric} "
            f"(best_mode='{mode}'") in caplog.text
  config.eval.best_mode = 'max'
  assert best_lib.checked_eval_keys(config.eval, names, 'T') == (metric, 'max')


def test_an_empty_eval_split_is_refused():
  config = schema.resolve(make_config())
  config.eval.split = ''
  with pytest.raises(UserError, match=r"^config key eval.split='' names no "
                     'split'):
    best_lib.checked_eval_keys(config.eval, ('loss',), 'T')


class LazyModelTrainer(ClassifierTrainer):
  """A subclassed model that is built only on its first call."""

  def build_model(self):
    class Net(tf.keras.Model):

      def __init__(self):
        super().__init__()
        self.dense = tf.keras.layers.Dense(10)

      def call(self, inputs):
        return self.dense(inputs)
    return Net()


def test_a_model_without_weights_yet_is_an_error():
  with pytest.raises(UserError, match=r'^LazyModelTrainer.build_model returned '
                     r'a Net with no weights yet .* call it once, e.g. '
                     r'model\(tf.zeros\(\[1, ...\]\)\), before returning it$'):
    LazyModelTrainer(config=make_config(), strategy=strategy_for(1))


def test_batch_not_divisible_by_replicas_is_an_error():
  with pytest.raises(UserError, match=r'train.global_batch_size=30 must be a '
                     r'positive multiple of the 4 replicas.*=32'):
    ClassifierTrainer(config=make_config(batch=30), strategy=strategy_for(4))


class UnregularizedTrainer(ClassifierTrainer):
  l2 = None

  def build_model(self):
    regularizer = tf.keras.regularizers.L2(self.l2) if self.l2 else None
    return tf.keras.Sequential([
        tf.keras.Input((100,)),
        tf.keras.layers.Dense(16, activation='relu',
                              kernel_regularizer=regularizer),
        tf.keras.layers.Dense(10)])


class RegularizedTrainer(UnregularizedTrainer):
  """An L2 kernel penalty, which reaches the loss through model.losses."""
  l2 = 0.1


def test_regularization_loss_is_scaled_once_across_replicas():
  config = make_config('sgd')
  tf.keras.utils.set_random_seed(config.seed)
  initial = RegularizedTrainer(config=config,
                               strategy=strategy_for(1)).model.get_weights()
  one, _ = train(config, 1, initial=initial, trainer_cls=RegularizedTrainer)
  four, _ = train(config, 4, initial=initial, trainer_cls=RegularizedTrainer)
  for a, b in zip(one.model.get_weights(), four.model.get_weights()):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  # The penalty is really in the update: without it the kernel ends larger.
  free, _ = train(config, 1, initial=initial, trainer_cls=UnregularizedTrainer)
  assert (np.linalg.norm(one.model.get_weights()[0]) <
          np.linalg.norm(free.model.get_weights()[0]))


class RegularizedArgmaxLossTrainer(ArgmaxLossTrainer, RegularizedTrainer):
  """The same slip in a model with an L2 penalty, which has gradients of its
  own."""


@pytest.mark.parametrize('trainer_cls', [ArgmaxLossTrainer,
                                         RegularizedArgmaxLossTrainer])
def test_a_loss_without_gradients_is_rejected(trainer_cls):
  with pytest.raises(UserError, match=f'{trainer_cls.__name__}.compute_loss '
                     'returned a loss that no trainable weight has a gradient '
                     'of, so training would change nothing'):
    train(make_config(), 1, trainer_cls=trainer_cls, loops=(1,))


class ActivityRegularizedTrainer(UnregularizedTrainer):
  """A penalty that exists only once the model has been called: Keras adds
  an activity regularizer's loss during the call. Optionally a weighted
  loss (weights all 1), which takes the penalty's gradients separately."""
  weighted = False

  def build_model(self):
    return tf.keras.Sequential([
        tf.keras.Input((100,)),
        tf.keras.layers.Dense(
            16, activation='relu',
            activity_regularizer=tf.keras.regularizers.L2(0.05)),
        tf.keras.layers.Dense(10)])

  def compute_loss(self, batch, outputs):
    loss = super().compute_loss(batch, outputs)
    return (loss, tf.ones_like(loss)) if self.weighted else loss


class WeightedActivityRegularizedTrainer(ActivityRegularizedTrainer):
  weighted = True


@pytest.mark.parametrize('replicas, accum, trainer_cls', [
    (4, 1, ActivityRegularizedTrainer),
    (1, 2, ActivityRegularizedTrainer),
    (2, 2, WeightedActivityRegularizedTrainer)])
def test_activity_regularizers_reach_every_step(replicas, accum, trainer_cls):
  config = make_config('sgd')
  tf.keras.utils.set_random_seed(config.seed)
  initial = UnregularizedTrainer(config=config,
                                 strategy=strategy_for(1)).model.get_weights()
  one, _ = train(config, 1, initial=initial,
                 trainer_cls=ActivityRegularizedTrainer)
  config.train.grad_accum_steps = accum
  other, _ = train(config, replicas, initial=initial, trainer_cls=trainer_cls)
  for a, b in zip(one.model.get_weights(), other.model.get_weights()):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  # The penalty is in the update: without it the hidden activations end
  # larger.
  free, _ = train(make_config('sgd'), 1, initial=initial,
                  trainer_cls=UnregularizedTrainer)
  features = next(iter(one.dataset('train', tf.distribute.InputContext(),
                                   64)))[0]
  def hidden(trainer):
    return float(tf.norm(trainer.model.layers[0](features)))
  assert hidden(one) < 0.9 * hidden(free)

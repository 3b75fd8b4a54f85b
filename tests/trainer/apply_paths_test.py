"""Every way a user's Trainer applies gradients is exact on 1, 2 and 4 replicas.

The trainers are in tests/user_trainers.py, outside models/, as a user keeps
them: the default step with a weighted (padded) loss, the tutorial pattern
(`self.optimizer.apply_gradients`), and two optimizers (the GAN case) through
Keras' apply_gradients or through `self.apply_gradients(optimizer=...)`.
After training, every mirrored variable's replica copies must be identical.
"""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from tests import user_trainers
from trainer.experiment import check_replicas
from trainer.experiment import run as experiment
from trainer.cluster import strategies
from trainer.errors import UserError

CPUS = [d.name for d in tf.config.list_logical_devices('CPU')]
LOOPS = (4, 4, 4)


def make_config(optimizer='adam', **train):
  config = ml_collections.ConfigDict()
  config.trainer = 'tests.user_trainers:SequenceTrainer'
  config.seed = 1
  config.data = dict()
  config.model = dict()
  config.train = dict(steps=12, global_batch_size=32, steps_per_loop=4)
  config.train.update(train)
  config.eval = dict(global_batch_size=96)
  config.optimizer = dict(name=optimizer, learning_rate=0.05)
  if optimizer == 'sgd':
    config.optimizer.momentum = 0.9
  return config


def strategy_for(replicas):
  if replicas == 1:
    return tf.distribute.OneDeviceStrategy(CPUS[0])
  return strategies.mirrored_strategy(CPUS[:replicas])


def build(cls, config, replicas, initial=None):
  tf.keras.utils.set_random_seed(config.seed)
  trainer = cls(config=config, strategy=strategy_for(replicas))
  if initial is not None:
    trainer.model.set_weights(initial)
  return trainer


def train(trainer, loops=LOOPS):
  iterator = iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size))
  return [trainer.train(iterator, n) for n in loops]


def assert_same_weights(a, b):
  for x, y in zip(a.model.get_weights(), b.model.get_weights()):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('cls', [
    user_trainers.SequenceTrainer, user_trainers.TutorialTrainer,
    user_trainers.WeightedTutorialTrainer, user_trainers.TwoOptimizerTrainer,
    user_trainers.SecondOptimizerApplyTrainer], ids=lambda c: c.__name__)
def test_weights_match_on_1_2_and_4_replicas(cls):
  config = make_config()
  one = build(cls, config, 1)
  initial = one.model.get_weights()
  results_1 = train(one)
  moved = [np.abs(a - b).max() for a, b in
           zip(initial, one.model.get_weights())]
  assert min(moved) > 1e-3  # The comparison is not between unmoved weights.
  for replicas in (2, 4):
    many = build(cls, config, replicas, initial)
    results_n = train(many)
    assert_same_weights(one, many)
    assert check_replicas.diverged_variables(many) == []
    for r1, rn in zip(results_1, results_n):
      assert rn['examples'] == r1['examples'] == 4 * 32
      assert rn['loss'] == pytest.approx(r1['loss'], rel=1e-5)
      assert rn['accuracy'] == pytest.approx(r1['accuracy'], rel=1e-5)


def test_the_weighted_tutorial_step_trains_what_the_default_step_does():
  config = make_config()
  default = build(user_trainers.SequenceTrainer, config, 1)
  tutorial = build(user_trainers.WeightedTutorialTrainer, config, 2,
                   default.model.get_weights())
  train(default)
  train(tutorial)
  assert_same_weights(default, tutorial)


class PerReplicaMeanTutorial(user_trainers.TutorialTrainer):
  """The tutorial pattern with the classic slip: a per-replica mean."""

  def train_step(self, batch):
    with tf.GradientTape() as tape:
      outputs = self.forward(batch, training=True)
      per_example = self.compute_loss(batch, outputs)
      loss = tf.reduce_mean(per_example)
    grads = tape.gradient(loss, self.model.trainable_variables)
    self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
    return {'loss': per_example, **self.compute_metrics(batch, outputs)}


def test_a_per_replica_mean_is_not_exact():
  # Guards the test above: the same comparison catches the common mistake.
  config = make_config('sgd')
  one = build(PerReplicaMeanTutorial, config, 1)
  initial = one.model.get_weights()
  train(one)
  two = build(PerReplicaMeanTutorial, config, 2, initial)
  train(two)
  assert not all(np.allclose(a, b, rtol=1e-3) for a, b in
                 zip(one.model.get_weights(), two.model.get_weights()))


def test_weighted_loss_is_the_mean_over_real_tokens():
  """The reported loss and accuracy are over real tokens: equal to numpy's
  over the whole split, on 1 and 4 replicas, with a partial last batch."""
  config = make_config()
  tokens, labels, mask = user_trainers.sequence_arrays('test', config.seed)
  for replicas in (1, 4):
    trainer = build(user_trainers.SequenceTrainer, config, replicas)
    train(trainer, loops=(4,))
    logits = trainer.model(tokens).numpy().astype(np.float64)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token_loss = -np.take_along_axis(log_p, labels[..., None], -1)[..., 0]
    correct = logits.argmax(-1) == labels
    metrics = trainer.evaluate('test')
    assert metrics['examples'] == user_trainers.NUM_EXAMPLES  # 512 = 5x96+32
    assert metrics['loss'] == pytest.approx(
        (token_loss * mask).sum() / mask.sum(), rel=1e-5)
    assert metrics['accuracy'] == pytest.approx(
        (correct * mask).sum() / mask.sum(), rel=1e-5)


def test_weighted_gradient_is_the_gradient_of_the_token_mean():
  """One SGD step (lr 1) on 2 replicas moves the weights by exactly the
  gradient of mean-over-real-tokens loss of the global batch."""
  config = make_config('sgd', global_batch_size=32)
  config.optimizer = dict(name='sgd', learning_rate=1.0)
  trainer = build(user_trainers.SequenceTrainer, config, 2)
  before = [v.numpy() for v in trainer.model.trainable_variables]
  # The first global batch, as the pipeline gives it to one reader.
  batch = next(iter(trainer.dataset(
      'train', tf.distribute.InputContext(), 32)))
  with tf.GradientTape() as tape:
    logits = trainer.model(batch['tokens'])
    token_loss = tf.keras.losses.sparse_categorical_crossentropy(
        batch['labels'], logits, from_logits=True) * batch['mask']
    loss = tf.reduce_sum(token_loss) / tf.reduce_sum(batch['mask'])
  grads = tape.gradient(loss, trainer.model.trainable_variables)
  train(trainer, loops=(1,))
  for b, g, v in zip(before, grads, trainer.model.trainable_variables):
    np.testing.assert_allclose(v.numpy(), b - g.numpy(), rtol=1e-5, atol=1e-6)


class UnbuiltSecondOptimizer(user_trainers.SequenceTrainer):

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    with self.strategy.scope():
      self.second = tf.keras.optimizers.SGD(0.1)  # Not built.

  def train_step(self, batch):
    grads, loss, values = self.compute_gradients(batch)
    self.apply_gradients(grads, self.model.trainable_variables, loss=loss,
                         optimizer=self.second)
    return values


def test_an_unbuilt_optimizer_is_refused_with_the_fix():
  trainer = build(UnbuiltSecondOptimizer, make_config(), 2)
  with pytest.raises(UserError, match=r'not built; build it in __init__ '
                     r'under self.strategy.scope\(\)'):
    train(trainer, loops=(1,))


class MismatchedGradients(user_trainers.SequenceTrainer):

  def train_step(self, batch):
    grads, loss, values = self.compute_gradients(batch)
    # The hidden layer's gradients for every variable: one list too short.
    self.apply_gradients(grads[:2], self.trainable_variables, loss=loss)
    return values


def test_gradients_and_variables_of_different_lengths_are_refused():
  """zip would silently drop the variables without a gradient."""
  trainer = build(MismatchedGradients, make_config(), 1)
  with pytest.raises(UserError) as e:
    train(trainer, loops=(1,))
  # (AutoGraph's frames above it; main.py prints the last line alone.)
  assert str(e.value).strip().endswith(
      'MismatchedGradients: apply_gradients got 2 gradients for 4 variables; '
      'take the gradients of the list you apply them to '
      '(self.trainable_variables)')


@pytest.mark.parametrize('replicas', [1, 2])
def test_an_embeddings_sparse_gradient_is_clipped_by_its_true_norm(replicas):
  """IndexedSlices from the tape (an Embedding) given to self.apply_gradients
  clip and chart by the norm of the dense gradient, as the default step's:
  the same weights and grad_norm, with clipping that binds."""
  config = make_config(clip_norm=0.05)
  default = build(user_trainers.EmbeddingTrainer, config, 1)
  own = build(user_trainers.EmbeddingOwnStep, config, replicas,
              default.model.get_weights())
  results = train(default), train(own)
  assert_same_weights(default, own)
  for r1, r2 in zip(*results):
    assert r1['grad_norm'] > 0.05  # Clipped.
    assert r2['grad_norm'] == pytest.approx(r1['grad_norm'], rel=1e-5)


def test_the_tutorial_pattern_with_clip_norm_is_refused(tmp_path):
  """self.optimizer.apply_gradients does not clip: with train.clip_norm set,
  the run would train unclipped while config.json says clipped. Refused in
  one line before anything is written."""
  config = make_config(clip_norm=1.0)
  config.trainer = 'tests.user_trainers:TutorialTrainer'
  model_dir = tmp_path / 'run'
  with pytest.raises(UserError, match=(
      r'^TutorialTrainer.train_step bypasses self.apply_gradients, which '
      r'clips the gradients to train.clip_norm=1: call it, or set '
      r'train.clip_norm=0 and clip in your step$')):
    experiment.run(config, model_dir=str(model_dir), strategy_name='default')
  assert not model_dir.exists()

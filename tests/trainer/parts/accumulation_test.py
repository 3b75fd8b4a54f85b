"""Gradient accumulation, including synchronized batch norm under
MirroredStrategy (which all-reduces through merge_call, refused in a while
loop), and XLA with synchronized batch norm."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from tests import user_trainers
from tests.trainer.settings_test import build
from tests.trainer.settings_test import make_config as classifier_config
from tests.trainer.settings_test import run
from trainer.cluster import strategies
from trainer.errors import UserError
from trainer.parts import accumulation

CPUS = [d.name for d in tf.config.list_logical_devices('CPU')]
BATCH, K = 32, 2


def make_config(**train):
  config = ml_collections.ConfigDict()
  config.trainer = 'tests.user_trainers:SyncNormTrainer'
  config.seed = 2
  config.data = dict()
  config.model = dict()
  config.train = dict(steps=8, global_batch_size=BATCH, steps_per_loop=4,
                      grad_accum_steps=K)
  config.train.update(train)
  config.eval = dict(global_batch_size=64)
  config.optimizer = dict(name='sgd', learning_rate=0.1, momentum=0.9)
  return config


class LaidOutLike(user_trainers.SyncNormTrainer):
  """On one replica, reorders each global batch so that micro-batch i holds
  the rows that micro-batch i of `layout` replicas holds together: then
  synchronized batch norm sees the same examples in every micro-batch."""

  layout = 1

  def dataset(self, split, input_context, batch_size):
    dataset = super().dataset(split, input_context, batch_size)
    n, rows = self.layout, BATCH // self.layout // K
    order = [r * BATCH // n + i * rows + j
             for i in range(K) for r in range(n) for j in range(rows)]
    return dataset.map(lambda batch: tf.nest.map_structure(
        lambda x: tf.gather(x, order), batch))


def train(cls, replicas, initial=None, config=None):
  config = config or make_config()
  tf.keras.utils.set_random_seed(config.seed)
  strategy = (tf.distribute.OneDeviceStrategy(CPUS[0]) if replicas == 0 else
              strategies.mirrored_strategy(CPUS[:replicas]))
  trainer = cls(config=config, strategy=strategy)
  if initial is not None:
    trainer.model.set_weights(initial)
  iterator = iter(trainer.distribute_dataset('train', batch_size=BATCH))
  results = [trainer.train(iterator, 4) for _ in range(2)]
  return trainer, results


def initial_weights(cls):
  tf.keras.utils.set_random_seed(2)
  return cls(config=make_config(),
             strategy=tf.distribute.OneDeviceStrategy(CPUS[0])
             ).model.get_weights()


@pytest.mark.parametrize('replicas', [1, 2, 4])
def test_sync_batch_norm_with_accumulation_matches_one_device(replicas):
  """replicas=1: mirrored on one logical CPU (merge_call all the same)."""
  reference_cls = type('Laid', (LaidOutLike,), {'layout': replicas})
  initial = initial_weights(reference_cls)
  one, results_1 = train(reference_cls, 0, initial=initial)
  many, results_n = train(user_trainers.SyncNormTrainer, replicas,
                          initial=initial)
  for name, a, b in zip([w.path for w in one.model.weights],
                        one.model.get_weights(), many.model.get_weights()):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)
  norm = many.model.get_layer('norm')
  for stat in (norm.moving_mean, norm.moving_variance):
    copies = many.strategy.experimental_local_results(stat.value)
    for copy in copies[1:]:
      np.testing.assert_array_equal(copy.numpy(), copies[0].numpy())
  assert not np.allclose(norm.moving_mean.numpy(), 0.0)
  for r1, rn in zip(results_1, results_n):
    assert rn['loss'] == pytest.approx(r1['loss'], rel=1e-5)


def test_micro_batch_composition_matters_with_sync_batch_norm():
  # Guards the test above: laid out for another replica count, one device's
  # micro-batches hold other examples and the weights differ.
  wrong_cls = type('Laid', (LaidOutLike,), {'layout': 1})
  initial = initial_weights(wrong_cls)
  one, _ = train(wrong_cls, 0, initial=initial)
  two, _ = train(user_trainers.SyncNormTrainer, 2, initial=initial)
  assert not all(np.allclose(a, b, rtol=1e-4) for a, b in
                 zip(one.model.get_weights(), two.model.get_weights()))


def test_accumulation_equals_one_batch_without_batch_norm():
  """k micro-batches of B/k are one batch of B (2 replicas, merge_call)."""
  initial = initial_weights(user_trainers.SequenceTrainer)
  whole, _ = train(user_trainers.SequenceTrainer, 2, initial=initial,
                   config=make_config(grad_accum_steps=1))
  parts, _ = train(user_trainers.SequenceTrainer, 2, initial=initial)
  for a, b in zip(whole.model.get_weights(), parts.model.get_weights()):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_unrolled_and_while_loop_accumulation_agree():
  weights = tf.constant([[1.0], [2.0]])

  def fn(batch):
    loss = tf.reduce_sum(tf.matmul(batch, weights) ** 2)
    return {'loss': loss}, {'values': tf.reduce_sum(batch, axis=1)}

  batch = tf.reshape(tf.range(16, dtype=tf.float32), [8, 2])
  whole = fn(batch)
  for unrolled in (True, False):
    summed, values = tf.function(lambda b, u=unrolled: accumulation.accumulate(
        fn, b, 4, unrolled=u))(batch)
    np.testing.assert_allclose(summed['loss'], whole[0]['loss'], rtol=1e-6)
    np.testing.assert_array_equal(values['values'], whole[1]['values'])


def test_xla_with_sync_batch_norm_on_cpu_replicas_is_a_one_line_error():
  config = make_config(jit_compile=True, grad_accum_steps=1)
  with pytest.raises(UserError, match=r"train.jit_compile=True cannot compile "
                     r"synchronized batch norm \(layer 'norm'\) on CPU "
                     r'replicas.*BatchNormalization\(synchronized=False\)'
                     ) as error:
    user_trainers.SyncNormTrainer(
        config=config, strategy=strategies.mirrored_strategy(CPUS[:2]))
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('replicas', [1, 2])
def test_k_micro_batches_of_b_equal_one_batch_of_kb(replicas):
  reference = build(classifier_config())
  initial = reference.model.get_weights()
  whole = run(reference)
  accumulated = build(classifier_config(grad_accum_steps=4), replicas)
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

"""Per-replica random numbers: each replica draws its own dropout masks, a
run is repeatable, and the generators' state is checkpointed."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from models.classifier import ClassifierTrainer
from trainer.experiment import check_replicas
from trainer.persistence import checkpointing
from trainer.cluster import strategies
from trainer.parts import randomness

CPUS = [d.name for d in tf.config.list_logical_devices('CPU')]
WIDTH = 64


def dropout_masks(replicas, per_replica, *, fold):
  """The dropout masks [replicas, per_replica, WIDTH] of one call of a
  Dropout(0.5) layer on ones, with every replica given the same input."""
  randomness.install()
  strategy = strategies.mirrored_strategy(CPUS[:replicas])
  with strategy.scope():
    layer = tf.keras.layers.Dropout(0.5, seed=7)

  @tf.function
  def masks():
    def replica():
      with randomness.per_replica() if fold else _nothing():
        return layer(tf.ones([per_replica, WIDTH]), training=True) > 0
    return strategy.experimental_local_results(strategy.run(replica))
  return np.stack([m.numpy() for m in masks()])


class _nothing:
  def __enter__(self):
    return None

  def __exit__(self, *unused):
    return False


@pytest.mark.parametrize('replicas', [2, 4])
def test_each_replica_draws_its_own_masks(replicas):
  batch = 16
  masks = dropout_masks(replicas, batch // replicas, fold=True)
  rows = masks.reshape(batch, WIDTH)
  assert len({row.tobytes() for row in rows}) == batch  # B distinct masks.
  for r in range(1, replicas):
    assert not np.array_equal(masks[0], masks[r])
  assert 0.35 < masks.mean() < 0.65  # Still dropout at rate 0.5.


def test_without_folding_every_replica_draws_the_same_masks():
  # What Keras 3 does on its own under MirroredStrategy (the reason for
  # parts/randomness.py): the mirrored generator state gives each replica
  # the same seed.
  masks = dropout_masks(2, 8, fold=False)
  np.testing.assert_array_equal(masks[0], masks[1])


def make_config(steps=12, dropout=0.5):
  config = ml_collections.ConfigDict()
  config.trainer = 'classifier'
  config.seed = 4
  config.data = dict(name='synthetic', pipeline='per_host', auto_shard='data')
  config.model = dict(input_dim=100, hidden_sizes=(32,), num_classes=10,
                      dropout=dropout)
  config.train = dict(steps=steps, global_batch_size=32, steps_per_loop=4)
  config.eval = dict(global_batch_size=96)
  config.optimizer = dict(name='adam', learning_rate=0.01)
  return config


def build(replicas, config=None):
  config = config or make_config()
  tf.keras.utils.set_random_seed(config.seed)
  strategy = (tf.distribute.OneDeviceStrategy(CPUS[0]) if replicas == 1 else
              strategies.mirrored_strategy(CPUS[:replicas]))
  return ClassifierTrainer(config=config, strategy=strategy)


def train(trainer, loops, iterator=None):
  iterator = iterator or iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size))
  for n in loops:
    trainer.train(iterator, n)
  return iterator


def test_the_trainer_step_folds_in_each_replica_id():
  seen = []

  class Probe(ClassifierTrainer):
    def train_step(self, batch):
      seen.append(getattr(randomness._replica, 'id', None))  # pylint: disable=protected-access
      return super().train_step(batch)

  config = make_config()
  tf.keras.utils.set_random_seed(config.seed)
  trainer = Probe(config=config,
                  strategy=strategies.mirrored_strategy(CPUS[:2]))
  train(trainer, (2,))
  assert sorted(int(tf.get_static_value(i)) for i in seen) == [0, 1]


@pytest.mark.parametrize('replicas', [1, 2])
def test_same_seed_and_layout_give_bitwise_the_same_run(replicas):
  a, b = build(replicas), build(replicas)
  train(a, (4, 4))
  train(b, (4, 4))
  for x, y in zip(a.model.get_weights(), b.model.get_weights()):
    np.testing.assert_array_equal(x, y)
  # Dropout is on: the run differs from one without it.
  c = build(replicas, make_config(dropout=0.0))
  c.model.set_weights([w for w in build(replicas).model.get_weights()])
  train(c, (4, 4))
  assert not np.allclose(a.model.get_weights()[0], c.model.get_weights()[0])
  assert check_replicas.diverged_variables(a) == []


def test_generator_state_is_checkpointed_for_a_bitwise_resume(tmp_path):
  uninterrupted = build(2)
  train(uninterrupted, (4, 4, 4))
  first = build(2)
  train(first, (4, 4))
  checkpointer = checkpointing.Checkpointer(first, str(tmp_path),
                                            async_save=False)
  checkpointer.save()
  reader = tf.train.load_checkpoint(str(tmp_path / 'ckpt-8'))
  states = [k for k in reader.get_variable_to_shape_map()
            if k.startswith('rng/')]
  assert len(states) == 1  # The one Dropout layer's generator.
  resumed = build(2)
  checkpointing.Checkpointer(resumed, str(tmp_path)).restore_latest()
  iterator = iter(resumed.distribute_dataset(
      'train', batch_size=resumed.global_batch_size,
      skip_batches=int(resumed.data_position.numpy())))
  train(resumed, (4,), iterator)
  for x, y in zip(uninterrupted.model.get_weights(),
                  resumed.model.get_weights()):
    np.testing.assert_array_equal(x, y)


def test_check_replicas_compares_dropout_models_in_inference_mode():
  config = make_config()
  # SGD: Adam divides each gradient by its own running RMS, so a weight
  # whose gradient is ~0 moves by ~lr whatever its rounding, and the
  # summation order of 1 vs 2 replicas (which differs by CPU: oneDNN picks
  # kernels by instruction set) can then exceed the check's 1e-5 tolerance.
  config.optimizer = dict(name='sgd', learning_rate=0.1, momentum=0.9)
  ok, report = check_replicas.compare(ClassifierTrainer, config,
                                      num_replicas=2, steps=8)
  assert ok, report
  assert 'dropout_0' in report[0] and 'inference mode' in report[0]

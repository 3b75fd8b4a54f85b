"""The moving average of the weights: the part alone, and through a Trainer
(eval, checkpoint, stop requests, replicas)."""

import numpy as np
import pytest
import tensorflow as tf

from tests.trainer.settings_test import build, make_config, run
from trainer.cluster import strategies
from trainer.parts import ema as ema_lib
from trainer.parts import status as status_lib
from trainer.persistence import checkpointing

CPUS = [d.name for d in tf.config.list_logical_devices('CPU')]


def test_the_part_alone_averages_each_replica_copy_and_swaps_exactly():
  strategy = strategies.mirrored_strategy(CPUS[:2])
  with strategy.scope():
    weight = tf.Variable([1.0, 2.0])
    average = ema_lib.WeightAverage(0.5, [weight], strategy)

  @tf.function
  def update(applied, n):
    average.update(applied, n)

  weight.assign([3.0, 6.0])
  update(tf.constant(True), tf.constant(100))    # d = min(0.5, ...) = 0.5
  update(tf.constant(False), tf.constant(101))   # skipped: d = 1
  for copy in strategy.experimental_local_results(average.averages[0]):
    np.testing.assert_allclose(copy.numpy(), [2.0, 4.0])
  with average.swapped_in():
    np.testing.assert_allclose(weight.numpy(), [2.0, 4.0])
  np.testing.assert_array_equal(weight.numpy(), [3.0, 6.0])


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
  for a, e in zip(average, trainer.ema.averages):
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
      [e.numpy() for e in trainer.ema.averages] +
      [w.numpy() for w in trainer.model.non_trainable_weights])
  assert trainer.evaluate() == pytest.approx(plain.evaluate())
  assert trainer.evaluate() != pytest.approx(build(make_config()).evaluate())
  # Checkpointed and restored.
  saved = checkpointing.Checkpointer(trainer, str(tmp_path), async_save=False)
  saved.save()
  restored = build(make_config(ema_decay=decay))
  checkpointing.Checkpointer(restored, str(tmp_path)).restore_latest()
  for a, b in zip(trainer.ema.averages, restored.ema.averages):
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
      assert result['status'] == status_lib.STOP_REQUESTED
      assert result['steps'] == 1
    else:
      trainer.train(iterator, 1)
  for a, b in zip(reference.model.get_weights(), stopped.model.get_weights()):
    np.testing.assert_array_equal(b, a)
  for a, b in zip(reference.ema.averages, stopped.ema.averages):
    np.testing.assert_array_equal(b.numpy(), a.numpy())


def test_ema_on_two_replicas_matches_one():
  one = build(make_config(ema_decay=0.99))
  initial = one.model.get_weights()
  run(one)
  two = build(make_config(ema_decay=0.99), replicas=2)
  two.model.set_weights(initial)
  for e, w in zip(two.ema.averages, initial):
    e.assign(w)
  run(two)
  for a, b in zip(one.ema.averages, two.ema.averages):
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)

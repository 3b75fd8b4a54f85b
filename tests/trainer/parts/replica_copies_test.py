"""Per-replica batch norm (Keras' default, synchronized=False) on 2 replicas:
an evaluation sees the model a checkpoint keeps, and evaluating changes
nothing about training (trainer/parts/replica_copies.py).

Each replica's copy of the moving statistics follows its own slice of the
batch, so the copies drift apart; a checkpoint keeps replica 0's.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tests import runner
from tests import user_trainers
from tests.trainer import apply_paths_test as paths


def moving_stat_copies(trainer):
  """[replica copies of every moving statistic], as numpy arrays."""
  return [[c.numpy() for c in
           trainer.strategy.experimental_local_results(v.value)]
          for v in trainer.model.non_trainable_variables
          if '/moving_' in v.path]


class RenormTrainer(user_trainers.UnsyncedNormTrainer):
  """Batch renormalization, whose renorm_mean/renorm_stddev are read in
  training: they stay per replica."""

  def build_model(self):
    model = super().build_model()
    norm = model.get_layer('norm')
    return tf.keras.Sequential([
        tf.keras.Input((user_trainers.SEQ_LEN, user_trainers.FEATURES)),
        model.get_layer('hidden'),
        tf.keras.layers.BatchNormalization(
            momentum=norm.momentum, renorm=True, name='norm'),
        tf.keras.layers.ReLU(), model.get_layer('logits')])


@pytest.mark.parametrize('cls', [user_trainers.UnsyncedNormTrainer,
                                 RenormTrainer], ids=lambda c: c.__name__)
def test_evaluate_gives_every_replica_the_first_copy_and_keeps_training(cls):
  config = paths.make_config()
  plain = paths.build(cls, config, 2)
  evaluated = paths.build(cls, config, 2, initial=plain.model.get_weights())
  paths.train(plain, (4, 4))
  iterator = iter(evaluated.distribute_dataset(
      'train', batch_size=evaluated.global_batch_size))
  evaluated.train(iterator, 4)
  drifted = moving_stat_copies(evaluated)
  assert all(not np.array_equal(a, b) for a, b in drifted)  # The case.
  evaluated.evaluate('test')
  for (first, _), after in zip(drifted, moving_stat_copies(evaluated)):
    assert all(np.array_equal(first, copy) for copy in after)
  evaluated.train(iterator, 4)
  # The weights and replica 0's statistics, what a checkpoint keeps, are
  # those of the run that did not evaluate, bit for bit.
  for a, b in zip(plain.model.get_weights(), evaluated.model.get_weights()):
    np.testing.assert_array_equal(a, b)


def test_the_run_evaluates_the_model_its_checkpoint_keeps(tmp_path):
  model_dir = str(tmp_path / 'run')
  config = '--config=tests/user_config.py:unsynced_norm'
  trained = runner.run_main(config, '--strategy=mirrored',
                            '--num_cpu_devices=2', f'--model_dir={model_dir}')
  assert trained.returncode == 0, trained.stderr[-3000:]
  # The checkpoint evaluated again, on one device.
  again = runner.run_main(config, '--mode=eval', f'--model_dir={model_dir}')
  assert again.returncode == 0, again.stderr[-3000:]
  assert runner.final_eval(trained.stdout) == runner.final_eval(again.stdout)
  with open(os.path.join(model_dir, 'eval', 'metrics.jsonl')) as f:
    in_run, re_eval = [json.loads(line) for line in f]
  assert in_run['step'] == re_eval['step'] == 16
  for key in ('loss', 'accuracy'):
    np.testing.assert_allclose(in_run[key], re_eval[key], rtol=1e-6)

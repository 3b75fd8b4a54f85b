"""A checkpoint written by an earlier version of distloop still restores.

tests/data/checkpoint_v1 was written by the version before the Trainer was
cut into step, loops and parts (`python main.py
--config=configs/digits_mlp.py:smoke --config.train.ema_decay=0.9`, 20 steps).
"""

import json
import os
import shutil

import ml_collections
import numpy as np
import tensorflow as tf

from models.classifier import ClassifierTrainer
from trainer.persistence import checkpointing
from trainer.persistence import run_record

V1 = os.path.join(os.path.dirname(__file__), '..', '..', 'data',
                  'checkpoint_v1')


def v1_config():
  with open(os.path.join(V1, 'config.json')) as f:
    return ml_collections.ConfigDict(json.load(f))


def test_v1_checkpoint_restores_and_training_continues(tmp_path):
  model_dir = tmp_path / 'run'
  shutil.copytree(V1, model_dir)
  config = v1_config()
  trainer = ClassifierTrainer(config=config,
                              strategy=tf.distribute.get_strategy())
  # The run record of the old run accepts this trainer: the resume goes on.
  run_record.check_or_write(
      str(model_dir), run_record.build(config, trainer), write=False)
  path = checkpointing.Checkpointer(trainer, str(model_dir)).restore_latest()
  assert path.endswith('ckpt-20')
  assert int(trainer.global_step.numpy()) == 20
  assert int(trainer.data_position.numpy()) == 20
  assert int(trainer.optimizer.iterations.numpy()) == 20
  reader = tf.train.load_checkpoint(path)
  for i, weight in enumerate(trainer.model.get_weights()):
    np.testing.assert_array_equal(weight, reader.get_tensor(
        f'optimizer/_trainable_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE'))
  for i, average in enumerate(trainer.ema.averages):
    np.testing.assert_array_equal(average.numpy(), reader.get_tensor(
        f'ema/{i}/.ATTRIBUTES/VARIABLE_VALUE'))
  before = trainer.evaluate('test')
  iterator = iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size, skip_batches=20))
  result = trainer.train(iterator, 10)
  assert result['steps'] == 10 and int(trainer.global_step.numpy()) == 30
  assert result['loss'] < 2.3  # Continues from trained weights (ln 10 = 2.3).
  assert trainer.evaluate('test')['loss'] < before['loss']

"""Image classifier trainer: learns real (generated) images, runs in main.py."""

import os

import numpy as np
import pytest
import tensorflow as tf

from configs import cifar_resnet20
from input import make_tfrecords
from input import shapes
from models import image_classifier
from tests import runner
from trainer.errors import UserError


@pytest.fixture(scope='module')
def records(tmp_path_factory):
  """Shapes at 24x24: 640 train images in 4 shards, 160 eval images."""
  root = tmp_path_factory.mktemp('shapes')
  shapes.write(str(root / 'images'), per_class=200, size=24)
  make_tfrecords.convert(str(root / 'images'), str(root / 'records'),
                         num_shards=4, eval_fraction=0.2)
  return root / 'records'


def _config(records, variant='shapes'):
  config = cifar_resnet20.get_config(variant)
  config.data.train_pattern = str(records / 'train-*')
  config.data.eval_pattern = str(records / 'eval-*')
  return config


def test_resnet20_learns_shapes(records):
  config = _config(records)
  config.data.image_size = 24
  config.model.base_filters = 8
  config.train.steps = 600
  config.train.global_batch_size = 32
  config.optimizer.warmup_steps = 60
  # Adam: out of SGD's early plateau at chance sooner, so a short run learns.
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 2e-3
  config.optimizer.momentum = 0.0
  trainer = image_classifier.ImageClassifierTrainer(
      config=config, strategy=tf.distribute.get_strategy())
  iterator = iter(trainer.distribute_dataset('train', batch_size=32))
  losses = [trainer.train(iterator, 150)['loss'] for _ in range(4)]
  metrics = trainer.evaluate('eval')
  assert metrics['examples'] == 160
  assert losses[-1] < 0.85 * losses[0], (losses, metrics)
  # Chance is 0.25; by chance 0.4 of 160 is 4 standard deviations away.
  # Typical: 0.6-0.8 (the 1,500-step shapes variant reaches 0.99).
  assert metrics['accuracy'] > 0.4, (metrics, losses)


def test_logits_are_float32_under_mixed_bfloat16(records):
  config = _config(records, 'smoke')
  config.train.precision = 'mixed_bfloat16'
  trainer = image_classifier.ImageClassifierTrainer(
      config=config, strategy=tf.distribute.get_strategy())
  assert tf.keras.mixed_precision.global_policy().name == 'float32'
  assert trainer.model.get_layer('stem_conv').compute_dtype == 'bfloat16'
  batch = next(iter(trainer.distribute_dataset('train', batch_size=8)))
  logits = trainer.forward(batch, training=True)
  assert logits.dtype == tf.float32 and logits.shape == (8, 10)
  assert trainer.compute_loss(batch, logits).dtype == tf.float32
  metrics = trainer.train(iter(trainer.distribute_dataset(
      'train', batch_size=8)), 2)
  assert np.isfinite(metrics['loss']) and 'top5_accuracy' in metrics


def test_unknown_model_or_data_name_is_a_user_error(records):
  for key, value in (('model', 'resnet21'), ('data', 'imagenet')):
    config = _config(records, 'smoke')
    config[key].name = value
    with pytest.raises(UserError, match=f'{key}.name=.{value}.*valid'):
      image_classifier.ImageClassifierTrainer(
          config=config, strategy=tf.distribute.get_strategy())


def test_main_trains_on_tfrecords_with_two_replicas(records, tmp_path):
  result = runner.run_main(
      '--config=configs/cifar_resnet20.py:smoke', '--strategy=mirrored',
      '--num_cpu_devices=2', f'--model_dir={tmp_path / "run"}',
      '--config.data.name=tfrecord',
      f'--config.data.train_pattern={records / "train-*"}',
      f'--config.data.eval_pattern={records / "eval-*"}',
      '--config.model.num_classes=4')
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = runner.final_eval(result.stdout)
  assert metrics['examples'] == 160  # the whole eval split, once
  assert set(metrics) == {'accuracy', 'examples', 'loss'}  # no top-5 of 4
  assert tf.train.latest_checkpoint(str(tmp_path / 'run'))
  # After each eval, a grid of eval images with their labels (Images tab).
  ((step, value),) = runner.summary_values(str(tmp_path / 'run' / 'eval'))[
      'eval/examples']
  assert step == 4
  images = tf.make_ndarray(value.tensor)  # [width, height, PNG x N]
  assert len(images) == 2 + image_classifier.EXAMPLE_IMAGES
  assert tf.io.decode_png(images[2]).shape == (16, 16, 3)
  description = value.metadata.summary_description
  assert description.count('predicted') == image_classifier.EXAMPLE_IMAGES


def test_main_without_tfrecords_exits_2_and_writes_nothing(tmp_path):
  model_dir = tmp_path / 'run'
  result = runner.run_main('--config=configs/cifar_resnet20.py',
                           f'--model_dir={model_dir}')
  assert result.returncode == 2, result.stderr[-3000:]
  errors = runner.error_lines(result.stderr)
  assert len(errors) == 1, result.stderr[-3000:]
  assert 'config key data.train_pattern is empty' in errors[0]
  assert 'make_tfrecords' in errors[0]
  assert not os.path.exists(model_dir)

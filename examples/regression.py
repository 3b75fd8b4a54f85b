"""A Trainer of your own, outside models/: the worked example of
docs/writing-a-trainer.md, printed there in full (a test runs it as printed).

  python main.py --config=examples/regression_config.py

Learns y = sin(3 x0) + x1^2 / 2 from four features (two of them noise), on
data generated in memory. It shows dict batches, a per-example loss, a
metric, and a serving function with a named input.
"""

import numpy as np
import tensorflow as tf

from input import pipeline
from trainer.trainer import Trainer

FEATURES = 4


def make_data(split: str, seed: int, size: int = 2048) -> dict:
  """{'features': float32 [N, 4], 'target': float32 [N]} for a split."""
  rng = np.random.RandomState(seed if split == 'train' else seed + 1)
  x = rng.uniform(-1, 1, size=(size, FEATURES)).astype(np.float32)
  y = np.sin(3 * x[:, 0]) + 0.5 * x[:, 1] ** 2
  return {'features': x, 'target': y.astype(np.float32)}


class RegressionTrainer(Trainer):
  """Squared error of a small MLP; reports the absolute error."""

  metric_names = ('abs_error',)

  def build_model(self):  # Once, eagerly, under strategy.scope().
    width = self.config.model.width
    return tf.keras.Sequential([
        tf.keras.Input((FEATURES,)),
        tf.keras.layers.Dense(width, activation='gelu'),
        tf.keras.layers.Dense(width, activation='gelu'),
        tf.keras.layers.Dense(1)], name='regressor')

  def dataset(self, split, input_context, batch_size):  # Eagerly, per pipeline.
    if split not in ('train', 'test'):
      raise ValueError(f'no split {split!r}: train or test')
    data = make_data(split, self.config.seed)
    return pipeline.finish(  # Shards, shuffles, repeats and batches 'train'.
        tf.data.Dataset.from_tensor_slices(data), input_context=input_context,
        batch_size=batch_size, training=split == 'train',
        seed=self.config.seed, num_examples=len(data['target']))

  def forward(self, batch, training):  # Replica context, traced.
    return self.model(batch['features'], training=training)[:, 0]

  def compute_loss(self, batch, outputs):  # One loss per example: [B].
    return tf.square(outputs - batch['target'])

  def compute_metrics(self, batch, outputs):  # {name: [B]}
    return {'abs_error': tf.abs(outputs - batch['target'])}

  def serving_input_signature(self):  # The exported function's inputs.
    return [tf.TensorSpec([None, FEATURES], tf.float32, name='features')]

  def serve(self, features):  # Traced once, at export.
    return {'prediction': self.model(features, training=False)[:, 0]}

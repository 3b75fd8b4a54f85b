"""The README's "Writing a Trainer for a new model" example runs as printed."""

import os
import re

import ml_collections
import numpy as np
import tensorflow as tf

from trainer import registry

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'README.md')


def example_source() -> str:
  text = open(README, encoding='utf-8').read()
  section = text.split('### Writing a Trainer for a new model', 1)[1]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def my_examples(split):
  """What the example's `my_examples` stands for: (features, label) pairs."""
  rng = np.random.RandomState(0 if split == 'train' else 1)
  features = rng.normal(size=(256, 64)).astype(np.float32)
  labels = (features[:, 0] > 0).astype(np.int32)
  return tf.data.Dataset.from_tensor_slices((features, labels))


def test_readme_trainer_example_trains_and_evaluates():
  namespace = {'my_examples': my_examples}
  exec(compile(example_source(), README, 'exec'), namespace)  # pylint: disable=exec-used
  trainer_cls = registry.get('my_classifier')
  config = ml_collections.ConfigDict(dict(
      trainer='my_classifier', seed=0, data=dict(),
      train=dict(steps=120, global_batch_size=32, steps_per_loop=20),
      eval=dict(global_batch_size=64),
      optimizer=dict(name='adam', learning_rate=0.05)))
  trainer = trainer_cls(config=config, strategy=tf.distribute.get_strategy())
  iterator = iter(trainer.distribute_dataset('train', batch_size=32))
  first = trainer.train(iterator, 20)
  for _ in range(5):
    last = trainer.train(iterator, 20)
  assert last['loss'] < first['loss']
  metrics = trainer.evaluate('test')
  assert metrics['examples'] == 256
  assert metrics['accuracy'] > 0.8

"""UCI handwritten digits (8x8), shipped in input/data/digits.csv.gz.

1,797 images, 10 classes. The train/test split is fixed: a permutation drawn
once with numpy's legacy RandomState(0) (its stream is frozen across numpy
versions), the first 1,437 images for training and the last 360 for test.
"""

import functools
import gzip
import os

import numpy as np
import tensorflow as tf

from input import pipeline

PATH = os.path.join(os.path.dirname(__file__), 'data', 'digits.csv.gz')
NUM_CLASSES = 10
NUM_FEATURES = 64
NUM_TEST = 360
SPLITS = ('train', 'test')


@functools.lru_cache(maxsize=None)
def load(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (features float32 [N, 64] scaled to [0, 1], labels int32 [N])."""
  if split not in SPLITS:
    raise ValueError(f'digits split {split!r} unknown; valid: {SPLITS}')
  with gzip.open(PATH, 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.float32)
  order = np.random.RandomState(0).permutation(len(table))
  rows = order[:-NUM_TEST] if split == 'train' else order[-NUM_TEST:]
  features = table[rows, :NUM_FEATURES] / 16.0
  labels = table[rows, NUM_FEATURES].astype(np.int32)
  return features, labels


def dataset(split, *, input_context, batch_size, training, seed):
  """Batched (features, labels) for one input pipeline; see pipeline.finish."""
  features, labels = load(split)
  examples = tf.data.Dataset.from_tensor_slices((features, labels))
  return pipeline.finish(
      examples, input_context=input_context, batch_size=batch_size,
      training=training, seed=seed, num_examples=len(labels))

"""Synthetic classification data for benchmarks and tests.

A fixed random linear teacher labels Gaussian features, so the data is
learnable (loss goes down) and identical for a given seed. The examples are
materialised once in memory, so the pipeline costs the same as real in-memory
data and benchmarks measure the training step, not a generator.
"""

import numpy as np
import tensorflow as tf

from input import pipeline


def arrays(num_examples: int, num_features: int, num_classes: int, seed: int,
           teacher_seed: int | None = None):
  """Returns (features float32 [N, F], labels int32 [N]).

  The features come from `seed`, the labelling rule from `teacher_seed`
  (default: `seed`); splits of one dataset share the rule.
  """
  rng = np.random.RandomState(seed)
  features = rng.normal(size=(num_examples, num_features)).astype(np.float32)
  teacher = rng.normal(size=(num_features, num_classes)).astype(np.float32)
  if teacher_seed is not None:
    teacher = np.random.RandomState(teacher_seed).normal(
        size=(num_features, num_classes)).astype(np.float32)
  labels = np.argmax(features @ teacher, axis=1).astype(np.int32)
  return features, labels


def dataset(split, *, input_context, batch_size, training, seed,
            num_examples=4096, num_features=100, num_classes=10):
  """Batched (features, labels): 'train' and 'test' draw different features
  (seeds `seed`, `seed + 1`) labelled by the same teacher, so test accuracy
  measures generalisation."""
  split_seed = seed if split == 'train' else seed + 1
  features, labels = arrays(num_examples, num_features, num_classes,
                            split_seed, teacher_seed=seed)
  examples = tf.data.Dataset.from_tensor_slices((features, labels))
  return pipeline.finish(
      examples, input_context=input_context, batch_size=batch_size,
      training=training, seed=seed, num_examples=num_examples)

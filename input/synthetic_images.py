"""Synthetic images for benchmarks and smoke runs of the image trainers.

A pool of `num_examples` images is drawn once, in-graph, from stateless
random ops seeded by (seed, index), and cached: the training step, not a
generator, is what a benchmark then measures, and the data is identical for
a given seed on any machine. The label sets each image's mean brightness
(plus noise), so a network can learn it and a smoke run's loss can go down.
The pool is kept as uint8 and normalised per batch, like decoded JPEGs.
"""

import tensorflow as tf

from input import imagenet
from input import pipeline


def dataset(split, *, input_context, batch_size, training, seed, image_size,
            num_classes, num_examples=256):
  """Batched (images float32 [B, S, S, 3], labels int32 [B]); see finish.

  'train' and the eval split use different seeds (seed, seed + 1).
  """
  split_seed = seed if split == 'train' else seed + 1

  def example(index):
    key = tf.stack([tf.constant(split_seed, tf.int64), index])
    label = tf.random.stateless_uniform([], key, minval=0, maxval=num_classes,
                                        dtype=tf.int32)
    noise = tf.random.stateless_normal(
        [image_size, image_size, 3],
        tf.random.experimental.stateless_fold_in(key, 1), stddev=40.0)
    level = 255.0 * (tf.cast(label, tf.float32) + 0.5) / num_classes
    image = tf.cast(tf.clip_by_value(tf.round(level + noise), 0, 255),
                    tf.uint8)
    return image, label

  examples = tf.data.Dataset.range(num_examples).map(example).cache()
  ds = pipeline.finish(
      examples, input_context=input_context, batch_size=batch_size,
      training=training, seed=seed, num_examples=num_examples)
  return ds.map(lambda images, labels: (imagenet.normalize(images), labels),
                num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

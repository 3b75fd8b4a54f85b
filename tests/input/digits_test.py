"""Shipped digits data: fixed split, per-pipeline sharding, eval reads all once."""

import numpy as np
import tensorflow as tf

from input import digits


def test_split_sizes_are_fixed_and_disjoint():
  train_x, train_y = digits.load('train')
  test_x, test_y = digits.load('test')
  assert train_x.shape == (1437, 64) and test_x.shape == (360, 64)
  assert set(np.unique(train_y)) == set(range(10)) == set(np.unique(test_y))
  assert 0.0 <= train_x.min() and train_x.max() <= 1.0
  train_rows = {row.tobytes() for row in train_x}
  overlap = sum(row.tobytes() in train_rows for row in test_x)
  assert overlap < 5  # a few digit bitmaps occur twice in the UCI set itself


def test_training_order_is_a_function_of_the_seed():
  def first_labels(seed):
    ds = digits.dataset('train', input_context=tf.distribute.InputContext(),
                        batch_size=32, training=True, seed=seed)
    return np.concatenate([y.numpy() for _, y in ds.take(50)])
  assert np.array_equal(first_labels(1), first_labels(1))
  assert not np.array_equal(first_labels(1), first_labels(2))


def test_pipelines_shard_eval_data_disjointly_and_completely():
  seen = []
  for pipeline_id in range(3):
    context = tf.distribute.InputContext(num_input_pipelines=3,
                                         input_pipeline_id=pipeline_id)
    ds = digits.dataset('test', input_context=context, batch_size=50,
                        training=False, seed=0)
    seen.append(np.concatenate([x.numpy() for x, _ in ds]))
  assert sum(len(s) for s in seen) == 360
  rows = np.concatenate(seen)
  expected, _ = digits.load('test')
  assert sorted(r.tobytes() for r in rows) == sorted(
      r.tobytes() for r in expected)


def test_eval_keeps_partial_last_batch_and_train_drops_it():
  context = tf.distribute.InputContext()
  sizes = [int(x.shape[0]) for x, _ in digits.dataset(
      'test', input_context=context, batch_size=100, training=False, seed=0)]
  assert sizes == [100, 100, 100, 60]
  train = digits.dataset('train', input_context=context, batch_size=100,
                         training=True, seed=0)
  assert train.element_spec[0].shape.as_list() == [100, 64]

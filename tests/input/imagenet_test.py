"""ImageNet-format reader: values, sharding, eval completeness, determinism."""

import numpy as np
import pytest
import tensorflow as tf

from input import imagenet
from input import make_tfrecords
from input import shapes
from trainer.errors import UserError

SIZE = 24  # the generated images' size: eval with crop_padding=0 is exact


@pytest.fixture(scope='module')
def records(tmp_path_factory):
  """24 train images in 3 shards, 8 eval images in 3 shards (3, 3, 2)."""
  root = tmp_path_factory.mktemp('imagenet')
  shapes.write(str(root / 'images'), per_class=8, size=SIZE)
  make_tfrecords.convert(str(root / 'images'), str(root / 'records'),
                         num_shards=3, eval_fraction=0.25)
  return root / 'records'


def _dataset(records, split, *, pipelines=1, pipeline_id=0, replicas=None,
             batch_size=3, seed=0, **kwargs):
  context = tf.distribute.InputContext(
      num_input_pipelines=pipelines, input_pipeline_id=pipeline_id,
      num_replicas_in_sync=replicas or pipelines)
  return imagenet.dataset(
      split, input_context=context, batch_size=batch_size,
      training=split == 'train', seed=seed,
      file_pattern=str(records / f'{split}-*'), image_size=SIZE, **kwargs)


def _raw(records, split):
  """(images uint8, labels) of every record, in file order, undecoded."""
  images, labels = [], []
  for path in sorted(tf.io.gfile.glob(str(records / f'{split}-*'))):
    for record in tf.data.TFRecordDataset(path):
      example = tf.io.parse_single_example(record, imagenet.FEATURES)
      images.append(tf.io.decode_jpeg(example['image/encoded']).numpy())
      labels.append(int(example['image/class/label']))
  return np.stack(images), np.array(labels)


def test_eval_values_shapes_and_normalisation(records):
  batches = list(_dataset(records, 'eval', crop_padding=0))
  assert [int(x.shape[0]) for x, _ in batches] == [3, 3, 2]
  images = np.concatenate([x.numpy() for x, _ in batches])
  labels = np.concatenate([y.numpy() for _, y in batches])
  assert batches[0][0].dtype == tf.float32 and batches[0][1].dtype == tf.int32
  raw_images, raw_labels = _raw(records, 'eval')
  # In file order, with the stored labels, normalised by ImageNet mean/std.
  np.testing.assert_array_equal(labels, raw_labels)
  expected = (raw_images - imagenet.MEAN_RGB) / imagenet.STDDEV_RGB
  np.testing.assert_allclose(images, expected, atol=1e-4)


def test_eval_center_crop_keeps_the_central_fraction(records):
  # 24 / (24 + 8) of the 24-pixel side: the central 18x18, resized to 24.
  image = next(iter(_dataset(records, 'eval', crop_padding=8)))[0][0]
  raw = _raw(records, 'eval')[0][0]
  expected = tf.image.resize(raw[3:21, 3:21], [SIZE, SIZE])
  np.testing.assert_allclose(
      image, (expected - imagenet.MEAN_RGB) / imagenet.STDDEV_RGB, atol=1e-3)


@pytest.mark.parametrize('policy', ['file', 'data'])
@pytest.mark.parametrize('pipelines', [1, 2])
def test_eval_reads_every_example_once_with_partial_batches(
    records, policy, pipelines):
  seen = []
  for pipeline_id in range(pipelines):
    ds = _dataset(records, 'eval', pipelines=pipelines,
                  pipeline_id=pipeline_id, shard_policy=policy)
    seen += [x.numpy() for x, _ in ds]
  images = np.concatenate(seen)
  reference = np.concatenate([x.numpy() for x, _ in _dataset(records, 'eval')])
  assert len(images) == 8
  assert sorted(i.tobytes() for i in images) == sorted(
      i.tobytes() for i in reference)


def test_sharding_policy_choice_and_error():
  assert imagenet.choose_sharding('auto', num_files=3, num_pipelines=2) == 'file'
  assert imagenet.choose_sharding('auto', num_files=1, num_pipelines=2) == 'data'
  assert imagenet.choose_sharding('data', num_files=8, num_pipelines=2) == 'data'
  with pytest.raises(UserError) as error:
    imagenet.choose_sharding('file', num_files=3, num_pipelines=4,
                             key='data.train_pattern')
  message = str(error.value)
  assert '\n' not in message
  for part in ("data.shard_policy='file'", '3 file(s)', '4 input pipelines',
               '--num_shards', '--config.data.shard_policy=data'):
    assert part in message
  with pytest.raises(UserError, match='valid: auto, file, data'):
    imagenet.choose_sharding('files', num_files=3, num_pipelines=1)


def test_file_policy_with_fewer_files_than_pipelines_fails_in_dataset(records):
  with pytest.raises(UserError, match='3 file'):
    _dataset(records, 'train', pipelines=4, shard_policy='file')


@pytest.mark.parametrize('pattern, says', [('', 'is empty'),
                                           ('/nonexistent/train-*', 'matches no')])
def test_missing_files_are_a_one_line_error_naming_the_key(pattern, says):
  with pytest.raises(UserError) as error:
    imagenet.dataset('train', input_context=tf.distribute.InputContext(),
                     batch_size=2, training=True, seed=0, file_pattern=pattern,
                     image_size=SIZE)
  assert 'data.train_pattern' in str(error.value)
  assert says in str(error.value) and 'make_tfrecords' in str(error.value)
  assert '\n' not in str(error.value)


def _take(ds, n):
  return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


@pytest.mark.parametrize('augment', ['random_resized_crop', 'pad_and_crop'])
def test_training_is_a_function_of_the_seed_and_skip_k_continues(
    records, augment):
  # 24 examples, batch 4: an epoch is 6 batches; 8 cross the reshuffle.
  first = _take(_dataset(records, 'train', batch_size=4, seed=1,
                         augment=augment), 8)
  again = _take(_dataset(records, 'train', batch_size=4, seed=1,
                         augment=augment), 8)
  for (x1, y1), (x2, y2) in zip(first, again):
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
  resumed = _take(_dataset(records, 'train', batch_size=4, seed=1,
                           augment=augment).skip(5), 3)
  for (x1, y1), (x2, y2) in zip(first[5:], resumed):
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
  other = _take(_dataset(records, 'train', batch_size=4, seed=2,
                         augment=augment), 1)
  assert not np.array_equal(first[0][0], other[0][0])
  assert first[0][0].shape == (4, SIZE, SIZE, 3)
  assert first[0][1].dtype == np.int32


def test_data_sharding_gives_the_same_global_batches_for_any_pipeline_count(
    records):
  single = _take(_dataset(records, 'train', batch_size=4, seed=3,
                          shard_policy='data'), 7)
  datasets = [_dataset(records, 'train', batch_size=2, seed=3,
                       shard_policy='data', pipelines=2, pipeline_id=p)
              for p in range(2)]
  # Known to be endless after the sharding filter: a multi-worker strategy
  # then needs no extra all-reduce per step to agree on "has data".
  assert all(d.cardinality() == tf.data.INFINITE_CARDINALITY
             for d in datasets)
  halves = [_take(d, 7) for d in datasets]
  for k, (x, y) in enumerate(single):
    np.testing.assert_array_equal(
        x, np.concatenate([halves[0][k][0], halves[1][k][0]]))
    np.testing.assert_array_equal(
        y, np.concatenate([halves[0][k][1], halves[1][k][1]]))


def test_file_sharding_gives_each_pipeline_its_own_files(records):
  files = sorted(tf.io.gfile.glob(str(records / 'train-*')))

  def normalised(paths):
    images = []
    for path in paths:
      for record in tf.data.TFRecordDataset(path):
        jpeg = tf.io.parse_single_example(record, imagenet.FEATURES)
        images.append(imagenet.normalize(
            tf.io.decode_jpeg(jpeg['image/encoded'])).numpy())
    return {np.round(i, 3).tobytes() for i in images}

  for p, own in ((0, files[0::2]), (1, files[1::2])):
    # augment='none' and crop_padding=0: the training view is the image.
    batches = _take(_dataset(records, 'train', batch_size=4, pipelines=2,
                             pipeline_id=p, shard_policy='file',
                             augment='none', crop_padding=0), 6)
    seen = {np.round(x, 3).tobytes() for b, _ in batches for x in b}
    assert seen <= normalised(own)
    assert len(seen) == (16 if p == 0 else 8)  # 6 batches of 4 >= the files


def test_label_offset_is_subtracted_and_out_of_range_labels_fail(records):
  _, raw_labels = _raw(records, 'eval')
  ds = _dataset(records, 'eval', batch_size=8, label_offset=-1)
  np.testing.assert_array_equal(next(iter(ds))[1], raw_labels + 1)
  ds = _dataset(records, 'eval', batch_size=8, label_offset=1, num_classes=4)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match='data.label_offset=1'):
    next(iter(ds))


def test_check_raises_the_dataset_errors_up_front(records):
  train, evals = str(records / 'train-*'), str(records / 'eval-*')
  imagenet.check({'data.train_pattern': train, 'data.eval_pattern': evals},
                 shard_policy='file', augment='none', num_pipelines=3)
  with pytest.raises(UserError, match='data.eval_pattern matches 3 file'):
    imagenet.check({'data.eval_pattern': evals}, shard_policy='file',
                   augment='none', num_pipelines=4)
  with pytest.raises(UserError, match="data.augment='crop' is unknown"):
    imagenet.check({}, shard_policy='auto', augment='crop', num_pipelines=1)

"""make_tfrecords: a folder round trip (JPEG kept, PNG re-encoded), errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from input import imagenet
from input import make_tfrecords
from input import shapes
from tests import runner
from trainer.errors import UserError


@pytest.fixture
def folder(tmp_path):
  """circle/ and square/ with 5 JPEGs each; square/ also holds a PNG and a
  text file (ignored)."""
  root = tmp_path / 'images'
  for name in ('circle', 'square'):
    (root / name).mkdir(parents=True)
    for i in range(5):
      jpeg = tf.io.encode_jpeg(
          shapes.draw(name, 20, np.random.default_rng(i)), quality=90)
      (root / name / f'{i}.jpg').write_bytes(jpeg.numpy())
  y, x = np.mgrid[0:12, 0:16]
  png = np.stack([y * 20, x * 15, 255 - y * 10 - x * 5], -1).astype(np.uint8)
  (root / 'square' / 'extra.PNG').write_bytes(tf.io.encode_png(png).numpy())
  (root / 'square' / 'notes.txt').write_text('not an image')
  return root


def _examples(pattern):
  out = []
  for path in sorted(tf.io.gfile.glob(pattern)):
    for record in tf.data.TFRecordDataset(path):
      out.append(tf.train.Example.FromString(record.numpy()).features.feature)
  return out


def test_round_trip_labels_shards_and_png_reencoding(folder, tmp_path):
  output = tmp_path / 'records'
  counts = make_tfrecords.convert(str(folder), str(output), num_shards=3,
                                  eval_fraction=0.2, seed=0)
  assert counts == {'train': 9, 'eval': 2}  # one eval image per class
  assert sorted(os.listdir(output)) == [
      'eval-00000-of-00002', 'eval-00001-of-00002', 'labels.txt',
      'train-00000-of-00003', 'train-00001-of-00003', 'train-00002-of-00003']
  assert (output / 'labels.txt').read_text() == 'circle\nsquare\n'
  examples = _examples(str(output / '*-of-*'))
  assert len(examples) == 11
  by_file = {}
  for f in examples:
    label = f['image/class/label'].int64_list.value[0]
    text = f['image/class/text'].bytes_list.value[0].decode()
    assert ['circle', 'square'][label] == text
    by_file[(text, f['image/filename'].bytes_list.value[0].decode())] = f
  assert len(by_file) == 11
  # A JPEG is stored byte for byte; the PNG as a JPEG of the same pixels.
  kept = by_file[('circle', '0.jpg')]['image/encoded'].bytes_list.value[0]
  assert kept == (folder / 'circle' / '0.jpg').read_bytes()
  png = by_file[('square', 'extra.PNG')]
  encoded = png['image/encoded'].bytes_list.value[0]
  assert encoded[:3] == b'\xff\xd8\xff'
  assert (png['image/height'].int64_list.value[0],
          png['image/width'].int64_list.value[0]) == (12, 16)
  original = tf.io.decode_png((folder / 'square' / 'extra.PNG').read_bytes())
  decoded = tf.io.decode_jpeg(encoded)
  assert decoded.shape == (12, 16, 3)
  assert np.mean(np.abs(decoded.numpy().astype(float) - original.numpy())) < 3
  # And the reader takes what the converter wrote.
  batch = next(iter(imagenet.dataset(
      'eval', input_context=tf.distribute.InputContext(), batch_size=8,
      training=False, seed=0, file_pattern=str(output / 'eval-*'),
      image_size=16, num_classes=2)))
  assert batch[0].shape == (2, 16, 16, 3) and sorted(batch[1]) == [0, 1]


def test_no_eval_split_by_default_and_shards_capped_by_images(folder, tmp_path):
  counts = make_tfrecords.convert(str(folder), str(tmp_path / 'r'),
                                  num_shards=20)
  assert counts == {'train': 11, 'eval': 0}
  assert len(tf.io.gfile.glob(str(tmp_path / 'r' / 'train-*-of-00011'))) == 11
  assert not tf.io.gfile.glob(str(tmp_path / 'r' / 'eval-*'))


def test_separate_train_and_eval_folders_share_one_output(folder, tmp_path):
  output = str(tmp_path / 'r')
  assert make_tfrecords.convert(str(folder), output, num_shards=2,
                                split_name='train') == {'train': 11}
  assert make_tfrecords.convert(str(folder), output, num_shards=1,
                                split_name='eval') == {'eval': 11}
  assert len(tf.io.gfile.glob(output + '/*-of-*')) == 3
  (folder / 'triangle').mkdir()
  (folder / 'triangle' / 'a.jpg').write_bytes(
      (folder / 'circle' / '0.jpg').read_bytes())
  (tmp_path / 'r' / 'eval-00000-of-00001').unlink()
  with pytest.raises(UserError, match='labels of the two splits would not'):
    make_tfrecords.convert(str(folder), output, split_name='eval')
  with pytest.raises(UserError, match='--eval_fraction=0.1 splits one folder'):
    make_tfrecords.convert(str(folder), output, eval_fraction=0.1,
                           split_name='eval')


def test_bad_inputs_are_user_errors_and_write_no_shard(folder, tmp_path):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'textonly' / 'a').mkdir(parents=True)
  (tmp_path / 'textonly' / 'a' / 'x.txt').write_text('x')
  cases = [
      (tmp_path / 'missing', 'is not a directory'),
      (tmp_path / 'empty', 'has no class folders'),
      (tmp_path / 'textonly', 'hold no images'),
  ]
  for images, says in cases:
    with pytest.raises(UserError, match=says):
      make_tfrecords.convert(str(images), str(tmp_path / 'out'))
  (folder / 'circle' / 'broken.jpg').write_bytes(b'\xff\xd8\xff not a jpeg')
  with pytest.raises(UserError, match="broken.jpg' does not decode"):
    make_tfrecords.convert(str(folder), str(tmp_path / 'out'))
  assert not [f for f in os.listdir(tmp_path / 'out')]  # no shard, no .tmp
  with pytest.raises(UserError, match='--eval_fraction=1.0'):
    make_tfrecords.convert(str(folder), str(tmp_path / 'o2'), eval_fraction=1.0)


def test_command_exits_2_with_one_line(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  for args, says in (([f'--output={tmp_path}'], 'flag --images is required'),
                     ([f'--images={tmp_path / "nope"}', f'--output={tmp_path}'],
                      'is not a directory')):
    result = subprocess.run(
        [sys.executable, '-m', 'input.make_tfrecords', *args],
        capture_output=True, text=True, cwd=runner.REPO, env=env, check=False)
    assert result.returncode == 2, result.stderr
    errors = runner.error_lines(result.stderr)
    assert len(errors) == 1 and says in errors[0], result.stderr
  assert not os.listdir(tmp_path)


def test_shapes_are_a_function_of_the_seed(tmp_path):
  shapes.write(str(tmp_path / 'a'), per_class=2, size=16, seed=5)
  shapes.write(str(tmp_path / 'b'), per_class=2, size=16, seed=5)
  for name in shapes.CLASSES:
    files = sorted(os.listdir(tmp_path / 'a' / name))
    assert files == ['00000.jpg', '00001.jpg']
    for f in files:
      assert ((tmp_path / 'a' / name / f).read_bytes() ==
              (tmp_path / 'b' / name / f).read_bytes())
  assert list(shapes.CLASSES) == sorted(shapes.CLASSES)  # label = index

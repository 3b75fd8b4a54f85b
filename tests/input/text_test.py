"""Byte-level text: windows, held-out split, eval coverage, exact resume."""

import time

import numpy as np
import pytest
import tensorflow as tf

from input import text
from trainer.errors import UserError

SEQ_LEN = 8


def _corpus(tmp_path, count=12, size=300):
  """`count` files of distinct known bytes; a Source over them, 50 % held out.

  Returns:
    (source, {relative path: content}).
  """
  rng = np.random.RandomState(0)
  contents = {}
  for i in range(count):
    content = bytes(rng.randint(32, 127, size=size + 37 * i).astype(np.uint8))
    (tmp_path / f'doc{i}.txt').write_bytes(content)
    contents[f'doc{i}.txt'] = content
  source = text.Source(files=str(tmp_path / '*.txt'), eval_percent=50)
  splits = {text.split_of(name, 50) for name in contents}
  assert splits == {'train', 'test'}  # Both splits have files.
  return source, contents


def _context(pipelines=1, pipeline_id=0, replicas=None):
  return tf.distribute.InputContext(
      num_input_pipelines=pipelines, input_pipeline_id=pipeline_id,
      num_replicas_in_sync=replicas or pipelines)


def _batches(ds, count=None):
  ds = ds.take(count) if count else ds
  return [(x.numpy(), y.numpy()) for x, y in ds]


def test_windows_start_every_seq_len_bytes_and_share_one():
  stream = np.frombuffer(b'abcdefghijk', np.uint8)
  got = [bytes(w) for w in text.windows(stream, 3)]
  # 'k' is a tail shorter than a window: dropped.
  assert got == [b'abcd', b'defg', b'ghij']
  assert text.windows(stream[:3], 3).shape == (0, 4)
  inputs, targets = text.split_window(tf.constant(text.windows(stream, 3)))
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  assert bytes(inputs.numpy()[0].astype(np.uint8)) == b'abc'
  assert bytes(targets.numpy()[0].astype(np.uint8)) == b'bcd'


def test_stream_is_files_in_hash_order_each_ending_in_the_separator(
    tmp_path):
  source, contents = _corpus(tmp_path)
  for split in text.SPLITS:
    names = [rel for rel, _ in text.split_files(source, split)]
    expected = b''.join(contents[n] + b'\0' for n in names)
    assert bytes(text.load_stream(source, split)) == expected
  capped = text.Source(files=source.files, eval_percent=50, max_bytes=500)
  first = text.split_files(capped, 'train')[0][0]
  assert bytes(text.load_stream(capped, 'train')) == (
      contents[first] + b'\0' + contents[
          text.split_files(capped, 'train')[1][0]])[:500]


def test_training_batches_are_shifted_windows_of_the_train_files(tmp_path):
  source, _ = _corpus(tmp_path)
  ds = text.dataset('train', source=source, seq_len=SEQ_LEN,
                    input_context=_context(), batch_size=4, seed=0)
  assert ds.element_spec[0].shape.as_list() == [4, SEQ_LEN]
  assert ds.element_spec[0].dtype == tf.int32
  expected = {bytes(w) for w in
              text.windows(text.load_stream(source, 'train'), SEQ_LEN)}
  for inputs, targets in _batches(ds, 20):
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    for x, y in zip(inputs, targets):
      assert bytes(np.append(x, y[-1]).astype(np.uint8)) in expected


def test_stdlib_split_is_disjoint_deterministic_and_fast():
  text.load_stream.cache_clear()
  start = time.perf_counter()
  source = text.Source()
  streams = [text.load_stream(source, split) for split in text.SPLITS]
  assert time.perf_counter() - start < 2.0
  assert len(streams[0]) == source.max_bytes
  assert len(streams[1]) == source.max_eval_bytes
  files = text.stdlib_files()
  train, held_out = (set(text.split_files(source, s)) for s in text.SPLITS)
  assert not train & held_out and train | held_out == set(files)
  assert 0.02 < len(held_out) / len(files) < 0.1
  paths = [rel for rel, _ in files]
  assert paths == sorted(paths) and len(paths) > 300
  assert not [p for p in paths if 'site-packages' in p or '/test/' in p
              or p.startswith(('test/', 'encodings/'))]
  text.load_stream.cache_clear()
  again = [text.load_stream(source, split) for split in text.SPLITS]
  for first, second in zip(streams, again):
    np.testing.assert_array_equal(first, second)
  # Held-out bytes come from held-out files.
  first_rel, first_path = text.split_files(source, 'test')[0]
  assert text.split_of(first_rel, 5) == 'test'
  with open(first_path, 'rb') as f:
    head = f.read(100)
  assert bytes(streams[1][:len(head)]) == head


@pytest.mark.parametrize('pipelines', [1, 2])
def test_eval_reads_every_window_once_keeping_the_partial_batch(
    tmp_path, pipelines):
  source, _ = _corpus(tmp_path)
  expected = text.windows(text.load_stream(source, 'test'), SEQ_LEN)
  batch = 16
  assert len(expected) % (batch * pipelines)  # A partial last batch exists.
  seen, sizes = [], []
  for pipeline_id in range(pipelines):
    ds = text.dataset('test', source=source, seq_len=SEQ_LEN,
                      input_context=_context(pipelines, pipeline_id),
                      batch_size=batch, seed=0)
    for inputs, targets in _batches(ds):
      sizes.append(len(inputs))
      seen += [np.append(x, y[-1]) for x, y in zip(inputs, targets)]
  assert len(seen) == len(expected)
  assert sorted(bytes(w.astype(np.uint8)) for w in seen) == sorted(
      bytes(w) for w in expected)
  assert min(sizes) < batch


def test_skipping_k_batches_continues_exactly_across_epochs(tmp_path):
  source, _ = _corpus(tmp_path)
  num_windows = len(text.windows(text.load_stream(source, 'train'), SEQ_LEN))
  k = num_windows // 4 + 3  # Past the end of the first epoch.

  def fresh():
    return text.dataset('train', source=source, seq_len=SEQ_LEN,
                        input_context=_context(), batch_size=4, seed=7)
  straight = _batches(fresh(), k + 5)[k:]
  resumed = _batches(fresh().skip(k), 5)
  for (x1, y1), (x2, y2) in zip(straight, resumed, strict=True):
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)


def test_two_pipelines_make_the_same_global_batches_as_one(tmp_path):
  source, _ = _corpus(tmp_path)

  def batches(pipelines, pipeline_id):
    return _batches(text.dataset(
        'train', source=source, seq_len=SEQ_LEN,
        input_context=_context(pipelines, pipeline_id), batch_size=4 //
        pipelines, seed=3), 6)
  one = batches(1, 0)
  halves = zip(batches(2, 0), batches(2, 1))
  for (x, _), ((x0, _), (x1, _)) in zip(one, halves):
    np.testing.assert_array_equal(x, np.concatenate([x0, x1]))


def test_data_files_matching_nothing_is_a_one_line_error(tmp_path):
  pattern = str(tmp_path / 'none' / '*.txt')
  with pytest.raises(UserError) as e:
    text.load_stream(text.Source(files=pattern), 'train')
  message = str(e.value)
  assert '\n' not in message
  assert f'data.files={pattern!r}' in message and 'matches no file' in message


def test_bad_data_keys_are_named():
  with pytest.raises(UserError, match='data.eval_percent=0'):
    text.Source.from_config({'eval_percent': 0})
  with pytest.raises(UserError, match='data.max_bytes=-1'):
    text.Source.from_config({'max_bytes': -1})
  assert text.Source.from_config({}) == text.Source()


def test_text_shorter_than_one_window_names_seq_len(tmp_path):
  source, _ = _corpus(tmp_path)
  short = text.Source(files=source.files, eval_percent=50, max_eval_bytes=5)
  with pytest.raises(UserError, match='model.seq_len=8 needs windows of 9 '
                     "bytes but the 'test' text has 5"):
    text.dataset('test', source=short, seq_len=SEQ_LEN,
                 input_context=_context(), batch_size=4, seed=0)

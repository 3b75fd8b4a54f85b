"""Resume on another topology: a run checkpointed on one replica layout
continues on another with the same example stream and ends within float
summation tolerance of the uninterrupted run."""

import json

import numpy as np
import pytest
import tensorflow as tf

from models.classifier import ClassifierTrainer
from tests.trainer.trainer_test import make_config, strategy_for
from trainer.errors import UserError
from trainer.persistence import checkpointing
from trainer.persistence import run_record


def train(trainer, steps, position=0):
  iterator = iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size, skip_batches=position))
  for _ in range(steps // 4):
    trainer.train(iterator, 4)


@pytest.mark.parametrize('pipeline', ['per_host', 'global'])
@pytest.mark.parametrize('before, after', [(1, 4), (4, 1), (2, 3)])
def test_a_resumed_run_on_another_layout_continues_the_stream(
    tmp_path, pipeline, before, after):
  config = make_config('adam', pipeline=pipeline, batch=48)
  tf.keras.utils.set_random_seed(config.seed)
  reference = ClassifierTrainer(config=config, strategy=strategy_for(1))
  initial = reference.model.get_weights()
  train(reference, 16)
  first = ClassifierTrainer(config=config, strategy=strategy_for(before))
  first.model.set_weights(initial)
  train(first, 8)
  checkpointing.Checkpointer(first, str(tmp_path), async_save=False).save()
  resumed = ClassifierTrainer(config=config, strategy=strategy_for(after))
  checkpointing.Checkpointer(resumed, str(tmp_path)).restore_latest()
  assert int(resumed.data_position.numpy()) == 8
  train(resumed, 8, position=8)
  for a, b in zip(reference.model.get_weights(), resumed.model.get_weights()):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  assert not np.allclose(initial[0], resumed.model.get_weights()[0])


def write_layout(tmp_path, **layout):
  (tmp_path / 'run.json').write_text(json.dumps({'layout': dict(
      {'replicas': 4, 'workers': 1, 'pipeline': 'per_host'}, **layout)}))


def test_a_layout_that_cannot_keep_the_stream_is_one_line(tmp_path):
  write_layout(tmp_path)
  new = {'replicas': 3, 'workers': 1, 'pipeline': 'per_host'}
  with pytest.raises(UserError, match=r'on 3 replica\(s\) on 1 worker\(s\): '
                     r'it ran on 4 replica\(s\) on 1 worker\(s\) with '
                     r'train.global_batch_size=64, which does not divide by '
                     '3 replicas'):
    run_record.check_layout(str(tmp_path), new, 64)
  run_record.check_layout(str(tmp_path), dict(new, replicas=8), 64)  # Fine.
  write_layout(tmp_path, pipeline='global')
  with pytest.raises(UserError, match='with data.pipeline=global, whose '
                     'auto-shard deals examples to workers'):
    run_record.check_layout(str(tmp_path), {'replicas': 4, 'workers': 2,
                                            'pipeline': 'global'}, 64)


def test_a_changed_batch_is_refused_as_changed_on_any_layout(tmp_path):
  """A run started with batch 64 on 4 replicas, resumed with 65 on 2: the
  batch changed, not 'it ran with 65' (the divisibility message)."""
  (tmp_path / 'run.json').write_text(json.dumps({
      'train.global_batch_size': 64, 'layout': {
          'replicas': 4, 'workers': 1, 'pipeline': 'per_host'}}))
  (tmp_path / 'ckpt-10.index').touch()  # It saved (the message says so).
  for replicas in (2, 4):
    with pytest.raises(UserError) as e:
      run_record.check_layout(str(tmp_path), {
          'replicas': replicas, 'workers': 1, 'pipeline': 'per_host'}, 65)
    assert str(e.value) == (
        f'cannot resume --model_dir={tmp_path}: train.global_batch_size: '
        '64 -> 65 since the run started (run.json); undo the change '
        'or use a new --model_dir')
  run_record.check_layout(str(tmp_path), {
      'replicas': 2, 'workers': 1, 'pipeline': 'per_host'}, 64)  # Fine.


def test_the_pieces_of_sharded_variables_are_kept_for_training_only(tmp_path):
  """run.json keeps which variables a parameter-server run held in pieces
  (train.variable_shard_bytes): training resumes only with the same pieces
  (the optimizer's slots are per piece); evaluation reads the run anyway."""
  pieces = {'mlp/dense_0/kernel': [16, 16, 16, 16]}
  by = 'train.variable_shard_bytes=4096 with --strategy=parameter_server'
  record = {'trainer': 'classifier', 'layout': {'replicas': 1},
            'pieces': pieces, 'pieces_made_by': by}
  run_record.check_or_write(str(tmp_path), record)
  with open(tmp_path / run_record.RECORD) as f:
    written = json.load(f)
  assert (written['pieces'], written['pieces_made_by']) == (pieces, by)
  run_record.check_pieces(str(tmp_path), pieces, by)
  # --mode=eval with --strategy=default: the variables are whole.
  default = 'train.variable_shard_bytes=4096 with --strategy=default'
  run_record.check_or_write(
      str(tmp_path), dict(record, pieces={}, pieces_made_by=default),
      write=False)
  with pytest.raises(UserError) as e:
    run_record.check_pieces(str(tmp_path), {}, default)
  assert str(e.value) == (
      f'cannot resume --model_dir={tmp_path}: variable '
      "'mlp/dense_0/kernel' was 4 pieces (train.variable_shard_bytes=4096 "
      'with --strategy=parameter_server) and is now whole (train.variable_'
      'shard_bytes=4096 with --strategy=default), and the optimizer keeps its '
      'slots per piece; resume as it was, or start a new --model_dir '
      '(--mode=eval and export read it either way)')
  with pytest.raises(UserError, match="'mlp/dense_0/kernel' was 4 pieces .* "
                     r'and is now 2 pieces \(train.variable_shard_bytes=8192'):
    run_record.check_pieces(
        str(tmp_path), {'mlp/dense_0/kernel': [32, 32]},
        'train.variable_shard_bytes=8192 with --strategy=parameter_server')


def test_a_run_with_no_pieces_in_its_record_resumes_whole(tmp_path):
  """A record written before pieces were kept (or a run with none) says
  every variable was whole."""
  run_record.check_or_write(str(tmp_path), {
      'trainer': 'classifier', 'pieces': {},
      'pieces_made_by': 'train.variable_shard_bytes=0 with --strategy=default'})
  with open(tmp_path / run_record.RECORD) as f:
    written = json.load(f)
  assert 'pieces' not in written and 'pieces_made_by' not in written
  by = 'train.variable_shard_bytes=64 with --strategy=parameter_server'
  run_record.check_or_write(str(tmp_path), {
      'trainer': 'classifier', 'pieces': {}, 'pieces_made_by': by},
      write=False)
  run_record.check_pieces(str(tmp_path), {}, by)
  with pytest.raises(UserError, match="'dense/kernel' was whole and is now "
                     r'2 pieces \(train.variable_shard_bytes=64 with'):
    run_record.check_pieces(str(tmp_path), {'dense/kernel': [8, 8]}, by)

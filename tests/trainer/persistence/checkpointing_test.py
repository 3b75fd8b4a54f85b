"""Checkpointer: async saves hold the state at save time; verified restore."""

import json
import os
import threading

import numpy as np
import pytest
import tensorflow as tf

from models.classifier import ClassifierTrainer
from tests.trainer.trainer_test import make_config, strategy_for
from trainer.persistence import checkpoint_writer
from trainer.persistence import checkpointing
from trainer.persistence import run_record
from trainer.errors import UserError


def build(replicas=1):
  config = make_config()
  tf.keras.utils.set_random_seed(config.seed)
  return ClassifierTrainer(config=config, strategy=strategy_for(replicas))


def train_steps(trainer, n):
  iterator = iter(trainer.distribute_dataset(
      'train', batch_size=trainer.global_batch_size,
      skip_batches=int(trainer.data_position.numpy())))
  trainer.train(iterator, n)


def state(trainer):
  """Model weights and optimizer variables (slots, iteration count)."""
  return [np.array(v) for v in trainer.model.get_weights()] + [
      np.array(v.numpy()) for v in trainer.optimizer.variables]


def save_at(trainer, checkpointer, steps):
  """Trains to each step in `steps` and saves; returns the state at each."""
  states = {}
  for step in steps:
    train_steps(trainer, step - int(trainer.global_step.numpy()))
    checkpointer.save()
    states[step] = state(trainer)
  checkpointer.wait()
  return states


def assert_holds(checkpoint_path, expected_state, step, replicas=1):
  """A new trainer restored from `checkpoint_path` has this step and state."""
  fresh = build(replicas)
  checkpointing.Checkpointer(fresh, os.path.dirname(checkpoint_path)).restore(
      checkpoint_path)
  assert int(fresh.global_step.numpy()) == step
  assert int(fresh.data_position.numpy()) == step
  for a, b in zip(expected_state, state(fresh)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('async_save', [True, False], ids=['async', 'sync'])
@pytest.mark.parametrize('replicas', [1, 2])
def test_saves_hold_the_state_at_save_time(tmp_path, replicas, async_save):
  """The first save is eager, later ones run as traced functions (async:
  from a snapshot, in a background thread); each holds its own step's state and
  the manager keeps max_to_keep of them."""
  trainer = build(replicas)
  checkpointer = checkpointing.Checkpointer(trainer, str(tmp_path),
                                            max_to_keep=3,
                                            async_save=async_save)
  states = save_at(trainer, checkpointer, [3, 6, 9, 12])
  assert [os.path.basename(p) for p in
          checkpointing.checkpoint_paths(str(tmp_path))] == [
              'ckpt-6', 'ckpt-9', 'ckpt-12']
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-12')
  for step in (6, 9):
    assert_holds(str(tmp_path / f'ckpt-{step}'), states[step], step, replicas)
  fresh = build(replicas)
  restorer = checkpointing.Checkpointer(fresh, str(tmp_path))
  assert restorer.restore_latest().endswith('ckpt-12')
  for a, b in zip(states[12], state(fresh)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('replicas', [1, 2])
def test_traced_writes_hold_what_tensorflows_writer_writes(tmp_path, replicas):
  """From the second save on, a checkpoint is written by one traced SaveV2
  op straight into its two files; they hold the same keys, tensors and
  object graph as TensorFlow's own writer's, and nothing else is left in
  the directory."""
  trainer = build(replicas)
  directory = tmp_path / 'run'
  checkpointer = checkpointing.Checkpointer(trainer, str(directory),
                                            max_to_keep=2, async_save=False)
  writes = checkpointer._writes  # pylint: disable=protected-access
  tensorflow_writes = []
  tensorflow_write = writes._tensorflow_write  # pylint: disable=protected-access
  writes._tensorflow_write = lambda *args, **kwargs: (  # pylint: disable=protected-access
      tensorflow_writes.append(args) or tensorflow_write(*args, **kwargs))
  save_at(trainer, checkpointer, [2, 4, 6])  # eager, traced, traced
  assert len(tensorflow_writes) == 1  # Only the first.
  assert isinstance(writes._snapshot_and_write,  # pylint: disable=protected-access
                    tf.types.experimental.ConcreteFunction)
  reference = str(tmp_path / 'reference' / 'ckpt')
  tf.train.Checkpoint._write(checkpointer.checkpoint, reference)  # pylint: disable=protected-access
  assert sorted(os.listdir(directory)) == [
      'checkpoint', 'ckpt-4.data-00000-of-00001', 'ckpt-4.index',
      'ckpt-6.data-00000-of-00001', 'ckpt-6.index']
  state_file = (directory / 'checkpoint').read_text()
  assert 'ckpt-2' not in state_file and 'ckpt-6' in state_file
  ours = tf.train.load_checkpoint(str(directory / 'ckpt-6'))
  theirs = tf.train.load_checkpoint(reference)
  keys = theirs.get_variable_to_dtype_map()
  assert ours.get_variable_to_dtype_map() == keys
  assert ours.get_variable_to_shape_map() == theirs.get_variable_to_shape_map()
  assert '_CHECKPOINTABLE_OBJECT_GRAPH' in keys and len(keys) > 10
  for key in keys:
    np.testing.assert_array_equal(ours.get_tensor(key),
                                  theirs.get_tensor(key), err_msg=key)


@pytest.mark.parametrize('async_save', [True, False], ids=['async', 'sync'])
@pytest.mark.parametrize('replicas', [1, 2])
def test_layouts_left_to_tensorflows_writer_save_the_same(
    tmp_path, monkeypatch, replicas, async_save):
  """A layout the single-file writer does not take (several shards, say)
  goes through TensorFlow's writer and its async checkpointer."""
  monkeypatch.setattr(checkpoint_writer, '_single_shard', lambda checkpoint: None)
  trainer = build(replicas)
  checkpointer = checkpointing.Checkpointer(trainer, str(tmp_path),
                                            async_save=async_save)
  states = save_at(trainer, checkpointer, [2, 4, 6])
  assert checkpointer._writes._snapshot is False  # pylint: disable=protected-access
  for step in (4, 6):
    assert_holds(str(tmp_path / f'ckpt-{step}'), states[step], step, replicas)


def test_a_failed_background_write_is_raised_by_wait(tmp_path):
  trainer = build()
  directory = tmp_path / 'run'
  checkpointer = checkpointing.Checkpointer(trainer, str(directory))
  save_at(trainer, checkpointer, [2, 4])
  os.rename(directory, tmp_path / 'moved')
  directory.write_text('a file where the checkpoint directory was')
  train_steps(trainer, 2)
  checkpointer.save()  # Returns at once; the write fails in the background.
  with pytest.raises(tf.errors.OpError):
    checkpointer.wait()
  checkpointer.wait()  # Raised once.


@pytest.mark.parametrize('replicas', [1, 2])
def test_async_snapshot_keeps_the_state_while_training_goes_on(
    tmp_path, replicas):
  """The background write is held until the model has trained on; the
  checkpoint still holds the state at the save."""
  trainer = build(replicas)
  checkpointer = checkpointing.Checkpointer(trainer, str(tmp_path))
  save_at(trainer, checkpointer, [2, 4])  # eager, then the traces
  writes = checkpointer._writes  # pylint: disable=protected-access
  write = writes._write_and_call_back  # pylint: disable=protected-access
  release = threading.Event()
  held = []

  def held_write(*args):
    held.append(True)
    assert release.wait(timeout=60)
    write(*args)
  writes._write_and_call_back = held_write  # pylint: disable=protected-access
  train_steps(trainer, 2)
  checkpointer.save()  # ckpt-6, held
  at_save = state(trainer)
  train_steps(trainer, 3)
  assert held and not (tmp_path / 'ckpt-6.index').exists()
  assert any(not np.array_equal(a, b) for a, b in zip(at_save, state(trainer)))
  release.set()
  checkpointer.wait()
  assert_holds(str(tmp_path / 'ckpt-6'), at_save, 6, replicas)


def test_max_to_keep_holds_across_a_restart(tmp_path):
  """A new process's manager picks up the old one's checkpoints from the
  state file and deletes them in turn, by name."""
  trainer = build()
  save_at(trainer, checkpointing.Checkpointer(trainer, str(tmp_path),
                                              max_to_keep=2), [1, 2, 3])
  restarted = checkpointing.Checkpointer(trainer, str(tmp_path),
                                         max_to_keep=2)
  save_at(trainer, restarted, [4, 5])
  assert sorted(os.listdir(tmp_path)) == [
      'checkpoint', 'ckpt-4.data-00000-of-00001', 'ckpt-4.index',
      'ckpt-5.data-00000-of-00001', 'ckpt-5.index']
  state_file = (tmp_path / 'checkpoint').read_text()
  assert 'ckpt-3' not in state_file and 'ckpt-4' in state_file
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-5')


def test_restored_run_continues_like_an_uninterrupted_one(tmp_path):
  reference = build()
  train_steps(reference, 10)
  trainer = build()
  checkpointer = checkpointing.Checkpointer(trainer, str(tmp_path))
  save_at(trainer, checkpointer, [4])
  resumed = build()
  checkpointing.Checkpointer(resumed, str(tmp_path)).restore_latest()
  train_steps(resumed, 6)
  for a, b in zip(reference.model.get_weights(), resumed.model.get_weights()):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(reference.optimizer.variables, resumed.optimizer.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_bytes(path):
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    for i in range(len(data) // 3, len(data) // 3 + 16):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)


def test_restore_falls_back_past_truncated_and_corrupt(tmp_path):
  trainer = build()
  checkpointer = checkpointing.Checkpointer(trainer, str(tmp_path),
                                            max_to_keep=5)
  weights = save_at(trainer, checkpointer, [2, 4, 6])
  _truncate(tmp_path / 'ckpt-6.data-00000-of-00001')
  _flip_bytes(tmp_path / 'ckpt-4.data-00000-of-00001')
  assert not checkpointing.is_complete(str(tmp_path / 'ckpt-6'))
  assert not checkpointing.is_complete(str(tmp_path / 'ckpt-4'))
  fresh = build()
  path = checkpointing.Checkpointer(fresh, str(tmp_path)).restore_latest()
  assert path.endswith('ckpt-2')
  assert int(fresh.global_step.numpy()) == 2
  for a, b in zip(weights[2], fresh.model.get_weights()):
    np.testing.assert_array_equal(a, b)


def test_missing_index_file_is_not_a_checkpoint(tmp_path):
  trainer = build()
  checkpointer = checkpointing.Checkpointer(trainer, str(tmp_path))
  save_at(trainer, checkpointer, [2, 4])
  os.remove(tmp_path / 'ckpt-4.index')  # Killed before the index was written.
  assert checkpointing.checkpoint_paths(str(tmp_path)) == [
      str(tmp_path / 'ckpt-2')]


def test_no_complete_checkpoint_is_an_error(tmp_path):
  trainer = build()
  checkpointer = checkpointing.Checkpointer(trainer, str(tmp_path))
  save_at(trainer, checkpointer, [2])
  _truncate(tmp_path / 'ckpt-2.data-00000-of-00001')
  with pytest.raises(UserError, match=r'no complete checkpoint in '
                     r'--model_dir=.*1 found, all unreadable'):
    checkpointing.Checkpointer(build(), str(tmp_path)).restore_latest()


def test_empty_dir_restores_nothing(tmp_path):
  assert checkpointing.Checkpointer(build(), str(tmp_path)).restore_latest() \
      is None


def test_run_record_refuses_a_changed_setting(tmp_path):
  trainer = build()
  record = run_record.build(trainer.config, trainer)
  run_record.check_or_write(str(tmp_path), record)
  written = (tmp_path / 'run.json').read_text()
  assert json.loads(written)['train.global_batch_size'] == 32
  run_record.check_or_write(str(tmp_path), record)  # Same: ok.
  changed = dict(record, **{'train.global_batch_size': 64})
  with pytest.raises(UserError, match='train.global_batch_size: 32 -> 64'):
    run_record.check_or_write(str(tmp_path), changed)
  changed = dict(record, data=dict(record['data'], name='digits'))
  with pytest.raises(UserError, match="data 'name': 'synthetic' -> 'digits'"):
    run_record.check_or_write(str(tmp_path), changed)
  # A key of the Trainer's own added since (not a None it had).
  added = dict(record, data=dict(record['data'], poison=-1))
  with pytest.raises(UserError, match=r"data 'poison': \(not set\) -> -1 "
                     r'since the run started \(run.json\)'):
    run_record.check_or_write(str(tmp_path), added)
  # Evaluation and export read the model only: its weights must match.
  run_record.check_or_write(str(tmp_path), changed, write=False,
                            reading='eval')
  weights = dict(record['model weights'])
  weights[next(iter(weights))] = [1, 2]
  with pytest.raises(UserError) as error:
    run_record.check_or_write(
        str(tmp_path), dict(changed, **{'model weights': weights}),
        write=False, reading='export')
  assert str(error.value).startswith(
      f'--mode=export cannot read --model_dir={tmp_path}: model weights ')
  assert "(the model's code or a model.* config key changed)" in str(
      error.value)
  assert (tmp_path / 'run.json').read_text() == written


def test_leftovers_of_cut_writes_and_untracked_checkpoints_are_removed(
    tmp_path):
  """What a kill -9 torture leaves: 0-byte *.tempstate* files, ckpt-N_temp/
  shard directories, and, after the state file is lost, checkpoints no
  manager tracks. A new Checkpointer removes them and keeps max_to_keep."""
  trainer = ClassifierTrainer(config=make_config(), strategy=strategy_for(1))
  first = checkpointing.Checkpointer(trainer, str(tmp_path), max_to_keep=10,
                                     async_save=False)
  for _ in range(6):
    trainer.global_step.assign_add(1)
    first.save()
  os.remove(tmp_path / 'checkpoint')  # The state file is lost.
  (tmp_path / 'ckpt-7.index.tempstate123').write_bytes(b'')
  (tmp_path / 'checkpoint.tmp99').write_bytes(b'')
  (tmp_path / 'ckpt-7_temp').mkdir()
  (tmp_path / 'ckpt-7_temp' / 'part-00000-of-00001.index').write_bytes(b'')
  checkpointing.Checkpointer(trainer, str(tmp_path), max_to_keep=3)
  assert sorted(os.listdir(tmp_path)) == [
      f'ckpt-{n}.{ext}' for n in (4, 5, 6)
      for ext in ('data-00000-of-00001', 'index')]

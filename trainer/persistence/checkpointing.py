"""Checkpoints in model_dir: async saves, verified restore, the run record.

What a checkpoint holds (a `tf.train.Checkpoint`): the Keras model under
`model`, the optimizer (slots, iteration count) under `optimizer`, the step
under `step`, the data position (global batches taken from the training
stream) under `data_position`, and with train.ema_decay / mixed_float16 the
moving-average weights under `ema` and the loss scale under `loss_scale`,
and, for models with dropout or other random layers, the state of their
random-number generators under `rng` (trainer/parts/randomness.py).
With a deterministic pipeline the data position is all it takes to continue the stream exactly (a `tf.distribute` iterator
cannot be checkpointed: tensorflow#56372).

Crash consistency: a checkpoint is only restored after every tensor in it has
been read back (TensorFlow checks each tensor's CRC32C). A checkpoint cut
short by `kill -9`, a full disk or a corrupted file is skipped with a warning
and the next older complete one is used; if none is complete, the run stops
with an error rather than start from scratch over a model_dir it would
overwrite.
"""

import glob
import os
import re

from absl import logging
import tensorflow as tf

from trainer.errors import UserError
from trainer.parts import sharding
from trainer.persistence import checkpoint_writer
from trainer.persistence import preemption

_CKPT_RE = re.compile(r'ckpt-(\d+)\.index$')


class _CheckpointManager(tf.train.CheckpointManager):
  """A CheckpointManager that deletes old checkpoints' files by name.

  TensorFlow's globs for each file of a checkpoint beyond max_to_keep; this
  one removes `<prefix>.index` and `<prefix>.data-00000-of-00001` by name
  and globs for data files only when there was no single-shard one.
  """

  # pylint: disable=protected-access

  def _sweep(self):
    if not self._max_to_keep or self._keep_checkpoint_every_n_hours:
      return super()._sweep()
    while len(self._maybe_delete) > self._max_to_keep:
      prefix, _ = self._maybe_delete.popitem(last=False)
      _remove_if_exists(prefix + '.index')
      if not _remove_if_exists(prefix + '.data-00000-of-00001'):
        for path in tf.io.gfile.glob(prefix + '.data-?????-of-?????'):
          _remove_if_exists(path)


def _remove_if_exists(path: str) -> bool:
  try:
    tf.io.gfile.remove(path)
  except tf.errors.NotFoundError:
    return False
  return True


def checkpoint_paths(directory: str) -> list[str]:
  """Checkpoint prefixes in `directory` that have an index file, oldest first.

  Found from the files themselves, not the `checkpoint` state file, which may
  be stale or damaged after a crash.
  """
  found = []
  for index in glob.glob(os.path.join(directory, 'ckpt-*.index')):
    match = _CKPT_RE.search(os.path.basename(index))
    if match:
      found.append((int(match.group(1)), index[:-len('.index')]))
  return [path for _, path in sorted(found)]


def is_complete(path: str) -> bool:
  """True when every tensor of checkpoint `path` reads back intact."""
  try:
    reader = tf.train.load_checkpoint(path)
    for key in reader.get_variable_to_shape_map():
      reader.get_tensor(key)
  except Exception as e:  # pylint: disable=broad-except
    # Truncation raises IndexError, bad bytes DataLossError, a missing file
    # NotFoundError...: any failure to read it back means "incomplete".
    logging.warning('checkpoint %s is incomplete or corrupt (%s: %s)', path,
                    type(e).__name__, str(e).splitlines()[0][:200])
    return False
  return True


class Checkpointer:
  """Saves and restores a Trainer's state in one directory.

  Args (keyword-only after trainer):
    trainer: the Trainer whose model, optimizer, step and data position are
      saved.
    directory: where checkpoints are written (model_dir for the chief).
    restore_directory: where they are read from (default `directory`;
      model_dir for the other workers of a multi-worker run).
    max_to_keep: how many recent checkpoints to keep.
    async_save: take the variables' values (in host memory) and write them
      in a background thread, so the training loop waits ~1 ms instead of
      the whole write (~2-3 ms for the seed MLP, far more for a large
      model). `wait()` blocks until the last write is on disk; the
      controller calls it before exiting.
    tidy_leftovers: remove what earlier writes left in `directory`
      (`tidy`). Only a process that is to write its checkpoints there may:
      beside a training job (an evaluator, --mode=eval) the "leftovers"
      are the job's writes in flight.
  """

  def __init__(self, trainer, directory: str, *, restore_directory=None,
               max_to_keep: int = 3, async_save: bool = True,
               tidy_leftovers: bool = True):
    self.trainer = trainer
    self.directory = directory
    self.restore_directory = restore_directory or directory
    if (tidy_leftovers and self.restore_directory == directory and
        os.path.isdir(directory)):
      tidy(directory, max_to_keep)
    items = trainer.checkpoint_items()
    # A weight held in pieces is saved by the model, not again by the
    # optimizers that update its pieces.
    sharding.save_pieces_once(trainer.model, items)
    self.checkpoint = tf.train.Checkpoint(
        step=trainer.global_step, data_position=trainer.data_position,
        **items)
    self.manager = _CheckpointManager(
        self.checkpoint, directory, max_to_keep=max_to_keep,
        step_counter=trainer.global_step)
    self.async_save = async_save
    self.options = tf.train.CheckpointOptions(
        experimental_enable_async_checkpoint=async_save)
    self.last_saved_step = None
    _ = self.checkpoint.save_counter  # Created now, before any trace.
    self._writes = checkpoint_writer.Writes(self.checkpoint)
    self.checkpoint._write = self._writes  # pylint: disable=protected-access

  def save(self) -> str:
    """Saves the current state as ckpt-<step>; returns its path."""
    step = int(self.trainer.global_step.numpy())
    path = self.manager.save(checkpoint_number=step, options=self.options)
    self.last_saved_step = step
    logging.info('%s checkpoint %s', 'writing' if self.async_save else 'saved',
                 path)
    return path

  def job_path(self, step: int) -> str:
    """Where the job's checkpoint of `step` is: in model_dir (on a worker
    other than the chief, not its own private copy, removed at exit)."""
    return os.path.join(self.restore_directory, f'ckpt-{step}')

  def wait(self) -> None:
    """Blocks until every checkpoint write started so far is on disk.

    A SIGTERM meanwhile (Preempted from the guard) is raised once the
    writes are done: the exit that follows would cut them.
    """
    try:
      self._writes.wait()
    except preemption.Preempted:
      self._writes.wait()
      raise

  def restore_latest(self, *, model_only: bool = False):
    """Restores the newest complete checkpoint; returns its path or None.

    Args:
      model_only: restore only what evaluation needs (eval and export).
    Raises:
      RuntimeError: checkpoints exist but none is complete.
    """
    paths = checkpoint_paths(self.restore_directory)
    for path in reversed(paths):
      if not is_complete(path):
        logging.warning('skipping %s; falling back to an older checkpoint',
                        path)
        continue
      self.restore(path, model_only=model_only)
      if path != paths[-1]:
        logging.warning('restored %s: newer checkpoints were incomplete', path)
      return path
    if paths:
      raise UserError(
          f'no complete checkpoint in --model_dir={self.restore_directory} '
          f'({len(paths)} found, all unreadable); move them away to start '
          'over, or pass another --model_dir')
    return None

  def restore(self, path: str, *, model_only: bool = False) -> None:
    """Restores checkpoint `path` under the strategy scope.

    A checkpoint written before the random-number state was saved (no `rng`
    key) restores everything else; the generators keep their initial state.
    """
    items = self.trainer.checkpoint_items(model_only=model_only)
    older = [k for k in ('rng', 'loss_scale_good_steps')
             if k in items and not _has_key(path, k)]
    if 'rng' in older:
      logging.warning('%s holds no random-number state (written with no '
                      'random layers, or by an older version): dropout and '
                      'other random layers start their streams afresh', path)
    if 'loss_scale_good_steps' in older:
      logging.warning('%s holds no count of good steps of the loss scale '
                      '(an older version): it counts afresh', path)
    for key in older:
      del items[key]
    if not older and not model_only:
      items = None  # The whole checkpoint, as saved.
    with self.trainer.strategy.scope():
      if items is None:
        self.checkpoint.read(path).assert_existing_objects_matched()
      else:
        extra = {} if model_only else {
            'data_position': self.trainer.data_position}
        status = tf.train.Checkpoint(step=self.trainer.global_step, **extra,
                                     **items).read(path)
        status.expect_partial().assert_existing_objects_matched()
    position = ('' if model_only else ', data position '
                f'{int(self.trainer.data_position.numpy())}')
    logging.info('restored %s (step %d%s)', path,
                 int(self.trainer.global_step.numpy()), position)


def tidy(directory: str, max_to_keep: int) -> None:
  """Removes what writes cut short and checkpoints no manager will delete.

  A long job killed again and again leaves, without this: files a write was
  renaming into place (TensorFlow's `*.tempstate*`, the state file's
  `checkpoint.tmp*`), `ckpt-N_temp/` shard directories of TensorFlow's
  writer, and - once the `checkpoint` state file is lost - every older
  checkpoint, which a new CheckpointManager knows nothing of and never
  deletes. Called at start-up, when no write is in flight: leftovers go, and
  of the checkpoints the newest `max_to_keep` stay (and the newest complete
  one, if those are all damaged).
  """
  removed = []
  for pattern in ('*.tempstate*', 'checkpoint.tmp*'):
    for path in glob.glob(os.path.join(directory, pattern)):
      _remove_if_exists(path)
      removed.append(os.path.basename(path))
  for path in glob.glob(os.path.join(directory, 'ckpt-*_temp')):
    if os.path.isdir(path):
      tf.io.gfile.rmtree(path)
      removed.append(os.path.basename(path) + '/')
  paths = checkpoint_paths(directory)
  if len(paths) > max_to_keep:
    keep = set(paths[-max_to_keep:])
    if not any(is_complete(p) for p in keep):
      newest = next((p for p in reversed(paths) if is_complete(p)), None)
      keep.add(newest)  # The newest complete one, if the kept are damaged.
    for path in paths:
      if path in keep:
        continue
      remove(path)
      removed.append(os.path.basename(path))
  if removed:
    logging.warning('removed leftovers of earlier runs from %s: %s', directory,
                    ', '.join(sorted(removed)))


def remove(path: str) -> None:
  """Deletes the files of checkpoint `path` (a prefix), index first."""
  for name in [path + '.index'] + glob.glob(path + '.data-?????-of-?????'):
    _remove_if_exists(name)


def _has_key(path: str, name: str) -> bool:
  """Whether checkpoint `path` holds anything under top-level key `name`."""
  prefix = name + '/'
  return any(key.startswith(prefix) for key in
             tf.train.load_checkpoint(path).get_variable_to_shape_map())

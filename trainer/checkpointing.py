"""Checkpoints in model_dir: async saves, verified restore, the run record.

What a checkpoint holds (a `tf.train.Checkpoint`): the Keras model under
`model`, the optimizer (slots, iteration count) under `optimizer`, the step
under `step`, the data position (global batches taken from the training
stream) under `data_position`, and with train.ema_decay / mixed_float16 the
moving-average weights under `ema` and the loss scale under `loss_scale`.
With a deterministic pipeline the data position is all it takes to continue the stream exactly (a `tf.distribute` iterator
cannot be checkpointed: tensorflow#56372).

Crash consistency: a checkpoint is only restored after every tensor in it has
been read back (TensorFlow checks each tensor's CRC32C). A checkpoint cut
short by `kill -9`, a full disk or a corrupted file is skipped with a warning
and the next older complete one is used; if none is complete, the run stops
with an error rather than start from scratch over a model_dir it would
overwrite.
"""

from concurrent import futures
import copy
import glob
import json
import os
import re

from absl import logging
import tensorflow as tf

from trainer.errors import UserError

_CKPT_RE = re.compile(r'ckpt-(\d+)\.index$')


def _fix_keras_async_copy():
  """Lets TF's async checkpointer copy Keras 3 variables.

  (Used for the checkpoint layouts `_Writes` leaves to TensorFlow.)

  Keras 3.15's `Variable._copy_trackable_to_cpu` makes a new tf.Variable on
  every call, which the async checkpointer's tf.function rejects ("only
  supports singleton tf.Variables"). A Keras variable serializes exactly as
  the tf.Variable it wraps, so mapping it to that variable's CPU copy is
  equivalent and creates nothing new.
  """
  from keras.src.backend.tensorflow import core  # pylint: disable=import-outside-toplevel

  def copy_to_cpu(self, object_map):
    self.value._copy_trackable_to_cpu(object_map)  # pylint: disable=protected-access
    object_map[self] = object_map[self.value]

  core.Variable._copy_trackable_to_cpu = copy_to_cpu  # pylint: disable=protected-access


_fix_keras_async_copy()


class _Writes:
  """Writes a `tf.train.Checkpoint`: installed as its `_write` method.

  An eager `tf.train.Checkpoint` write walks the object graph in Python and
  reads every variable op by op on each save (~11 ms for the seed MLP), and
  writes each shard under `<prefix>_temp/`, then merges the shards' indexes
  into `<prefix>.index` (MergeV2Checkpoints: a directory made and removed,
  an index written, read and written again, renames). TensorFlow's async
  writer adds a copy of every variable into host-memory variables and a
  second Checkpoint that writes them. From the second write on (a
  Checkpointer used once, like the best checkpoint's, would only pay for the
  traces), this writes with two traced functions instead:

    snapshot()              -> the checkpoint's tensors in host memory
                               (copied there from an accelerator; on the CPU
                               a variable read shares the variable's buffer,
                               and TensorFlow copies a buffer that is shared
                               before it updates it, so the tensors keep the
                               state at the save, and the copy happens at the
                               variable's next update);
    write(prefix, tensors)  -> one SaveV2 op writing `<prefix>.index` and
                               `<prefix>.data-00000-of-00001` directly, each
                               under a temporary name and renamed when
                               complete, the index last.

  The tensors, checkpoint keys and object graph are TensorFlow's own (its
  `_gather_serialized_tensors` and shard planning, as its writer uses them),
  so the files hold what TensorFlow's writer puts in them (checkpointing_test
  compares them). An async write takes the snapshot on the training thread
  (~0.3 ms for the seed MLP) and runs `write` and the write callbacks
  (CheckpointManager's state file and deletions) in a background thread,
  which the interpreter waits for at exit; the next write first waits for
  it, and an error in it is raised by the next write or `wait()`. A layout
  that needs more than one file (several tasks or shards, registered savers,
  Python state), an io device or sharding option, or TensorFlow internals
  other than these, is written by TensorFlow's writer, async writes by its
  async checkpointer.
  """

  def __init__(self, checkpoint):
    self._checkpoint = checkpoint
    self._tensorflow_write = checkpoint._write  # pylint: disable=protected-access
    self._writes = 0
    self._snapshot = None  # Traced on the second write; False: not possible.
    self._write = None
    self._snapshot_and_write = None
    self._executor = None
    self._pending = None  # The last async write's Future.

  def __call__(self, file_prefix, options=None):
    self.wait()  # For the previous async write, which could still sweep.
    self._writes += 1
    if self._writes > 1 and self._snapshot is None:
      self._trace()
    if (self._writes == 1 or not self._snapshot or
        (options and (options.experimental_io_device or
                      options.experimental_sharding_callback))):
      if (options and options.experimental_enable_async_checkpoint and
          self._writes == 1):
        options = copy.copy(options)  # The first write is synchronous.
        options.experimental_enable_async_checkpoint = False
      return self._tensorflow_write(file_prefix, options=options)
    callbacks = (options and options.experimental_write_callbacks) or ()
    if options and options.experimental_enable_async_checkpoint:
      if self._executor is None:
        # Its thread is joined at interpreter exit: no write is cut short.
        self._executor = futures.ThreadPoolExecutor(
            1, thread_name_prefix='checkpoint-write')
      self._pending = self._executor.submit(
          self._write_and_call_back, file_prefix, self._snapshot(), callbacks)
    else:
      self._write_and_call_back(file_prefix, None, callbacks)
    return file_prefix

  def wait(self) -> None:
    """Blocks until the last async write is done; raises its error."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      pending.result()
    self._checkpoint.sync()  # TensorFlow's async writer, if it was used.

  def _write_and_call_back(self, file_prefix, tensors, callbacks):
    tf.io.gfile.makedirs(os.path.dirname(file_prefix))
    if tensors is None:
      self._snapshot_and_write(tf.constant(file_prefix))
    else:
      self._write(tf.constant(file_prefix), tensors)
    for callback in callbacks:
      callback(file_prefix)

  def _trace(self):
    """Traces snapshot and write; on any failure leaves writes to
    TensorFlow's writer (`self._snapshot = False`)."""
    # Under this process's full CPU device name, so the object graph (placed
    # on '/cpu:0') falls in the same shard as the variables.
    cpu = tf.constant(0).device
    plan = {}

    def snapshot():
      with tf.device(cpu):
        shard = _single_shard(self._checkpoint)
        if shard is None:
          return []
        plan['task'], plan['keys'] = shard[0], list(shard[1])
        return [tf.identity(tensor) for tensor in shard[1].values()]

    def write(prefix, tensors):
      from tensorflow.python.checkpoint import functional_saver  # pylint: disable=import-outside-toplevel,g-direct-tensorflow-import
      shard = {}
      for (key, spec), tensor in zip(plan['keys'], tensors):
        shard.setdefault(key, {})[spec] = tensor
      with tf.device(cpu):
        saved = functional_saver._single_shard_save(prefix, shard, plan['task'])  # pylint: disable=protected-access
      with tf.control_dependencies([saved]):
        return tf.identity(prefix)

    self._snapshot = False
    try:
      traced_snapshot = tf.function(snapshot).get_concrete_function()
      if not plan:
        return
      specs = [tf.TensorSpec(t.shape, t.dtype)
               for t in traced_snapshot.structured_outputs]
      prefix = tf.TensorSpec([], tf.string)
      traced_write = tf.function(write).get_concrete_function(prefix, specs)
      # Synchronous writes: both in one call (~0.3 ms less than two).
      both = tf.function(lambda prefix: write(prefix, snapshot()))
      traced_both = both.get_concrete_function(prefix)
    except Exception as e:  # pylint: disable=broad-except
      # TensorFlow internals other than those this was written against.
      logging.warning("checkpoints are written by TensorFlow's own writer "
                      '(%s: %s)', type(e).__name__, e)
      return
    self._snapshot, self._write = traced_snapshot, traced_write
    self._snapshot_and_write = traced_both


def _single_shard(checkpoint):
  """(task, {(key, slice spec): tensor}) of the checkpoint's one shard.

  Called while tracing. None when TensorFlow's writer would write more than
  one shard or needs more than SaveV2 (registered savers, Python state,
  tensors saved under other names, as DTensor's are).
  """
  # pylint: disable=protected-access
  from tensorflow.python.checkpoint import functional_saver  # pylint: disable=import-outside-toplevel,g-direct-tensorflow-import
  serialized, feeds, registered, _ = (
      checkpoint._saver._gather_serialized_tensors(None))
  if feeds or registered:
    return None
  shards = functional_saver.MultiDeviceSaver(
      serialized, registered)._get_shards_by_task(None)
  if len(shards) != 1 or len(shards[0][1]) != 1:
    return None
  (task, (shard,)), = shards
  tensors = {}
  for key, slices in shard.items():
    for spec, tensor in slices.items():
      if hasattr(tensor, '_wrapped_name'):
        return None
      if tensor is not None:  # None: in the object graph, no value saved.
        tensors[(key, spec)] = tensor
  return task, tensors


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
  """

  def __init__(self, trainer, directory: str, *, restore_directory=None,
               max_to_keep: int = 3, async_save: bool = True):
    self.trainer = trainer
    self.directory = directory
    self.restore_directory = restore_directory or directory
    self.checkpoint = tf.train.Checkpoint(
        step=trainer.global_step, data_position=trainer.data_position,
        **trainer.checkpoint_items())
    self.manager = _CheckpointManager(
        self.checkpoint, directory, max_to_keep=max_to_keep,
        step_counter=trainer.global_step)
    self.async_save = async_save
    self.options = tf.train.CheckpointOptions(
        experimental_enable_async_checkpoint=async_save)
    self.last_saved_step = None
    _ = self.checkpoint.save_counter  # Created now, before any trace.
    self._writes = _Writes(self.checkpoint)
    self.checkpoint._write = self._writes  # pylint: disable=protected-access

  def save(self) -> str:
    """Saves the current state as ckpt-<step>; returns its path."""
    step = int(self.trainer.global_step.numpy())
    path = self.manager.save(checkpoint_number=step, options=self.options)
    self.last_saved_step = step
    logging.info('%s checkpoint %s', 'writing' if self.async_save else 'saved',
                 path)
    return path

  def wait(self) -> None:
    """Blocks until every checkpoint write started so far is on disk."""
    self._writes.wait()

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
    """Restores checkpoint `path` under the strategy scope."""
    with self.trainer.strategy.scope():
      if model_only:
        status = tf.train.Checkpoint(
            step=self.trainer.global_step,
            **self.trainer.checkpoint_items(model_only=True)).read(path)
        status.expect_partial().assert_existing_objects_matched()
      else:
        self.checkpoint.read(path).assert_existing_objects_matched()
    logging.info('restored %s (step %d, data position %d)', path,
                 int(self.trainer.global_step.numpy()),
                 int(self.trainer.data_position.numpy()))


# -----------------------------------------------------------------------------
# The run record: what must not change when a run is resumed.

RECORD = 'run.json'


def run_record(config, trainer) -> dict:
  """The settings a checkpoint's meaning depends on."""
  return {
      'trainer': config.trainer,
      'seed': config.seed,
      'train.global_batch_size': config.train.global_batch_size,
      'optimizer.name': config.optimizer.name,
      'data': config.data.to_dict(),
      'model weights': {v.path: list(v.shape) for v in trainer.model.weights},
      # A checkpoint without the average cannot seed one (it would start
      # from the initial weights), and the reverse would drop it.
      'train.ema': bool(trainer.ema_weights_list),
  }


def check_or_write_run_record(model_dir: str, record: dict, *,
                              write: bool = True) -> None:
  """Refuses to resume a run whose record differs; writes it for a new run.

  Changing the model, global batch, data, seed, optimizer or trainer would
  mix two different runs in one model_dir (the data position, for one, counts
  global batches). Everything else (train.steps, learning rate, cadences) may
  change between restarts.

  Raises:
    UserError: naming the first setting that changed, old and new values.
  """
  path = os.path.join(model_dir, RECORD)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    for key in record:
      if key not in old or _jsonable(record[key]) == old[key]:
        continue
      if isinstance(old[key], dict) and isinstance(record[key], dict):
        keys = sorted(set(old[key]) | set(record[key]))
        sub = next(k for k in keys
                   if _jsonable(record[key].get(k)) != old[key].get(k))
        what = f'{key} {sub!r}: {old[key].get(sub)!r} -> {record[key].get(sub)!r}'
        if key == 'model weights':
          what += ' (a model.* config key changed)'
      else:
        what = f'{key}: {old[key]!r} -> {record[key]!r}'
      raise UserError(
          f'cannot resume --model_dir={model_dir}: {what} since the run '
          f'started ({RECORD}); restore the old value or use a new --model_dir')
    return
  if write:
    write_json_atomically(path, record)


def write_json_atomically(path: str, value) -> None:
  """Writes JSON to `path` so a reader never sees a partial file."""
  write_text_atomically(path, json.dumps(value, indent=2, sort_keys=True))


def write_text_atomically(path: str, text: str) -> None:
  """Writes `text` to `path` via a temporary file and a rename."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _jsonable(value):
  return json.loads(json.dumps(value))

"""How a checkpoint is written: one traced SaveV2, in a background thread.

`Writes` replaces a `tf.train.Checkpoint`'s `_write` method (see its
docstring for the measurements behind it); `checkpointing.Checkpointer`
installs it. The files are the ones TensorFlow's own writer makes.
"""

from concurrent import futures
import copy
import os

from absl import logging
import tensorflow as tf


def _fix_keras_async_copy():
  """Lets TF's async checkpointer copy Keras 3 variables.

  (Used for the checkpoint layouts `Writes` leaves to TensorFlow.)

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


class Writes:
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
    pending = self._pending
    if pending is not None:
      try:
        pending.result()
      finally:
        if pending.done():  # Not when a signal's exception cut the wait.
          self._pending = None
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
      traced_snapshot = tf.function(snapshot, autograph=False
                                      ).get_concrete_function()
      if not plan:
        return
      specs = [tf.TensorSpec(t.shape, t.dtype)
               for t in traced_snapshot.structured_outputs]
      prefix = tf.TensorSpec([], tf.string)
      traced_write = tf.function(write, autograph=False).get_concrete_function(
          prefix, specs)
      # Synchronous writes: both in one call (~0.3 ms less than two).
      both = tf.function(lambda prefix: write(prefix, snapshot()),
                         autograph=False)
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

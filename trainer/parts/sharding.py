"""Keras weights held as pieces on several ps tasks (train.variable_shard_bytes).

Under --strategy=parameter_server with a `variable_partitioner`, TensorFlow
creates each large variable as a `ShardedVariable`: pieces of consecutive
rows, each a variable of its own, placed round-robin over the ps tasks. A
Keras 3 weight then holds that ShardedVariable, and three things Keras and
TensorFlow do with it fail (TF 2.21, Keras 3):

  gradients    GradientTape cannot take a ShardedVariable as a source ("no
               attribute 'handle'");
  the update   the Keras optimizer cannot update one in place ("ShardedVariable
               doesn't support being used as a reference");
  checkpoints  a Keras weight saves its value as one tensor, and a
               ShardedVariable is not one ("no attribute 'device'").

So a Trainer differentiates and updates the pieces (`trainable_variables`),
each with optimizer slots of its own made beside it on its ps task; a
sharded weight saves as TensorFlow saves a ShardedVariable, one tensor in
slices written from the pieces (`adopt`), and only under the model
(`save_once`). A checkpoint's model is then the same whether it was written
with pieces or not: it evaluates and exports with any strategy. The
optimizer's slots are kept per piece, so resuming training needs the same
pieces (the run record keeps them: `pieces`).

The forward pass reads a sharded weight whole (the pieces joined), so every
step still moves each weight to the worker; what sharding buys is that no
ps task has to hold, or serve, more than its share.
"""

import tensorflow as tf

_SHARDED = tf.__internal__.distribute.ShardedVariable


def _sharded(weight):
  """The ShardedVariable a Keras weight holds, or None."""
  value = getattr(weight, 'value', None)
  return value if isinstance(value, _SHARDED) else None


def trainable_variables(model) -> list:
  """The variables to differentiate and update: the model's trainable
  weights, a sharded one as its pieces (tf.Variables, in row order)."""
  found = []
  for weight in model.trainable_variables:
    sharded = _sharded(weight)
    found.extend(sharded.variables if sharded is not None else [weight])
  return found


def pieces(model) -> dict[str, list[int]]:
  """{weight path: rows of each piece} of the model's sharded weights."""
  return {w.path: [int(v.shape[0]) for v in _sharded(w).variables]
          for w in model.weights if _sharded(w) is not None}


def adopt(model) -> None:
  """Makes each sharded weight of `model` save and restore as one tensor
  in slices.

  Called once, after the model is built under the strategy's scope; a
  model without sharded weights is left as it is.
  """
  for weight in model.weights:
    if _sharded(weight) is not None and not isinstance(weight, _Whole):
      weight.__class__ = _whole_class(type(weight))


def save_once(optimizer) -> None:
  """Stops a built optimizer saving the pieces of sharded weights.

  A Keras optimizer saves the variables it updates (its
  `_trainable_variables`), where a checkpoint usually finds the model's
  weights. Given pieces, it would save each sharded weight a second time,
  beside the model's own; the model alone saves them now (the optimizer's
  slots, `_variables`, are saved as before). The Checkpointer calls it for
  every optimizer among a Trainer's checkpoint items that updates pieces
  (`save_pieces_once`); calling it again does nothing.

  Raises:
    RuntimeError: this Keras keeps the variables elsewhere.
  """
  if getattr(optimizer, '_distloop_saves_pieces_once', False):
    return
  names = getattr(optimizer, '_self_unconditional_dependency_names', {})
  if '_trainable_variables' not in names:
    raise RuntimeError(
        f'{type(optimizer).__name__} does not track _trainable_variables: '
        'this Keras version is not one parts/sharding.py knows')
  # pylint: disable=protected-access
  del names['_trainable_variables']
  optimizer._self_unconditional_checkpoint_dependencies = [
      d for d in optimizer._self_unconditional_checkpoint_dependencies
      if d.name != '_trainable_variables']
  optimizer._distloop_saves_pieces_once = True


def save_pieces_once(model, items) -> None:
  """`save_once` for each optimizer among checkpoint `items` (a dict) that
  updates pieces of `model`'s weights: a Trainer's own optimizer and any
  second one its subclass adds in checkpoint_items."""
  held = {id(piece) for weight in model.weights if _sharded(weight)
          for piece in _sharded(weight).variables}
  if not held:
    return
  for item in items.values():
    updated = getattr(item, '_trainable_variables', None)
    if updated and any(id(v) in held for v in updated):
      save_once(item)


def check_built(strategy) -> None:
  """Raises the partitioner's refusal (parameter_server.RowPieces) if the
  model was built past it: Keras swallows an error raised while a
  subclassed model builds itself, and leaves the weight unmade."""
  partitioner = getattr(strategy.extended, '_variable_partitioner', None)
  refused = getattr(partitioner, 'refused', None)
  if refused is not None:
    raise refused


def _slices(weight):
  """(checkpoint slice spec, piece) of a sharded weight, in row order."""
  full = weight.value.shape.as_list()
  offset = 0
  for piece in weight.value.variables:
    info = tf.Variable.SaveSliceInfo(
        full_name=weight.path, full_shape=full,
        var_offset=[offset] + [0] * (len(full) - 1),
        var_shape=piece.shape.as_list())
    yield info.spec, piece
    offset += int(piece.shape[0])


class _Whole:
  """Checkpointing of a Keras weight that holds a ShardedVariable.

  Saved as TensorFlow saves a ShardedVariable: one tensor in slices, each
  piece's written from where it lives and read back into it, so no task
  holds the whole. A checkpoint key so written restores into the weight
  held whole, and one saved whole into pieces (tested both ways).
  """

  def _gather_saveables_for_checkpoint(self):
    # Defined here, and not _serialize_to_tensors, so that TensorFlow takes
    # this (its legacy path: classes are searched in order) over the Keras
    # weight's own.
    return self.value._gather_saveables_for_checkpoint()  # pylint: disable=protected-access

  def _copy_trackable_to_cpu(self, object_map):
    # Asynchronous checkpoints save from a copy in host memory.
    if self in object_map:
      object_map[self].copy(_slices(self))
    else:
      object_map[self] = _HostCopy(_slices(self))


class _HostCopy(tf.__internal__.tracking.Trackable):
  """The host-memory copy of a sharded weight an asynchronous save writes."""

  def __init__(self, slices):
    with tf.device('/cpu:0'):
      self._slices = [(spec, tf.Variable(piece.read_value(), trainable=False))
                      for spec, piece in slices]

  def copy(self, slices):
    for (_, mine), (_, piece) in zip(self._slices, slices):
      mine.assign(piece.read_value())

  def _serialize_to_tensors(self):
    return {'VARIABLE_VALUE': {spec: copy.read_value()
                               for spec, copy in self._slices}}


_CLASSES = {}


def _whole_class(base):
  if base not in _CLASSES:
    _CLASSES[base] = type(base.__name__, (_Whole, base), {})
  return _CLASSES[base]

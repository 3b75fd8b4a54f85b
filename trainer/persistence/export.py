"""SavedModel export: `trainer.serve` as the `serving_default` signature.

The SavedModel is self-contained: a plain `tf.Module` holding the model's
variables and one traced function, so `tf.saved_model.load` followed by
`signatures['serving_default'](input_0=...)` needs TensorFlow alone (no
distloop code, no Keras objects).

Saving under a MirroredStrategy needs no special handling, and the export does
not care whether it runs inside or outside `strategy.scope()` (both are
supported by `tf.distribute.Strategy.scope`'s contract and give the same
graph). `tf.saved_model.save` traces the signature inside a save context
whose variable policy is part of the tf.function cache key; with the default
policy, `VariablePolicy.NONE`, every read of a MirroredVariable in that trace
becomes a read of its primary copy (tensorflow/python/distribute/values.py,
`is_saving_non_distributed`) and each MirroredVariable is written once, as a
plain variable without device placement
(`DistributedVariable._export_to_saved_model_graph`). The exported graph is
the single-device model: it loads on a host with any device set. The other
policies, meant for reloading under a strategy, would record the training
devices (SAVE_VARIABLE_DEVICES) and each replica's copy
(EXPAND_DISTRIBUTED_VARIABLES), which a serving host has no use for.
"""

import functools
import os
import shutil
import uuid

import tensorflow as tf

from trainer.errors import UserError
from trainer.parts import precision

SIGNATURE = 'serving_default'


def export_saved_model(trainer, export_dir: str) -> str:
  """Writes `trainer.serve` and the model's variables as a SavedModel.

  The `serving_default` signature takes the inputs of
  `trainer.serving_input_signature()`, by their TensorSpec names (`input_0`,
  ...), and returns the dict `trainer.serve` returns (`{'outputs': logits}` by
  default), its 16-bit float outputs as float32. `serve` is traced with that
  signature while saving.

  The write is atomic for readers: the SavedModel is built in a hidden
  sibling directory and renamed into place only once complete (and synced to
  disk), so `export_dir` never holds a half-written export. An existing export
  at `export_dir` is replaced; for an instant between two renames
  `export_dir` does not exist, which a reader sees as an error, never as a
  partial model.

  Args:
    trainer: a built Trainer, under any strategy. Its `serve` may use only
      the variables of `trainer.model` (others are not exported and saving
      fails with "untracked resource").
    export_dir: a local directory; created, or replaced if it is empty or
      holds a SavedModel. One export at a time per directory.
  Returns:
    The absolute path of the export.
  Raises:
    UserError: `export_dir` exists and is neither empty nor a SavedModel (it
      is not deleted: the path is most likely a mistake).
  """
  export_dir = os.path.abspath(export_dir)
  _check_replaceable(export_dir)
  parent, name = os.path.split(export_dir)
  os.makedirs(parent, exist_ok=True)

  module = tf.Module()
  # The Keras variables, not the Model: the object graph then holds only
  # variables and the function, nothing that needs Keras to revive (Keras' own
  # ExportArchive tracks variables the same way).
  module.model_variables = list(trainer.model.variables)
  module.serve = tf.function(_float32_outputs(trainer.serve),
                             input_signature=trainer.serving_input_signature())
  options = tf.saved_model.SaveOptions(
      experimental_variable_policy=tf.saved_model.experimental.VariablePolicy
      .NONE)

  # A unique name so concurrent or crashed exports never collide; hidden so
  # a directory listing of exports ignores it. Not created here: mkdtemp
  # would make it mode 0700, unreadable to a serving process of another user.
  tmp = os.path.join(parent, f'.{name}.tmp-{uuid.uuid4().hex}')
  old = tmp + '.old'
  try:
    tf.saved_model.save(module, tmp, signatures={SIGNATURE: module.serve},
                        options=options)
    # Without the sync a machine crash could persist the renames below
    # before the file contents: a complete-looking export with empty files.
    _fsync_tree(tmp)
    if os.path.lexists(export_dir):
      os.rename(export_dir, old)
      try:
        os.rename(tmp, export_dir)
      except BaseException:
        os.rename(old, export_dir)  # Put the previous export back.
        raise
    else:
      os.rename(tmp, export_dir)
    _fsync_dir(parent)
  finally:
    if os.path.lexists(tmp):
      _remove(tmp)
    # Only once something is back in place: `old` may be the last copy.
    if os.path.lexists(old) and os.path.lexists(export_dir):
      _remove(old)
  return export_dir


def model_input_specs(model) -> list:
  """The default serving signature: the Keras model's inputs with a free
  batch dimension, named input_0, input_1, ...; a model whose inputs are a
  dict gets one per key, named by it, in model.inputs' order (by key)."""
  return [tf.TensorSpec([None, *x.shape[1:]], x.dtype, name=name)
          for name, x in _named_inputs(model)]


def call_model(model, inputs) -> dict:
  """The default serve: the model on `inputs` (from model_input_specs:
  one tensor, a list, or a dict-input model's tensors by key) -> a dict of
  outputs: a dict output as it is, else {'outputs': x} for one tensor and
  {'outputs_0': x0, ...} for a list."""
  named = _input_dict(model)
  if named is not None and len(inputs) == len(named):
    features = dict(zip((name for name, _ in _named_inputs(model)), inputs))
  else:
    features = inputs[0] if len(inputs) == 1 else list(inputs)
  outputs = model(features, training=False)
  if isinstance(outputs, dict):
    return outputs
  if isinstance(outputs, (list, tuple)):
    return {f'outputs_{i}': x for i, x in enumerate(outputs)}
  return {'outputs': outputs}


def _named_inputs(model) -> list:
  """[(name, KerasTensor)] in the order of model.inputs (for a dict of
  inputs Keras sorts them by key, as before it named them input_0, ...)."""
  named = _input_dict(model)
  keys = {id(x): key for key, x in (named or {}).items()}
  return [(keys.get(id(x), f'input_{i}'), x)
          for i, x in enumerate(model.inputs)]


def _input_dict(model):
  """A functional model's dict of inputs {name: KerasTensor}, else None."""
  try:
    structure = model.input
  except (AttributeError, ValueError):  # Never called: no structure.
    return None
  return structure if isinstance(structure, dict) else None


def _float32_outputs(serve):
  """`serve` with its float16 or bfloat16 outputs (a mixed-precision
  model's) cast to float32, as the loss and metrics see them: a client reads
  the export without knowing the policy it was trained under. Wrapped, so
  that the signature's inputs keep the names of serve's arguments."""
  @functools.wraps(serve)
  def serve_float32(*inputs):
    return precision.float32(serve(*inputs))
  return serve_float32


def _check_replaceable(export_dir: str) -> None:
  if not os.path.lexists(export_dir):
    return
  if os.path.isdir(export_dir) and (
      not os.listdir(export_dir) or
      tf.saved_model.contains_saved_model(export_dir)):
    return
  raise UserError(
      f'export directory {export_dir} exists and is not a SavedModel; '
      'refusing to replace it: move it away or export elsewhere')


def _fsync_tree(root: str) -> None:
  for directory, _, files in os.walk(root):
    for name in files:
      fd = os.open(os.path.join(directory, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  else:
    os.remove(path)

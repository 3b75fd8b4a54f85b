"""What a checkpoint saves of a Trainer, checked before a run writes one.

A weight, optimizer or variable the Trainer keeps but its checkpoint does
not hold trains (or not) and is then lost: a resumed run, --mode=eval and
the export would silently use its initial value. Each is one line naming
the attribute and the fix (called by trainer/experiment/validation.py); a
non-trainable variable, which may be a constant, is a warning.
"""

from absl import logging
import tensorflow as tf

from trainer.errors import UserError

# Trainer's own variables outside checkpoint_items(): the step and the data
# position, which the Checkpointer saves beside them, and a stop request,
# which is for the process that received it.
FRAMEWORK_VARIABLES = ('global_step', 'data_position', 'stop_requested')


def check_model_saved(trainer) -> None:
  """Every weight of the model is in what a checkpoint saves of it:
  Keras 3 does not track the layers a subclassed model keeps in a list or
  dict attribute for tf.train.Checkpoint (their trainable weights would be
  saved only through the optimizer, so --mode=eval would not load them)."""
  # What --mode=eval restores: the model, and beside it the state of its
  # random layers (Keras' SeedGenerators, saved as 'rng' by their
  # tf.Variable, which Keras' own variable wraps).
  kept = _saved(trainer, model_only=True)
  lost = [v.path for v in trainer.model.variables
          if id(v) not in kept and id(getattr(v, 'value', v)) not in kept]
  if lost:
    raise UserError(
        f'{type(trainer.model).__name__} (from {type(trainer).__name__}.'
        f'build_model) has weights a checkpoint would not save '
        f'({", ".join(lost[:3])}{", ..." if len(lost) > 3 else ""}): Keras 3 '
        'does not track layers kept in a list or dict attribute of a '
        'subclassed model for tf.train.Checkpoint; give each layer an '
        "attribute of its own (setattr(self, f'block_{i}', layer)) or hold "
        'them in a tf.keras.Sequential')


def check_kept_objects(trainer) -> None:
  """Every Keras optimizer a training Trainer keeps (an attribute, or in a
  list, tuple or dict attribute) was built under its strategy's scope, and
  is in its checkpoint; so is every layer with weights and every variable it
  keeps (built by now, even one built at its first call in the step)."""
  name = type(trainer).__name__
  kept = _saved(trainer)
  mirrored = _distributed(trainer.model.trainable_variables)
  for attr, value in vars(trainer).items():
    values = (value.values() if isinstance(value, dict) else
              value if isinstance(value, (list, tuple)) else [value])
    for item in values:
      lost = [] if attr in FRAMEWORK_VARIABLES else _lost_variables(item, kept)
      fix = ("add it there: items = super().checkpoint_items(model_only), "
             f"then items['{attr}'] = self.{attr} (also when model_only if "
             'forward or serve reads it; a run with checkpoints already then '
             'needs a new --model_dir)')
      if any(v.trainable for v in lost):  # Neither trained nor saved.
        raise UserError(
            f'{name}.{attr} holds trainable tf.Variable(s) ({_names(lost)}) '
            "that checkpoint_items() does not return: the default step trains "
            "only the model's weights, and a resumed run, --mode=eval and the "
            f'export would see their initial values; make them weights of the '
            f'model, or, if a train_step of your own trains them, {fix}')
      if lost:  # A constant is fine; a state the step changes is lost.
        logging.warning(
            '%s.%s holds tf.Variable(s) (%s) that checkpoint_items() does not '
            'return: if your step changes them, a resumed run, --mode=eval and '
            'the export will see their initial values; if so, %s', name,
            attr, _names(lost), fix)
      # By its weights: a view of self.model's layers (an encoder kept for
      # serving) is saved with them.
      if isinstance(item, tf.keras.layers.Layer) and any(
          id(w) not in kept for w in item.trainable_weights):
        raise UserError(
            f'{name}.{attr} is a layer ({item.name!r}) with trainable weights '
            'that checkpoint_items() does not return: they would be neither '
            "saved nor restored, and the default step trains only the model's;"
            ' make it part of the model build_model returns, add it to '
            'checkpoint_items() if a train_step of your own trains it, or set '
            'its trainable = False if it is frozen')
      if not isinstance(item, tf.keras.optimizers.Optimizer):
        continue
      if mirrored and item.built and not _distributed(
          item.variables):
        raise UserError(
            f'{name}.{attr} is an optimizer built outside '
            'self.strategy.scope(): one copy of its state would serve every '
            "replica and the replicas' weights would drift apart; make and "
            'build it in __init__ under `with self.strategy.scope():`')
      if id(item) not in kept:
        raise UserError(
            f'{name}.{attr} is an optimizer that checkpoint_items() does not '
            'return, so a resumed run would restart its state (moments, step '
            f'count); add it there: items = super().checkpoint_items('
            f"model_only), then items['{attr}'] = self.{attr} unless "
            'model_only')


def _saved(trainer, model_only: bool = False) -> set[int]:
  """The ids of every object a checkpoint of `trainer` saves (its object
  graph: layers, variables, optimizers...)."""
  root = tf.train.Checkpoint(**trainer.checkpoint_items(model_only))
  return {id(o) for o in tf.train.TrackableView(root).descendants()}


def _distributed(variables) -> bool:
  return bool(variables) and all(
      isinstance(getattr(v, 'value', v), tf.distribute.DistributedValues)
      for v in variables)


def _lost_variables(item, kept: set[int]) -> list:
  """The variables `item` (a variable, or a tf.Module that is not a Keras
  layer) holds that no checkpoint saves."""
  if isinstance(item, (tf.Variable, tf.keras.Variable)):
    variables = [item]
  elif isinstance(item, tf.Module) and not isinstance(
      item, tf.keras.layers.Layer):
    variables = list(item.variables)
  else:
    return []
  return [v for v in variables
          if id(v) not in kept and id(getattr(v, 'value', v)) not in kept]


def _names(variables) -> str:
  return ', '.join(getattr(v, 'path', v.name) for v in variables[:3])

"""Per-replica random numbers for Keras random ops, and their state.

Keras 3 draws dropout masks and every `keras.random.*` op from a
`SeedGenerator`, whose state is a variable. Created under a strategy that
variable is mirrored: its copies hold the same value and advance together,
so every replica drew the same mask for the same input shape (measured:
identical dropout masks on 2 replicas). With N replicas only B/N distinct
masks existed per step, and the regularisation depended on the replica
count.

Inside the Trainer's replica step (`per_replica()`), each seed a
SeedGenerator hands out has the replica's id in its sync group folded in
(`tf.random.experimental.stateless_fold_in`): replica r of N draws its own
numbers, a deterministic function of the generator's state and r, so a run
is repeatable for a given seed and replica layout (the id counts replicas
over all workers). The generators' states advance identically on every
replica (each copy by the same increments) and are checkpointed
(`seed_states`), so a resumed run draws what the uninterrupted one would
have. With one replica nothing is folded in: masks are Keras' own.

Covered: Dropout and every Keras layer or op that draws from a
SeedGenerator (random augmentation layers, GaussianNoise,
`keras.random.*(seed=generator)`). Not covered: an integer seed
(`keras.random.normal(shape, seed=42)` returns the same tensor on every
call, as Keras documents) and TensorFlow's own `tf.random.*` ops.
"""

import contextlib
import threading

import tensorflow as tf

_replica = threading.local()  # MirroredStrategy runs replicas in threads.
_installed = []


def install() -> None:
  """Makes SeedGenerator.next fold in the replica id inside per_replica()
  (idempotent; outside per_replica() Keras behaves as it always does)."""
  if _installed:
    return
  from keras.src.random import seed_generator  # pylint: disable=import-outside-toplevel
  original = seed_generator.SeedGenerator.next

  def next_seed(self, ordered=True):
    seed = original(self, ordered=ordered)
    replica = getattr(_replica, 'id', None)
    if replica is None:
      return seed
    return tf.cast(tf.random.experimental.stateless_fold_in(
        tf.cast(seed, tf.int64), replica), seed.dtype)

  seed_generator.SeedGenerator.next = next_seed
  _installed.append(original)


@contextlib.contextmanager
def per_replica():
  """Within it (in a replica context), SeedGenerators draw this replica's
  own numbers. Enter it inside the function given to strategy.run: that is
  the thread the replica is traced in."""
  context = tf.distribute.get_replica_context()
  previous = getattr(_replica, 'id', None)
  if context is not None and context.num_replicas_in_sync > 1:
    _replica.id = context.replica_id_in_sync_group
  try:
    yield
  finally:
    _replica.id = previous


def generators(*owners):
  """Every SeedGenerator of the given models/layers (nested layers too)
  and those held directly as attributes of other owners, in a fixed order."""
  from keras.src.random import seed_generator  # pylint: disable=import-outside-toplevel
  found, seen = [], set()

  def add(generator):
    if id(generator) not in seen:
      seen.add(id(generator))
      found.append(generator)

  for owner in owners:
    if isinstance(owner, tf.keras.layers.Layer):
      for layer in owner._flatten_layers(include_self=True, recursive=True):  # pylint: disable=protected-access
        for generator in layer._seed_generators:  # pylint: disable=protected-access
          add(generator)
    else:
      for value in vars(owner).values():
        if isinstance(value, seed_generator.SeedGenerator):
          add(value)
  return found


def seed_states(*owners) -> list:
  """The state variables of `generators(*owners)`, for a checkpoint."""
  return [_tf_variable(g.state) for g in generators(*owners)]


def random_layers(model) -> list:
  """The layers of `model` that own a SeedGenerator (dropout, noise,
  random augmentation...), innermost first."""
  return [layer for layer in model._flatten_layers(include_self=False,  # pylint: disable=protected-access
                                                   recursive=True)
          if layer._seed_generators]  # pylint: disable=protected-access


@contextlib.contextmanager
def inference_mode(layers):
  """Within it (when traced within), `layers` run as if training=False:
  dropout and noise off, augmentation off. For comparisons that need the
  same numbers on 1 and N replicas (trainer/experiment/check_replicas.py).

  Yields the layers that cannot be switched off (their `call` takes no
  `training` argument, so they draw whatever the mode).
  """
  originals, stuck = [], []
  for layer in layers:
    if not getattr(layer, '_call_has_training_arg', False):
      stuck.append(layer)
      continue
    call = layer.call
    originals.append((layer, 'call' in vars(layer), call))

    def forced(*args, _call=call, **kwargs):
      kwargs['training'] = False
      return _call(*args, **kwargs)
    layer.call = forced
  try:
    yield stuck
  finally:
    for layer, had_own, call in originals:
      if had_own:
        layer.call = call
      else:
        del layer.call


def _tf_variable(variable):
  return variable if isinstance(variable, tf.Variable) else variable.value

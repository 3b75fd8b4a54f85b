"""Per-replica batch norm: every replica evaluates the model a checkpoint keeps.

Keras 3 assigns a layer's non-trainable variables per replica (aggregation
'none'). A BatchNormalization(synchronized=False) layer, Keras' default,
updates each replica's copy of its moving statistics from that replica's
slice of the batch, so on N replicas the copies drift apart, while a
checkpoint keeps replica 0's. An evaluation spread over the replicas then
ran N different models and reported numbers no checkpoint reproduces.

Before every evaluation (trainer/loops.py) `equalize` gives every copy of
those moving statistics replica 0's value: one all_gather of a few vectors
per layer, exact (a gather does no arithmetic). Training never reads them
except to update them from batch statistics, so the weights and replica 0's
statistics are the same whether or when a run evaluates, and a resumed run
evaluates what the uninterrupted one does. Only the moving statistics are
touched: batch renormalization's renorm_mean/renorm_stddev, read in
training, stay per replica, as does any other per-replica state a layer
keeps (check_replicas reports such copies).
"""

import tensorflow as tf

# What a BatchNormalization layer reads in inference only.
MOVING = ('moving_mean', 'moving_variance', 'moving_stddev')


def drifting(model) -> list:
  """The moving statistics of the model's per-replica batch-norm layers."""
  return [getattr(layer, name)
          for layer in model._flatten_layers(include_self=False)  # pylint: disable=protected-access
          if isinstance(layer, tf.keras.layers.BatchNormalization) and
          not layer.synchronized
          for name in MOVING if getattr(layer, name, None) is not None]


def equalize(model, strategy) -> None:
  """Sets every replica's copy of `drifting(model)` to replica 0's (traced,
  cross-replica context; on every worker at once under several workers)."""
  variables = drifting(model)

  def replica():
    # Each copy as [1, ...], gathered in replica order: row 0 is replica 0's.
    gathered = tf.distribute.get_replica_context().all_gather(
        [tf.identity(v.value)[tf.newaxis] for v in variables], axis=0)
    for variable, values in zip(variables, gathered):
      variable.assign(values[0])  # Aggregation 'none': this copy only.
  strategy.run(replica)

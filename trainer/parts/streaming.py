"""Streaming metrics: Keras metric objects with state (AUC, Precision,
Recall, F1Score, your own), updated in the replica step.

Keras 3 keeps a metric's state in sync-on-read variables with SUM
aggregation: each replica updates its own copy, and a read in cross-replica
context sums the copies over every replica and worker. AUC's confusion
counts, Precision's true/false positives, F1's counts and Mean's total and
count are all sums, so `result()` read that way is the metric over every
example of every replica, exactly as if one device had seen them all.
"""

import tensorflow as tf


def results(metrics: dict, strategy, *, reset: bool = True) -> dict:
  """{name: float} of each metric over all replicas and workers (host).

  Every worker must call it at the same point: on several workers the read
  is a collective. Resets the metrics after, unless `reset` is False.
  """
  if not metrics:
    return {}
  with strategy.scope():
    values = {name: float(tf.convert_to_tensor(metric.result()))
              for name, metric in metrics.items()}
  if reset:
    clear(metrics, strategy)
  return values


def clear(metrics: dict, strategy) -> None:
  """Empties the metrics' state on every replica (e.g. of steps that were
  rolled back)."""
  with strategy.scope():
    for metric in metrics.values():
      metric.reset_state()


def build(metrics: dict, strategy, update) -> None:
  """Creates the state of metrics that make it on their first update
  (F1Score: its shapes come from the data), before any trace: variables
  made inside a traced replica step fail under a strategy. Runs
  `update(metrics)` once, eagerly, on every replica, then resets.
  """
  if all(metric.variables for metric in metrics.values()):
    return
  with strategy.scope():
    strategy.run(lambda: update(metrics))
    for metric in metrics.values():
      metric.reset_state()

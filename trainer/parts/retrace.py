"""tf.functions that count their traces and warn when one retraces late.

A retrace rebuilds the whole graph (seconds for a large model), and a loop
that retraces on every call is the most common silent slowdown of custom
training loops (tensorflow#34481: a Python int passed where a tensor was
meant). Every loop function of the Trainer is made here.
"""

import collections

from absl import logging
import tensorflow as tf


class TraceCounter:
  """Makes counted tf.functions; `counts` holds {name: times traced}.

  After a function's first call completes it is "warm": a later trace is
  logged as a warning naming the function, with what to do about it.
  """

  def __init__(self, owner: str):
    self.owner = owner
    self.counts = collections.Counter()
    self._warm = set()

  def function(self, fn, name: str, **options):
    """tf.function(fn, **options) whose traces are counted under `name`."""
    def traced(*args):
      self.counts[name] += 1
      if name in self._warm:
        logging.warning(
            '%s: tf.function %r retraced (trace #%d) after warm-up; each '
            'retrace costs a full graph build. Pass tensors, not Python '
            'values, and keep input shapes and dtypes fixed.', self.owner,
            name, self.counts[name])
      return fn(*args)

    function = tf.function(traced, **options)

    def call(*args):
      result = function(*args)
      self._warm.add(name)
      return result
    call.python_function = fn
    call.tf_function = function
    return call

  def total(self) -> int:
    """Traces so far, over every function: a change means a call traced."""
    return sum(self.counts.values())

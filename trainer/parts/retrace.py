"""tf.functions that count their traces and warn when one retraces late.

A retrace rebuilds the whole graph (seconds for a large model), and a loop
that retraces on every call is the most common silent slowdown of custom
training loops (tensorflow#34481: a Python int passed where a tensor was
meant). Every loop function of the Trainer is made here.
"""

import collections

from absl import logging
import tensorflow as tf

from trainer.parts import autograph as autograph_lib


class TraceCounter:
  """Makes counted tf.functions; `counts` holds {name: times traced}.

  After a function's first call completes it is "warm": a later trace is
  logged as a warning naming the function, with what to do about it.
  """

  def __init__(self, owner: str):
    self.owner = owner
    self.counts = collections.Counter()
    self._warm = set()

  def function(self, fn, name: str, *, autograph: bool = False, **options):
    """tf.function(fn, **options) whose traces are counted under `name`.

    AutoGraph converts fn only with `autograph=True`: the loops are written
    with explicit control flow and convert the Trainer's methods themselves
    (parts/autograph.py). With it, pass a function or a functools.partial,
    not a lambda: AutoGraph converts a lambda by parsing its whole file.
    Errors from converted code read as in any tf.function either way.
    """
    def traced(*args):
      self.counts[name] += 1
      if name in self._warm:
        logging.warning(
            '%s: tf.function %r retraced (trace #%d) after warm-up; each '
            'retrace costs a full graph build. Pass tensors, not Python '
            'values, and keep input shapes and dtypes fixed.', self.owner,
            name, self.counts[name])
      # AutoGraph converts fn, not this wrapper (parts/autograph.py).
      return (autograph_lib.user(fn) if autograph else fn)(*args)

    traced.__name__ = name  # The name of the graph's function.
    function = tf.function(autograph_lib.readable_errors(traced),
                           autograph=False, **options)

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

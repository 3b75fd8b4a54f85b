"""What AutoGraph converts while a loop is traced: the user's code only.

tf.function runs AutoGraph over the Python it traces, function by function
and recursively, so that `if`, `for` and `while` on tensors become graph
control flow. A Trainer's own methods (forward, compute_loss, train_step...)
may rely on that, as in any tf.function. The framework's code around them
does not: it builds its graph with explicit tf.while_loop and tf.cond. Yet
AutoGraph converted it all the same, ~40 functions (the loops, the step, the
parts), every one re-parsed and rewritten at each process's first trace:
~3 s of CPU before the first step, about as long as importing TensorFlow
(docs/benchmarks.md, time to first step).

So the framework's functions that converted code can reach are marked
`framework` (TensorFlow's do_not_convert: they run as written, and so does
what they call), and each call from them into a Trainer method goes through
`user`, which converts that method exactly as tf.function would have.
"""

import functools

import tensorflow as tf

framework = tf.autograph.experimental.do_not_convert


def user(method):
  """`method` as a tf.function would run it: converted by AutoGraph
  (recursively) while a graph is traced; as it is when called eagerly.

  An error raised in it keeps its traceback through the user's own frames
  (validation.py names the method from them); `readable_errors` at the top
  of the traced function rewrites it once, as tf.function does.
  """
  if tf.executing_eagerly():
    return method
  api, converter, ag_ctx = _autograph()

  def converted(*args, **kwargs):
    # `framework` code runs with conversion off; this turns it back on for
    # the method and everything it calls.
    with ag_ctx.ControlStatusCtx(status=ag_ctx.Status.ENABLED):
      # tf.function's own options: no optional features (the default of
      # ConversionOptions is all of them: list idioms and equality operators
      # rewritten too, and every return wrapped in an Identity op).
      return api.converted_call(
          method, args, kwargs,
          options=converter.ConversionOptions(recursive=True,
                                              optional_features=None))
  return converted


def readable_errors(fn):
  """fn, whose errors from converted code read as in any tf.function:
  'in user code:' and the lines of the user's source that raised."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      if hasattr(e, 'ag_error_metadata'):
        raise e.ag_error_metadata.to_exception(e)
      raise
  return wrapped


def _autograph():
  """TensorFlow's AutoGraph internals that tf.function itself calls (TF
  2.21 has no public way to convert a function with conversion off)."""
  # pylint: disable=g-direct-tensorflow-import,import-outside-toplevel
  from tensorflow.python.autograph.core import ag_ctx
  from tensorflow.python.autograph.core import converter
  from tensorflow.python.autograph.impl import api
  return api, converter, ag_ctx

"""What compute_loss, compute_metrics and a train/eval step must return.

Per-example values, shape [B] with B the leading dimension of the batch
(of its first tensor), or a pair (values [B], weights [B]) for weighted
values: a language model returns each sequence's mean token loss with its
token count as weight, so that padding counts for nothing and the mean over
the global batch is the mean over its real tokens.

A value of any other shape is an error at trace time naming the method, the
shape returned and the shape expected: a loss of shape [2B] (flattened
per-token losses) would double the gradient, a metric of shape [B, B] (a
broadcasting slip) would report nonsense, and neither raises anything in
TensorFlow by itself.
"""

import numpy as np
import tensorflow as tf

from trainer import errors
from trainer.errors import UserError


class ContractError(UserError):
  """A Trainer method returned something the contract does not allow."""


def batch_size(batch):
  """The leading dimension of the batch's first tensor: static int, or a
  scalar tensor when it is not known while tracing (eval batches)."""
  first = tf.nest.flatten(batch)[0]
  static = first.shape[0] if first.shape.rank else None
  return static if static is not None else tf.shape(first)[0]


def per_example(value, *, where: str, size, dtype=tf.float32):
  """Checks one per-example value; returns (values, weights or None).

  Args:
    value: a tensor [B], or a (values [B], weights [B]) pair.
    where: how to name it in an error, e.g. "MyTrainer.compute_loss".
    size: B (static int, or a scalar tensor: then checked when it runs).
    dtype: the dtype both are cast to.
  Raises:
    ContractError: a rank other than 1, or a static length other than B.
  """
  weights = None
  if isinstance(value, (tuple, list)):
    if len(value) != 2:
      raise ContractError(
          f'{where} returned a {type(value).__name__} of {len(value)} items; '
          'return per-example values [B] or a pair (values [B], weights [B])')
    value, weights = value
  value = _checked(value, where=where, size=size, dtype=dtype)
  if weights is not None:
    weights = _checked(weights, where=f'{where} (weights)', size=size,
                       dtype=dtype)
  return value, weights


def _checked(tensor, *, where, size, dtype):
  if tensor is None or isinstance(tensor, dict):
    got = 'None (no return statement?)' if tensor is None else 'a dict'
    raise ContractError(
        f'{where} returned {got}; return a tensor [B] of per-example values '
        '(or a pair (values [B], weights [B]))')
  try:
    tensor = tf.convert_to_tensor(tensor)
  except (TypeError, ValueError) as e:
    raise ContractError(
        f'{where} returned {type(tensor).__name__}, not a tensor [B] of '
        f'per-example values ({str(e).splitlines()[0][:120]})') from None
  shape = tensor.shape
  expected = f'[{size}]' if isinstance(size, int) else '[B] (the batch size)'
  if shape.rank != 1 or (isinstance(size, int) and shape[0] is not None and
                         shape[0] != size):
    raise ContractError(
        f'{where} returned shape {shape.as_list() if shape.rank is not None else "unknown"}'
        f', expected {expected}: one value per example of the batch '
        f'({_shape_hint(shape, size)})')
  if not isinstance(size, int) or shape[0] is None:
    # Known only when it runs (eval batches have a free batch dimension).
    with tf.control_dependencies([tf.debugging.assert_equal(
        tf.shape(tensor)[0], tf.cast(size, tf.int32), message=(
            f'{where} must return one value per example of the batch'))]):
      tensor = tf.identity(tensor)
  return tf.cast(tensor, dtype)


def _shape_hint(shape, size) -> str:
  """What a value of `shape` instead of [size] usually means, and the fix."""
  dims = shape.as_list() if shape.rank is not None else None
  if dims == [size, 1]:
    return 'squeeze the last axis: tf.squeeze(value, -1)'
  if dims == [size, size]:
    return ('a [B, 1] output broadcast against [B] labels gives [B, B]: '
            'squeeze the output\'s last axis first')
  if dims and len(dims) > 1 and dims[0] == size:
    return ('reduce the other axes per example, or return a per-example '
            'mean with its token count as weight')
  if dims == []:
    return ('a scalar or a mean is the wrong reduction: the Trainer reduces '
            'over the global batch itself (a Keras loss object, even with '
            'reduction=None, averages over the last axis: give it [B, 1] '
            'values to get [B])')
  return ('a scalar or a mean is the wrong reduction: the Trainer reduces '
          'over the global batch itself; flattened per-token values belong '
          'in a per-example mean with its token count as weight')


def gathered_outputs(outputs, *, where: str, size) -> dict:
  """Checks eval_outputs' {name: [B, ...]}: each value is gathered along its
  first axis, one row per example (only a static mismatch is caught)."""
  if not isinstance(outputs, dict):
    raise ContractError(
        f'{where} returned {type(outputs).__name__}, not a dict; return '
        '{name: per-example values [B, ...]}, or None to gather nothing')
  for name, value in outputs.items():
    # Ragged or sparse values (variable-length outputs) have a shape too.
    shape = (value if hasattr(value, 'shape') else
             tf.convert_to_tensor(value)).shape
    if shape.rank == 0 or (isinstance(size, int) and shape.rank and
                           shape[0] not in (None, size)):
      raise ContractError(
          f'{where} returned shape {shape.as_list()} for {name!r}, expected '
          f'[{size if isinstance(size, int) else "B"}, ...]: values are '
          'gathered along their first axis, one row per example of the '
          'batch; reduce over the split in aggregate, not per batch')
  return outputs


def forward_outputs(outputs, *, where: str):
  """Checks that forward returned something (what compute_loss reads)."""
  if outputs is None:
    raise ContractError(
        f"{where} returned None (no return statement?); return the model's "
        'outputs, e.g. self.model(batch[0], training=training)')
  return outputs


def metrics_dict(metrics, *, where: str) -> dict:
  """Checks that compute_metrics returned {name: value}."""
  if not isinstance(metrics, dict):
    raise ContractError(
        f'{where} returned {type(metrics).__name__}, not a dict; return '
        '{name: per-example values [B]} for every name in metric_names ({} '
        'when there is none)')
  return metrics


def step_outputs(values, *, where: str, names, size, keys_from=None):
  """Checks a step's {'loss': ..., metric: ...}; returns {name: (v, w)}.

  Raises:
    ContractError: keys other than 'loss' and `names` (named as returned by
      `keys_from`, default `where`), or a bad shape.
  """
  if not isinstance(values, dict):
    got = ('None (no return statement?)' if values is None else
           type(values).__name__)
    raise ContractError(
        f"{where} returned {got}; return {{'loss': per-example loss [B], "
        f'metric: per-example values [B]}} for metric_names={tuple(names)}')
  if set(values) != {'loss', *names}:
    if keys_from and keys_from.endswith('.compute_metrics'):
      raise ContractError(
          f'{keys_from} returned keys {sorted(set(values) - {"loss"})} but '
          f'the Trainer declares metric_names={tuple(names)}; make '
          'compute_metrics return exactly metric_names')
    raise ContractError(
        f'{keys_from or where} returned keys {sorted(values)} but the Trainer '
        f"declares metric_names={tuple(names)} (plus 'loss'); return 'loss' "
        'and exactly metric_names')
  return {name: per_example(values[name], where=f'{where} [{name!r}]',
                            size=size)
          for name in ('loss', *names)}


def host_metrics(trainer, method: str, argument) -> dict:
  """trainer.aggregate(outputs) or trainer.derived_metrics(metrics) (host),
  checked: {name: one number}. A mistake in it is one line naming it."""
  where = f'{type(trainer).__name__}.{method}'
  try:
    result = getattr(trainer, method)(argument)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ContractError(f'{where} raised {type(e).__name__}: '
                        f'{errors.one_line(e)}') from e
  if not isinstance(result, dict):
    raise ContractError(f'{where} returned {type(result).__name__}, not a '
                        'dict {name: number}')
  for name, value in result.items():
    dtype = np.asarray(value).dtype
    if np.ndim(value) or not (np.issubdtype(dtype, np.number) or
                              dtype == bool):
      raise ContractError(
          f'{where} returned {name!r} of shape {list(np.shape(value))} and '
          f'dtype {dtype}: each value must be one number '
          '(a metric); compute it from the arrays')
  return {name: float(value) for name, value in result.items()}

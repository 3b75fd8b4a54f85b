"""Input checks for TPUs, run on the host before the first step.

A TPU program is compiled for fixed shapes: a batch dimension of None (a
dataset batched without `drop_remainder=True`) fails at compile time with a
message far from its cause (tensorflow#45317, #61231), and a training stream
that ends fails mid-run. These checks say what to change in the pipeline
instead. They run on any host, so they are tested on CPU datasets.
"""

import tensorflow as tf

from trainer.errors import UserError


def check_dataset(dataset: tf.data.Dataset, *, split: str,
                  training: bool) -> None:
  """Raises UserError when `dataset` cannot feed a TPU.

  Args:
    dataset: one input pipeline's batched dataset (what Trainer.dataset
      returns).
    split: its split, for the message.
    training: training data must also repeat forever and have a static
      batch size. An eval split may end in a partial batch: TPUStrategy pads
      a dynamic batch dimension itself (its default
      experimental_enable_dynamic_batch_size), but not other dimensions.
  """
  def static(shape):
    if not training and shape.rank:
      shape = shape[1:]
    return shape.is_fully_defined()

  unknown = [
      f'{element_path(path)} {spec.shape}'
      for path, spec in flatten_with_paths(dataset.element_spec)
      if not static(spec.shape)]
  if unknown:
    raise UserError(
        f"the '{split}' dataset has dimensions unknown until run time "
        f"({', '.join(unknown)}), which a TPU cannot compile; batch with "
        "dataset.batch(batch_size, drop_remainder=True) and give every "
        'feature a fixed shape (pad or crop variable-length features)')
  if training and dataset.cardinality() != tf.data.INFINITE_CARDINALITY:
    raise UserError(
        f"the '{split}' dataset ends (cardinality "
        f'{int(dataset.cardinality())}); on a TPU training runs a fixed '
        'number of steps over a repeated dataset: add dataset.repeat() '
        'before batching and set train.steps')


def flatten_with_paths(structure, prefix=''):
  """[(path, leaf)] of nested dicts/tuples/lists: 'image', '0', 'a/b'."""
  if isinstance(structure, dict):
    items = sorted(structure.items())
  elif isinstance(structure, (tuple, list)):
    items = list(enumerate(structure))
  else:
    return [(prefix, structure)]
  leaves = []
  for key, value in items:
    leaves += flatten_with_paths(value, f'{prefix}/{key}' if prefix else str(key))
  return leaves


def element_path(path: str) -> str:
  return f'element[{path}]' if path else 'element'

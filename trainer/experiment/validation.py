"""Validate before writing: a Trainer's mistakes surface before model_dir.

After the Trainer is built and before anything lands in model_dir, every
split the mode reads is built and one batch taken from it, and the train and
eval loops are traced (tracing changes no weight; the traced graphs are the
ones the run then uses, so this costs no second trace). Shape, dtype, key and
contract errors in build_model, dataset, forward, compute_loss and
compute_metrics therefore stop the run in seconds, with one line naming the
method and the fix (exit 2), instead of a traceback after training with
checkpoints and event files already written.
"""

import inspect
import types

import tensorflow as tf

from trainer import errors
from trainer import loops
from trainer import settings as settings_lib
from trainer.cluster import tpu
from trainer.experiment import kept_state
from trainer.parts import contracts
from trainer.errors import UserError
from trainer.trainer import Trainer

# The methods a Trainer subclass writes, in the order a run calls them.
USER_METHODS = ('__init__', 'build_model', 'dataset', 'forward',
                'compute_loss', 'compute_metrics', 'train_step', 'eval_step',
                'serve', 'serving_input_signature', 'checkpoint_items')


def built(trainer_cls, config, strategy, *, train: bool = True):
  """trainer_cls(config=config, strategy=strategy), an error raised in one
  of its own methods (build_model...) becoming one line naming it; `train`
  False: to evaluate or export only (settings.evaluating_only)."""
  try:
    with settings_lib.evaluating_only(not train):
      trainer = trainer_cls(config=config, strategy=strategy)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    method = _user_method(e, trainer_cls)
    if method is None:
      raise
    raise UserError(f'{trainer_cls.__name__}.{method} raised '
                    f'{type(e).__name__}: {errors.one_line(e)}') from e
  if 'settings' not in vars(trainer):  # Set by Trainer.__init__ first.
    raise UserError(
        f'{trainer_cls.__name__}.__init__ did not call Trainer.__init__, '
        'which builds the model, optimizer and steps; start it with '
        'super().__init__(config=config, strategy=strategy) (or **kwargs)')
  return trainer


def check(trainer, *, train: bool, eval_split: str | None,
          data_position: int = 0, serving: bool = False,
          summaries: bool = False) -> None:
  """Builds the splits `trainer` will read, traces its loops.

  Args:
    trainer: a built Trainer.
    train: whether the run trains (the 'train' split and the train loop).
    eval_split: the split it evaluates, or None.
    data_position: global batches the training stream resumes after.
    serving: whether it exports: traces the serving function as the export
      will (serve with serving_input_signature).
    summaries: whether it writes training summaries, which call
      derived_metrics: it is tried on their keys.
  Raises:
    UserError: one line naming the method or key and the fix.
  """
  name = type(trainer).__name__
  kept_state.check_model_saved(trainer)
  if train:
    _check_split(trainer, 'train', training=True)
  if eval_split:
    _check_split(trainer, eval_split, training=False)
  if train or eval_split:  # Export alone reads no data.
    loops.build_streaming(trainer)  # Before any trace: it makes variables.
  if train:
    iterator = iter(trainer.distribute_dataset(
        'train', batch_size=trainer.global_batch_size,
        skip_batches=data_position, service_job=''))
    _trace(trainer, f'{name} train step', lambda: loops.trace_train(
        trainer, iterator))
    kept_state.check_kept_objects(trainer)  # All built by now.
  if train and summaries:
    _check_derived_metrics(trainer)
  if eval_split:
    dataset = trainer.distribute_dataset(
        eval_split, batch_size=trainer.eval_global_batch_size)
    _trace(trainer, f'{name} eval step',
           lambda: loops.trace_eval(trainer, dataset))
  if serving:
    _check_serving(trainer)


def _check_serving(trainer) -> None:
  name = type(trainer).__name__
  try:
    signature = trainer.serving_input_signature()
  except Exception as e:  # pylint: disable=broad-except
    if type(trainer).serving_input_signature is Trainer.serving_input_signature:
      raise UserError(
          f"{name} keeps the default serving_input_signature, which reads the "
          f"model's inputs, but its {type(trainer.model).__name__} has none "
          f'({type(e).__name__}: {errors.one_line(e)}): override '
          "serving_input_signature to return the TensorSpecs of serve's "
          'inputs, which the export needs') from e
    raise UserError(f'{name}.serving_input_signature raised '
                    f'{type(e).__name__}: {errors.one_line(e)}') from e
  if (not isinstance(signature, (list, tuple)) or
      not all(isinstance(x, tf.TensorSpec) for x in signature)):
    raise UserError(
        f'{name}.serving_input_signature returned {signature!r}; return a '
        "list of tf.TensorSpec, one per input of serve, e.g. "
        "[tf.TensorSpec([None, 64], tf.float32, name='features')]")
  _check_serve_arity(trainer, len(signature))
  traced = []
  try:
    _trace(trainer, f'{name} serving function', lambda: traced.append(
        tf.function(trainer.serve, input_signature=signature
                    ).get_concrete_function()))
  except UserError as e:  # Its inputs may be what does not fit.
    specs = ', '.join(f'{x.name or "unnamed"} {x.shape} {x.dtype.name}'
                      for x in signature)
    raise UserError(f'{e} (serve was traced with the inputs {name}.'
                    f'serving_input_signature() gives: {specs})') from e
  outputs = traced[0].structured_outputs
  if (not isinstance(outputs, dict) or not outputs or
      not all(isinstance(k, str) and tf.is_tensor(v)
              for k, v in outputs.items())):  # Ragged, sparse save too.
    kind = ('one tensor' if tf.is_tensor(outputs) else
            'a dict that is empty or not {str: tensor}'
            if isinstance(outputs, dict) else
            f'a {type(outputs).__name__}' if outputs is not None else 'None')
    default = type(trainer).serve is Trainer.serve
    raise UserError(
        f'{name}.serve' + (" (the default: the model's outputs, a dict as "
                           "it is, else under 'outputs')" if default else '') +
        f' returned {kind}; {"override serve to " if default else ""}return '
        "a dict of tensors, e.g. {'prediction': self.model(features, "
        "training=False)}: its keys name the outputs of the exported "
        'signature')


def _check_derived_metrics(trainer) -> None:
  """derived_metrics on the keys a training summary gives it, with made-up
  values: a misspelt key or a wrong return fails now, not at the first
  summary. An arithmetic error may be the made-up values': let through."""
  if type(trainer).derived_metrics is Trainer.derived_metrics:
    return
  keys = ('loss', *trainer.metric_names, *(trainer.streaming['train'] or {}))
  try:
    contracts.host_metrics(trainer, 'derived_metrics',
                           dict.fromkeys(keys, 0.5))
  except contracts.ContractError as e:
    if not isinstance(e.__cause__, (ArithmeticError, ValueError)):
      raise


def _check_split(trainer, split: str, *, training: bool) -> None:
  """One batch of `split`, from one input pipeline called as the run will
  call it (trainer/parts/distributed_input.py)."""
  name = type(trainer).__name__
  where = f'{name}.dataset({split!r})'
  global_size = (trainer.global_batch_size if training else
                 trainer.eval_global_batch_size)
  context = tf.distribute.InputContext()
  if trainer.settings.pipeline == 'global' and not trainer.coordinated:
    batch_size, over = global_size, 'split over the replicas after'
  else:
    context = tf.distribute.InputContext(
        num_replicas_in_sync=trainer.num_replicas)
    batch_size = context.get_per_replica_batch_size(global_size)
    over = f'over {trainer.num_replicas} replica(s)'
  try:
    dataset = trainer.dataset(split, context, batch_size)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    _check_defined(e, type(trainer), 'dataset')
    key = ('' if training else
           f' (config key eval.split={split!r}: is it a split your dataset '
           'has?)')
    raise UserError(f'{where} raised {type(e).__name__}: '
                    f'{errors.one_line(e)}{key}') from e
  if not isinstance(dataset, tf.data.Dataset):
    raise UserError(f'{where} returned {type(dataset).__name__}, not a '
                    'tf.data.Dataset')
  cardinality = int(dataset.cardinality())
  if cardinality == 0:
    raise UserError(f'{where} is empty: it yields no batch; check the data '
                    f'keys of the config and the files behind {split!r}')
  if not training and cardinality == tf.data.INFINITE_CARDINALITY:
    raise UserError(
        f'{where} repeats forever, but an evaluation reads its split to the '
        'end (each example once): drop .repeat() for splits other than '
        "'train'")
  if training and cardinality > 0:
    raise UserError(
        f"{where} ends after {cardinality} batches, but the training stream "
        'must never end (a resume or another batch size reads on from where '
        'it was): add .repeat() before .batch() (with drop_remainder=True), '
        'as input/pipeline.py finish() does')
  _check_batched(dataset, where, batch_size, training=training)
  try:
    batch = next(iter(dataset))
  except StopIteration:
    raise UserError(f'{where} is empty: it yields no batch; check the data '
                    f'keys of the config and the files behind {split!r}'
                    ) from None
  size = int(contracts.batch_size(batch))
  if size > batch_size or (training and size < batch_size):
    key = 'train' if training else 'eval'
    raise UserError(
        f'{where} gave a first batch of {size} examples for batch_size='
        f'{batch_size} ({key}.global_batch_size {over}): batch by the '
        'batch_size argument it is called with, not by a config value, '
        f'with .batch(batch_size{", drop_remainder=True" if training else ""})'
        ' (a dataset not batched at all shows the first dimension of one '
        'example here)')
  if (isinstance(batch, dict) and
      type(trainer).forward is Trainer.forward):
    raise UserError(
        f'{where} yields dict batches (keys {", ".join(sorted(batch))}) but '
        f'{name} keeps the default forward, which reads (inputs, labels) '
        'tuples: override forward(self, batch, training) to call '
        "self.model on the inputs, e.g. self.model(batch['features'], "
        'training=training)')


def _check_batched(dataset, where: str, batch_size: int, *,
                   training: bool) -> None:
  """The values of a batch have a batch dimension, of a fixed size when
  training: a partial batch would be divided by the full batch size.
  (.batch() without drop_remainder leaves every value's first dimension
  unknown; a map after it may lose one value's, which is no mistake.)"""
  shapes = [(tpu.element_path(p), spec.shape) for p, spec in
            tpu.flatten_with_paths(dataset.element_spec)
            if getattr(spec, 'shape', None) is not None and
            spec.shape.rank is not None]
  firsts = [shape[0] for _, shape in shapes if shape.rank]
  scalars = [path for path, shape in shapes if shape.rank == 0]
  if scalars and batch_size not in firsts and None not in firsts:
    raise UserError(
        f'{where} yields single examples, not batches ({scalars[0]} is a '
        'scalar): batch them with .batch(batch_size' +
        (', drop_remainder=True)' if training else ')') +
        ', with the batch_size argument dataset() is called with')
  if training and firsts and all(first is None for first in firsts):
    path, shape = next((p, s) for p, s in shapes if s.rank)
    raise UserError(
        f'{where} has no fixed batch size ({path} {shape}): a partial batch '
        'at the end of an epoch would be trained as a full one (its loss '
        'divided by the full batch size); batch the training split with '
        '.batch(batch_size, drop_remainder=True), or give the batch '
        'dimension in the element spec (from_generator\'s output_signature, '
        'or tf.ensure_shape in a map after .batch() that lost it)')


def _check_serve_arity(trainer, count: int) -> None:
  """serve takes as many inputs as serving_input_signature has specs."""
  params = inspect.signature(trainer.serve).parameters.values()
  if any(p.kind == p.VAR_POSITIONAL for p in params):
    return
  inputs = [p for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  if not sum(p.default is p.empty for p in inputs) <= count <= len(inputs):
    name = type(trainer).__name__
    raise UserError(
        f'{name}.serving_input_signature returned {count} TensorSpec(s) but '
        f'{name}.serve takes {len(inputs)} input(s) '
        f'({", ".join(p.name for p in inputs)}): return one spec per input '
        'of serve, in its order')


def _trace(trainer, what: str, fn) -> None:
  try:
    fn()
  except UserError as e:
    # A contract error raised while tracing: AutoGraph wraps its message in
    # "in user code: ..." frames; its own line is the last.
    raise UserError(errors.one_line(e)) from e
  except Exception as e:  # pylint: disable=broad-except
    method = _user_method(e, type(trainer))
    if method is None:
      raise  # Not from the Trainer's own methods: a bug, with its traceback.
    hint = ''
    if 'ShardedVariable' in str(e):
      hint = ('; a weight is held in pieces (train.variable_shard_bytes): '
              'take gradients of and apply them to self.trainable_variables, '
              'not self.model.trainable_variables')
    elif (trainer.settings.precision.startswith('mixed_') and
          ('float16' in str(e) or "'half'" in str(e)) and
          method not in ('forward', 'serve', 'build_model') and
          (type(trainer).train_step is not Trainer.train_step or
           type(trainer).eval_step is not Trainer.eval_step)):
      hint = (f'; train.precision={trainer.settings.precision!r}: the model '
              'computes in 16 bits and self.forward returns 16-bit outputs, '
              'which the default steps cast to float32 before the loss and '
              'metrics; a step of your own must cast them too: '
              'tf.cast(outputs, tf.float32)')
    raise UserError(
        f'{type(trainer).__name__}.{method} raised {type(e).__name__} while '
        f'the {what.split(" ", 1)[1]} was traced: {errors.one_line(e)}{hint}'
        ) from e


# Trainer's own versions that run the user's model or data: an error in
# them is the user's (a model that does not fit its data), named with them.
DEFAULTS_NAMED = ('build_model', 'dataset', 'forward', 'compute_loss',
                  'serving_input_signature', 'serve')


def _user_method(error, cls) -> str | None:
  """The innermost user-written Trainer method in the error's traceback
  (under AutoGraph a method `m` runs as a generated `tf__m`), else one of
  Trainer's DEFAULTS_NAMED as 'm (the default)'."""
  owned = {}
  for klass in cls.__mro__:
    if klass is Trainer or klass is object:
      continue
    for method in USER_METHODS:
      function = vars(klass).get(method)
      if isinstance(function, types.FunctionType):
        owned[function.__code__.co_name] = method
  defaults = {vars(Trainer)[m].__code__: m for m in DEFAULTS_NAMED}
  found = default = None
  name, tb = '', error.__traceback__
  while tb is not None:
    code = tb.tb_frame.f_code
    converted = code.co_name.startswith('tf__')  # AutoGraph's copy.
    name = code.co_name[len('tf__'):] if converted else code.co_name
    if code in defaults:
      default = defaults[code]
    elif name in owned:
      found = owned[name]
    elif converted and name in DEFAULTS_NAMED:
      default = name
    tb = tb.tb_next
  _check_defined(error, cls, name)  # `name`: the innermost frame's.
  return found if found or not default else f'{default} (the default)'


def _check_defined(error, cls, method: str) -> None:
  """A NotImplementedError from Trainer's own stub of `method`: the Trainer
  does not define it."""
  if (isinstance(error, NotImplementedError) and
      method in ('build_model', 'dataset', 'compute_loss') and
      getattr(cls, method) is vars(Trainer)[method]):
    raise UserError(
        f'{cls.__name__} does not define {method}, which every Trainer must '
        '(build_model, dataset, compute_loss; docs/writing-a-trainer.md)'
        ) from error


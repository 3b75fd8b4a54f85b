"""Every config key the framework reads: its default and what it means.

This is the place to learn every knob. A config file states only what
differs: its `trainer`, its own `model` and `data` keys, and any framework
key it changes; `merge` lays it over these defaults, so `--print_config`,
`config.json` and the command line see every key, whether or not the file
mentions it. `validate` then checks types, ranges and combinations, each
mistake a one-line UserError naming the key, the value and the fix.

Sections `model` and `data` belong to the Trainer: any key goes there
(`data.pipeline`, `data.auto_shard` and `data.service` are the
framework's). Every other section is the framework's: a key it does not
know is a typo, and an error.

Pure Python: main.py checks the config with it before importing TensorFlow.
"""

import dataclasses
import difflib
from typing import Any

import ml_collections

from trainer.errors import UserError

REQUIRED = object()  # A key every config must set.
PRECISIONS = ('auto', 'float32', 'mixed_float16', 'mixed_bfloat16')
OPTIMIZERS = ('sgd', 'adam', 'adamw', 'lamb')
SCHEDULES = ('constant', 'cosine', 'linear', 'step')
PIPELINES = ('per_host', 'global')
AUTO_SHARD = ('data', 'file', 'off', 'auto')
# Sections whose keys the Trainer defines (any key is accepted there).
TRAINER_SECTIONS = ('model', 'data')


@dataclasses.dataclass(frozen=True)
class Key:
  """One framework key.

  Attributes:
    default: its value when the config does not set it (REQUIRED: none;
      None: derived from other keys, see `meaning`).
    meaning: one line.
    kind: its type, when the default does not say (REQUIRED or None).
    choices: the values allowed, if a fixed set.
    minimum: the smallest value allowed (numbers).
    below: values must be below this (numbers).
    of: the type of each element (tuples).
  """
  default: Any
  meaning: str
  kind: type | None = None
  choices: tuple = ()
  minimum: float | None = None
  below: float | None = None
  of: type | None = None

  @property
  def type(self):
    return self.kind or type(self.default)


SCHEMA = {
    'trainer': Key(REQUIRED, 'the Trainer: a registered name (classifier, '
                   'image_classifier, lm) or "module.path:ClassName"',
                   kind=str),
    'seed': Key(0, 'seeds the initial weights, the data order and dropout',
                minimum=0),
    'data': {
        'pipeline': Key('per_host', 'per_host: one pipeline per host, '
                        'per-replica batches (distribute_datasets_from_'
                        'function); global: one globally batched dataset the '
                        'strategy splits', choices=PIPELINES),
        'auto_shard': Key('data', 'with pipeline=global: the tf.data auto-'
                          'shard policy, set explicitly', choices=AUTO_SHARD),
        'service': Key('', 'grpc://HOST:PORT of a tf.data service dispatcher '
                       '(python -m input.data_service): the training input '
                       'runs on its workers; the data order is then not '
                       'reproducible (docs/cluster.md); empty: off'),
    },
    'model': {},
    'train': {
        'steps': Key(REQUIRED, 'optimizer updates to train for', kind=int,
                     minimum=1),
        'global_batch_size': Key(REQUIRED, 'examples per update over all '
                                 'replicas and workers; a multiple of the '
                                 'replica count', kind=int, minimum=1),
        'steps_per_loop': Key(100, 'steps per tf.function call (one inner '
                              'loop); host work happens between loops',
                              minimum=1),
        'clip_norm': Key(0.0, 'clip the all-reduced gradient to this global '
                         'norm; 0: off', minimum=0),
        'nan_retries': Key(0, 'on a non-finite step, restore the last '
                           'checkpoint and skip the bad batch, at most this '
                           'many times', minimum=0),
        'precision': Key('auto', 'float32, mixed_float16 (GPU; dynamic loss '
                         'scaling), mixed_bfloat16, or auto: bfloat16 on TPU, '
                         'float32 elsewhere', choices=PRECISIONS),
        'grad_accum_steps': Key(1, 'micro-batches per update; must divide the '
                                'per-replica batch', minimum=1),
        'jit_compile': Key(False, 'XLA-compile the forward and backward pass'),
        'ema_decay': Key(0.0, 'moving average of the weights for eval, export '
                         'and the best checkpoint, in [0, 1); 0: off',
                         minimum=0, below=1),
        'variable_shard_bytes': Key(0, 'parameter_server: larger variables '
                                    'in pieces of at most this many bytes, '
                                    'over the ps tasks; 0: whole', minimum=0),
    },
    'optimizer': {
        'name': Key('adam', 'sgd, adam, adamw or lamb', choices=OPTIMIZERS),
        'learning_rate': Key(1e-3, 'peak learning rate (after warmup); '
                             '> 0'),
        'momentum': Key(0.0, 'sgd only', minimum=0),
        'nesterov': Key(False, 'sgd only'),
        'beta_1': Key(0.9, 'adam, adamw, lamb', minimum=0, below=1),
        'beta_2': Key(0.999, 'adam, adamw, lamb', minimum=0, below=1),
        'epsilon': Key(1e-7, 'adam, adamw, lamb', minimum=0),
        'weight_decay': Key(0.0, 'decoupled weight decay (x learning rate), '
                            'any optimizer; 0: none', minimum=0),
        'weight_decay_exclude': Key(('bias', 'norm', 'gamma', 'beta'),
                                    'substrings of variable paths never '
                                    'decayed', of=str),
        'schedule': Key('constant', 'constant, cosine, linear or step',
                        choices=SCHEDULES),
        'warmup_steps': Key(0, 'linear warmup from 0 to learning_rate',
                            minimum=0),
        'decay_steps': Key(0, 'steps of the decay after warmup; 0: to '
                           'train.steps', minimum=0),
        'end_learning_rate_factor': Key(0.0, 'cosine/linear end value, as a '
                                        'fraction of the peak', minimum=0),
        'step_boundaries': Key((), 'schedule=step: multiply by step_factor at '
                               'each of these steps, e.g. (30000, 60000)',
                               of=int),
        'step_factor': Key(0.1, 'schedule=step: the factor', minimum=0),
    },
    'checkpoint': {
        'every_steps': Key(1000, 'save every N steps (and always at the end '
                           'and on preemption); 0: only then', minimum=0),
        'max_to_keep': Key(3, 'recent checkpoints kept', minimum=1),
        'async_save': Key(True, 'write checkpoints in a background thread'),
    },
    'eval': {
        'global_batch_size': Key(None, 'examples per eval step over all '
                                 'replicas; default: train.global_batch_size',
                                 kind=int, minimum=1),
        'split': Key('test', 'the split evaluations read'),
        'every_steps': Key(0, 'train_and_eval: evaluate every N steps; 0: '
                           'once, at the end', minimum=0),
        'timeout_secs': Key(600.0, 'continuous_eval: give up after this long '
                            'without a new checkpoint', minimum=0),
        'best_metric': Key('', 'train_and_eval: loss or one of metric_names '
                           '(not aggregate, streaming or derived ones), whose '
                           'best checkpoint model_dir/best keeps; "": none'),
        'best_mode': Key('auto', 'max or min, for best_metric; auto: min for '
                         'names ending in loss, error, mae, mse, rmse, '
                         'perplexity, bits_per_byte or bits_per_char, else max',
                         choices=('auto', 'max', 'min')),
        'patience': Key(0, 'train_and_eval: stop after N evals without a '
                        'new best (across restarts); 0: never', minimum=0),
    },
    'summary': {
        'every_steps': Key(None, 'TensorBoard training scalars every N steps '
                           '(need not divide steps_per_loop); default: '
                           'train.steps_per_loop; 0: none', kind=int,
                           minimum=0),
        'input_wait_every_loops': Key(10, 'measure the input wait on one inner '
                                      'loop in N; 0: never', minimum=0),
        'histograms_every_steps': Key(0, 'histograms of every trainable '
                                      'weight every N steps; 0: none',
                                      minimum=0),
    },
    'log': {
        'every_secs': Key(0.0, 'at most one progress line per N seconds; 0: '
                          'one per inner loop', minimum=0),
    },
    'export': {
        'at_end': Key(False, 'write a SavedModel to model_dir/export when '
                      'training ends'),
    },
}


def defaults() -> ml_collections.ConfigDict:
  """Every framework key at its default (required ones as typed None)."""
  def build(spec):
    config = ml_collections.ConfigDict()
    for name, key in spec.items():
      if isinstance(key, dict):
        config[name] = build(key)
      elif key.default is REQUIRED or key.default is None:
        config[name] = ml_collections.config_dict.placeholder(key.type)
      else:
        config[name] = key.default
    return config
  return build(SCHEMA)


def merge(user, *, source: str = 'the config') -> ml_collections.ConfigDict:
  """The defaults with `user`'s values laid over them, section by section.

  Args:
    user: a (partial) ConfigDict or dict, as a config file returns it.
    source: how to name its origin in an error, e.g. 'configs/x.py'.
  Raises:
    UserError: a key of a framework section that the framework does not
      know, with the closest valid one.
  """
  config = defaults()
  _lay_over(config, _as_dict(user), SCHEMA, path='', source=source)
  return config


def _as_dict(value):  # placeholder()s kept: they stay overridable.
  return (value.to_dict(preserve_field_references=True)
          if isinstance(value, ml_collections.ConfigDict) else value)


def _lay_over(config, user, spec, *, path, source):
  for name, value in user.items():
    key = f'{path}{name}'
    if name not in spec:
      if path.rstrip('.') in TRAINER_SECTIONS:
        config[name] = value  # The Trainer's own key.
        continue
      valid = sorted(spec) if spec else []
      close = difflib.get_close_matches(name, valid, n=1)
      hint = f'did you mean {path}{close[0]}? ' if close else ''
      raise UserError(
          f'{source}: config key {key} is not a framework key; {hint}valid '
          f'under {path.rstrip(".") or "the top level"}: {", ".join(valid)} '
          f'(a Trainer\'s own keys go under {" or ".join(TRAINER_SECTIONS)})')
    if isinstance(spec[name], dict):
      if not isinstance(value, dict):
        raise UserError(f'{source}: config key {key} must be a section (a '
                        f'ConfigDict), not {value!r}')
      _lay_over(config[name], value, spec[name], path=f'{key}.',
                source=source)
    else:
      value = _typed(spec[name], value)
      if value is not None:
        _check_value(key, spec[name], value)
      config[name] = value


def _typed(key: Key, value):
  """value as the key's type where that is lossless (int -> float, list ->
  tuple), so the ConfigDict keeps the declared type for overrides."""
  if isinstance(value, ml_collections.FieldReference):
    value = value.get()
  if key.type is float and type(value) is int:  # Not a bool.
    return float(value)
  if key.type is tuple and isinstance(value, list):
    return tuple(value)
  return value


def validate(config) -> None:
  """Checks a merged config in place; fills derived defaults.

  Raises:
    UserError: the first bad value: a required key unset, a wrong type, a
      value out of range or not among the choices, or a bad combination.
  """
  _check_section(config, SCHEMA, path='')
  train = config.train
  if config.eval.global_batch_size is None:
    config.eval.global_batch_size = train.global_batch_size
  if config.summary.every_steps is None:
    config.summary.every_steps = train.steps_per_loop
  if train.global_batch_size % train.grad_accum_steps:
    raise UserError(
        f'config key train.grad_accum_steps={train.grad_accum_steps} must '
        f'divide train.global_batch_size={train.global_batch_size} into '
        'equal micro-batches; pick a divisor of it')
  if config.eval.split == 'train':
    # Trainer.dataset('train') repeats forever: an eval would never end.
    raise UserError("config key eval.split='train' is the endless training "
                    'stream and cannot be evaluated once; evaluate a held-out '
                    'split, e.g. --config.eval.split=test')
  _check_data_service(config.data.service)
  check_optimizer(config.optimizer, total_steps=train.steps)


def _check_data_service(address: str) -> None:
  host, _, port = address.removeprefix('grpc://').rpartition(':')
  if address and not (address.startswith('grpc://') and host and
                      port.isdigit()):
    raise UserError(f'config key data.service={address!r} is not a tf.data '
                    'service address; use grpc://HOST:PORT, the address '
                    'python -m input.data_service prints')


def check_optimizer(optimizer, *, total_steps: int = 0) -> None:
  """The combinations of an `optimizer` section that cannot work."""
  name = optimizer.name
  if optimizer.learning_rate <= 0:
    raise UserError(f'config key optimizer.learning_rate='
                    f'{optimizer.learning_rate} must be > 0')
  if name != 'sgd' and (optimizer.momentum or optimizer.nesterov):
    raise UserError(f'config keys optimizer.momentum/nesterov apply to sgd '
                    f'only, not optimizer.name={name!r}; set them to 0/False')
  schedule, warmup = optimizer.schedule, optimizer.warmup_steps
  if total_steps and warmup >= total_steps and schedule != 'constant':
    raise UserError(f'config key optimizer.warmup_steps={warmup} leaves no '
                    f'steps to decay in train.steps={total_steps}; lower it')
  steps = tuple(optimizer.step_boundaries)
  if schedule == 'step' and not (steps and list(steps) == sorted(steps)):
    raise UserError('config key optimizer.step_boundaries='
                    f'{steps!r} must be a non-empty increasing tuple of '
                    'steps for schedule=step, e.g. (30000, 60000)')


def _check_section(config, spec, *, path):
  for name, key in spec.items():
    full = f'{path}{name}'
    if isinstance(key, dict):
      _check_section(config[name], key, path=f'{full}.')
      continue
    value = config[name]
    if value is None:
      if key.default is REQUIRED:
        example = '64' if key.type is int else "'...'"
        raise UserError(f'config key {full} is required: set it in the '
                        f'config file or with --config.{full}={example}')
      continue  # Derived later.
    _check_value(full, key, value)


def _check_value(full: str, key: Key, value) -> None:
  kind, of = key.type, key.of
  # An element with a comma or brackets is a tuple typed as one string
  # (--config.KEY=a,b): no variable path or name holds one.
  if not (_is(kind, value) and (not of or all(
      _is(of, e) and not (of is str and set(',()[]\'"') & set(e))
      for e in value))):
    of = f' of {_describe(of).split()[-1]}s' if of else ''
    one = [e for e in value if isinstance(e, str) and ',' in e] if _is(
        kind, value) else []
    of += f' ({one[0]!r} is one string, not several)' if one else ''
    raise UserError(f'config key {full}={value!r} must be {_describe(kind)}'
                    f'{of}; e.g. --config.{full}={_example(key)}')
  if key.choices and value not in key.choices:
    raise UserError(f'config key {full}={value!r} is unknown; valid: '
                    f'{", ".join(key.choices)}')
  if key.minimum is not None and value < key.minimum:
    bound = f'>= {key.minimum:g}' if key.below is None else (
        f'in [{key.minimum:g}, {key.below:g})')
    raise UserError(f'config key {full}={value!r} must be {bound} '
                    f'({key.meaning})')
  if key.below is not None and value >= key.below:
    raise UserError(f'config key {full}={value!r} must be in '
                    f'[{key.minimum or 0:g}, {key.below:g}) ({key.meaning})')


def _is(kind, value) -> bool:
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  return (isinstance(value, bool) if kind is bool else number if kind is float
          else number and isinstance(value, int) if kind is int
          else isinstance(value, kind))


def _describe(kind) -> str:
  return {bool: 'True or False', int: 'an integer', float: 'a number',
          str: 'a string', tuple: 'a tuple'}.get(kind, kind.__name__)


def _example(key: Key) -> str:
  if key.choices:
    return key.choices[0]
  if key.type is tuple:  # Quoted for the shell.
    return '"%s"' % repr(key.default or {int: (1000, 2000)}.get(
        key.of, ('a', 'b'))).replace(' ', '')
  if key.default not in (REQUIRED, None):
    return repr(key.default).replace(' ', '')
  return {int: '1', float: '1.0', bool: 'True', str: 'NAME'}.get(key.type, '')


def resolve(user, *, source: str = 'the config') -> ml_collections.ConfigDict:
  """merge + validate: the full config for a (partial) one. Idempotent."""
  config = merge(user, source=source)
  validate(config)
  return config


def resolve_section(name: str, user, *, total_steps: int = 0):
  """One framework section (e.g. 'optimizer'), laid over its defaults and
  checked: for code that builds a part from a section of its own, such as a
  second optimizer."""
  config = defaults()[name]
  _lay_over(config, _as_dict(user), SCHEMA[name], path=f'{name}.',
            source='the config')
  _check_section(config, SCHEMA[name], path=f'{name}.')
  if name == 'optimizer':
    check_optimizer(config, total_steps=total_steps)
  return config


def _leaf_paths(spec, prefix=''):
  for name, key in spec.items():
    if isinstance(key, dict):
      yield from _leaf_paths(key, f'{prefix}{name}.')
    else:
      yield f'{prefix}{name}'


def describe() -> str:
  """Every framework key, its default and meaning, as a markdown table
  (docs/running.md prints it; `python -m trainer.schema` too)."""
  lines = ['| key | default | meaning |', '| --- | --- | --- |']
  for path in _leaf_paths(SCHEMA):
    node = SCHEMA
    for part in path.split('.'):
      node = node[part]
    default = ('required' if node.default is REQUIRED else
               'derived' if node.default is None else f'`{node.default!r}`')
    lines.append(f'| `{path}` | {default} | {node.meaning} |')
  return '\n'.join(lines)

if __name__ == '__main__':
  print(describe())

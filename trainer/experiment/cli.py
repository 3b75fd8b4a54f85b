"""Command-line plumbing: flags checked, mistakes in one line.

Imports no TensorFlow: main.py checks flags and the whole config against the
schema (trainer/schema.py) with it first, so a mistake costs a fraction of a
second. The --config flag and its files: config_file.py.
"""

import dataclasses
import datetime
import os
import re
import shlex

from absl import flags
from absl import logging
from ml_collections import config_dict
from ml_collections.config_flags import config_flags

from trainer import errors
from trainer import schema
from trainer.cluster import STRATEGIES
from trainer.cluster import asynchronous
from trainer.cluster import tf_config
from trainer.experiment import config_file
from trainer.errors import UserError
from trainer.persistence import run_lock

MODES = ('train', 'eval', 'train_and_eval', 'continuous_eval', 'export')
# Exit statuses a job manager must not retry: a bad command (UserError) and
# a non-finite loss (controller.NonFiniteLoss).
PERMANENT_CODES = (2, 3)


def parse_flags(argv):
  """absl flag parsing (for app.run) with every mistake in one line.

  Also loads --config now, so a missing file, unknown variant or unknown
  override key is reported here rather than deep inside the run.
  """
  from trainer.persistence import preemption  # pylint: disable=import-outside-toplevel
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS:
      flags.FLAGS.config  # pylint: disable=pointless-statement
  except preemption.Preempted as e:
    preemption.exit_preempted(e, preemption.retryable_code_in(argv))
  except UserError as e:
    errors.fail(str(e))
  except (flags.Error, IOError, ValueError, TypeError, KeyError,
          AttributeError) as e:
    errors.fail(_explain(argv, e))
  if len(rest) > 1:
    errors.fail(f'unexpected argument(s) {rest[1:]}; flags take the form '
                '--name=value')
  return rest


def _config_spec(argv):
  return next((a.split('=', 1)[1] for a in argv[1:]
               if a.startswith('--config=')), None)


def _explain(argv, error: Exception) -> str:
  """A one-line message for a flag error, naming the flag and the fix."""
  missing = re.match(r'Missing value for flag (--\S+)', str(error))
  if missing:
    return f'flag {missing[1]}: no value given; write it as {missing[1]}=VALUE'
  spec = _config_spec(argv)
  if spec is None:
    return errors.one_line(error)
  override = re.match(r'flag --config\.([^=]+)=', str(error))
  unset = re.search(r"'(NoneType|list)'> of field config\.(\S+) is not "
                    'supported', str(error))
  if unset:  # ml_collections cannot override a None or a list.
    kind, key = unset.groups()
    fix = ('give it a default there, or declare it '
           'ml_collections.config_dict.placeholder(TYPE)')
    if kind == 'list':
      fix = (f'make it a tuple there, e.g. {key.rpartition(".")[2]}='
             f'{tuple(config_file.load_config(spec)[key])}')
    return (f'flag --config.{key}: config key {key} is '
            f'{"a list" if kind == "list" else "None"} in {spec}, which no '
            f'override can set; {fix}')
  if isinstance(error, flags.IllegalFlagValueError) and override:
    return _bad_value(argv, spec, override.group(1), error)
  if isinstance(error, (KeyError, AttributeError)):
    try:
      config = config_file.load_config(spec)
    except Exception:  # pylint: disable=broad-except
      return errors.one_line(error)
    for arg in argv[1:]:
      match = re.match(r'^--(?:no)?config\.([^=]+)', arg)
      if match:
        missing = _missing_key(config, match.group(1))
        if missing:
          return f'flag {arg}: {missing}'
  text = errors.one_line(error)
  if text.startswith('flag --') or isinstance(error,
                                               flags.UnrecognizedFlagError):
    return text  # Names its own flag (not --config).
  return f'flag --config={spec}: {text}'


# What a --config.KEY=VALUE override must be, by the type of the key's value.
_TYPES = {int: 'an int', float: 'a number', bool: 'true or false',
          tuple: 'a tuple', str: 'a string'}


def _bad_value(argv, spec: str, key: str, error: Exception) -> str:
  """absl's 'flag --config.KEY=VALUE: why', with the type and an example."""
  message = errors.one_line(error)
  given = [a for a in argv if a.startswith(f'--config.{key}=')]
  try:
    current = config_file.load_config(spec)[key]
  except Exception:  # pylint: disable=broad-except
    return message
  if type(current) not in _TYPES:  # e.g. None: any type may be meant.
    return message
  example = (str(current).lower() if isinstance(current, bool) else
             repr(current).replace(' ', '') if isinstance(current, tuple) else
             current)
  flag = given[-1] if given else f'--config.{key}'
  return (f'flag {flag}: not {_TYPES[type(current)]}; e.g. '
          f'{shlex.quote(f"--config.{key}={example}")}')


def _missing_key(config, dotted: str):
  """Why `dotted` is not a key of config, or None when it is."""
  node, walked = config, []
  for part in dotted.split('.'):
    keys = list(node.keys()) if hasattr(node, 'keys') else []
    if part not in keys:
      where = f"under '{'.'.join(walked)}'" if walked else 'at the top level'
      own = ('; a key of your own is declared in the config file first: '
             f'config.{dotted} = DEFAULT in get_config(), then overridden'
             if walked and walked[0] in schema.TRAINER_SECTIONS else '')
      return (f'config has no key {dotted!r} (no {part!r} {where}); valid '
              f'there: {", ".join(sorted(keys))}{own}')
    node, walked = node[part], walked + [part]
  return None


@dataclasses.dataclass(frozen=True)
class RunRequest:
  """What main.py was asked to do, every flag and the config checked."""
  config: config_dict.ConfigDict
  model_dir: str
  mode: str
  strategy: str
  tpu: str
  tpu_timeout: float
  num_cpu_devices: int
  cluster_timeout: float
  deterministic: bool
  profile_steps: tuple[int, int] | None
  retryable_exit_code: int | None = None
  # 'worker' or 'ps': a parameter-server task that only serves the chief.
  serves: str = ''
  # Whether this process writes model_dir (False: another worker of a
  # cluster, which writes a private directory).
  chief: bool = True


def run_request(flag_values) -> RunRequest:
  """main.py's flags and config, checked without TensorFlow.

  Raises:
    UserError: the first bad flag or config value, in one line.
  """
  f = flag_values
  if f.mode not in MODES:
    raise UserError(f'flag --mode={f.mode!r} is unknown; valid: '
                    f'{", ".join(MODES)}')
  if f.strategy not in STRATEGIES:
    raise UserError(f'flag --strategy={f.strategy!r} is unknown; valid: '
                    f'{", ".join(STRATEGIES)}')
  if f.tpu and f.strategy != 'tpu':
    raise UserError(f'flag --tpu={f.tpu!r} needs --strategy=tpu (got '
                    f'--strategy={f.strategy}); drop --tpu or pass '
                    '--strategy=tpu')
  if f.strategy == 'tpu' and not f.tpu:
    raise UserError('flag --strategy=tpu needs --tpu=NAME, '
                    '--tpu=grpc://HOST:PORT or --tpu=local (on a TPU VM)')
  if f.tpu.startswith('grpc://'):
    tf_config.tpu_address(f.tpu)
  for name in ('tpu_timeout', 'cluster_timeout'):
    if not f[name].value > 0:
      raise UserError(f'flag --{name}={f[name].value:g} must be > 0 '
                      '(seconds)')
  if f.num_cpu_devices < 1:
    raise UserError(f'flag --num_cpu_devices={f.num_cpu_devices} must be '
                    '>= 1')
  if f.num_cpu_devices > 1 and f.strategy not in ('mirrored',
                                                  'multi_worker_mirrored'):
    raise UserError(f'flag --num_cpu_devices={f.num_cpu_devices} makes '
                    'replicas only under --strategy=mirrored (or '
                    f'multi_worker_mirrored), not --strategy={f.strategy}; '
                    'add --strategy=mirrored')
  profile_steps = parse_profile_steps(f.profile_steps)
  code = f.retryable_exit_code
  if code is not None and (not 1 <= code <= 255 or code in PERMANENT_CODES):
    raise UserError(f'flag --retryable_exit_code={code} must be in 1..255 '
                    f'and not {" or ".join(map(str, PERMANENT_CODES))} (a '
                    'bad command, a non-finite loss: never retried); e.g. '
                    '143 for a TFJob that retries 128-255')
  tf_config.set_from_flags(f.worker_hosts, f.task_index, strategy=f.strategy)
  mode, strategy = f.mode, f.strategy
  serves, role = '', 'chief'
  if (strategy in ('default', 'one_device', 'mirrored') and
      mode in ('train', 'train_and_eval') and
      tf_config.check_one_process(strategy)):
    role = 'evaluator'  # Beside a chief that trains under this strategy.
  if strategy in ('multi_worker_mirrored', 'parameter_server'):
    # Validated now: TensorFlow would wait forever.
    role = tf_config.role(tf_config.from_environ(strategy=strategy))
    if role == 'evaluator':  # Its strategy would wait for the cluster.
      strategy = 'default'
    elif strategy == 'parameter_server':
      _check_parameter_server(f)
      schema.validate(f.config)
      for key, fix in asynchronous.conflicts(f.config)[:1]:
        raise UserError(f'config key {key} is not supported with --strategy='
                        f'parameter_server: {fix}')
      # Workers and ps tasks run the same command and serve the chief.
      serves = role if role in ('worker', 'ps') else ''
  if role == 'evaluator':
    # The evaluator task (outside the cluster, as TFJob puts it) runs the
    # same command: it evaluates each checkpoint of --model_dir, alone.
    mode = 'continuous_eval'
    for variable in tf_config.TASK_VARIABLES:  # Not for TensorFlow to read.
      os.environ.pop(variable, None)
    logging.info('TF_CONFIG (or CLUSTER_SPEC) names this process the '
                 'evaluator task: it evaluates each checkpoint of --model_dir '
                 'as it appears (--mode=continuous_eval) and exits when '
                 'training ends')
  config = f.config
  schema.validate(config)
  return RunRequest(
      config=config, mode=mode, strategy=strategy, tpu=f.tpu,
      model_dir=f.model_dir or default_model_dir(
          config_flags.get_config_filename(f['config'])),
      tpu_timeout=f.tpu_timeout, num_cpu_devices=f.num_cpu_devices,
      cluster_timeout=f.cluster_timeout, deterministic=f.deterministic,
      profile_steps=profile_steps, retryable_exit_code=code, serves=serves,
      chief=role == 'chief')


def _check_parameter_server(f) -> None:
  """What --strategy=parameter_server cannot do, refused on every task."""
  if f.mode not in ('train', 'train_and_eval'):
    raise UserError(f'flag --mode={f.mode} with --strategy=parameter_server: '
                    'the cluster only trains; evaluate or export its '
                    'checkpoints with --strategy=default (or an evaluator '
                    'task for continuous_eval)')
  if f.deterministic:
    raise UserError('flag --deterministic with --strategy=parameter_server: '
                    'workers apply their updates asynchronously, in an order '
                    'no seed fixes; drop --deterministic, or train with '
                    'multi_worker_mirrored')


def check_model_dir(model_dir: str, mode: str, chief: bool = True) -> None:
  """Refuses a --model_dir that cannot serve `mode`, before TensorFlow: for
  training also one that another training run holds (when this process is
  the one that will write it, `chief`).

  Creates nothing: training makes the directory only once the Trainer has
  passed validation (trainer/experiment/run.py probes it again then, and
  takes the lock).
  """
  if '://' in model_dir:
    # run.json, config.json, goodput, eval records and the cleanup of
    # partial checkpoints use the local file system: a URL would split the
    # run between the bucket and a local directory named 'gs:'.
    raise UserError(f'flag --model_dir={model_dir!r} is a URL; distloop '
                    'writes model_dir through the local file system: pass a '
                    'local path or a mounted bucket (e.g. /gcs/BUCKET/run '
                    'with Cloud Storage FUSE)')
  if mode in ('eval', 'export'):
    if not os.path.isdir(model_dir):
      raise UserError(f'--mode={mode} needs a trained run in --model_dir, '
                      f'but {model_dir!r} does not exist')
    return
  if mode == 'continuous_eval':
    return  # It waits for the training run to make the directory.
  existing = os.path.realpath(model_dir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    problem = f'{existing!r} is a file'
  elif not os.access(existing, os.W_OK | os.X_OK):
    problem = f'{existing!r} is not writable'
  else:
    if chief:
      run_lock.check_free(model_dir)
    return
  raise UserError(f'flag --model_dir={model_dir!r} is not a writable '
                  f'directory ({problem}); pass a directory you can write to')


def default_model_dir(config_path: str) -> str:
  """runs/<config name>-<variant>-<timestamp>, relative to the working dir."""
  name = os.path.basename(config_path).replace('.py', '').replace(':', '-')
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  return os.path.join('runs', f'{name}-{stamp}')


def parse_profile_steps(value: str) -> tuple[int, int] | None:
  """'10,15' -> (10, 15); '' -> None.

  Raises:
    UserError: naming --profile_steps, when the value is not two integers
      1 <= START <= END.
  """
  if not value:
    return None
  parts = value.split(',')
  try:
    start, end = (int(p) for p in parts)
  except ValueError:
    start = end = None
  if start is None or not 1 <= start <= end:
    raise UserError(f'flag --profile_steps={value!r} must be START,END with '
                    '1 <= START <= END (the first and last step to trace, '
                    'e.g. --profile_steps=10,15)')
  return start, end

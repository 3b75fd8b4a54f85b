"""The --config flag: a config file laid over the schema's defaults.

`--config=path/to/file.py[:VARIANT]`. The file's `get_config(variant)`
returns a (partial) ConfigDict; the variant after ':' must be one of the
file's module-level VARIANTS tuple (a file without one has no variants, and
any ':VARIANT' is refused). The result is laid over the schema's defaults
(`schema.merge`), then `--config.KEY=VALUE` overrides apply to any key,
whether or not the file mentions it. Imports no TensorFlow.
"""

import glob
import importlib.util
import os
import re

from absl import flags
from ml_collections import config_dict
from ml_collections.config_flags import config_flags

from trainer import errors
from trainer import schema
from trainer.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def use_default_config(argv, default_path: str) -> None:
  """Adds --config=default_path to argv (in place) when no --config is given.

  ml_collections parses a default config file, with the --config.KEY
  overrides, while the flag is being *defined*, outside any error handling.
  Naming the file on the command line moves that parse into `parse_flags`.
  Two --config flags: one line, exit 2 (ml_collections: "defined twice").
  """
  given = [a for a in argv[1:] if re.match(r'^--?config(=|$)', a)]
  if len(given) > 1:
    errors.fail(f'flag --config is given {len(given)} times '
                f'({", ".join(given)}); give one config file and change its '
                'keys with --config.KEY=VALUE')
  if not given:
    argv.insert(1, f'--config={default_path}')


def define_config_flag(default_path: str, flag_values=flags.FLAGS):
  """Defines --config: a config file laid over the schema's defaults."""
  flag = config_flags._ConfigFlag(  # pylint: disable=protected-access
      parser=_ConfigFileParser(name='config', lock_config=True),
      serializer=flags.ArgumentSerializer(), name='config',
      default=default_path, flag_values=flag_values,
      help_string='Experiment config: FILE.py[:VARIANT]; override any key '
      'with --config.KEY=VALUE (trainer/schema.py lists them).')
  return flags.DEFINE_flag(flag, flag_values)


class _ConfigFileParser(config_flags.ConfigFileFlagParser):

  def parse(self, path):
    config = load_config(path)
    config.lock()
    return config


def load_config(spec: str) -> config_dict.ConfigDict:
  """FILE.py[:VARIANT] -> its config laid over the schema's defaults.

  Raises:
    UserError: no such file, an unknown variant, get_config failing, or a
      key of a framework section that the framework does not know.
  """
  path, _, variant = spec.partition(':')
  if not os.path.isfile(path):
    # Shipped configs, as a path from here when under it, else whole.
    available = sorted(p if os.path.relpath(p).startswith('..') else
                       os.path.relpath(p) for p in
                       glob.glob(os.path.join(REPO, 'configs', '*.py')))
    raise UserError(f'flag --config={spec}: no such file {path!r}; '
                    f'available: {", ".join(available)}')
  module = load_module(path)
  names = variants(module)
  if variant and variant not in names:
    valid = ('none: it declares no VARIANTS' if not names else
             f'valid: {", ".join(names)}')
    raise UserError(f'config variant {variant!r} is unknown in {path}; '
                    f'{valid}')
  if not callable(getattr(module, 'get_config', None)):
    raise UserError(f'flag --config={spec}: {path} has no get_config() '
                    'function returning the config')
  try:
    user = module.get_config(variant) if names else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'flag --config={spec}: get_config() raised '
                    f'{type(e).__name__}: {errors.one_line(e)}') from e
  if not isinstance(user, (config_dict.ConfigDict, dict)):
    raise UserError(f'flag --config={spec}: get_config() returned '
                    f'{type(user).__name__}, not a ConfigDict')
  return schema.merge(user, source=path)


def load_module(path: str):
  """Executes a config file as a module of its own.

  Raises:
    UserError: it does not load (a syntax error, a failing import...),
      naming the error and where it was raised.
  """
  spec = importlib.util.spec_from_file_location(
      '_distloop_config_' + re.sub(r'\W', '_', path), path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'flag --config={path}: the config file does not load: '
                    f'{errors.raised_at(e)}') from e
  return module


def variants(module) -> tuple[str, ...]:
  """The variants a config module declares (module-level VARIANTS)."""
  names = getattr(module, 'VARIANTS', ())
  return tuple(names) if isinstance(names, (tuple, list)) else ()

"""config.trainer -> the Trainer subclass: a registered name or an import path.

  config.trainer = 'classifier'                         # @register('classifier')
  config.trainer = 'my_package.my_module:MyTrainer'     # any importable module

An import path needs no registration and no edit of this repository: the
module is imported from the path: main.py puts the distloop directory first
on sys.path, then the working directory, then PYTHONPATH's entries.
"""

import importlib
import os

from trainer import errors
from trainer.errors import UserError

_TRAINERS = {}


def register(name: str):
  """Class decorator: `@register('classifier') class ClassifierTrainer(...)`."""
  def wrap(cls):
    if name in _TRAINERS and _TRAINERS[name] is not cls:
      raise ValueError(f'trainer name {name!r} is registered twice: '
                       f'{_TRAINERS[name].__name__} and {cls.__name__}')
    _TRAINERS[name] = cls
    return cls
  return wrap


def get(name: str):
  """Returns the Trainer subclass named by `name` (see the module docstring).

  Raises:
    UserError: an unknown name, a module that does not import, a missing
      class, or a class that is not a Trainer.
  """
  if not isinstance(name, str) or not name:
    raise UserError(f'config key trainer={name!r} must name a trainer: a '
                    'registered name or "module.path:ClassName"')
  if ':' in name:
    return _from_path(name)
  if name not in _TRAINERS:
    raise UserError(f'config key trainer={name!r} names no registered trainer; '
                    f'valid: {", ".join(sorted(_TRAINERS))}, or an import path '
                    '"my_module:MyTrainer"')
  return _TRAINERS[name]


def _from_path(name: str):
  from trainer.trainer import Trainer  # pylint: disable=import-outside-toplevel
  module_name, _, class_name = name.partition(':')
  if module_name.endswith('.py') or '/' in module_name:
    directory, file = os.path.split(module_name.removesuffix('.py'))
    raise UserError(
        f'config key trainer={name!r} is a file path; name its module as '
        f'Python imports it: trainer="{file}:{class_name}" with '
        f'PYTHONPATH={directory or "."}')
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # pylint: disable=broad-except
    missing = e.name if isinstance(e, ModuleNotFoundError) else None
    if missing and (module_name == missing or
                    module_name.startswith(missing + '.')):
      raise UserError(
          f'config key trainer={name!r}: no module {missing!r} on the path '
          f'(working directory {os.getcwd()} and PYTHONPATH); check '
          'the spelling, or add its directory to PYTHONPATH') from e
    # Its own code failed (a syntax error, an import of something missing).
    raise UserError(f'config key trainer={name!r}: module {module_name!r} '
                    f'does not import: {errors.raised_at(e)}') from e
  cls = getattr(module, class_name, None)
  if cls is None:
    found = sorted(k for k, v in vars(module).items()
                   if isinstance(v, type) and issubclass(v, Trainer) and
                   v is not Trainer)
    raise UserError(f'config key trainer={name!r}: module {module_name!r} has '
                    f'no {class_name!r}; Trainer subclasses there: '
                    f'{", ".join(found) or "none"}')
  if not (isinstance(cls, type) and issubclass(cls, Trainer)):
    raise UserError(f'config key trainer={name!r}: {class_name} is not a '
                    'subclass of trainer.trainer.Trainer')
  return cls


def names():
  return sorted(_TRAINERS)

"""Name -> Trainer subclass, so a config picks its trainer with `trainer=NAME`."""

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
  """Returns the Trainer subclass registered under `name`."""
  if name not in _TRAINERS:
    raise UserError(f'config key trainer={name!r} names no registered trainer; '
                    f'valid: {", ".join(sorted(_TRAINERS))} '
                    '(register a Trainer subclass with @registry.register)')
  return _TRAINERS[name]


def names():
  return sorted(_TRAINERS)

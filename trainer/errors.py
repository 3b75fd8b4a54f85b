"""The exception types a command reports in one line, and how it does.

A `UserError` is a bad flag, config key, TF_CONFIG, path or value. Entry points
print its message as one line and exit with status 2 (no stack trace); its
message names the flag or key, the value given, the rule and the fix.
"""

import os
import re
import sys


class UserError(Exception):
  """A mistake in the user's input, reported in one line."""

  EXIT_CODE = 2


class NonFiniteLoss(Exception):
  """The loss or gradient norm was NaN/Inf and recovery is off or exhausted
  (trainer/controller.py): exit status 3."""

  EXIT_CODE = 3


def fail(message: str):
  """Prints `error: message` to stderr and exits with status 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(UserError.EXIT_CODE)


def raised_at(error: Exception) -> str:
  """'Type: message (file, line N)' for an error raised while importing a
  user's file: the innermost line that is not the import machinery's."""
  where, text = None, one_line(error)
  if isinstance(error, SyntaxError) and error.filename:
    where, text = (error.filename, error.lineno), error.msg
  tb = None if where else error.__traceback__
  while tb is not None:
    if not tb.tb_frame.f_code.co_filename.startswith('<'):  # Not frozen.
      where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
    tb = tb.tb_next
  text = f'{type(error).__name__}: {text}'
  return text + (f' ({where[0]}, line {where[1]})' if where else '')


def exit_now(code: int) -> None:
  """os._exit(code): no interpreter shutdown (callers flush first).

  Removes first the Python files AutoGraph wrote to the temporary directory
  for the functions it converted (atexit handlers, which os._exit skips,
  would have): otherwise each run leaves its ~7 files there.
  """
  for name, module in list(sys.modules.items()):
    if name.startswith('__autograph_generated_file'):
      try:
        os.remove(module.__file__)
      except (OSError, AttributeError, TypeError):
        pass
  os._exit(code)  # pylint: disable=protected-access


def one_line(error: Exception) -> str:
  """The informative last line of a (possibly multi-line) error message.

  For a config key that code read and the config lacks: the key and the fix.
  """
  try:
    missing = missing_config_key(error)
  except Exception:  # pylint: disable=broad-except
    missing = None  # Never hide the error being reported behind another.
  if missing:
    return missing
  text = re.sub(r'\x1b\[[0-9;]*m', '', str(error))  # Keras' bold.
  # Keras ends a layer's error with the arguments of the call it failed in.
  text = re.split(r'\n\s*Arguments received by ', text)[0]
  lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
  line = lines[-1] if lines else type(error).__name__
  # Tracing errors end in "ExceptionName: message" lines (AutoGraph).
  return re.sub(r'^\w*(Error|Exception): ', '', line)


def missing_config_key(error: Exception) -> str | None:
  """'config has no key ...' when `error` is a ConfigDict's missing key.

  ml_collections raises a KeyError (config['k']) or AttributeError
  (config.k) naming only the key, from the ConfigDict's own __getitem__ or
  __getattr__, the innermost frame. The section is found by identity under
  the roots the traceback's frames hold (a ConfigDict local, or the
  `config` of a `self`, e.g. the Trainer's); the root it lies deepest
  under names it whole. With no root, only the key is named.
  """
  if not isinstance(error, (KeyError, AttributeError)):
    return None
  # Here, not at the top: trainer.cluster.launch imports this module and
  # never needs ml_collections.
  from ml_collections import config_dict  # pylint: disable=import-outside-toplevel
  tb, frames = error.__traceback__, []
  while tb is not None:
    frames.append(tb.tb_frame)
    tb = tb.tb_next
  if not frames or frames[-1].f_code.co_name not in ('__getattr__',
                                                     '__getitem__'):
    return None
  inner = frames[-1].f_locals
  section = inner.get('self')
  key = inner.get('attribute', inner.get('key'))
  if not isinstance(section, config_dict.ConfigDict) or not isinstance(
      key, str) or key in section:
    return None
  roots = []
  for frame in frames[:-1]:
    for value in frame.f_locals.values():
      attributes = getattr(value, '__dict__', None)
      if isinstance(attributes, dict):
        value = attributes.get('config', value)
      if isinstance(value, config_dict.ConfigDict):
        roots.append(value)
  paths = [p for p in (_path(root, section) for root in roots)
           if p is not None]
  path = max(paths, key=len) if paths else None
  similar = re.search(r'Did you mean "([^"]+)"', str(error))
  from trainer import schema  # pylint: disable=import-outside-toplevel
  own = ' or '.join(schema.TRAINER_SECTIONS)  # Where a Trainer's keys go.
  if path is not None and _in_schema((*path, key)):
    # Framework keys are laid over the config only after get_config().
    name = '.'.join((*path, key))
    near = (f' (it has {similar.group(1)!r}: a misspelling?)' if similar
            else '')
    value = 'dict(...)' if isinstance(_in_schema((*path, key)), dict) else '...'
    return (f'config has no key {name!r} yet{near}; the framework\'s defaults '
            'are added only after get_config() returns, so get_config() must '
            f'create it before using it: config.{name} = {value}')
  if path is None:
    named, fix = f'{key!r} (in a section of it)', f'the {own} section of'
  else:
    named = repr('.'.join((*path, key)))
    fix = (f'the {".".join(path)} section of' if path and path[0] in
           schema.TRAINER_SECTIONS else f'the {own} section (a Trainer\'s '
           'own keys go there; this one is not a framework key) of')
  return (f'config has no key {named}'
          f'{f" (did you mean {similar.group(1)!r}?)" if similar else ""}; '
          f"add {key}=... to {fix} the config file's get_config() "
          '(--config.KEY=VALUE overrides only keys the config has)')


def _in_schema(path):
  """The schema's entry (a section dict or a Key) at `path`, or None."""
  from trainer import schema  # pylint: disable=import-outside-toplevel
  node = schema.SCHEMA
  for part in path:
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def _path(root, target) -> tuple[str, ...] | None:
  """The keys from ConfigDict `root` down to the ConfigDict `target`."""
  from ml_collections import config_dict  # pylint: disable=import-outside-toplevel
  stack, seen = [(root, ())], set()
  while stack:
    node, path = stack.pop()
    if node is target:
      return path
    if id(node) in seen:
      continue
    seen.add(id(node))
    stack.extend((value, (*path, str(name))) for name, value in
                 node.items(preserve_field_references=True)
                 if isinstance(value, config_dict.ConfigDict))
  return None


def hide_coordinator_reports() -> None:
  """Keeps TensorFlow's coordinator from logging a replica's error.

  Under MirroredStrategy each replica's step runs in a thread whose
  exception TensorFlow's Coordinator logs ('Error reported to Coordinator',
  ~40-60 lines of traceback) and then raises again in the caller, always
  (coordinator.py: the join re-raises the first one reported). There it is
  reported once: in one line when it is a mistake in the user's code (a
  UserError, or an error in a Trainer method found while tracing), else
  with its stack, which the log would only have printed twice.
  """
  import logging  # pylint: disable=import-outside-toplevel

  def keep(record) -> bool:
    return not record.getMessage().startswith('Error reported to Coordinator')
  tf_logger = logging.getLogger('tensorflow')
  if not getattr(tf_logger, 'hides_coordinator_reports', False):
    tf_logger.addFilter(keep)
    tf_logger.hides_coordinator_reports = True

"""Command-line plumbing shared by main.py and the tools: one-line errors."""

import glob
import importlib.util
import os
import re
import sys

from absl import flags

from trainer.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fail(message: str):
  """Prints `error: message` to stderr and exits with status 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(UserError.EXIT_CODE)


def one_line(error: Exception) -> str:
  """The informative last line of a (possibly multi-line) error message."""
  lines = [l.strip() for l in str(error).strip().splitlines() if l.strip()]
  line = lines[-1] if lines else type(error).__name__
  return re.sub(r'^(ValueError|KeyError|TypeError|IOError|OSError): ', '', line)


def use_default_config(argv, default_path: str) -> None:
  """Adds --config=default_path to argv (in place) when no --config is given.

  ml_collections parses a default config file, with the --config.KEY
  overrides, while the flag is being *defined*, outside any error handling.
  Naming the file on the command line moves that parse into `parse_flags`.
  """
  if not any(re.match(r'^--?config(=|$)', a) for a in argv[1:]):
    argv.insert(1, f'--config={default_path}')


def parse_flags(argv):
  """absl flag parsing (for app.run) with every mistake in one line.

  Also loads --config now, so a missing file, unknown variant or unknown
  override key is reported here rather than deep inside the run.
  """
  missing = _missing_config_file(argv)
  if missing:
    fail(missing)
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS:
      flags.FLAGS.config  # pylint: disable=pointless-statement
  except (flags.Error, IOError, ValueError, TypeError, KeyError,
          AttributeError) as e:
    fail(_explain(argv, e))
  if len(rest) > 1:
    fail(f'unexpected argument(s) {rest[1:]}; flags take the form '
         '--name=value')
  return rest


def _config_spec(argv):
  return next((a.split('=', 1)[1] for a in argv[1:]
               if a.startswith('--config=')), None)


def _missing_config_file(argv):
  spec = _config_spec(argv)
  path = (spec or '').partition(':')[0]
  if spec is None or os.path.isfile(path):
    return None
  available = sorted(os.path.relpath(p) for p in
                     glob.glob(os.path.join(REPO, 'configs', '*.py')))
  return (f'flag --config={spec}: no such file {path!r}; available: '
          f'{", ".join(available)}')


def _explain(argv, error: Exception) -> str:
  """A one-line message for a flag error, naming the flag and the fix."""
  spec = _config_spec(argv)
  if spec is None:
    return one_line(error)
  path, _, variant = spec.partition(':')
  if isinstance(error, (KeyError, AttributeError)):
    try:
      config = _load(path, variant)
    except Exception:  # pylint: disable=broad-except
      return one_line(error)
    for arg in argv[1:]:
      match = re.match(r'^--(?:no)?config\.([^=]+)', arg)
      if match:
        missing = _missing_key(config, match.group(1))
        if missing:
          return f'flag {arg}: {missing}'
  return f'flag --config={spec}: {one_line(error)}'


def _load(path: str, variant: str):
  spec = importlib.util.spec_from_file_location('_distloop_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def _missing_key(config, dotted: str):
  """Why `dotted` is not a key of config, or None when it is."""
  node, walked = config, []
  for part in dotted.split('.'):
    keys = list(node.keys()) if hasattr(node, 'keys') else []
    if part not in keys:
      where = f"under '{'.'.join(walked)}'" if walked else 'at the top level'
      return (f'config has no key {dotted!r} (no {part!r} {where}); valid '
              f'there: {", ".join(sorted(keys))}')
    node, walked = node[part], walked + [part]
  return None

"""The one exception type for user mistakes, and how a command reports one.

A `UserError` is a bad flag, config key, TF_CONFIG, path or value. Entry points
print its message as one line and exit with status 2 (no stack trace); its
message names the flag or key, the value given, the rule and the fix.
"""

import re
import sys


class UserError(Exception):
  """A mistake in the user's input, reported in one line."""

  EXIT_CODE = 2


def fail(message: str):
  """Prints `error: message` to stderr and exits with status 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(UserError.EXIT_CODE)


def one_line(error: Exception) -> str:
  """The informative last line of a (possibly multi-line) error message."""
  lines = [l.strip() for l in str(error).strip().splitlines() if l.strip()]
  line = lines[-1] if lines else type(error).__name__
  # Tracing errors end in "ExceptionName: message" lines (AutoGraph).
  return re.sub(r'^\w*(Error|Exception): ', '', line)

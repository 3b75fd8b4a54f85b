"""The one exception type for user mistakes.

A `UserError` is a bad flag, config key, TF_CONFIG, path or value. Entry points
print its message as one line and exit with status 2 (no stack trace); its
message names the flag or key, the value given, the rule and the fix.
"""


class UserError(Exception):
  """A mistake in the user's input, reported in one line."""

  EXIT_CODE = 2

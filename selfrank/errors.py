"""The one exception type for user mistakes.

Anything raised as ``UserError`` is reported by the CLI as a single line and exit code 2, with
no traceback. Raise it for bad configs, bad input files and bad arguments; let programming
errors stay ordinary exceptions so that they keep their tracebacks.
"""


class UserError(ValueError):
    """A mistake in the user's input: config, data file, argument or environment."""

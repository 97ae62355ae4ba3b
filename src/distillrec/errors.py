"""The user-error contract: every mistake in a user's data or configuration is a :class:`UserError`.

The command line catches ``UserError`` for every command and prints its message on one line (exit code 2, no
traceback). A message names the file, line, field or key that is wrong and says how to fix it.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix (data or configuration); the message names where it is and the fix."""


class DataError(UserError):
    """A problem in a user's data: the message names the file, the line or field, and the fix."""


class ConfigError(UserError):
    """A problem in a configuration or a command-line option; the message names the key and the fix."""

"""User-facing errors.

An ``LMStackError`` is a mistake in the user's input (a missing file, a wrong format, an
unsupported architecture, a bad config value). The CLI prints its message on one line and
exits with status 2, without a traceback. Anything else is a bug and keeps its traceback.
"""


class LMStackError(Exception):
    """A problem with user input: the message names what was found and what was expected."""


class ConfigError(LMStackError, ValueError):
    """A config field has a wrong value or type."""


class UnsupportedError(LMStackError):
    """A format, architecture or feature lmstack does not handle."""

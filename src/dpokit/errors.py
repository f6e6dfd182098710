"""The project's own error types.

Every problem a user can fix (bad data, a mistyped config key, an impossible setting) is raised as a
:class:`DpokitError` subclass whose message says *where* (file, line/row, field) and *what to do*.
The command line prints these messages without a stack trace; anything else is a bug.
"""

from __future__ import annotations


class DpokitError(Exception):
    """Base class for errors the user can act on."""


class DataError(DpokitError):
    """A preference file or row is unusable (missing field, wrong type, malformed JSON, ...)."""


class ConfigError(DpokitError):
    """A configuration key or value is wrong."""


class TrainingError(DpokitError):
    """The run cannot continue (non-finite loss, incompatible checkpoint, ...)."""

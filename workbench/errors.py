"""The project's error types: each carries a one-line message that names what and where.

The CLI prints `error: <message>` and exits with status 2 for any `WorkbenchError`; every
other exception is a bug and keeps its traceback.
"""


class WorkbenchError(Exception):
    """Bad input or a bad file: the message is one line and says what and where."""


class UnknownModelError(WorkbenchError):
    """A model spec that names no built-in model, local folder or reachable hub model."""


class UnknownHookError(WorkbenchError):
    """A hook name the model does not have."""


class CorpusError(WorkbenchError):
    """An empty, unreadable or too-short corpus."""


class CacheError(WorkbenchError):
    """An activation cache that is missing, corrupt, truncated or of an unknown format."""


class MissingExtraError(WorkbenchError):
    """A feature whose optional dependencies are not installed."""


class ConfigError(WorkbenchError):
    """A configuration value out of range or of the wrong kind."""

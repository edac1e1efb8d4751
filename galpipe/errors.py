"""galpipe's own exception types.

Every error galpipe raises on bad input is a :class:`GalpipeError`; the message
names the file, row or config key at fault and what was expected.
"""


class GalpipeError(Exception):
    """Base class of every error galpipe raises on purpose."""


class ConfigError(GalpipeError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class DataError(GalpipeError, ValueError):
    """An input file, table row or array is malformed (names the file/row)."""


class SourceError(GalpipeError, RuntimeError):
    """A remote or simulated data source failed (HTTP error, empty query, ...)."""


class ModelError(GalpipeError, ValueError):
    """An architecture, layer spec or saved model is inconsistent."""

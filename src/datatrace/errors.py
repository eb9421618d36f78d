"""The error hierarchy every datatrace component raises.

Messages name what was received, what was expected and how to fix it. User input is
never checked with ``assert``.
"""

from __future__ import annotations


class DatatraceError(Exception):
    """Base class of every error datatrace raises on purpose."""


class ConfigError(DatatraceError, ValueError):
    """An invalid setting passed to a constructor (raised from ``__init__``)."""


class DataError(DatatraceError, ValueError):
    """A dataset, loader or batch that datatrace cannot use as given."""


class ModelError(DatatraceError, ValueError):
    """A model, parameter selection or checkpoint that datatrace cannot use as given."""


class NumericalError(DatatraceError, ArithmeticError):
    """NaN/inf gradients, or a solve that failed."""


class NotFittedError(DatatraceError, RuntimeError):
    """A method that needs ``fit`` was called before it."""


class StoreError(DatatraceError, RuntimeError):
    """A store that does not match the job reusing it, or is corrupt."""


class MissingDependencyError(DatatraceError, ImportError):
    """An optional package that a feature needs is not installed (the message names it)."""

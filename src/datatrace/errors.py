"""The error and warning hierarchies every datatrace component raises and issues.

Messages name what was received, what was expected and how to fix it. User input is
never checked with ``assert``. Warnings go through :mod:`warnings` with a
:class:`DatatraceWarning` category, so users can filter them (docs/conventions.md).
"""

from __future__ import annotations

import sys
import warnings


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


# ----------------------------------------------------------------------------- warnings
class DatatraceWarning(UserWarning):
    """Base class of every warning datatrace issues; filter them all with it.

    Example:
        >>> import warnings
        >>> from datatrace import DatatraceWarning
        >>> warnings.simplefilter("ignore", DatatraceWarning)  # or "error" to make them raise
    """


class CostWarning(DatatraceWarning):
    """A setting that will take minutes or more, or more memory than a machine may have.

    Issued before the expensive step starts (e.g. a dense Hessian for ``solver="explicit"``),
    with the estimate and a cheaper alternative; the work itself still runs.
    """


class AccuracyWarning(DatatraceWarning, RuntimeWarning):
    """Results that are less accurate than the method promises: an assumption of the method
    does not hold for this model or run (also a ``RuntimeWarning``)."""


class ConvergenceWarning(AccuracyWarning):
    """An iterative solver or training run stopped before its tolerance was met."""


def warn(message: str, category: type[Warning] = DatatraceWarning) -> None:
    """Issue ``message`` as ``category``, attributed to the first caller outside datatrace.

    ``stacklevel`` is counted at run time, so the warning names the user's line whatever the
    depth of the library's call stack (and ``warnings``' once-per-location filter works there).
    """
    frame = sys._getframe(1)
    level = 2
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("datatrace."):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)

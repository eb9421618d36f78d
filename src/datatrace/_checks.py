"""Checks of settings shared by the whole package; each names the bad value and the range."""

from __future__ import annotations

from typing import Any

import torch

from datatrace.errors import ConfigError, DatatraceError, NumericalError

__all__ = ["check_int", "finite_or_raise"]


def check_int(name: str, value: Any, low: int, error: type[DatatraceError] = ConfigError) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) ``>= low``; else raise ``error``.

    Example:
        >>> check_int("proj_dim", 8, 1)
        8
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise error(f"{name} must be an integer >= {low}; got {value!r}.")
    return value


def finite_or_raise(values: torch.Tensor, what: str, start: int) -> torch.Tensor:
    """``values``, unless they hold NaN/inf: never returned silently (``NumericalError``)."""
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return values
    bad = (~finite).nonzero()[0].tolist()
    where = f"unit {start + bad[-1]}" + (f" of query {bad[0]}" if len(bad) == 2 else "")
    raise NumericalError(
        f"the {what} hold {int((~finite).sum())} NaN/inf value(s) (first at {where}) although "
        "the data and weights are finite: the gradients or the curvature solve overflowed. "
        "Raise damping=, use float64 (model.double() and data), or rescale the inputs."
    )

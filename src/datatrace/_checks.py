"""Checks of settings shared by the whole package; each names the bad value and the range."""

from __future__ import annotations

from typing import Any

from datatrace.errors import ConfigError, DatatraceError

__all__ = ["check_int"]


def check_int(name: str, value: Any, low: int, error: type[DatatraceError] = ConfigError) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) ``>= low``; else raise ``error``.

    Example:
        >>> check_int("proj_dim", 8, 1)
        8
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise error(f"{name} must be an integer >= {low}; got {value!r}.")
    return value

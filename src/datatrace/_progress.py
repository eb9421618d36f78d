"""Progress bars: one rule for every long phase (docs/conventions.md).

Every phase that can take more than a few seconds (featurization, K-FAC/EK-FAC passes,
solver iterations, scoring, self-influence, benchmark retraining) draws its bar through
:func:`progress_bar`, so one switch governs them all:

1. ``progress=False`` (an attributor setting, or a function's argument) turns a bar off;
2. the environment variable ``DATATRACE_PROGRESS`` set to ``0``/``false``/``no``/``off``,
   or tqdm's own ``TQDM_DISABLE`` set to anything but those (and empty), turns every bar
   off, whatever the code asked for; so does being a rank other than 0 under ``torchrun``;
3. ``progress=True``, or ``DATATRACE_PROGRESS=1``/``true``/``yes``/``on`` where the code
   left the choice open, turns a bar on (also when stderr is not a terminal);
4. otherwise (``progress=None``, the attributors' default) a bar is drawn when stderr is a
   terminal, tqdm's own rule: bars in a shell or notebook, none in CI logs or pipes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["ENV_VAR", "progress_bar", "resolve_progress"]

ENV_VAR = "DATATRACE_PROGRESS"
"""The environment variable that turns every bar off (``0``) or on (``1``)."""

_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")

T = TypeVar("T")


def _env(name: str) -> str:
    return os.environ.get(name, "").strip().lower()


def _other_rank() -> bool:
    """Whether this is a rank other than 0 of an initialised torch.distributed group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def resolve_progress(enabled: bool | None) -> bool | None:
    """The module docstring's rule: True (draw), False (never) or None (if stderr is a tty).

    Example:
        >>> import os
        >>> os.environ["DATATRACE_PROGRESS"] = "0"
        >>> resolve_progress(True)
        False
        >>> del os.environ["DATATRACE_PROGRESS"]
    """
    if enabled is False:
        return False
    env, tqdm_env = _env(ENV_VAR), _env("TQDM_DISABLE")
    if env in _OFF or (tqdm_env and tqdm_env not in _OFF) or _other_rank():
        return False
    if enabled or env in _ON:
        return True
    return None


def progress_bar(
    iterable: Iterable[T] | None = None,
    *,
    desc: str,
    enabled: bool | None,
    total: float | None = None,
    leave: bool = True,
    unit: str = "it",
) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one with ``total``), shown by the rule above.

    Args:
        iterable: what to iterate over (None: update the bar by hand).
        desc: what the phase is, e.g. ``"if-ekfac: K-FAC covariances (member 0)"``.
        enabled: the caller's ``progress`` setting (True, False or None).
        total: number of steps, where ``iterable`` has no ``len``.
        leave: keep the finished bar on screen (False for bars nested in another).
        unit: what one step is (``"batch"``, ``"iter"``, ...).

    Example:
        >>> sum(progress_bar(range(3), desc="counting", enabled=False))
        3
    """
    show = resolve_progress(enabled)
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        disable=None if show is None else not show,
        leave=leave,
        unit=unit,
        dynamic_ncols=True,
    )

"""The method registry: ids (DESIGN.md §8) to attributor classes and their default settings.

A method registers itself in its own file, with the :func:`register` class decorator (the
built-in ones) or :func:`register_method` (a method defined anywhere, e.g. in a user's
module or a test); :func:`make_attributor`, ``datatrace methods``, ``datatrace bench
--methods`` and the conformance suite then find it by id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from datatrace.errors import ConfigError
from datatrace.task import Task

if TYPE_CHECKING:
    from datatrace.methods.base import Attributor

__all__ = ["METHODS", "make_attributor", "register", "register_method", "unregister_method"]

MethodEntry = tuple["type[Attributor[Any]]", dict[str, Any]]
METHODS: dict[str, MethodEntry] = {}


def register_method(method_id: str, cls: type[Attributor[Any]], **defaults: Any) -> None:
    """Register the attributor class ``cls`` under ``method_id`` with default settings.

    Raises:
        ConfigError: ``method_id`` is taken, or ``cls`` is not an ``Attributor`` subclass.

    Example:
        >>> import torch
        >>> from datatrace.methods import GradDotAttributor
        >>> register_method("grad-dot-64", GradDotAttributor, batch_size=64)
        >>> make_attributor("grad-dot-64", Task(torch.nn.Linear(2, 2))).config.batch_size
        64
        >>> unregister_method("grad-dot-64")
    """
    from datatrace.methods.base import Attributor

    if not isinstance(cls, type) or not issubclass(cls, Attributor):
        raise ConfigError(
            f"register_method needs an Attributor subclass; got {cls!r} for {method_id!r}."
        )
    if not isinstance(method_id, str) or not method_id:
        raise ConfigError(f"a method id must be a non-empty string; got {method_id!r}.")
    if method_id in METHODS and METHODS[method_id][0] is not cls:
        raise ConfigError(
            f"method id {method_id!r} is taken by {METHODS[method_id][0].__name__}; pick another "
            "id, or unregister_method it first."
        )
    METHODS[method_id] = (cls, dict(defaults))


def unregister_method(method_id: str) -> None:
    """Remove ``method_id`` from the registry (e.g. a test's method, at teardown)."""
    if method_id not in METHODS:
        raise ConfigError(f"unknown method {method_id!r}; registered methods: {sorted(METHODS)}.")
    del METHODS[method_id]


def register(method_id: str, **defaults: Any) -> Callable[[type[Attributor[Any]]], Any]:
    """Class decorator: register an attributor under ``method_id`` with default settings."""

    def deco(cls: type[Attributor[Any]]) -> type[Attributor[Any]]:
        register_method(method_id, cls, **defaults)
        return cls

    return deco


def make_attributor(method_id: str, task: Task, **kwargs: Any) -> Attributor[Any]:
    """Build the attributor registered as ``method_id`` (DESIGN.md §8 ids)."""
    if method_id not in METHODS:
        raise ConfigError(f"unknown method {method_id!r}; registered methods: {sorted(METHODS)}.")
    cls, defaults = METHODS[method_id]
    obj = cls(task, **{**defaults, **kwargs})
    obj.name = method_id
    return obj

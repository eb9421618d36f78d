"""The settings registry: settings register by name, users register their own.

See :mod:`datatrace.bench.settings` for how to write and register a setting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from datatrace.bench.settings.base import Setting, _check_fields
from datatrace.errors import ConfigError

__all__ = ["get_setting", "list_settings", "register_setting"]

_REGISTRY: dict[str, Callable[..., Setting]] = {}

R = TypeVar("R")


def _same_factory(a: Callable[..., Setting], b: Callable[..., Setting]) -> bool:
    # Registering an equal instance again, or a class again after its module was reloaded,
    # is not a name clash; any other factory is compared by identity.
    def key(f: Any) -> tuple[Any, ...]:
        owner = getattr(f, "__self__", None)
        if isinstance(owner, Setting):
            return ("instance", owner)
        if isinstance(f, type):
            return ("class", f.__module__, f.__qualname__)
        return ("object", id(f))

    return key(a) == key(b)


def register_setting(setting: R, *, overwrite: bool = False) -> R:
    """Register a setting under its name; usable as a class decorator.

    Args:
        setting: a ``Setting`` subclass (constructed with the overrides of
            :func:`get_setting`), a ``Setting`` instance (overrides go through
            :meth:`Setting.replace`), or a function ``(**overrides) -> Setting``.
        overwrite: replace a setting already registered under the same name.

    Returns:
        ``setting`` unchanged.

    Raises:
        ConfigError: if ``setting`` is none of the above, or its name is taken.
    """
    factory: Callable[..., Setting]
    probe: Setting
    if isinstance(setting, Setting):
        probe, factory = setting, setting.replace
    elif isinstance(setting, type) and issubclass(setting, Setting):
        factory = setting
        probe = setting()
    elif callable(setting):
        factory = setting
        probe = setting()
        if not isinstance(probe, Setting):
            raise ConfigError(
                f"a setting factory must return a Setting when called without arguments; "
                f"{getattr(setting, '__name__', setting)!r} returned {type(probe).__name__}."
            )
    else:
        raise ConfigError(
            f"register_setting takes a Setting subclass, instance or factory; got "
            f"{type(setting).__name__}."
        )
    name = probe.name
    if name in _REGISTRY and not overwrite and not _same_factory(_REGISTRY[name], factory):
        raise ConfigError(
            f"a setting named {name!r} is already registered; choose another name or pass "
            "overwrite=True."
        )
    _REGISTRY[name] = factory
    return setting


def list_settings() -> list[str]:
    """Names of the registered settings, sorted."""
    return sorted(_REGISTRY)


def get_setting(name: str, **overrides: Any) -> Setting:
    """The registered setting ``name`` with ``overrides`` of its fields.

    Args:
        name: a name from :func:`list_settings`.
        **overrides: field values, e.g. ``size="small"`` or ``epochs=50``.

    Raises:
        ConfigError: for an unknown name (the message lists the valid ones) or field.

    Example:
        >>> get_setting("digits-mlp", size="small").size
        'small'
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(
            f"unknown setting {name!r}; registered settings are {list_settings()}. Register "
            "your own with datatrace.bench.settings.register_setting."
        )
    factory = _REGISTRY[name]
    if overrides:
        probe = factory()
        _check_fields(type(probe), overrides)
    setting = factory(**overrides)
    if not isinstance(setting, Setting):
        raise ConfigError(
            f"the factory registered as {name!r} returned {type(setting).__name__}, not a Setting."
        )
    return setting

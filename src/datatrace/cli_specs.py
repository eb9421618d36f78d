"""Method specs of the command line: ``--methods "trak:proj_dim=1024,grad-cos"`` and ``datatrace methods``.

A spec is ``id[:key=value...]`` separated by commas; each value is parsed by the setting's
declared type (a ``Literal`` of strings stays a string, ``1e-3`` becomes a float, ``null``
None), so ``if-ekfac:fisher=true`` means the string ``"true"``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types as types_module
import typing
from typing import Any

from datatrace.bench.benchmark import DEFAULT_METHODS
from datatrace.errors import ConfigError, DatatraceError

__all__ = ["RUNNER_OWNED", "describe_methods", "parse_methods", "parse_question"]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _typed_value(text: str, hint: Any) -> Any:
    """``text`` read as the setting's declared type (``fisher=true`` stays the string "true").

    Literal choices match as written, then None (``none``/``null``), bool, int, float and str
    in that order, as far as the type admits them; anything else is read as JSON.
    """
    literals: list[Any] = []
    types: list[Any] = []
    todo = [hint]
    while todo:
        h = todo.pop()
        origin = typing.get_origin(h)
        if origin is typing.Literal:
            literals += list(typing.get_args(h))
        elif origin in (typing.Union, types_module.UnionType):
            todo += list(typing.get_args(h))
        else:
            types.append(origin or h)
    if text in [str(v) for v in literals if isinstance(v, str)]:
        return text
    if text.lower() in ("none", "null") and type(None) in types:
        return None
    if bool in types and text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        if kind in types:
            try:
                return kind(text)
            except ValueError:
                pass
    if str in types:
        return text
    return _value(text)


def _setting_types(method_id: str) -> dict[str, Any]:
    from datatrace.methods import METHODS

    cls = METHODS[method_id][0]
    try:
        return typing.get_type_hints(cls.Config)
    except Exception:  # an annotation that cannot be resolved: fall back to JSON values
        return {}


def parse_methods(spec: str) -> list[tuple[str, dict[str, Any] | None]]:
    """``"trak:proj_dim=2048,grad-cos"`` -> ``[("trak", {"proj_dim": 2048}), ("grad-cos", None)]``.

    None means "use the default grid"; unknown ids raise ``ConfigError``.
    """
    from datatrace.methods import METHODS

    out: list[tuple[str, dict[str, Any] | None]] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, *pairs = item.split(":")
        if name not in METHODS:
            raise ConfigError(f"unknown method {name!r}; choose from {sorted(METHODS)}.")
        opts: dict[str, Any] = {}
        for pair in pairs:
            if "=" not in pair or not pair.split("=", 1)[0]:
                raise ConfigError(f"method option {pair!r} of {name!r} must look like key=value.")
            key, text = pair.split("=", 1)
            hints = _setting_types(name)
            opts[key] = _typed_value(text, hints[key]) if key in hints else _value(text)
        if pairs:
            _check_method_options(name, opts)
        out.append((name, opts if pairs else None))
    if not out:
        raise ConfigError(
            f"--methods is empty; give comma-separated ids such as {DEFAULT_METHODS!r}."
        )
    return out


# what the benchmark runner passes to every attributor itself: not a method option
RUNNER_OWNED = ("batch_size",)


def _check_method_options(method_id: str, opts: dict[str, Any]) -> None:
    """Refuse unknown or invalid settings of ``method_id`` now, before any training."""
    from datatrace.methods import METHODS

    cls, defaults = METHODS[method_id]
    valid = [f.name for f in dataclasses.fields(cls.Config) if f.name not in RUNNER_OWNED]
    owned = sorted(set(opts) & set(RUNNER_OWNED))
    if owned:
        raise ConfigError(
            f"option {owned[0]}= of {method_id!r} is set by the benchmark runner itself and "
            f"cannot be given in --methods; {method_id}'s options are {valid}."
        )
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} of {method_id!r}; its options are {valid}.")
    try:
        cls.Config(**{**defaults, **opts})
    except DatatraceError as exc:
        raise ConfigError(f"invalid option of {method_id!r}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"invalid option of {method_id!r} ({', '.join(f'{k}={v!r}' for k, v in opts.items())}): "
            f"{exc}"
        ) from exc


def describe_methods() -> list[str]:
    """One line per registered method id: the id, its class's summary, its preset settings."""
    from datatrace.methods import METHODS

    width = max(map(len, METHODS), default=0)
    lines = []
    for method_id, (cls, defaults) in sorted(METHODS.items()):
        doc = (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip(".")
        preset = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
        lines.append(f"{method_id:{width}s}  {doc}" + (f" ({preset})" if preset else ""))
    return lines


def parse_question(spec: str) -> tuple[str, Any]:
    """``"scale:job=million:configs=grad-dot,if-ekfac"`` -> ``("scale", ScaleConfig(...))``.

    Options are split at each ``:`` that starts a ``key=`` (a value may hold ``:``, as in
    ``device=cuda:0``); a list option takes comma-separated values.
    """
    from datatrace.bench.questions import QUESTIONS

    name, *pairs = re.split(r":(?=[A-Za-z_][\w-]*=)", spec.strip())
    if ":" in name:
        raise ConfigError(f"question options {name.split(':', 1)[1]!r} must look like key=value.")
    if name not in QUESTIONS:
        raise ConfigError(
            f"unknown question {name!r}; choose from {sorted(QUESTIONS)} (`datatrace questions` "
            "lists them with their options)."
        )
    hints = typing.get_type_hints(QUESTIONS[name].config)
    opts: dict[str, Any] = {}
    for pair in pairs:
        key, text = pair.split("=", 1)
        key = key.replace("-", "_")
        if key not in hints:
            raise ConfigError(
                f"unknown option {key!r} of question {name!r}; its options are {list(hints)}."
            )
        hint = hints[key]
        if typing.get_origin(hint) is tuple:
            hint = typing.get_args(hint)[0]
            opts[key] = tuple(_typed_value(t, hint) for t in text.split(",") if t)
        else:
            opts[key] = _typed_value(text, hint)
        values = opts[key] if isinstance(opts[key], tuple) else (opts[key],)
        free_text = hint is str or typing.get_origin(hint) is typing.Literal
        if not free_text and any(isinstance(v, str) for v in values):
            raise ConfigError(f"option {key} of question {name!r} takes {hint}; got {text!r}.")
    return name, QUESTIONS[name].config(**opts)

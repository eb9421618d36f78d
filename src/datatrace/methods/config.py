"""Settings every method shares (:class:`MethodConfig`; STYLE.md "API"), and the one rule
for settings a method ignores (:class:`Applies`).

A setting that a method reads only in some configurations (``proj_dim`` without a projector,
``fisher`` with a curvature that is not K-FAC) or never (``engine`` for a method that takes no
gradients) is declared once in its config class's ``APPLIES`` table, and so is a value that
only some configurations can take (a per-layer ``damping``, ``solver="datainf"``). Passing
such a setting where it would be ignored raises a ``ConfigError`` naming it, what decides,
and the fix; leaving it at its default is always accepted. A config's ``__post_init__``
therefore validates each field on its own; rules between fields live in ``APPLIES``. The check runs after a config's own
``__post_init__`` validation, so a malformed value is still reported as such first.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from datatrace.devices import check_feature_dtype
from datatrace.errors import ConfigError
from datatrace.projection import ProjectorKind

__all__ = ["RESULT_NEUTRAL", "Applies", "MethodConfig", "no_projection", "unused"]

# settings that do not change results: left out of a store's config, so changing them reuses it
RESULT_NEUTRAL = ("batch_size", "progress")


@dataclass(frozen=True)
class Applies:
    """When a setting is read, for the check that refuses it where it would be ignored.

    Attributes:
        when: true for the configurations that read the setting.
        needs: what they have, completing "applies only with ...".
        on: the settings ``when`` reads, quoted in the error with their values.
        hint: more advice for the error (e.g. the setting that does what was meant).
        values: true for the values the rule is about (None: every value but the default),
            for a setting only some of whose values need more: a per-layer ``damping``
            (a number is read everywhere), ``solver="datainf"``.

    Example:
        >>> rule = Applies(lambda c: c.projector != "none", "a projector", on=("projector",))
        >>> rule.when(MethodConfig(projector="gaussian"))
        True
    """

    when: Callable[[Any], bool]
    needs: str
    on: tuple[str, ...] = ()
    hint: str = ""
    values: Callable[[Any], bool] | None = None


def unused(reason: str) -> Applies:
    """A setting the method never reads (``reason`` says why)."""
    return Applies(lambda config: False, reason)


def no_projection(reason: str) -> dict[str, Applies]:
    """``APPLIES`` entries of a method that takes no random projection (``reason``)."""
    return {"projector": unused(reason), "proj_dim": unused(reason)}


def _check_applies(config: MethodConfig) -> None:
    """Raise ``ConfigError`` for a setting given a non-default value where it is ignored."""
    defaults = {
        f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(config)
    }
    for name, rule in type(config).APPLIES.items():
        value = getattr(config, name)
        if value == defaults[name] or rule.when(config):
            continue
        if rule.values is not None and not rule.values(value):
            continue
        hint = f" {rule.hint}" if rule.hint else ""
        if not rule.on:
            raise ConfigError(
                f"{type(config).__name__} does not use {name}: {rule.needs}; got {name}="
                f"{value!r}. Drop {name}=.{hint}"
            )
        got = ", ".join(f"{n}={getattr(config, n)!r}" for n in rule.on)
        raise ConfigError(
            f"{name}={value!r} applies only with {rule.needs}; got {got}. Drop {name}=, or "
            f"use {rule.needs}.{hint}"
        )


@dataclass(frozen=True)
class MethodConfig:
    """Settings every method shares.

    Attributes:
        batch_size: examples per batch when datatrace batches the data itself.
        engine: per-sample gradient engine: ``"auto"`` (hooks for Linear/Conv2d, functional
            for the rest), ``"hooks"`` or ``"functional"``.
        projector: random projection of gradients: ``"none"``, ``"gaussian"``,
            ``"rademacher"``, ``"sjlt"`` or ``"factored"`` (per-layer, LoGra-style).
        proj_dim: projected dimension (for ``"factored"``: features per layer, a perfect square);
            only with a projector (``APPLIES``).
        seed: seed of the projections (combined with the member index).
        progress: progress bars on the long phases (featurization, curvature passes, solver
            iterations, scoring, self-influence): True, False, or None (default) to show
            them where stderr is a terminal. ``DATATRACE_PROGRESS=0`` (or ``TQDM_DISABLE``)
            turns them off everywhere (docs/conventions.md). A display option: it never
            enters a store's config and configs equal but for it compare equal.
        feature_dtype: dtype in which train features are kept, in memory and in store
            shards: ``"bfloat16"``, ``"float16"``, ``"float32"``, ``"float64"`` (a
            ``torch.dtype`` is accepted and stored by name) or None (default: the model's
            dtype). Features are upcast to the working dtype when scored; a half type halves
            their memory and bytes stored (docs/devices.md gives its LDS change).
    """

    batch_size: int = 64
    engine: Literal["auto", "hooks", "functional"] = "auto"
    projector: ProjectorKind = "none"
    proj_dim: int = 1024
    seed: int = 0
    progress: bool | None = field(default=None, compare=False)
    feature_dtype: Literal["float16", "bfloat16", "float32", "float64"] | None = None

    # Settings read only in some configurations (see the module docstring); a subclass
    # extends it: ``APPLIES = {**MethodConfig.APPLIES, "fisher": Applies(...)}``.
    APPLIES: ClassVar[Mapping[str, Applies]] = {
        "proj_dim": Applies(
            lambda c: c.projector != "none",
            "a projector",
            on=("projector",),
            hint="(projector='gaussian', 'rademacher', 'sjlt' or 'factored'.)",
        ),
    }

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # every config class's own __post_init__ is followed by the APPLIES check, run once
        # by the outermost one (after all of a subclass's validation)
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None:
            return

        @functools.wraps(own)
        def post_init(self: MethodConfig) -> None:
            own(self)
            if type(self).__post_init__ is post_init:
                _check_applies(self)

        cls.__post_init__ = post_init  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1; got {self.batch_size!r}.")
        if self.engine not in ("auto", "hooks", "functional"):
            raise ConfigError(
                f"engine must be 'auto', 'hooks' or 'functional'; got {self.engine!r}."
            )
        if self.projector not in ("none", "gaussian", "rademacher", "sjlt", "factored"):
            raise ConfigError(
                f"projector must be one of 'none', 'gaussian', 'rademacher', 'sjlt', 'factored'; "
                f"got {self.projector!r}."
            )
        if not isinstance(self.proj_dim, int) or self.proj_dim < 1:
            raise ConfigError(f"proj_dim must be an integer >= 1; got {self.proj_dim!r}.")
        if self.progress not in (None, True, False):
            raise ConfigError(f"progress must be True, False or None; got {self.progress!r}.")
        # frozen: store the normalised name (a torch.dtype is not JSON)
        object.__setattr__(self, "feature_dtype", check_feature_dtype(self.feature_dtype))
        if type(self).__post_init__ is MethodConfig.__post_init__:  # no subclass validation
            _check_applies(self)

    def to_json(self) -> dict[str, Any]:
        """JSON-able settings; ``type(self)(**to_json())`` rebuilds an equal config.

        ``progress`` is left out: it changes what is shown, not what is computed.
        """
        out = json.loads(json.dumps(dataclasses.asdict(self)))
        del out["progress"]
        if out["feature_dtype"] is None:
            # left out at its default, so stores written before the setting existed still match
            del out["feature_dtype"]
        return out

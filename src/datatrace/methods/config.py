"""Settings every method shares (:class:`MethodConfig`; STYLE.md "API")."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from datatrace.devices import check_feature_dtype
from datatrace.errors import ConfigError
from datatrace.projection import ProjectorKind

__all__ = ["RESULT_NEUTRAL", "MethodConfig"]

# settings that do not change results: left out of a store's config, so changing them reuses it
RESULT_NEUTRAL = ("batch_size", "progress")


@dataclass(frozen=True)
class MethodConfig:
    """Settings every method shares.

    Attributes:
        batch_size: examples per batch when datatrace batches the data itself.
        engine: per-sample gradient engine: ``"auto"`` (hooks for Linear/Conv2d, functional
            for the rest), ``"hooks"`` or ``"functional"``.
        projector: random projection of gradients: ``"none"``, ``"gaussian"``,
            ``"rademacher"``, ``"sjlt"`` or ``"factored"`` (per-layer, LoGra-style).
        proj_dim: projected dimension (for ``"factored"``: features per layer, a perfect square).
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

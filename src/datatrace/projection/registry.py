"""Projectors by id (``proj=`` of the attributors)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from datatrace._checks import check_int
from datatrace.errors import ConfigError
from datatrace.projection.base import IdentityProjector, Projector
from datatrace.projection.dense import GaussianProjector, RademacherProjector
from datatrace.projection.factored import FactoredProjector
from datatrace.projection.sjlt import SJLTProjector

__all__ = ["ProjectorKind", "make_projector"]

ProjectorKind = Literal["none", "gaussian", "rademacher", "sjlt", "factored"]


_BUILDERS: dict[str, tuple[Callable[..., Projector], frozenset[str]]] = {
    "gaussian": (GaussianProjector, frozenset({"block_rows", "cache_bytes", "generate_on"})),
    "rademacher": (RademacherProjector, frozenset({"block_rows", "cache_bytes", "generate_on"})),
    "sjlt": (SJLTProjector, frozenset({"nnz", "block_rows", "cache_bytes", "generate_on"})),
    "factored": (FactoredProjector, frozenset({"proj_dim_in", "proj_dim_out", "cache_bytes"})),
    "none": (IdentityProjector, frozenset({"n_params"})),
}


def make_projector(
    kind: ProjectorKind, proj_dim: int | None = None, seed: int = 0, member: int = 0, **kw: Any
) -> Projector:
    """Build a projector by id.

    Args:
        kind: ``"none"``, ``"gaussian"``, ``"rademacher"``, ``"sjlt"`` or ``"factored"``.
        proj_dim: output features (ignored for ``"none"``). For ``"factored"`` it is the
            per-layer ``proj_dim_in * proj_dim_out`` (may be None when both are given); without
            those keywords it must be a perfect square and both become ``sqrt(proj_dim)``.
        seed: seed of the random matrix.
        member: ensemble member.
        **kw: extra settings of the chosen class (``nnz``, ``block_rows``, ...).

    Example:
        >>> make_projector("sjlt", 64, seed=3, nnz=2).proj_dim
        64
    """
    if kind not in _BUILDERS:
        raise ConfigError(f"unknown projector kind {kind!r}; choose one of {sorted(_BUILDERS)}.")
    builder, allowed = _BUILDERS[kind]
    if set(kw) - allowed:
        raise ConfigError(
            f"projector {kind!r} takes no {sorted(set(kw) - allowed)}; it accepts {sorted(allowed)}."
        )
    if kind == "none":
        return builder(**kw)
    if kind == "factored":
        k_in, k_out = kw.pop("proj_dim_in", None), kw.pop("proj_dim_out", None)
        if k_in is None and k_out is None:
            k_in = k_out = math.isqrt(check_int("proj_dim", proj_dim, 1))
        if proj_dim is not None and (k_in or 0) * (k_out or 0) != proj_dim:
            raise ConfigError(
                f"factored proj_dim is per layer, proj_dim_in * proj_dim_out; got proj_dim="
                f"{proj_dim} with proj_dim_in={k_in}, proj_dim_out={k_out}. Pass a perfect square "
                "or matching proj_dim_in= and proj_dim_out=."
            )
        return builder(k_in, k_out, seed=seed, member=member, **kw)
    return builder(check_int("proj_dim", proj_dim, 1), seed=seed, member=member, **kw)

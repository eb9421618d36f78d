"""Influence functions (Koh & Liang, 2017) with interchangeable inverse-curvature solvers.

Upweighting training example i by ε moves the optimum by ``-H^{-1} ∇L_i ε`` where ``H`` is
the curvature of the mean training loss. Removing i (ε = -1/n) therefore changes the query
objective ``f_q`` (loss-like) by ``∇f_q^T (H + λI)^{-1} ∇L_i / n``; training on i is the
reverse of removing it, so

    score[q, i] = ∇f_q^T (H + λI)^{-1} ∇L_i / n,

in units of the target's change (leave-one-out scale; positive = proponent). ``H`` is the
GGN (default), the exact Hessian, or the empirical Fisher of the (optionally projected)
gradients; any solver in :mod:`datatrace.solvers` inverts it.
Cost: one per-sample gradient per example plus the solver's curvature products per query.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from datatrace.curvature import FisherOperator, GGNOperator, HessianOperator, LinearOperator
from datatrace.errors import ConfigError
from datatrace.methods.base import Attributor, MemberContext, MethodConfig, register
from datatrace.solvers import SOLVERS, make_solver

__all__ = ["InfluenceAttributor", "InfluenceConfig"]


@dataclass(frozen=True)
class InfluenceConfig(MethodConfig):
    """Influence-function settings.

    Attributes:
        solver: inverse solver id: ``"explicit"``, ``"cg"``, ``"lissa"``, ``"arnoldi"``,
            ``"datainf"``.
        curvature: ``"ggn"`` (Gauss-Newton / true Fisher), ``"hessian"`` (exact) or
            ``"fisher"`` (empirical Fisher of the train features; works with projections).
        damping: λ added to the curvature (of the mean loss), >= 0.
        solver_options: keyword arguments of the solver (e.g. ``{"max_iter": 200}``).
    """

    solver: str = "cg"
    curvature: Literal["ggn", "hessian", "fisher"] = "ggn"
    damping: float = 1e-3
    solver_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver not in SOLVERS:
            raise ConfigError(f"unknown solver {self.solver!r}; choose one of {sorted(SOLVERS)}.")
        if self.curvature not in ("ggn", "hessian", "fisher"):
            raise ConfigError(
                f"curvature must be 'ggn', 'hessian' or 'fisher'; got {self.curvature!r}."
            )
        if not (isinstance(self.damping, (int, float)) and self.damping >= 0):
            raise ConfigError(f"damping must be a number >= 0; got {self.damping!r}.")
        if self.curvature != "fisher" and self.projector != "none":
            raise ConfigError(
                f"curvature={self.curvature!r} acts on the full parameter space, but projector="
                f"{self.projector!r}; use projector='none', or curvature='fisher' with a projection."
            )
        if self.solver == "datainf" and self.curvature != "fisher":
            raise ConfigError(
                f"the DataInf solver inverts the empirical Fisher of per-sample gradients; got "
                f"curvature={self.curvature!r}. Set curvature='fisher'."
            )


@register("influence")
@register("if-explicit", solver="explicit")
@register("if-cg", solver="cg")
@register("if-lissa", solver="lissa")
@register("if-arnoldi", solver="arnoldi")
@register("if-datainf", solver="datainf", curvature="fisher")
class InfluenceAttributor(Attributor):
    """Influence functions with any solver and curvature.

    Example:
        >>> from datatrace import Task
        >>> model = torch.nn.Linear(4, 3).double().eval()
        >>> train = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
        >>> attr = InfluenceAttributor(Task(model), solver="explicit", damping=1e-2)
        >>> attr.fit(train).attribute((train[0][:2], train[1][:2])).shape
        (2, 16)
    """

    method_id = "influence"
    Config = InfluenceConfig
    config: InfluenceConfig

    def __init__(self, task: Any, **kwargs: Any) -> None:
        super().__init__(task, **kwargs)
        self._solver = make_solver(self.config.solver, **self.config.solver_options)

    def _operator(self, ctx: MemberContext) -> LinearOperator:
        cfg = self.config
        if cfg.curvature == "fisher":
            grads = self._all_train_features(ctx)
            blocks = None
            if ctx.projector is None:
                blocks, start = [], 0
                for p in self.task.tracked_params().values():
                    blocks.append(slice(start, start + p.numel()))
                    start += p.numel()
            return FisherOperator(grads, blocks=blocks)
        op_cls = GGNOperator if cfg.curvature == "ggn" else HessianOperator
        return op_cls(self.task, self._train, state=ctx.state, batch_size=cfg.batch_size)

    def _fit_member(self, ctx: MemberContext) -> None:
        ctx.fitted["inverse"] = self._solver.prepare(
            self._operator(ctx), float(self.config.damping)
        )

    def _transform_queries(self, ctx: MemberContext, q: torch.Tensor) -> torch.Tensor:
        inverse = ctx.fitted["inverse"]
        out = inverse.apply(q.T).T / self._n_train
        info = getattr(inverse, "info", None)
        if info is not None and not info.converged:
            warnings.warn(
                f"CG stopped after {info.iterations} iterations with relative residual "
                f"{info.relative_residual:.2e}; scores are approximate. Raise "
                "solver_options={'max_iter': ...} or damping.",
                RuntimeWarning,
                stacklevel=3,
            )
        return out

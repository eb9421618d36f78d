"""LoGra: influence on per-layer factored projections of gradients (Choe et al., 2024).

A Linear/Conv2d layer's per-sample gradient is ``D_n = sum_t g_{n,t} a_{n,t}ᵀ`` (``O x I'``,
bias as a last input column). LoGra ("What is your data worth to GPT?", 2024) projects the
two factors separately, ``a -> P_aᵀ a`` (``k_in``) and ``g -> P_gᵀ g`` (``k_out``), so the
projected gradient

    D̃_n = P_gᵀ D_n P_a = sum_t (P_gᵀ g_{n,t}) (P_aᵀ a_{n,t})ᵀ        (k_out x k_in)

is formed from the projected factors without ever forming ``D_n``: a model whose full
gradient is too large to store keeps ``k_out k_in`` numbers per layer. ``P_a`` and ``P_g``
are the :class:`~datatrace.projection.FactoredProjector` matrices (``N(0, 1/k)``, seeded by
``(seed, member, layer)``); ``proj_dim_in=None`` / ``proj_dim_out=None`` leaves that side
unprojected (``P = I``), which with both None is the full gradient.

Preconditioning happens in the projected space, block-diagonal over layers:

- ``"identity"``: ``score[q, n] = <D̃_q, D̃_n> / n`` (the influence formula below with
  ``H = I``; grad-dot's inner product divided by ``n``);
- ``"kfac"`` / ``"ekfac"``: K-FAC / EK-FAC (:func:`datatrace.curvature.fit_kfac_layers`) fitted
  on the projected factors ``P_aᵀ A P_a``, ``P_gᵀ G P_g`` and, for EK-FAC, the projected
  per-sample gradients; ``score[q, n] = <(F̃ + λI)⁻¹ D̃_q, D̃_n> / n`` with ``λ`` per layer
  as in :mod:`datatrace.curvature.kfac` (a number, ``"heuristic"`` or ``{module: λ}``).

Scores are in influence units (leave-one-out scale, positive = proponent; see
:mod:`datatrace.methods.influence`): with no projection LoGra equals ``grad-dot / n``,
``if-kfac`` and ``if-ekfac`` (same damping, Fisher kind and seed). Train features are the
flattened projected gradients, stored and streamed by the shared loop. Only Linear/Conv2d
parameters can be tracked (``Task(module_types=(nn.Linear, nn.Conv2d))``).
Cost: one per-sample gradient pass for the features, one (K-FAC) or two (EK-FAC) passes for
the curvature, ``O(k_in² + k_out²)`` memory per layer for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch

from datatrace.curvature import (
    KFACCurvature,
    KFACLayer,
    Projections,
    check_damping,
    check_fisher_samples,
    fit_kfac_layers,
    layer_damping,
)
from datatrace.data import Batch
from datatrace.errors import ConfigError
from datatrace.gradients.engine import PerSampleGrads
from datatrace.gradients.factored import ParamLayout
from datatrace.gradients.hooks import _outer_sum
from datatrace.methods.base import Attributor, MemberContext, MethodConfig, register
from datatrace.methods.config import Applies, no_projection
from datatrace.methods.context import FormChoice, FormDemand
from datatrace.methods.per_module import per_module_scores, per_token_scores
from datatrace.projection import FactoredProjector
from datatrace.scores import Scores
from datatrace.solvers import inverse_eigenvalues

__all__ = ["LoGraAttributor", "LoGraConfig"]

PRECONDITIONERS = ("identity", "kfac", "ekfac")


def _check_dim(label: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"{label} must be an integer >= 1, or None for no projection of that side; got "
            f"{value!r}."
        )


@dataclass(frozen=True)
class LoGraConfig(MethodConfig):
    """LoGra settings.

    Attributes:
        proj_dim_in: ``k_in``, projected width of each layer's inputs (None: unprojected).
        proj_dim_out: ``k_out``, projected width of its output gradients (None: unprojected).
        preconditioner: ``"identity"``, ``"kfac"`` or ``"ekfac"`` (fitted in the projected
            space).
        damping: λ of ``(F̃ + λI)⁻¹`` per layer: a number >= 0, ``"heuristic"`` (0.1 x each
            layer's mean projected eigenvalue) or ``{module: λ}``; unused by ``"identity"``.
        fisher: K-FAC/EK-FAC Fisher kind: ``"empirical"`` (training labels; the default, the
            benchmark's choice), ``"true"`` (labels sampled from the model, seeded by
            ``seed``) or ``"exact"``.
        fisher_samples: with ``fisher="true"``: labels sampled per example, averaged.
    """

    proj_dim_in: int | None = 32
    proj_dim_out: int | None = 32
    preconditioner: Literal["identity", "kfac", "ekfac"] = "ekfac"
    damping: float | str | dict[str, float] = "heuristic"
    fisher: Literal["true", "empirical", "exact"] = "empirical"
    fisher_samples: int = 1

    # settings that only some configurations read (MethodConfig.APPLIES)
    APPLIES: ClassVar[Mapping[str, Applies]] = {
        **MethodConfig.APPLIES,
        **no_projection(
            "LoGra projects each layer itself; set proj_dim_in and proj_dim_out instead"
        ),
        "fisher": Applies(
            lambda c: c.preconditioner != "identity",
            "preconditioner='kfac' or 'ekfac'",
            on=("preconditioner",),
        ),
        "fisher_samples": Applies(
            lambda c: c.preconditioner != "identity",
            "preconditioner='kfac' or 'ekfac'",
            on=("preconditioner",),
        ),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_dim("proj_dim_in", self.proj_dim_in)
        _check_dim("proj_dim_out", self.proj_dim_out)
        if self.preconditioner not in PRECONDITIONERS:
            raise ConfigError(
                f"preconditioner must be one of {list(PRECONDITIONERS)}; got "
                f"{self.preconditioner!r}."
            )
        check_damping(self.damping)
        if self.fisher not in ("true", "empirical", "exact"):
            raise ConfigError(
                f"fisher must be 'true', 'empirical' or 'exact'; got {self.fisher!r}."
            )
        check_fisher_samples(self.fisher_samples, self.fisher)


@dataclass(frozen=True)
class LoGraState:
    """LoGra's state of one member.

    Attributes:
        projections: per layer ``(P_a, P_g)`` (None: that side unprojected), made before the
            member's features.
        layers: the projected K-FAC/EK-FAC layers (None for ``"identity"``).
        inverse: per layer, the damped inverse eigenvalues (None for ``"identity"``).
    """

    projections: Projections
    layers: list[KFACLayer] | None = None
    inverse: list[torch.Tensor] | None = None


@register("logra")
class LoGraAttributor(Attributor[LoGraState]):
    """LoGra: factored per-layer projections with identity or (EK-)FAC preconditioning.

    Example:
        >>> from datatrace import Task
        >>> model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(),
        ...                             torch.nn.Linear(5, 3)).double().eval()
        >>> train = (torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,)))
        >>> attr = LoGraAttributor(Task(model), proj_dim_in=4, proj_dim_out=2)
        >>> attr.fit(train).attribute((train[0][:2], train[1][:2])).shape
        (2, 16)
    """

    method_id = "logra"

    @classmethod
    def layer_params_only(cls, settings: Mapping[str, Any]) -> bool:
        return True  # per-layer projections of Linear/Conv2d factors

    Config = LoGraConfig
    config: LoGraConfig

    @classmethod
    def feature_forms(cls, config: MethodConfig) -> tuple[FormChoice, ...]:
        """Each layer's gradient projected on both sides: the loop refuses parameters
        outside Linear/Conv2d layers and hands over the member's layout (``ctx.layout``, a
        LoRA member's adapter layers)."""
        return ("layer-projected",)

    @classmethod
    def form_demand(cls, config: MethodConfig) -> FormDemand:
        return FormDemand(
            "LoGra", "score flat projected gradients (trak, grad-dot with projector=)"
        )

    def __init__(self, task: Any, **kwargs: Any) -> None:
        super().__init__(task, **kwargs)
        if isinstance(self.config.damping, dict):  # a per-layer damping naming other layers
            check_damping(self.config.damping, ParamLayout(self.task).modules)

    # ------------------------------------------------------------------ projections
    def _prepare_member(self, ctx: MemberContext[LoGraState]) -> LoGraState:
        """Per layer ``(P_a, P_g)`` (None: that side unprojected), made once per member."""
        cfg = self.config
        proj = FactoredProjector(
            cfg.proj_dim_in or 1, cfg.proj_dim_out or 1, seed=cfg.seed, member=ctx.index
        )
        out: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        for slot in ctx.factor_layout().slots:
            # in the working dtype, as every projector: a half-precision model gets the
            # float32 model's matrices (randn in bf16 draws other numbers), not rounded ones
            p_a, p_g = proj.layer_matrices(
                slot.module,
                slot.in_width,
                slot.out_features,
                ctx.task.working_dtype,
                ctx.task.device,
            )
            out.append((p_a if cfg.proj_dim_in else None, p_g if cfg.proj_dim_out else None))
        return LoGraState(out)

    def _layer_shapes(self, layout: ParamLayout) -> list[tuple[int, int]]:
        cfg = self.config
        return [
            (cfg.proj_dim_out or slot.out_features, cfg.proj_dim_in or slot.in_width)
            for slot in layout.slots
        ]

    def _project(self, ctx: MemberContext[LoGraState], psg: PerSampleGrads) -> torch.Tensor:
        """Flattened ``P_gᵀ D P_a`` per layer, from the factors (or dense gradients), in the
        working dtype."""
        by_module = {f.module: f for f in psg.factors}
        b, parts, dtype = psg.batch_size, [], ctx.task.working_dtype
        for slot, (p_a, p_g) in zip(ctx.factor_layout().slots, ctx.fitted.projections):
            f = by_module.get(slot.module)
            if f is not None:
                a = f.a.to(dtype) if p_a is None else f.a.to(dtype) @ p_a
                g = f.g.to(dtype) if p_g is None else f.g.to(dtype) @ p_g
                mat = _outer_sum(g, a)
            else:  # computed densely (functional engine): project the gradient matrix
                cols = []
                if slot.weight is not None:
                    cols.append(psg.dense[slot.weight].reshape(b, slot.out_features, -1))
                if slot.bias is not None:
                    cols.append(psg.dense[slot.bias].reshape(b, slot.out_features, 1))
                mat = torch.cat(cols, 2).to(dtype)
                mat = mat if p_a is None else mat @ p_a
                mat = mat if p_g is None else p_g.T @ mat
            parts.append(mat.reshape(b, -1))
        return torch.cat(parts, 1)

    def _features(
        self, ctx: MemberContext[LoGraState], batch: Batch, which: str, state: Any
    ) -> torch.Tensor:
        return self._project(ctx, self._unit_grads(ctx, batch, which, state))

    # ------------------------------------------------------------------ curvature
    def _fit_member(self, ctx: MemberContext[LoGraState]) -> LoGraState:
        cfg = self.config
        if cfg.preconditioner == "identity":
            return ctx.fitted
        layers = self._curvature(ctx)
        damping = layer_damping(layers, cfg.damping)  # type: ignore[arg-type]
        inverse = [
            inverse_eigenvalues(lay.eigenvalues, damping[lay.module], lay.module) for lay in layers
        ]
        return replace(ctx.fitted, layers=layers, inverse=inverse)

    def _curvature(self, ctx: MemberContext[LoGraState]) -> list[KFACLayer]:
        """Fit K-FAC/EK-FAC of the projected factors, or reload it from the store."""
        cfg = self.config
        task, layout = ctx.task, ctx.factor_layout()
        names = [f"L{j}-{f}" for j in range(len(layout.slots)) for f in KFACCurvature.FIELDS]

        def fit() -> dict[str, torch.Tensor]:
            layers = fit_kfac_layers(
                task,
                self._train,
                state=ctx.state,
                kind=cfg.preconditioner,  # type: ignore[arg-type]
                fisher=cfg.fisher,
                batch_size=cfg.batch_size,
                seed=cfg.seed + 7919 * ctx.index,  # as influence's K-FAC: member 0 uses seed
                projections=ctx.fitted.projections,
                fisher_samples=cfg.fisher_samples,
                progress=cfg.progress,
            )
            return {
                f"L{j}-{f}": getattr(lay, f)
                for j, lay in enumerate(layers)
                for f in KFACCurvature.FIELDS
            }

        arrays = self._cached_arrays(ctx, "logra", names, fit)
        layers = []
        for j, (slot, shape) in enumerate(zip(layout.slots, self._layer_shapes(layout))):
            vals = {
                f: arrays[f"L{j}-{f}"].to(task.device, task.working_dtype)
                for f in KFACCurvature.FIELDS
            }
            layers.append(KFACLayer(slot.module, slot.weight, slot.bias, shape, **vals))
        return layers

    def _split(self, layout: ParamLayout, rows: torch.Tensor) -> list[torch.Tensor]:
        """``(k, d)`` feature rows to per-layer ``(k, k_out, k_in)`` matrices."""
        out, pos = [], 0
        for o, i in self._layer_shapes(layout):
            out.append(rows[:, pos : pos + o * i].reshape(rows.shape[0], o, i))
            pos += o * i
        return out

    def _transform_queries(self, ctx: MemberContext[LoGraState], q: torch.Tensor) -> torch.Tensor:
        if self.config.preconditioner == "identity":
            return q / self._n_train
        layers, inverse = ctx.fitted.layers, ctx.fitted.inverse
        assert layers is not None and inverse is not None  # set by _fit_member
        mats = [
            lay.spectral(m, inv)
            for lay, inv, m in zip(layers, inverse, self._split(ctx.factor_layout(), q))
        ]
        return torch.cat([m.reshape(q.shape[0], -1) for m in mats], 1) / self._n_train

    # ------------------------------------------------------------------ per-module scores
    def attribute_per_module(self, queries: Any) -> dict[str, Scores]:
        """``{module: Scores}``: each layer's term of the scores; they sum to :meth:`attribute`.

        The preconditioner is block-diagonal over layers, so ``score = sum_l <P_l, D̃_l> / n``
        splits exactly into one term per layer (``P_l`` the preconditioned query block).
        """
        self._check_fitted()
        spans = []  # per member: its layout (a LoRA member's adapter layers)
        for ctx in self._contexts:
            layout, member, pos = ctx.factor_layout(), {}, 0
            for slot, (o, i) in zip(layout.slots, self._layer_shapes(layout)):
                member[slot.module] = [slice(pos, pos + o * i)]
                pos += o * i
            spans.append(member)
        return per_module_scores(self, queries, spans)

    def attribute_per_token(self, queries: Any) -> torch.Tensor:
        """``(n_query, T, n_units)`` scores per predicted query token (language models); they
        sum over tokens to :meth:`attribute`. See :func:`datatrace.methods.per_module.per_token_scores`."""
        return per_token_scores(self, queries)

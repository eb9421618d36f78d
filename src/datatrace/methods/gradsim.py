"""Gradient similarity: Grad-Dot and Grad-Cos (Charpiat et al., 2019; Pruthi et al., 2020).

``grad-dot``: ``score[q, i] = <g_q, g_i>`` with ``g_q`` the gradient of the query objective
(loss-like: ``-direction * target``) and ``g_i`` that of training example i's loss. One SGD
step on i with learning rate η lowers the query objective by ``η <g_q, g_i>`` to first order,
so positive scores are proponents. ``grad-cos`` normalises both gradients (with ``groups=``,
the group gradient: the gradient of the group's summed loss).

Factored features (``train_features="factored"``, the default when every tracked parameter
sits in a Linear/Conv2d layer and nothing is projected or grouped): a layer's gradient is
``D = sum_t g_t a_tᵀ``, so per layer

    <D_q, D_i> = sum_{t,s} (a_{q,t} · a_{i,s}) (g_{q,t} · g_{i,s}),
    ||D_i||² = sum_{t,s} (a_{i,t} · a_{i,s}) (g_{i,t} · g_{i,s}),

exactly. Train and query features keep each layer's factors where ``T^2 (I' + O) < O I'``
(:func:`~datatrace.gradients.factored.pairs_factors`: for an MLP's ``T = 1``, ``I' + O``
numbers and flops per pair instead of ``O I'``) and its gradient matrix elsewhere (long
sequences, many conv patches), so no flat per-sample gradient is ever formed.
``train_features="recompute"`` keeps no train features: ``fit`` does nothing per example
and every scoring call recomputes them batch by batch (the same feature kind as ``"auto"``),
for one more gradient pass per call instead of their memory or disk.
Cost: one per-sample gradient per example; no curvature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from datatrace.data import Batch
from datatrace.errors import ConfigError
from datatrace.gradients.factored import FactorCodec, pairs_factors
from datatrace.methods.base import Attributor, MemberContext, MethodConfig, register
from datatrace.methods.context import FormChoice, FormDemand
from datatrace.task import Member

__all__ = ["GradCosAttributor", "GradDotAttributor", "GradSimConfig", "GradientSimilarity"]


def _unit(x: torch.Tensor) -> torch.Tensor:
    # A zero gradient stays zero instead of becoming NaN.
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


@dataclass(frozen=True)
class GradSimConfig(MethodConfig):
    """Settings of the gradient-similarity methods (Grad-Dot, Grad-Cos, TracIn).

    Attributes:
        train_features: ``"factored"`` (layer inputs and output gradients, scored from their
            Gram products; exact; needs every tracked parameter in a Linear/Conv2d layer, no
            projector and no groups), ``"gradients"`` (flattened per-sample gradients, or
            projected ones), ``"auto"`` (factored where it applies, gradients otherwise), all
            kept by ``fit`` (in memory or in the store); or ``"recompute"`` (``"auto"``'s
            kind, kept nowhere: each scoring call recomputes them batch by batch).
    """

    train_features: Literal["auto", "factored", "gradients", "recompute"] = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_features not in ("auto", "factored", "gradients", "recompute"):
            raise ConfigError(
                f"train_features must be 'auto', 'factored', 'gradients' or 'recompute'; got "
                f"{self.train_features!r}."
            )
        if self.train_features == "factored" and (
            self.projector != "none" or self.engine == "functional"
        ):
            raise ConfigError(
                f"train_features='factored' keeps the hook engine's unprojected layer factors; it "
                f"needs projector='none' and engine != 'functional' (got projector="
                f"{self.projector!r}, engine={self.engine!r}). Use train_features='gradients' or "
                "'auto'."
            )


@dataclass(frozen=True)
class GradSimState:
    """The gradient-similarity state of one member.

    Attributes:
        codec: the factored-row codec of the member's layers (None: flat features), built
            from the loop's decision (``ctx.form``, ``ctx.layout``: taken in the member's
            scope, where a LoRA member tracks its adapter layers) before its features are
            computed, and kept for scoring outside it.
    """

    codec: FactorCodec | None


class GradientSimilarity(Attributor[GradSimState]):
    """Inner products of (possibly transformed) gradients, on flat or factored features.

    The base of Grad-Dot, Grad-Cos and TracIn: it owns the choice between the two feature
    kinds (see the module docstring) and scores either kind; subclasses only transform.

    Example:
        >>> from datatrace import Task
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 3)).eval()
        >>> train = (torch.randn(8, 8), torch.randint(0, 3, (8,)))
        >>> factored = GradDotAttributor(Task(model), train_features="factored").fit(train)
        >>> flat = GradDotAttributor(Task(model), train_features="gradients").fit(train)
        >>> torch.allclose(factored.attribute(train).values, flat.attribute(train).values,
        ...                atol=1e-5)
        True
    """

    Config = GradSimConfig
    config: GradSimConfig

    @classmethod
    def feature_forms(cls, config: MethodConfig) -> tuple[FormChoice, ...]:
        """Factored where asked for or allowed (``"auto"``, ``"recompute"``), else flat or
        projected gradients (see :class:`GradSimConfig`)."""
        assert isinstance(config, GradSimConfig)
        if config.train_features == "factored":
            return ("factored",)
        return ("flat",) if config.train_features == "gradients" else ("factored", "flat")

    @classmethod
    def form_demand(cls, config: MethodConfig) -> FormDemand:
        return FormDemand(
            "train_features='factored'",
            "use train_features='auto' (flat gradients where factors cannot be used)",
        )

    def _prepare_member(self, ctx: MemberContext[GradSimState]) -> GradSimState:
        """The codec of the form the loop chose for the member (see :class:`GradSimState`)."""
        factored = ctx.form == "factored"
        return GradSimState(FactorCodec(ctx.factor_layout(), pairs_factors) if factored else None)

    def _fit_member(self, ctx: MemberContext[GradSimState]) -> GradSimState:
        return ctx.fitted  # no per-train-set work beyond the features

    @staticmethod
    def _codec(ctx: MemberContext[GradSimState]) -> FactorCodec | None:
        """The member's factored-row codec, or None for flat features."""
        return ctx.fitted.codec

    def _features(
        self,
        ctx: MemberContext[GradSimState],
        batch: Batch,
        which: str,
        state: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        codec = self._codec(ctx)
        if codec is None:
            return super()._features(ctx, batch, which, state)
        return codec.encode(self._unit_grads(ctx, batch, which, state).factors)

    def _scale_features(
        self, ctx: MemberContext[GradSimState], features: torch.Tensor, factor: float
    ) -> torch.Tensor:
        """Features of the gradients times ``factor``."""
        codec = self._codec(ctx)
        return factor * features if codec is None else codec.scale(features, factor)

    def _recomputes_train_features(self, members: Sequence[Member]) -> bool:
        return self.config.train_features == "recompute"

    def _join_query_features(
        self, ctx: MemberContext[GradSimState], feats: list[torch.Tensor]
    ) -> torch.Tensor:
        codec = self._codec(ctx)
        return super()._join_query_features(ctx, feats) if codec is None else codec.join(feats)

    def _combine(
        self, ctx: MemberContext[GradSimState], q: torch.Tensor, train: torch.Tensor, start: int
    ) -> torch.Tensor:
        codec = self._codec(ctx)
        return super()._combine(ctx, q, train, start) if codec is None else codec.inner(q, train)

    def _self_scores(
        self, ctx: MemberContext[GradSimState], train: torch.Tensor, start: int
    ) -> torch.Tensor:
        codec = self._codec(ctx)
        return super()._self_scores(ctx, train, start) if codec is None else codec.sq_norms(train)


@register("grad-dot")
class GradDotAttributor(GradientSimilarity):
    """Inner products of query and training gradients.

    Example:
        >>> from datatrace import Task
        >>> model = torch.nn.Linear(4, 3).eval()
        >>> train = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> GradDotAttributor(Task(model)).fit(train).attribute(train).values.shape
        torch.Size([8, 8])
    """

    method_id = "grad-dot"


@register("grad-cos")
class GradCosAttributor(GradientSimilarity):
    """Cosine similarity of query and training gradients.

    Example:
        >>> from datatrace import Task
        >>> model = torch.nn.Linear(4, 3).eval()
        >>> train = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> s = GradCosAttributor(Task(model)).fit(train).attribute(train)
        >>> bool((s.values.abs() <= 1 + 1e-6).all())
        True
    """

    method_id = "grad-cos"

    def _normalise(self, ctx: MemberContext[GradSimState], features: torch.Tensor) -> torch.Tensor:
        codec = self._codec(ctx)
        if codec is None:
            return _unit(features)
        norms = codec.sq_norms(features).sqrt()
        return codec.scale(features, 1.0 / norms.clamp_min(torch.finfo(norms.dtype).tiny))

    def _finish_train_features(
        self, ctx: MemberContext[GradSimState], features: torch.Tensor
    ) -> torch.Tensor:
        # on whole units: a group's gradient is normalised after its members are summed
        return self._normalise(ctx, features)

    def _transform_queries(self, ctx: MemberContext[GradSimState], q: torch.Tensor) -> torch.Tensor:
        return self._normalise(ctx, q)

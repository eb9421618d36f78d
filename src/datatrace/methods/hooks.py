"""The hooks a method overrides, with their defaults (DESIGN.md §3).

A method declares how it featurizes training examples (:meth:`MethodHooks._train_features`),
how it transforms query features (:meth:`MethodHooks._transform_queries`), how the two
combine (:meth:`MethodHooks._combine`, an inner product by default), and what ``fit``
computes once per member (:meth:`MethodHooks._fit_member`, returning the method's own frozen
state dataclass). Every hook gets the member's :class:`~datatrace.methods.context.MemberContext`:
its effective task, weights, projector and the method's state of it. The shared loop
(:mod:`datatrace.methods.loop`) calls them; :class:`~datatrace.methods.base.Attributor` is
the public class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Generic

import torch

from datatrace.data import Batch
from datatrace.devices import FEATURE_DTYPES
from datatrace.errors import CostWarning, NumericalError, warn
from datatrace.gradients import PerSampleGrads, compute_group_grads, compute_per_sample_grads
from datatrace.group import Grouping
from datatrace.methods.config import MethodConfig
from datatrace.methods.context import FormChoice, FormDemand, MemberContext, StateT
from datatrace.store import Store
from datatrace.task import Member, Task

__all__ = ["MethodHooks"]


class MethodHooks(ABC, Generic[StateT]):
    """Hooks of one attribution method over the state type ``StateT`` it declares."""

    method_id: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # set by Attributor.__init__ and fit (declared here for the hooks and the loop)
    task: Task
    name: str
    config: MethodConfig
    store: Store | None
    _train: Any
    _n_train: int
    _n_units: int
    _groups_arg: Any
    _grouping: Grouping | None
    _contexts: list[MemberContext[StateT]]
    _recompute: bool

    @classmethod
    def feature_forms(cls, config: MethodConfig) -> tuple[FormChoice, ...]:
        """The train-feature forms the method scores with these settings, preferred first.

        The shared loop takes the first one each fit allows (both per-layer forms need no
        projector and every tracked parameter in a Linear/Conv2d layer, factored ones also
        no groups and the hook engine; ``"flat"`` is projected with a projector) and hands
        it to every hook as ``ctx.form`` (with ``ctx.layout`` for ``"factored"`` and
        ``"layer-projected"`` features), so a method reads the decision instead of making
        it. Default: ``("flat",)`` (the per-sample gradients of :meth:`_features`).
        """
        return ("flat",)

    @classmethod
    def form_demand(cls, config: MethodConfig) -> FormDemand:
        """Where :meth:`feature_forms` has no flat fallback: the setting that demands its
        last form and the fix, which the loop's refusal names when groups, a projector, the
        functional engine or the model's layers rule that form out."""
        return FormDemand(cls.__name__, "use a method that scores flat gradients")

    def _features(
        self,
        ctx: MemberContext[StateT],
        batch: Batch,
        which: str,
        state: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """Per-unit gradients of ``which`` at ``state``, projected by the member's projector.

        Per-sample gradients, or while a grouped train batch is featurized, the gradients of
        each group's summed objective (one row per group; see the module docstring).
        """
        return self._project(ctx, self._unit_grads(ctx, batch, which, state))

    def _project(self, ctx: MemberContext[StateT], psg: PerSampleGrads) -> torch.Tensor:
        """Rows of ``psg``, projected by the member's projector (flattened without one)."""
        if ctx.projector is None:
            return psg.flat()
        return ctx.projector.project(psg)

    def _train_features(self, ctx: MemberContext[StateT], batch: Batch) -> torch.Tensor:
        """``(B, d)`` features of training examples (default: training-loss gradients)."""
        return self._features(ctx, batch, "loss", ctx.state)

    def _query_features(self, ctx: MemberContext[StateT], batch: Batch) -> torch.Tensor:
        """``(B, d)`` features of queries (default: gradients of the query objective)."""
        return self._features(ctx, batch, "query", ctx.state)

    def _unit_grads(
        self,
        ctx: MemberContext[StateT],
        batch: Batch,
        which: str,
        state: Mapping[str, torch.Tensor],
    ) -> PerSampleGrads:
        """Unprojected per-sample gradients, or per-group ones while groups are featurized."""
        if ctx.unit_members is None:
            return compute_per_sample_grads(
                ctx.task, batch, state=state, which=which, engine=self.config.engine
            )
        return compute_group_grads(
            ctx.task, batch, ctx.unit_members, state=state, which=which, engine=self.config.engine
        )

    def _fitted_train_features(self, ctx: MemberContext[StateT]) -> torch.Tensor | None:
        """``(n_units, d)`` train features of every unit at once, when the member's state
        already holds them (default: None, featurized batch by batch).

        For a method whose per-train-set work yields all features together (rps: its refit
        of the last layer on the whole training set). The loop keeps them as it keeps any
        features: one block in memory, or store shards of ``shard_bytes`` (written, reused
        and resumed like every method's), in ``feature_dtype``.
        """
        return None

    def _finish_train_features(
        self, ctx: MemberContext[StateT], features: torch.Tensor
    ) -> torch.Tensor:
        """Non-linear step on complete units' train features (default: none)."""
        return features

    def _join_query_features(
        self, ctx: MemberContext[StateT], feats: list[torch.Tensor]
    ) -> torch.Tensor:
        """One tensor of query features from the batches' (default: concatenated rows)."""
        return torch.cat(feats, 0)

    def _prepare_member(self, ctx: MemberContext[StateT]) -> StateT | None:
        """The member's state needed while its features are computed (default: none).

        Called inside the member's scope before its train features; what it returns is
        ``ctx.fitted`` for every featurization hook, and the ``ctx.fitted`` that
        :meth:`_fit_member` sees (and may extend with ``dataclasses.replace``).
        """
        return None

    @abstractmethod
    def _fit_member(self, ctx: MemberContext[StateT]) -> StateT:
        """Per-train-set work after featurization (curvature, kernels): the member's state.

        Returns the method's frozen state dataclass of this member; the loop keeps it as
        ``ctx.fitted`` for scoring. Inside the member's scope (``ctx.task`` is effective).
        """

    def _transform_queries(self, ctx: MemberContext[StateT], q: torch.Tensor) -> torch.Tensor:
        """Map query features to the space train features are scored in (default: identity)."""
        return q

    def _combine(
        self, ctx: MemberContext[StateT], q: torch.Tensor, train: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Scores ``(n_query, n_block)`` of transformed queries against a train feature block."""
        return q @ train.T

    def _aggregate(self, blocks: list[torch.Tensor], start: int) -> torch.Tensor:
        """Combine members' score blocks (default: mean)."""
        return torch.stack(blocks).mean(0)

    def _self_scores(
        self, ctx: MemberContext[StateT], train: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Self-attribution of a train feature block (default: its own transformed inner product)."""
        return (self._transform_queries(ctx, train) * train).sum(1)

    def _cost_warning(self, n_rhs: int | None) -> str | None:
        """A one-line estimate of work about to start, to issue as a ``CostWarning``, or None.

        Called by :meth:`fit` once the training set and members are resolved, before any
        featurization (``n_rhs`` None), and by every scoring call before its queries are
        featurized, with the number of right-hand sides (queries; units for
        :meth:`self_attribute`). Default: never (methods whose cost can explode override it).
        """
        return None

    def _check_cost(self, n_rhs: int | None) -> None:
        message = self._cost_warning(n_rhs)
        if message is not None:
            warn(message, CostWarning)

    def _recomputes_train_features(self, members: Sequence[Member]) -> bool:
        """Whether this fit keeps no train features, scoring recomputing them (default: no).

        Called by :meth:`fit` once the training set, groups, members and store are resolved.
        When True, ``fit`` featurizes nothing (so :meth:`_fit_member` must not read train
        features) and :meth:`_iter_train_features` recomputes each block from its training
        batch at the member's state (see the module docstring).
        """
        return False

    @property
    def feature_dtype(self) -> torch.dtype:
        """The dtype train features are kept in (``feature_dtype``, else the model's)."""
        name = self.config.feature_dtype
        return self.task.dtype if name is None else FEATURE_DTYPES[name]

    def _to_feature_dtype(self, feats: torch.Tensor) -> torch.Tensor:
        """``feats`` in the storage dtype; refuses float16 overflow rather than storing inf."""
        out = feats.to(self.feature_dtype)
        narrowed = out.dtype == torch.float16 and feats.dtype != torch.float16
        if narrowed and not bool(torch.isfinite(out).all()) and bool(torch.isfinite(feats).all()):
            raise NumericalError(
                f"train features reach {float(feats.abs().max()):.3g}, beyond float16's range "
                "(65504), so feature_dtype='float16' would store inf; use "
                "feature_dtype='bfloat16' (float32's range) or None."
            )
        return out

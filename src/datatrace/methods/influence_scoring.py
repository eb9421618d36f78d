"""How influence scores meet the training examples: the preconditioned queries and the
training features they are contracted with (:class:`InfluenceScoring`, the base of
:class:`~datatrace.methods.influence.InfluenceAttributor`).

A member's queries are preconditioned, ``P_q = (H + λI)⁻¹ ∇f_q / n``, into one of four forms,
chosen by the train features (``ctx.form``) and the config:

- flat rows (flattened or projected gradients; every curvature and solver);
- per-layer query matrices ``(k, O, I')`` (factored train features, K-FAC/EK-FAC), contracted
  with each training example's layer factors, ``score = Σ_t g_tᵀ P_q a_t``; recomputed
  factors are formed into blocks of :data:`SCORE_BLOCK_ROWS` examples first
  (:class:`~datatrace.gradients.factored.GradientBlock`);
- low-rank pairs (``query_rank=r``: each matrix's truncated SVD);
- factor rows (``factored_damping=True``: the inverse ``(G + δ_G I)⁻¹ ⊗ (A + δ_A I)⁻¹`` keeps
  each query's layer factors, ``(a A⁻¹, g G⁻¹)``), scored by pairwise factor products when
  every layer has few positions (``T² (I' + O) < O I'``), else through matrices.

All forms give the same scores (to float64 rounding); only the cost differs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch

from datatrace.data import Batch
from datatrace.errors import ConvergenceWarning, warn
from datatrace.gradients import compute_per_sample_grads
from datatrace.gradients.factored import (
    FactorCodec,
    GradientBlock,
    contract_low_rank,
    contract_preconditioned,
    pack_low_rank,
    pairs_factors,
    unpack_low_rank,
)
from datatrace.gradients.hooks import _outer_sum
from datatrace.methods.base import Attributor, MemberContext
from datatrace.methods.influence_config import InfluenceConfig
from datatrace.solvers import InverseOperator
from datatrace.solvers.inverses import KFACInverse

__all__ = ["SCORE_BLOCK_BYTES", "SCORE_BLOCK_ROWS", "InfluenceScoring", "InfluenceState"]

SCORE_BLOCK_ROWS = 256
"""Training examples contracted with the preconditioned queries at once when the factors are
recomputed (:class:`~datatrace.gradients.factored.GradientBlock`): pydoc-gpt2's 300 queries
ran 1.5x faster at 256 rows than batch by batch at 64."""

SCORE_BLOCK_BYTES = 256 * 2**20
"""Most bytes of gradient matrices in one such block (a block is at least one batch)."""


@dataclass(frozen=True)
class InfluenceState:
    """Influence's state of one member (its train-feature form and layer layout are the
    loop's: ``ctx.form``, ``ctx.layout``).

    Attributes:
        inverse: ``(H + λI)^{-1}`` as the solver prepared it.
    """

    inverse: InverseOperator

    def solve(self) -> InverseOperator:
        """The prepared inverse (set by ``_fit_member``)."""
        return self.inverse


class InfluenceScoring(Attributor[InfluenceState]):
    """Influence's scoring hooks of the shared loop (the module docstring); abstract: the
    attributor adds the curvature and its inverse (``_fit_member``)."""

    config: InfluenceConfig
    _n_train: int

    def __init__(self, task: Any, **kwargs: Any) -> None:
        super().__init__(task, **kwargs)
        # member index -> (preconditioned query block, its per-layer split): see _query_matrices
        self._query_cache: dict[int, tuple[torch.Tensor, Any]] = {}
        # per member: whether its last transformed queries are factor rows (factored damping)
        self._factor_queries: dict[int, bool] = {}
        self._dense_queries = False  # per-module and per-token scores read query matrices

    def _query_codec(self, ctx: MemberContext[InfluenceState]) -> FactorCodec | None:
        """The codec of query rows kept as layer factors, with factored damping and
        factored train features: its inverse keeps each layer's rank, so a query of one
        position is scored by two small inner products per layer (``FactorCodec.inner``)."""
        cfg = self.config
        if not cfg.factored_damping or ctx.form != "factored" or cfg.query_rank is not None:
            return None
        return None if self._dense_queries else FactorCodec(ctx.factor_layout())

    @contextmanager
    def _plain_queries(self) -> Iterator[None]:
        """Preconditioned queries as flat rows (or ``query_rank`` pairs) even with factored
        damping: per-module and per-token scores split those."""
        self._dense_queries = True
        try:
            yield
        finally:
            self._dense_queries = False

    def _query_features(self, ctx: MemberContext[InfluenceState], batch: Batch) -> torch.Tensor:
        codec = self._query_codec(ctx)
        if codec is None:
            return super()._query_features(ctx, batch)
        psg = compute_per_sample_grads(
            ctx.task, batch, state=ctx.state, which="query", engine="hooks"
        )
        return codec.encode(psg.factors)

    def _join_query_features(
        self, ctx: MemberContext[InfluenceState], feats: list[torch.Tensor]
    ) -> torch.Tensor:
        codec = self._query_codec(ctx)
        return super()._join_query_features(ctx, feats) if codec is None else codec.join(feats)

    def _transform_queries(
        self, ctx: MemberContext[InfluenceState], q: torch.Tensor
    ) -> torch.Tensor:
        inverse = ctx.fitted.solve()
        factored = ctx.form == "factored"
        codec, self._factor_queries[ctx.index] = self._query_codec(ctx), False
        if codec is not None:
            assert isinstance(inverse, KFACInverse)
            layout = ctx.factor_layout()
            parts = codec.decode(q)
            if all(  # the pairwise product is the cheaper one (T_q = T_n assumed)
                len(p) == 2 and pairs_factors(p[0].shape[1], s.out_features, s.in_width)
                for p, s in zip(parts, layout.slots)
            ):
                self._factor_queries[ctx.index] = True
                maps = [inverse.kronecker[m] for m in layout.modules]
                return codec.transform(q, maps, 1.0 / self._n_train)
            q = layout.from_matrices(codec.matrices(q))  # many positions: query matrices
        if factored and isinstance(inverse, KFACInverse):
            # per layer, never the flat (dim, k) transpose
            layout = ctx.factor_layout()
            mats = [m.div_(self._n_train) for m in inverse.apply_matrices(layout.to_matrices(q))]
            out = layout.from_matrices(mats)
            if self.config.query_rank is None:  # _combine's split of ``out``: these matrices
                self._query_cache[ctx.index] = (out, (None, mats))
        else:
            out = inverse.apply(q.T).T / self._n_train
        if factored and self.config.query_rank is not None:
            out = pack_low_rank(ctx.factor_layout(), out, self.config.query_rank)
        info = getattr(inverse, "info", None)
        if info is not None and not info.converged:
            warn(
                f"CG stopped after {info.iterations} iterations with relative residual "
                f"{info.relative_residual:.2e}; scores are approximate. Raise "
                "solver_options={'max_iter': ...} or damping.",
                ConvergenceWarning,
            )
        return out

    def _score_blocks(
        self, queries: Any, local: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            yield from super()._score_blocks(queries, local)
        finally:  # the per-layer query split lives for one attribute call
            self._query_cache.clear()

    # ------------------------------------------------------------------ factored path
    def _query_matrices(
        self, ctx: MemberContext[InfluenceState], q: torch.Tensor
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]] | None, list[torch.Tensor] | None]:
        """The preconditioned queries ``q`` split per layer (low-rank pairs or full matrices),
        split once per query block: ``_combine`` meets the same ``q`` for every train block."""
        cached = self._query_cache.get(ctx.index)
        if cached is not None and cached[0] is q:
            return cached[1]
        layout = ctx.factor_layout()
        rank = self.config.query_rank
        split = (
            (unpack_low_rank(layout, q, rank), None)
            if rank is not None
            else (None, [m.contiguous() for m in layout.to_matrices(q)])
        )
        self._query_cache[ctx.index] = (q, split)
        return split

    def _train_features(self, ctx: MemberContext[InfluenceState], batch: Batch) -> torch.Tensor:
        if ctx.form != "factored":
            return super()._train_features(ctx, batch)
        psg = compute_per_sample_grads(ctx.task, batch, state=ctx.state, engine="hooks")
        return FactorCodec(ctx.factor_layout()).encode(psg.factors)

    def _scoring_train_blocks(
        self, ctx: MemberContext[InfluenceState], local: bool, queries: torch.Tensor
    ) -> Iterator[tuple[int, Any]]:
        per_block = self._batches_per_block()
        if per_block is None:
            yield from super()._scoring_train_blocks(ctx, local, queries)
            return
        capacity, batches = per_block * self.config.batch_size, self._train_batches(local)
        while group := list(islice(batches, per_block)):  # streamed: one block's batches
            block = GradientBlock(ctx.factor_layout(), capacity, queries.shape[0])
            for _, offset, batch in group:
                with self._recomputing(ctx) as scoped:
                    scoped = self._batch_context(scoped, offset, batch)
                    psg = compute_per_sample_grads(
                        scoped.task, batch, state=scoped.state, engine="hooks"
                    )
                by_module = {f.module: f for f in psg.factors}
                block.add([(by_module[m].a, by_module[m].g) for m in block.layout.modules])
            yield group[0][1], block

    def _count_scoring_blocks(self, ctx: MemberContext[InfluenceState], local: bool) -> int | None:
        per_block, count = self._batches_per_block(), self._count_train_blocks(ctx, local)
        return count if per_block is None or count is None else -(-count // per_block)

    def _batches_per_block(self) -> int | None:
        """Training batches per :class:`GradientBlock` while scoring recomputed factors (None:
        batch by batch, through the train features): about ``SCORE_BLOCK_ROWS`` rows, within
        ``SCORE_BLOCK_BYTES`` of gradient matrices (member 0's layers: the same blocks for
        every member). Only where the blocks equal the features they replace: full query
        matrices, no groups, features in the model's (working) dtype."""
        task, ctx = self.task, self._contexts[0]
        if not self._recompute or ctx.form != "factored" or self._grouping is not None:
            return None
        if (
            self.config.query_rank is not None
            or self._factor_queries.get(ctx.index, False)
            or not (self.feature_dtype == task.dtype == task.working_dtype)
        ):
            return None
        bs = self.config.batch_size
        row = sum(s.out_features * s.in_width for s in ctx.factor_layout().slots)
        fit = SCORE_BLOCK_BYTES // max(1, bs * row * task.working_dtype.itemsize)
        return max(1, min(-(-SCORE_BLOCK_ROWS // bs), fit))

    def _combine(
        self, ctx: MemberContext[InfluenceState], q: torch.Tensor, train: Any, start: int
    ) -> torch.Tensor:
        if ctx.form != "factored":
            return super()._combine(ctx, q, train, start)
        if self._factor_queries.get(ctx.index, False):
            return FactorCodec(ctx.factor_layout()).inner(q, train)
        queries, full = self._query_matrices(ctx, q)
        if isinstance(train, GradientBlock):
            assert full is not None  # blocks only with full query matrices
            return train.contract(full)
        total = q.new_zeros(q.shape[0], train.shape[0])
        for j, part in enumerate(FactorCodec(ctx.factor_layout()).decode(train)):
            if full is not None:
                total += contract_preconditioned(full[j], part)
            else:
                assert queries is not None
                total += contract_low_rank(*queries[j], part)
        return total

    def _self_scores(
        self, ctx: MemberContext[InfluenceState], train: torch.Tensor, start: int
    ) -> torch.Tensor:
        if ctx.form != "factored":
            return super()._self_scores(ctx, train, start)
        layout = ctx.factor_layout()
        inverse = ctx.fitted.solve()
        if isinstance(inverse, KFACInverse) and inverse.factored:  # factors keep their rank
            codec = FactorCodec(layout)
            maps = [inverse.kronecker[m] for m in layout.modules]
            return codec.paired_inner(train, codec.transform(train, maps, 1.0 / self._n_train))
        mats = [
            _outer_sum(part[1], part[0]) if len(part) == 2 else part[0]
            for part in FactorCodec(layout).decode(train)
        ]
        grads = layout.from_matrices(mats)
        pre = inverse.apply(grads.T).T / self._n_train
        return (pre * grads).sum(1)

"""TRAK (Park et al., 2023): a linearised, projected, ensembled influence estimate.

For classification each training example's output function is its margin
``m_i = logit_y - logsumexp_{c≠y} logit_c``; with ``Φ`` the projected gradients of
``-m_i`` (loss-like), ``Q = diag(1 - p_i)`` (``dL/dm = -(1 - p)`` for cross-entropy) and
``φ_q`` the projected gradient of the query objective,

    score[q, :] = mean_m(φ_q (Φ^T Φ + λI)^{-1} Φ^T) ⊙ mean_m(Q)

averaged over independently trained members ``m`` (kernel scores and Q are averaged
separately, as in the paper). Positive = proponent. For non-classification losses the
features are loss gradients and Q = 1.
With ``groups=`` a group's feature is the projected gradient of its members' summed
``-margin``, the kernel is built from group features, and its Q is the members' mean
``1 - p`` (singleton groups reproduce per-example TRAK exactly).
Cost: projected per-sample gradients plus a ``proj_dim x proj_dim`` solve per member, or
with fewer units than features (groups) an ``n_units x n_units`` one (``kernel_form``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch

from datatrace import distributed
from datatrace._progress import progress_bar
from datatrace.curvature import KernelOperator
from datatrace.data import Batch, iter_batches
from datatrace.errors import ConfigError, NumericalError
from datatrace.methods.base import Attributor, MemberContext, MethodConfig, register
from datatrace.methods.config import Applies
from datatrace.methods.context import check_dropout_masks
from datatrace.projection import ProjectorKind
from datatrace.solvers import GramInverse, InverseOperator
from datatrace.task import margin

__all__ = ["TRAKAttributor", "TRAKConfig"]


@dataclass(frozen=True)
class TRAKConfig(MethodConfig):
    """TRAK settings.

    Attributes:
        projector: defaults to ``"rademacher"`` (TRAK's choice).
        proj_dim: projected dimension (default 2048).
        damping: λ added to ``Φ^T Φ``; None = ``relative_damping`` x its mean diagonal.
        relative_damping: the scale-free λ used when ``damping`` is None, as a multiple of
            the kernel's mean diagonal (default 1.0: chosen on validation queries on every
            bench setting; on digits-mlp, proj_dim 2048, test LDS was 0.066 / 0.126 / 0.189 /
            0.243 / 0.249 / 0.222 at 1e-4 / 1e-2 / 0.1 / 1 / 3 / 10 — docs/benchmarks.md).
            Values near 0 approach the plain inverse traker computes.
        output: ``"margin"`` (classification; needs a cross-entropy task), ``"loss"`` (any
            task: features are training-loss gradients and Q = 1) or ``"auto"`` (default:
            margin for cross-entropy tasks, loss otherwise, e.g. language models).
        q_dropout: number of dropout masks averaged in ``Q`` only (0: off). Features come
            from the unmasked model once; ``Q`` is the mean over forward passes under masks
            ``0 .. q_dropout-1`` of the ``dropout`` ensemble (seed
            ``seed``): the Q-only Dropout Ensemble, cheap to serve (forward passes only).
        q_dropout_rate: drop probability of those masks (None: the dropout layers' own).
        q_dropout_layers: modules to mask (None: the model's dropout layers).
        kernel_form: how ``(Φ^T Φ + λI)^{-1}`` is applied (same scores up to rounding):
            ``"primal"`` factors the ``proj_dim x proj_dim`` kernel (features streamed once);
            ``"dual"`` factors the ``n_units x n_units`` Gram ``Φ Φ^T`` and applies the
            Woodbury identity (:class:`~datatrace.solvers.GramInverse`; holds ``Φ`` in memory,
            needs ``λ > 0``); ``"auto"`` (default) takes dual when there are fewer units than
            features (e.g. groups) and ``λ > 0``, where it is the cheaper of the two.
    """

    projector: ProjectorKind = "rademacher"
    proj_dim: int = 2048
    damping: float | None = None
    relative_damping: float = 1.0
    output: Literal["auto", "margin", "loss"] = "auto"
    q_dropout: int = 0
    q_dropout_rate: float | None = None
    q_dropout_layers: tuple[str, ...] | None = None
    kernel_form: Literal["auto", "primal", "dual"] = "auto"

    # settings that only some configurations read (MethodConfig.APPLIES)
    APPLIES: ClassVar[Mapping[str, Applies]] = {
        **MethodConfig.APPLIES,
        "relative_damping": Applies(
            lambda c: c.damping is None,
            "damping=None",
            on=("damping",),
            hint="(relative_damping sets λ as a multiple of the kernel's mean diagonal.)",
        ),
        "q_dropout_rate": Applies(lambda c: c.q_dropout > 0, "q_dropout >= 1", on=("q_dropout",)),
        "q_dropout_layers": Applies(lambda c: c.q_dropout > 0, "q_dropout >= 1", on=("q_dropout",)),
    }

    @property
    def undamped(self) -> bool:
        """Whether λ is 0 (``damping=0``, or no damping and ``relative_damping=0``)."""
        return self.damping == 0 or (self.damping is None and self.relative_damping == 0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.q_dropout, bool) or not isinstance(self.q_dropout, int):
            raise ConfigError(f"q_dropout must be an int >= 0; got {self.q_dropout!r}.")
        if self.q_dropout < 0:
            raise ConfigError(f"q_dropout must be an int >= 0; got {self.q_dropout!r}.")
        if self.q_dropout:  # validates rate and layers now, not in fit()
            check_dropout_masks(self.seed, self.q_dropout_rate, self.q_dropout_layers)
        if self.damping is not None and not (
            isinstance(self.damping, (int, float)) and self.damping >= 0
        ):
            raise ConfigError(f"damping must be None or a number >= 0; got {self.damping!r}.")
        if not (isinstance(self.relative_damping, (int, float)) and self.relative_damping >= 0):
            raise ConfigError(
                f"relative_damping must be a number >= 0; got {self.relative_damping!r}."
            )
        if self.output not in ("auto", "margin", "loss"):
            raise ConfigError(f"output must be 'auto', 'margin' or 'loss'; got {self.output!r}.")
        if self.kernel_form not in ("auto", "primal", "dual"):
            raise ConfigError(
                f"kernel_form must be 'auto', 'primal' or 'dual'; got {self.kernel_form!r}."
            )
        if self.kernel_form == "dual" and self.undamped:
            raise ConfigError(
                "kernel_form='dual' divides by the damping λ; it needs damping > 0 (or "
                "relative_damping > 0). Use kernel_form='primal'."
            )


def _gram(blocks: Iterable[torch.Tensor], min_rows: int = 1024) -> torch.Tensor:
    """``Φ^T Φ`` over row blocks of ``Φ``, accumulated in place, ``min_rows`` rows at a time.

    Shards are often small (one batch): a ``d x d`` product per shard re-reads and re-writes
    the whole kernel for a few rows of work (and allocated a new one each time), so shards
    are concatenated into groups of at least ``min_rows`` rows first.
    """
    kernel: torch.Tensor | None = None
    group: list[torch.Tensor] = []
    rows = 0

    def flush() -> None:
        nonlocal kernel, rows
        x = group[0] if len(group) == 1 else torch.cat(group, 0)
        kernel = x.T @ x if kernel is None else kernel.addmm_(x.T, x)
        group.clear()
        rows = 0

    for block in blocks:
        group.append(block)
        rows += block.shape[0]
        if rows >= min_rows:
            flush()
    if group:
        flush()
    assert kernel is not None
    return kernel


class _QRecorder:
    """``1 - p`` of the examples featurized in this fit, recorded from the featurization pass
    (allocated at the first record; ``values`` None until then)."""

    def __init__(self) -> None:
        self.values: tuple[torch.Tensor, torch.Tensor] | None = None  # (1 - p, seen)


@dataclass(frozen=True)
class TRAKState:
    """TRAK's state of one member.

    Attributes:
        q: ``(n_units,)`` output weights ``Q`` (1 for loss features); None while featurizing.
        inverse: ``(Φ^T Φ + λI)^{-1}`` (:class:`~datatrace.solvers.GramInverse`: its
            ``form`` is ``"primal"`` or ``"dual"``); None while featurizing.
        recorder: ``1 - p`` recorded while featurizing (dropped by ``_fit_member``).
    """

    q: torch.Tensor | None = None
    inverse: InverseOperator | None = None
    recorder: _QRecorder | None = None


@register("trak")
class TRAKAttributor(Attributor[TRAKState]):
    """TRAK with projected kernel, damping and ensemble averaging.

    Example:
        >>> from datatrace import Task
        >>> model = torch.nn.Linear(4, 3).eval()
        >>> train = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> TRAKAttributor(Task(model, target="margin"), proj_dim=8).fit(train).attribute(train).shape
        (16, 16)
    """

    method_id = "trak"
    target_kind = "margin"
    Config = TRAKConfig
    config: TRAKConfig

    def _uses_margin(self) -> bool:
        if self.config.output == "auto":
            return self.task.loss_name == "cross_entropy"
        if self.config.output == "margin" and self.task.loss_name != "cross_entropy":
            raise ConfigError(
                f"TRAK's margin output needs a cross-entropy task; the task's loss is "
                f"{self.task.loss_name!r}. Pass output='loss'."
            )
        return self.config.output == "margin"

    def _prepare_member(self, ctx: MemberContext[TRAKState]) -> TRAKState:
        return TRAKState(recorder=_QRecorder())

    def _train_features(self, ctx: MemberContext[TRAKState], batch: Batch) -> torch.Tensor:
        margin_out = self._uses_margin()
        psg = self._unit_grads(ctx, batch, "margin" if margin_out else "loss", ctx.state)
        if margin_out and not self.config.q_dropout:
            self._record_q(ctx, psg.objective)
        return self._project(ctx, psg)

    def _record_q(self, ctx: MemberContext[TRAKState], neg_margin: torch.Tensor | None) -> None:
        """Keep ``1 - p = sigmoid(-margin)`` of the batch's examples from the featurization
        pass, so ``Q`` needs no second forward pass when every example was featurized here
        (not when store shards were reused or the engine gave no objective values)."""
        idx, recorder = ctx.batch_indices, ctx.fitted.recorder
        if neg_margin is None or idx is None or neg_margin.shape[0] != idx.shape[0]:
            return
        if recorder is None:  # featurized outside a fit (recomputed): nothing to record
            return
        if recorder.values is None:
            dtype = ctx.task.working_dtype  # 1 - p near 0 or 1 needs more than half precision
            recorder.values = (
                torch.empty(self._n_train, dtype=dtype, device=neg_margin.device),
                torch.zeros(self._n_train, dtype=torch.bool),
            )
        q, seen = recorder.values
        q[idx.to(q.device)] = torch.sigmoid(neg_margin.detach().to(q.dtype))
        seen[idx] = True

    def _q_weights(self, ctx: MemberContext[TRAKState]) -> torch.Tensor:
        recorder = ctx.fitted.recorder
        recorded = None if recorder is None else recorder.values
        if not self._uses_margin():
            return torch.ones(self._n_train, dtype=ctx.task.working_dtype, device=ctx.task.device)
        cfg = self.config
        if distributed.is_distributed() and not cfg.q_dropout:
            recorded = self._gather_q(ctx, recorded)
        if recorded is not None and bool(recorded[1].all()):
            return recorded[0]
        if cfg.q_dropout:
            if ctx.dropout_masked:
                raise ConfigError(
                    "q_dropout masks Q of an unmasked model; with dropout members= the masks "
                    "already enter features and Q. Use one of the two (q_dropout=0)."
                )
            qs = []
            for j in range(cfg.q_dropout):
                with ctx.under_dropout_mask(
                    j, seed=cfg.seed, rate=cfg.q_dropout_rate, layers=cfg.q_dropout_layers
                ) as masked:
                    qs.append(self._q_pass(masked))
            return torch.stack(qs).mean(0)
        return self._q_pass(ctx)

    def _gather_q(
        self, ctx: MemberContext[TRAKState], recorded: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Distributed: each rank recorded ``1 - p`` of its own batches; join the parts.

        The ranks' parts are disjoint, so their sum (zeros elsewhere) is exact.
        """
        if recorded is None:  # this rank featurized nothing (no batches, or all resumed)
            recorded = (
                torch.zeros(self._n_train, dtype=ctx.task.dtype, device=ctx.task.device),
                torch.zeros(self._n_train, dtype=torch.bool),
            )
        q, seen = recorded
        q, count = distributed.all_reduce_sum(
            [torch.where(seen.to(q.device), q, torch.zeros_like(q)), seen.to(torch.float64)]
        )
        return q, count > 0

    def _q_pass(self, ctx: MemberContext[TRAKState]) -> torch.Tensor:
        parts = []
        batches = progress_bar(
            iter_batches(self._train, self.config.batch_size),
            desc=self._phase("output weights Q (forward pass)", ctx),
            enabled=self.config.progress,
            unit="batch",
        )
        with torch.no_grad():
            for batch in batches:
                split = ctx.task.split_batch(batch)
                assert split.labels is not None
                logits = ctx.task.outputs(ctx.state, split).to(ctx.task.working_dtype)
                m = margin(logits, split.labels)
                parts.append(torch.sigmoid(-m))  # 1 - p_y, since p_y = sigmoid(margin)
        return torch.cat(parts)

    def _fit_member(self, ctx: MemberContext[TRAKState]) -> TRAKState:
        inverse = self._fit_dual(ctx) if self._dual(ctx) else self._fit_primal(ctx)
        state = TRAKState(inverse=inverse)
        q = self._q_weights(ctx)
        # A group's Q is its members' mean 1 - p (its features: the group's summed -margin gradient)
        return replace(state, q=q if self._grouping is None else self._grouping.mean_rows(q))

    def _dual(self, ctx: MemberContext[TRAKState]) -> bool:
        cfg = self.config
        if cfg.kernel_form != "auto":
            return cfg.kernel_form == "dual"
        if cfg.undamped:
            return False
        _, first = next(self._iter_train_features(ctx))
        return self._n_units < first.shape[1]

    def _fit_dual(self, ctx: MemberContext[TRAKState]) -> GramInverse:
        phi = self._all_train_features(ctx)
        damping = self.config.damping
        if damping is None:  # the mean diagonal of Φ^TΦ is ||Φ||² / d
            damping = (
                self.config.relative_damping * float(phi.double().square().sum()) / phi.shape[1]
            )
        if not damping > 0:
            raise NumericalError(
                f"TRAK's dual kernel needs λ > 0; the relative damping gives λ={damping:.3g} "
                "(all train features are zero). Check the model and data, or pass damping=."
            )
        try:
            return GramInverse(phi, damping, form="dual")
        except NumericalError as exc:
            raise NumericalError(
                f"TRAK's dual Gram ΦΦ^T + λI (n_units={phi.shape[0]}, proj_dim={phi.shape[1]}) "
                f"is not positive definite at λ={damping:.3g}; raise damping or relative_damping."
            ) from exc

    def _fit_primal(self, ctx: MemberContext[TRAKState]) -> InverseOperator:
        # The d x d kernel is small: factor it in float64 (the float32 Gram's rounding is
        # covered by the default relative damping, even when Φ^TΦ is rank-deficient).
        kernel = _gram(block for _, block in self._iter_train_features(ctx)).double()
        damping = self.config.damping
        if damping is None:
            damping = self.config.relative_damping * float(kernel.diagonal().mean())
        try:
            return KernelOperator(kernel).inverse(damping)
        except NumericalError as exc:
            raise NumericalError(
                f"TRAK's kernel Φ^TΦ + λI (proj_dim={kernel.shape[0]}, n_train={self._n_train}) is not "
                f"positive definite at λ={damping:.3g}; raise damping or relative_damping, or use a "
                "proj_dim below the number of training examples."
            ) from exc

    def _transform_queries(self, ctx: MemberContext[TRAKState], q: torch.Tensor) -> torch.Tensor:
        inverse = ctx.fitted.inverse
        assert inverse is not None  # set by _fit_member
        return inverse.apply(q.T).T.to(q.dtype)

    def _aggregate(self, blocks: list[torch.Tensor], start: int) -> torch.Tensor:
        size = blocks[0].shape[1]
        q = torch.stack([self._q(ctx)[start : start + size] for ctx in self._contexts]).mean(0)
        return torch.stack(blocks).mean(0) * q

    def _self_scores(
        self, ctx: MemberContext[TRAKState], train: torch.Tensor, start: int
    ) -> torch.Tensor:
        q = self._q(ctx)[start : start + train.shape[0]]
        return super()._self_scores(ctx, train, start) * q

    @staticmethod
    def _q(ctx: MemberContext[TRAKState]) -> torch.Tensor:
        q = ctx.fitted.q
        assert q is not None  # set by _fit_member
        return q

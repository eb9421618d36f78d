"""Source (Bae, Lin, Lorraine & Grosse, 2024, "Training Data Attribution via Approximate
Unrolled Differentiation", NeurIPS): attribution through the training trajectory.

Influence functions assume the model sits at the optimum of its training loss. Source asks
instead how the *trajectory* responds when a training example's weight in the loss changes.
Linearise SGD ``θ_{k+1} = θ_k - η_k ∇J_k(θ_k)``, where ``J_k`` is the mean loss over the
examples ``D_k`` the step trains on: a weight ``ε`` on example ``m`` perturbs the iterates by
``δ_{k+1} = (I - η_k H_k) δ_k - η_k ∇L_m(θ_k) ε``. Split the run into ``L`` segments and
treat the curvature ``H`` and the gradient ``g_m`` as constant (*stationary*) within each
segment (their averages over the segment's checkpoints); then, per eigenvalue ``σ`` of the
segment's curvature (paper §3.2, eqs. 17-24),

    propagation  P(σ) = exp(-σ Σ_k η_k)              ("exp", the paper's closed form)
                        Π_k (1 - η_k σ)              ("sgd": the exact discrete product)
    response     R(σ) = (1 - P(σ)) / σ               (→ Σ_k η_k as σ → 0)

over the segment's steps ``k`` (``Σ_k η_k = η K`` with ``η`` its mean learning rate and ``K``
its number of steps). The final parameters move by ``-Σ_ℓ P_L ⋯ P_{ℓ+1} R_ℓ ḡ_{m,ℓ} ε``:
an early segment's response reaches the end only through the propagation of every later
segment. Scores walk the segments backwards from the query gradient ``∇f_q(θ_T)``:

    score[q, m] = Σ_ℓ [m ∈ D_ℓ] / N_ℓ · (P_{ℓ+1} ⋯ P_L ∇f_q)ᵀ R_ℓ ḡ_{m,ℓ}.

Scale and sign (DESIGN.md §1): removing ``m`` from a segment whose loss averages over its
``N_ℓ`` examples is ``ε = -1/N_ℓ`` there; the score is the first-order decrease of the query
objective that training on ``m`` brings (positive = proponent), in the target's units, like
influence functions (``score = ∇f_qᵀ (H + λI)⁻¹ ∇L_m / n``), to which Source with one
segment reduces as ``η T → ∞``. A point absent from a segment (``Checkpoint.train_indices``)
gets no term from it, so a point used only in pretraining acts through the fine-tuning
segments' propagation. ``damping`` λ shifts every eigenvalue (as weight decay would);
momentum β scales learning rates to ``η / (1 - β)`` (paper, Appendix D).

Curvature: EK-FAC (default) per segment in one shared eigenbasis — the Kronecker factors are
averaged over the segment's checkpoints and eigendecomposed, and the corrected eigenvalues are
averaged over the checkpoints in that basis (paper, Appendix D.2) — or K-FAC, or for tiny
models the dense GGN or Hessian of the segment's mean loss. Fast-Source (``fast=True``)
evaluates curvature and gradients once per segment, at the segment's averaged parameters.

Trajectory convention: a checkpoint at step ``s_j`` holds the weights after ``s_j`` steps; it
closes the interval ``(s_{j-1}, s_j]`` (``s_{-1} = 0``), whose steps used its learning rate
and ``train_indices``. ``anchor="end"`` evaluates the interval's curvature and gradients at
its closing checkpoint (the paper's use of checkpoints saved along a segment), ``"start"`` at
its opening one (the weights the steps actually started from; exact for a checkpoint per
step). Intervals are grouped into ``segments`` contiguous segments; a change of
``train_indices`` always starts a new segment. Checkpoint weights within a segment are
weighted by the number of steps they stand for.

Cost: curvature (two passes over the segment's data for EK-FAC) and one per-sample gradient
per training example per checkpoint (one per segment with ``fast=True``); train features are
``segments x n_params`` per example (no projection).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from datatrace.curvature import (
    GGNOperator,
    HessianOperator,
)
from datatrace.data import Batch, as_data, num_examples
from datatrace.errors import AccuracyWarning, ConfigError, DataError, warn
from datatrace.methods.base import Attributor, MemberContext, MethodConfig, register
from datatrace.methods.config import Applies, no_projection
from datatrace.methods.per_module import (
    module_param_spans,
    per_module_scores,
    per_token_scores,
)
from datatrace.methods.source_spectra import (
    Spectrum,
    dense_spectrum,
    kfac_spectrum,
    propagation,
    response,
)
from datatrace.scores import Scores
from datatrace.task import Checkpoint

__all__ = ["SourceAttributor", "SourceConfig", "propagation", "response"]

Curvature = Literal["ekfac", "kfac", "ggn", "hessian"]
_SGD_KINDS = ("sgd", "sgd-momentum", "sgdm")


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SourceConfig(MethodConfig):
    """Source settings.

    Attributes:
        curvature: ``"ekfac"`` (default), ``"kfac"``, or the dense ``"ggn"`` / ``"hessian"``
            of the segment's mean loss (materialised: tiny models only).
        fisher: Fisher kind of (E)K-FAC: ``"true"``, ``"empirical"`` or ``"exact"``.
        damping: λ added to every eigenvalue (in propagation and response), >= 0.
        segments: number of segments ``L``; None: one per checkpoint. A change of the
            checkpoints' ``train_indices`` always starts a new segment.
        anchor: where an interval between checkpoints is evaluated: ``"end"`` (its closing
            checkpoint) or ``"start"`` (its opening one).
        unroll: ``"exp"`` (the paper's ``exp(-σ η K)``) or ``"sgd"`` (``Π (1 - η σ)``).
        momentum: SGD momentum β of the run; learning rates count as ``η / (1 - β)``.
        fast: Fast-Source: one evaluation per segment at its averaged parameters.
        horizon: summed learning rate ``η T`` assumed for a member whose trajectory has no
            steps (no checkpoints, or one at step 0); None refuses such members.
    """

    curvature: Curvature = "ekfac"
    fisher: Literal["true", "empirical", "exact"] = "true"
    damping: float = 0.0
    segments: int | None = None
    anchor: Literal["end", "start"] = "end"
    unroll: Literal["exp", "sgd"] = "exp"
    momentum: float = 0.0
    fast: bool = False
    horizon: float | None = None

    # settings that only some configurations read (MethodConfig.APPLIES)
    APPLIES: ClassVar[Mapping[str, Applies]] = {
        **MethodConfig.APPLIES,
        **no_projection("Source applies matrix functions of the curvature in parameter space"),
        "fisher": Applies(
            lambda c: c.curvature in ("kfac", "ekfac"),
            "curvature='kfac' or 'ekfac'",
            on=("curvature",),
        ),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        choices: dict[str, tuple[str, ...]] = {
            "curvature": ("ekfac", "kfac", "ggn", "hessian"),
            "fisher": ("true", "empirical", "exact"),
            "anchor": ("end", "start"),
            "unroll": ("exp", "sgd"),
        }
        for name, options in choices.items():
            if getattr(self, name) not in options:
                raise ConfigError(
                    f"{name} must be one of {list(options)}; got {getattr(self, name)!r}."
                )
        if not (_is_number(self.damping) and 0 <= self.damping < math.inf):
            raise ConfigError(f"damping must be a finite number >= 0; got {self.damping!r}.")
        if self.segments is not None and (
            isinstance(self.segments, bool)
            or not isinstance(self.segments, int)
            or self.segments < 1
        ):
            raise ConfigError(f"segments must be an int >= 1 or None; got {self.segments!r}.")
        if not (_is_number(self.momentum) and 0 <= self.momentum < 1):
            raise ConfigError(f"momentum must be a number in [0, 1); got {self.momentum!r}.")
        if not isinstance(self.fast, bool):
            raise ConfigError(f"fast must be True or False; got {self.fast!r}.")
        if self.horizon is not None and not (
            _is_number(self.horizon) and 0 < self.horizon < math.inf
        ):
            raise ConfigError(f"horizon must be a finite number > 0 or None; got {self.horizon!r}.")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ----------------------------------------------------------------------------- segments
@dataclass(frozen=True)
class _Segment:
    """One segment: weighted parameter samples, its step schedule and its training data."""

    samples: list[tuple[float, dict[str, torch.Tensor]]]  # (weight, state); weights sum to 1
    schedule: list[tuple[float, int]]  # (effective learning rate, steps) per interval
    indices: tuple[int, ...] | None  # training indices it trained on (None: all)
    first_step: int
    last_step: int

    @property
    def steps(self) -> int:
        return sum(k for _, k in self.schedule)


@dataclass(frozen=True)
class SourceState:
    """Source's state of one member.

    Attributes:
        segments: the member's segments (built from its trajectory before its features).
        spectra: per segment, its curvature in its eigenbasis (None while featurizing).
        masks: ``(L, n_train)``: 1 where a segment trained on the example (None while
            featurizing).
        counts: per segment, the number of examples its loss averages over.
        full: whether every segment trained on the whole training set.
    """

    segments: list[_Segment]
    spectra: list[Spectrum] | None = None
    masks: torch.Tensor | None = None
    counts: list[int] | None = None
    full: bool = True

    def fitted_parts(self) -> tuple[list[Spectrum], torch.Tensor, list[int]]:
        """``(spectra, masks, counts)``, set by ``_fit_member``."""
        assert self.spectra is not None and self.masks is not None and self.counts is not None
        return self.spectra, self.masks, self.counts


def _shifted(
    fn: Callable[[torch.Tensor, Sequence[tuple[float, int]], str], torch.Tensor],
    damping: float,
    schedule: Sequence[tuple[float, int]],
    unroll: str,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``σ -> fn(σ + λ, schedule, unroll)``: a spectral map of the damped curvature."""
    return lambda sigma: fn(sigma + damping, schedule, unroll)


def _average_state(
    samples: Sequence[tuple[float, Mapping[str, torch.Tensor]]],
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, last in samples[-1][1].items():
        if last.is_floating_point():
            total = torch.zeros_like(last)
            for w, s in samples:
                total = total + w * s[name]
            out[name] = total
        else:  # counters and integer buffers: the latest value
            out[name] = last
    return out


def _take(data: Any, indices: Sequence[int] | torch.Tensor) -> Any:
    """Rows ``indices`` of the training data, in any form the shared loop accepts."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    data = as_data(data)
    if isinstance(data, torch.Tensor):
        return data[idx]
    if isinstance(data, Mapping):
        return {k: v[idx] for k, v in data.items()}
    if isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):
        return tuple(t[idx] for t in data)
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, Dataset):
        return Subset(data, idx.tolist())
    raise DataError(f"cannot select training examples from data of type {type(data).__name__}.")


# ----------------------------------------------------------------------------- attributor
@register("source")
class SourceAttributor(Attributor[SourceState]):
    """Source: approximate unrolled differentiation over the member's trajectory.

    Each member's checkpoints (the task's by default) form the trajectory; the last one is
    the final model, where queries are evaluated. Checkpoints carry their step, learning
    rate and (multi-stage runs) ``train_indices``: record them with
    :class:`datatrace.recording.CheckpointRecorder`.

    Example:
        >>> from datatrace import Checkpoint, Task
        >>> model = torch.nn.Linear(4, 3).double().eval()
        >>> run = [Checkpoint(model.state_dict(), step=s, learning_rate=0.1) for s in (50, 100)]
        >>> train = (torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))
        >>> attr = SourceAttributor(Task(model, checkpoints=run), segments=1).fit(train)
        >>> attr.attribute((train[0][:2], train[1][:2])).shape
        (2, 8)
    """

    method_id = "source"
    reads_trajectory = True

    @classmethod
    def layer_params_only(cls, settings: Mapping[str, Any]) -> bool:
        return True  # K-FAC/EK-FAC per segment

    Config = SourceConfig
    config: SourceConfig
    # Per-example segment masks and self-scores (rows of the train data) are not group-aware
    # yet; the shared group loop would give wrong self-attribution (see datatrace.group).
    supports_groups = False

    # ------------------------------------------------------------------ segments
    def _prepare_member(self, ctx: MemberContext[SourceState]) -> SourceState:
        return SourceState(self._build_segments(ctx))

    def _build_segments(self, ctx: MemberContext[SourceState]) -> list[_Segment]:
        cfg = self.config
        ckpts: list[Checkpoint | None] = list(ctx.checkpoints)
        states = ctx.states
        steps = [0 if c is None else c.step for c in ckpts]
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ConfigError(
                f"Source needs checkpoints in training order with increasing steps; member "
                f"{ctx.index} has steps {steps}."
            )
        kinds = sorted({c.optimizer for c in ckpts if c is not None} - set(_SGD_KINDS))
        if kinds:
            warn(
                f"Source's closed form models SGD updates; member {ctx.index}'s checkpoints were "
                f"recorded with optimizer {kinds}. Scores follow the SGD model of the run.",
                AccuracyWarning,
            )
        scale = 1.0 / (1.0 - cfg.momentum)
        n = self._n_train
        if steps[-1] == 0:
            if cfg.horizon is None:
                raise ConfigError(
                    f"Source needs the training trajectory, but member {ctx.index}'s checkpoints "
                    f"say no step was taken (steps {steps}). Pass Task(checkpoints=[Checkpoint("
                    "state, step=..., learning_rate=...), ...]) (see "
                    "datatrace.recording.CheckpointRecorder), or set horizon= (the summed "
                    "learning rate η·T of one segment at the final weights)."
                )
            last = ckpts[-1]
            indices = None if last is None else last.train_indices
            self._check_indices(indices, n)
            return [_Segment([(1.0, states[-1])], [(cfg.horizon, 1)], indices, 0, 0)]
        # Intervals (s_{j-1}, s_j], each closed by checkpoint j.
        intervals = []
        for j, (c, s) in enumerate(zip(ckpts, steps)):
            assert c is not None
            k = s - (steps[j - 1] if j > 0 else 0)
            if k == 0:  # a checkpoint of the initial weights closes no step
                continue
            sample = states[j] if cfg.anchor == "end" else states[max(j - 1, 0)]
            self._check_indices(c.train_indices, n)
            intervals.append((sample, c.learning_rate * scale, k, c.train_indices, s))
        groups = self._group(intervals, ctx.index)
        segments = []
        for group in groups:
            total = sum(iv[2] for iv in group)
            samples = [(iv[2] / total, iv[0]) for iv in group]
            if cfg.fast:
                samples = [(1.0, _average_state(samples))]
            schedule = [(iv[1], iv[2]) for iv in group]
            first = group[0][4] - group[0][2]
            segments.append(_Segment(samples, schedule, group[0][3], first, group[-1][4]))
        return segments

    def _group(self, intervals: list[Any], member: int) -> list[list[Any]]:
        count = self.config.segments
        m = len(intervals)
        if count is None:
            chunks = [[iv] for iv in intervals]
        else:
            if count > m:
                raise ConfigError(
                    f"segments={count} but member {member}'s trajectory has only {m} checkpoint "
                    f"interval(s) with steps; use segments <= {m} or record more checkpoints."
                )
            bounds = [round(i * m / count) for i in range(count + 1)]
            chunks = [intervals[a:b] for a, b in itertools.pairwise(bounds)]
        out = []
        for chunk in chunks:  # a change of training indices starts a new segment
            current = [chunk[0]]
            for iv in chunk[1:]:
                if iv[3] != current[-1][3]:
                    out.append(current)
                    current = []
                current.append(iv)
            out.append(current)
        return out

    @staticmethod
    def _check_indices(indices: tuple[int, ...] | None, n: int) -> None:
        if indices is None:
            return
        if not indices:
            raise DataError(
                "a checkpoint's train_indices is empty; a stage trains on >= 1 example."
            )
        if max(indices) >= n or min(indices) < 0:
            raise DataError(
                f"a checkpoint's train_indices reach {max(indices)} (min {min(indices)}) but the "
                f"training set passed to fit() has {n} examples; indices must lie in [0, {n})."
            )

    # ------------------------------------------------------------------ featurization
    def _train_features(self, ctx: MemberContext[SourceState], batch: Batch) -> torch.Tensor:
        parts = []
        for seg in ctx.fitted.segments:
            (w0, s0), *rest = seg.samples
            g = w0 * self._features(ctx, batch, "loss", s0)
            for w, state in rest:
                g = g + w * self._features(ctx, batch, "loss", state)
            parts.append(g)
        return torch.cat(parts, 1)

    def _fit_member(self, ctx: MemberContext[SourceState]) -> SourceState:
        cfg = self.config
        segments = ctx.fitted.segments
        masks, counts = [], []
        spectra: list[Spectrum] = []
        for seg in segments:
            data = self._train if seg.indices is None else _take(self._train, seg.indices)
            spectrum: Spectrum
            if cfg.curvature in ("ggn", "hessian"):
                op_cls = GGNOperator if cfg.curvature == "ggn" else HessianOperator
                spectrum = dense_spectrum(
                    op_cls, ctx.task, data, seg.samples, cfg.batch_size, cfg.progress
                )
            else:
                spectrum = kfac_spectrum(
                    ctx.task,
                    data,
                    seg.samples,
                    cfg.curvature,
                    cfg.fisher,
                    cfg.batch_size,
                    cfg.seed,
                    cfg.progress,
                )
            spectra.append(spectrum)
            mask = torch.ones(self._n_train, dtype=ctx.task.working_dtype, device=ctx.task.device)
            if seg.indices is not None:
                mask = torch.zeros_like(mask)
                mask[list(seg.indices)] = 1.0
            masks.append(mask)
            counts.append(num_examples(data))
        return replace(
            ctx.fitted,
            spectra=spectra,
            masks=torch.stack(masks),  # (L, n_train)
            counts=counts,
            full=all(seg.indices is None for seg in segments),
        )

    def _transform_queries(self, ctx: MemberContext[SourceState], q: torch.Tensor) -> torch.Tensor:
        segments = ctx.fitted.segments
        spectra, _, counts = ctx.fitted.fitted_parts()
        lam = float(self.config.damping)
        unroll = self.config.unroll
        v = q
        out: list[torch.Tensor] = []
        for j in reversed(range(len(segments))):
            spectrum, sched, n_seg = spectra[j], segments[j].schedule, counts[j]
            out.append(spectrum.apply(v, _shifted(response, lam, sched, unroll)) / n_seg)
            v = spectrum.apply(v, _shifted(propagation, lam, sched, unroll))
        return torch.cat(out[::-1], 1)

    def _combine(
        self, ctx: MemberContext[SourceState], q: torch.Tensor, train: torch.Tensor, start: int
    ) -> torch.Tensor:
        if ctx.fitted.full:
            return q @ train.T
        masks = ctx.fitted.fitted_parts()[1][:, start : start + train.shape[0]]
        n_seg = masks.shape[0]
        out = q.new_zeros(q.shape[0], train.shape[0])
        for qq, tt, m in zip(q.chunk(n_seg, 1), train.chunk(n_seg, 1), masks):
            out += (qq @ tt.T) * m
        return out

    def _self_scores(
        self, ctx: MemberContext[SourceState], train: torch.Tensor, start: int
    ) -> torch.Tensor:
        # The query side of a training example is its query-objective gradient at the final
        # weights, not its (segment-averaged) training features.
        rows = _take(self._train, torch.arange(start, start + train.shape[0]))
        if isinstance(rows, Dataset):  # a map-style dataset: collate the rows into one batch
            rows = next(iter(DataLoader(rows, batch_size=train.shape[0], shuffle=False)))
        q = self._transform_queries(ctx, self._query_features(ctx, rows))
        masks = ctx.fitted.fitted_parts()[1][:, start : start + train.shape[0]]
        n_seg = masks.shape[0]
        out = train.new_zeros(train.shape[0])
        for qq, tt, m in zip(q.chunk(n_seg, 1), train.chunk(n_seg, 1), masks):
            out += (qq * tt).sum(1) * m
        return out

    def attribute_per_module(self, queries: Any) -> dict[str, Scores]:
        """``{module: Scores}``: each module's term of the scores; they sum to :meth:`attribute`.

        Each segment's term ``(P ⋯ ∇f_q)ᵀ R_ℓ ḡ_{m,ℓ}`` is split by parameter; with K-FAC/EK-FAC
        (block-diagonal over layers) a module's term is Source computed with that module's
        parameters alone.
        """
        self._check_fitted()
        # the loop gives Source flat gradients (its config refuses projectors): split by parameter
        params = self.task.tracked_params()
        sizes = [p.numel() for p in params.values()]
        base = module_param_spans(list(params), sizes)
        dim = sum(sizes)
        spans = [  # one flat parameter vector per segment; members may differ in segments
            {
                m: [slice(sl.start + j * dim, sl.stop + j * dim) for j in range(n) for sl in sls]
                for m, sls in base.items()
            }
            for n in (len(ctx.fitted.segments) for ctx in self._contexts)
        ]
        return per_module_scores(self, queries, spans)

    def attribute_per_token(self, queries: Any) -> torch.Tensor:
        """``(n_query, T, n_units)`` scores per predicted query token (language models); they
        sum over tokens to :meth:`attribute`. See :func:`datatrace.methods.per_module.per_token_scores`."""
        return per_token_scores(self, queries)

    def segment_summary(self, member: int = 0) -> list[dict[str, Any]]:
        """The segments of a fitted member: steps, ``η K``, checkpoints and examples used."""
        self._check_fitted()
        ctx = self._contexts[member]
        return [
            {
                "steps": (seg.first_step, seg.last_step),
                "lr_steps": sum(lr * k for lr, k in seg.schedule),
                "checkpoints": len(seg.schedule),
                "examples": n,
            }
            for seg, n in zip(ctx.fitted.segments, ctx.fitted.fitted_parts()[2])
        ]
